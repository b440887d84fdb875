"""Speed of feature extraction, prediction and frozen training, measured side by side in one run.

    PYTHONPATH=src python benchmarks/speed.py ../shared/datasets/hymenoptera_data \
        --vgg-weights ../shared/weights/vgg16_imagenet_notop.safetensors

IMAGE_FOLDER is a class-folder tree (``train/`` and ``val/`` inside are used for the training comparison
when present). Prints one table; the figures are only comparable within one run, and on a shared machine
only their ratios mean much. Flags shrink every part for a quick look (``--quick``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from headstart.backbones import registry
from headstart.backbones.base import create_backbone
from headstart.data.datasets import load_dataset
from headstart.data.images import load_image
from headstart.data.pipeline import decoded_batches, default_decode_threads
from headstart.data.transforms import EvalTransform, decode_size
from headstart.engines import OnnxRunner, TorchRunner, backbone_onnx_path, make_runner, run_batches
from headstart.errors import ImageReadError
from headstart.features import FeatureCache, default_threads, extract_features
from headstart.predict import Predictor, collect_images

ROWS: list[tuple[str, str, str, str]] = []


def row(backbone: str, measure: str, value: str, note: str = "") -> None:
    ROWS.append((backbone, measure, value, note))
    print(f"  {backbone:<24} {measure:<46} {value:>12}  {note}", file=sys.stderr, flush=True)


def images_in(folder: Path) -> list[Path]:
    return collect_images([folder])


def repeated(paths: list[Path], n: int, out: Path, distinct: bool) -> list[Path]:
    """``n`` image files in ``out`` cycling through ``paths``: symlinks, or copies with a distinct trailing
    byte string (JPEG decoders ignore bytes after the end marker) so each has its own cache entry."""
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for i in range(n):
        src = paths[i % len(paths)]
        dst = out / f"{i:06d}_{src.name}"
        if distinct:
            dst.write_bytes(src.read_bytes() + f"headstart-bench-{i}".encode())
        else:
            dst.symlink_to(src.resolve())
        made.append(dst)
    return made


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t, out


def matmul_gflops(n: int = 4096, reps: int = 3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return best


def gflop_per_image(body: torch.nn.Module, size: tuple[int, int]) -> float:
    body = copy.deepcopy(body).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        body(torch.zeros(1, 3, *size))
    return counter.get_total_flops() / 1e9


def passes(runner, x: torch.Tensor, reps: int) -> None:
    """``reps`` backbone passes over the batch ``x`` the way extraction runs them (an engine's lanes included)."""
    for _ in run_batches(runner, ((list(range(len(x))), x) for _ in range(reps))):
        pass


def bench_backbone(name, size, weights, paths, args, cache_root: Path, mm: float) -> dict:
    bb = create_backbone(name, weights, size).freeze().eval()
    label = f"{name}@{size}"
    cfg = bb.data_config
    n = min(args.images, len(paths))
    sample = paths[:n]
    # decode only: the pipeline with its default thread count, no backbone
    threads = default_decode_threads(default_threads())
    t, _ = timed(lambda: sum(len(i) for i, _, _ in decoded_batches(sample, range(n), EvalTransform(cfg),
                                                                  args.batch_size, min_size=decode_size(cfg),
                                                                  threads=threads)))
    row(label, f"decode + resize only ({threads} threads)", f"{n / t:.1f} img/s")
    c0 = time.process_time()
    for _ in decoded_batches(sample, range(n), EvalTransform(cfg), args.batch_size, min_size=decode_size(cfg),
                             threads=1):
        pass
    cpu_input = (time.process_time() - c0) / n
    x = torch.randn(args.batch_size, 3, *cfg.input_size)
    eager_body = copy.deepcopy(bb.body).eval()

    def eager(t):
        with torch.inference_mode():
            return eager_body(t)

    torch.set_num_threads(default_threads())
    cache = FeatureCache(cache_root / "features")
    onnx_file = backbone_onnx_path(bb, cache)
    import onnxruntime as ort

    plain = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])  # ORT defaults
    default = make_runner(bb, "auto", args.batch_size, cache=cache)
    torch_runner = TorchRunner(copy.deepcopy(bb.body).eval())
    raw = lambda t: plain.run(None, {plain.get_inputs()[0].name: t.numpy()})  # noqa: E731
    torch_e2e = TorchRunner(copy.deepcopy(bb.body).eval())

    def e2e(runner, part, pool=None):
        ex_cache = FeatureCache(Path(tempfile.mkdtemp(dir=cache_root)) / "features")
        time.sleep(0.5)  # like each backbone-only contestant: no threads left spinning by the one before
        t, ex = timed(extract_features, bb, part, ex_cache, runner=runner, batch_size=args.batch_size,
                      progress=False, pool=pool)
        shutil.rmtree(ex_cache.root.parent)
        return ex.computed / t

    # what `headstart train` extracts for the backbone's default head: for an averaging head, averages (in
    # memory and in the cache)
    head_pool = "avg" if registry.get(name).default_head == "avg" else None

    # every measure once per round, rounds interleaved, best round kept: load from other jobs on a shared
    # machine drifts over minutes, and this keeps it out of the ratios
    # the onnx engine before it ran in lanes: one run at a time on every core
    one_run = OnnxRunner(onnx_file, lanes=1)
    fns = {"eager": eager, "torch": torch_runner, "raw_ort": raw, "onnx_one_run": one_run, "default": default}
    for f in fns.values():
        f(x[:2])
        f(x)
    rounds = {k: [] for k in list(fns) + ["e2e_torch", "e2e_onnx_one_run", "e2e_default", "e2e_default_avg"]}
    # each backbone-only rate over as many images as an end-to-end round extracts: a rate from one batch
    # (128 images over 3 rounds, as before) swung by 25% between rounds, and its best round made the ratio
    reps = max(1, (args.backbone_images or n) // len(x))
    order = list(fns)
    for k in range(args.rounds):
        # a session whose threads still spin after returning (raw ORT, torch's OpenMP team) slows whatever runs
        # right after it: each contestant starts after a pause, and the order alternates direction and rotates,
        # so no contestant always follows the same one (a rotation alone kept the default engine behind raw ORT)
        turn = order[k % len(order):] + order[:k % len(order)]
        for name_ in (turn if k % 2 == 0 else turn[::-1]):
            f = fns[name_]
            time.sleep(0.5)
            t = time.perf_counter()
            passes(f, x, reps)
            rounds[name_].append(reps * len(x) / (time.perf_counter() - t))
        # every round extracts the whole sample into a fresh cache, as a training run does with its images
        rounds["e2e_torch"].append(e2e(torch_e2e, sample))
        rounds["e2e_onnx_one_run"].append(e2e(one_run, sample))
        rounds["e2e_default"].append(e2e(default, sample))
        if head_pool:
            rounds["e2e_default_avg"].append(e2e(default, sample, head_pool))
    r = {k: max(v, default=0.0) for k, v in rounds.items()}
    print(f"  {label} per round (img/s): " + "; ".join(f"{k} " + "/".join(f"{x:.1f}" for x in v)
                                                    for k, v in rounds.items() if v), file=sys.stderr)

    def paired(e2e_key, backbone_key):
        """End to end over backbone-only as measured in the same round (median over rounds): the best of each
        alone divides two maxima of noisy rates, and the backbone-only rate swung by 10-20% between rounds."""
        return float(np.median([e / b for e, b in zip(rounds[e2e_key], rounds[backbone_key])]))
    c0 = time.process_time()
    passes(default, x, reps)
    cpu_backbone = (time.process_time() - c0) / (reps * len(x))
    # storing the maps (and the averages, for an averaging head), as the cache writer does during extraction:
    # new shard files, one per batch part
    feats = default(x).numpy()

    def store_cpu(arr):
        store = FeatureCache(Path(tempfile.mkdtemp(dir=cache_root)) / "features")
        c0 = time.process_time()
        for k in range(reps):
            store.put_many("bench", [f"{k:08d}{j:024d}" for j in range(len(arr))], arr)
        cpu = (time.process_time() - c0) / (reps * len(arr))
        shutil.rmtree(store.root.parent)
        return cpu

    cpu_store = store_cpu(feats)
    cpu_store_avg = store_cpu(feats.mean(axis=(-2, -1), dtype=np.float32)) if head_pool else None
    gf = gflop_per_image(bb.body, cfg.input_size)
    row(label, "GFLOP per image (FlopCounterMode)", f"{gf:.2f}")
    row(label, "backbone only: torch eager NCHW", f"{r['eager']:.1f} img/s")
    row(label, "backbone only: torch engine (channels-last)", f"{r['torch']:.1f} img/s",
        f"{r['torch'] / r['eager']:.2f}x eager")
    row(label, "backbone only: raw ONNX Runtime (default opts)", f"{r['raw_ort']:.1f} img/s",
        f"{r['raw_ort'] / r['eager']:.2f}x eager")
    row(label, "backbone only: onnx engine, one run at a time", f"{r['onnx_one_run']:.1f} img/s",
        f"{r['onnx_one_run'] / r['raw_ort']:.2f}x raw ORT")
    lanes = getattr(default, "lanes", 1)
    row(label, f"backbone only: default engine ({default.engine}, {lanes} lanes)", f"{r['default']:.1f} img/s",
        f"{r['default'] / r['raw_ort']:.2f}x raw ORT (target >= 0.95)")
    achieved = r["default"] * gf
    row(label, "achieved GFLOP/s, default engine", f"{achieved:.1f}",
        f"{achieved / mm:.2f}x the 4096^2 matmul ({mm:.1f} GFLOP/s)")
    # the input pipeline's CPU is taken from the backbone's cores: with both at full use, end to end can reach
    # at most backbone / (backbone + input) of the backbone-only rate
    ceiling = lambda store: cpu_backbone / (cpu_backbone + cpu_input + store)  # noqa: E731
    row(label, "CPU per image: input pipeline (1 thread) / cache write of maps / default engine",
        f"{cpu_input * 1e3:.2f} / {cpu_store * 1e3:.2f} / {cpu_backbone * 1e3:.2f} ms",
        f"end-to-end ceiling at equal core use {ceiling(cpu_store):.2f}x ({ceiling(0.0):.2f}x without the cache "
        "write)")
    if head_pool:
        row(label, "CPU per image: cache write of averages (default head)", f"{cpu_store_avg * 1e3:.3f} ms",
            f"end-to-end ceiling {ceiling(cpu_store_avg):.2f}x")
    cases = [("torch engine (maps to cache)", "e2e_torch", "torch"),
             ("onnx, one run at a time (maps to cache)", "e2e_onnx_one_run", "onnx_one_run"),
             (f"default engine, {default.engine} in {lanes} lanes (maps to cache)", "e2e_default", "default")]
    if head_pool:
        cases.append(("default engine, default head (averages to cache)", "e2e_default_avg", "default"))
    for what, key, bkey in cases:
        row(label, f"end to end extraction, {what}", f"{r[key]:.1f} img/s",
            f"{r[key] / r[bkey]:.2f}x best backbone-only; {paired(key, bkey):.2f}x same round, median "
            "(target >= 0.8)")
    return {"bb": bb, "default": default}


def predict_child(name, size, weights, folder, how) -> None:
    """Run in a subprocess: predict every image in ``folder`` with ``how`` (``default`` engine or torch
    ``eager`` NCHW through the same predictor); print the seconds, the engine and the labels as JSON."""
    from headstart.heads import Head, HeadConfig
    from headstart.model import ImageModel

    torch.manual_seed(0)  # the same head in every child, so their labels can be compared
    bb = create_backbone(name, weights, size).freeze().eval()
    model = ImageModel(bb, Head(HeadConfig(pool="avg"), bb.feature_shape, 2), ["a", "b"]).eval()
    if how == "eager":
        torch.set_num_threads(default_threads())
        predictor = Predictor(model, runner=lambda t: bb.body(t))
    else:
        predictor = Predictor(model)
    t, rows = timed(predictor.predict, [Path(folder)])
    engine = "torch eager" if how == "eager" else predictor.runner.engine
    print(json.dumps({"seconds": t, "engine": engine, "labels": [r["label"] for r in rows]}))


def predict_compare(name, size, weights, paths, args, cache_root: Path) -> None:
    """Each predictor in its own process: headstart sets the C allocator for the whole process
    (``headstart.hardware``), so eager torch is timed both as plain torch runs it and with that setting."""
    folder = cache_root / "predict-images"
    files = repeated(paths, args.predict_images, folder, distinct=False)
    label = f"{name}@{size}"
    res = {}
    for key, how, env in (("default", "default", {}), ("eager", "eager", {"HEADSTART_MALLOC": "system"}),
                          ("eager_tuned", "eager", {})):
        time.sleep(1.0)
        cmd = [sys.executable, __file__, "--predict-child", name, str(size), str(weights), str(folder), how]
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | env)
        if out.returncode:
            row(label, f"predict {len(files)} images: {key}", "failed", out.stderr.strip()[-200:])
            return
        res[key] = json.loads(out.stdout.strip().splitlines()[-1])
    t_def = res["default"]["seconds"]
    for key, what in (("eager", "torch eager NCHW (glibc malloc defaults, as plain torch)"),
                      ("eager_tuned", "torch eager NCHW (headstart's malloc setting)")):
        t = res[key]["seconds"]
        agree = np.mean([a == b for a, b in zip(res["default"]["labels"], res[key]["labels"])])
        row(label, f"predict {len(files)} images: {what}", f"{t:.1f} s",
            f"{len(files) / t:.1f} img/s; default engine {t / t_def:.2f}x faster; labels agree {agree:.3f}")
    row(label, f"predict {len(files)} images: default engine ({res['default']['engine']})", f"{t_def:.1f} s",
        f"{res['eager']['seconds'] / t_def:.2f}x faster than plain eager (target >= 3)")
    shutil.rmtree(folder)


def rss_child(name, size, weights, folder, cache) -> None:
    """Run in a subprocess: extract every image in ``folder`` into ``cache``; print peak RSS as JSON."""
    bb = create_backbone(name, weights, size).freeze().eval()
    paths = images_in(Path(folder))
    t, ex = timed(extract_features, bb, paths, FeatureCache(cache), progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_rss": peak, "n": len(paths), "computed": ex.computed, "seconds": t,
                      "feature_bytes": ex.features.numel() * 4}))


def rss_compare(name, size, weights, paths, args, cache_root: Path) -> None:
    label = f"{name}@{size}"
    res = {}
    for n in args.rss_images:
        folder = cache_root / f"rss-{n}"
        repeated(paths, n, folder, distinct=True)
        cache = cache_root / f"rss-cache-{n}" / "features"
        cmd = [sys.executable, __file__, "--rss-child", name, str(size), str(weights), str(folder), str(cache)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if out.returncode:
            row(label, f"peak RSS extracting {n} images", "failed", out.stderr.strip()[-200:])
            continue
        res[n] = json.loads(out.stdout.strip().splitlines()[-1])
        res[n]["cache_bytes"] = sum(f.stat().st_size for f in cache.rglob("*.safetensors"))
        row(label, f"peak RSS extracting {n} images", f"{res[n]['peak_rss'] / 2**20:.0f} MiB",
            f"{res[n]['computed'] / res[n]['seconds']:.1f} img/s; cached features "
            f"{res[n]['cache_bytes'] / 2**20:.0f} MiB")
        shutil.rmtree(folder)
        shutil.rmtree(cache.parent)
    if len(res) == 2:
        small, big = sorted(res)
        bound = 1.5 * res[small]["peak_rss"] + res[big]["cache_bytes"]
        row(label, f"RSS({big}) / (1.5 x RSS({small}) + cached features)", f"{res[big]['peak_rss'] / bound:.2f}",
            "target <= 1.0")


def naive_train(name, size, weights, train: Path, val: Path, epochs: int, batch_size: int) -> float:
    """The loop a first attempt writes: decode every image and run the frozen base on every epoch."""
    from headstart.heads import Head, HeadConfig

    t0 = time.perf_counter()
    tr = load_dataset(train)
    va = load_dataset(val, tr.classes)
    bb = create_backbone(name, weights, size).freeze().eval()
    head = Head(HeadConfig(pool="avg"), bb.feature_shape, len(tr.classes))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    tf = EvalTransform(bb.data_config)
    g = torch.Generator().manual_seed(0)

    def batches(ds, order):
        for s in range(0, len(order), batch_size):
            xs, ys = [], []
            for i in order[s:s + batch_size]:
                try:
                    xs.append(tf(load_image(ds.paths[i])))
                    ys.append(int(ds.labels[i]))
                except ImageReadError:
                    continue
            if xs:
                yield torch.stack(xs), torch.tensor(ys)

    for _ in range(epochs):
        head.train()
        for x, y in batches(tr, torch.randperm(len(tr), generator=g).tolist()):
            with torch.no_grad():
                f = bb(x)
            loss = torch.nn.functional.cross_entropy(head(f), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            for x, y in batches(va, list(range(len(va)))):
                head(bb(x))
    return time.perf_counter() - t0


def train_compare(name, size, weights, folder: Path, args, cache_root: Path) -> None:
    import headstart

    train, val = folder / "train", folder / "val"
    if not train.is_dir():
        return
    label = f"{name}@{size}"
    clf = headstart.ImageClassifier(backbone=name, weights=weights, input_size=size, epochs=args.train_epochs,
                                    patience=args.train_epochs, cache=cache_root / "train-cache" / "features",
                                    progress=False)
    t_hs, _ = timed(clf.fit, train, val if val.is_dir() else None)
    # the naive loop as plain torch runs it (its own process, glibc's malloc defaults), and in this process,
    # where headstart's allocator setting also speeds up its eager passes
    cmd = [sys.executable, __file__, "--naive-child", name, str(size), str(weights), str(train), str(val),
           str(args.train_epochs), str(args.batch_size)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"HEADSTART_MALLOC": "system"})
    t_plain = float(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else float("nan")
    t_naive = naive_train(name, size, weights, train, val, args.train_epochs, args.batch_size)
    row(label, f"train {args.train_epochs} epochs: naive loop, plain torch (base every epoch)", f"{t_plain:.1f} s")
    row(label, f"train {args.train_epochs} epochs: naive loop, headstart's malloc setting", f"{t_naive:.1f} s")
    row(label, f"train {args.train_epochs} epochs: headstart frozen (cold cache)", f"{t_hs:.1f} s",
        f"{t_plain / t_hs:.2f}x / {t_naive / t_hs:.2f}x faster than the naive loops; val accuracy "
        f"{clf.metrics_.get('val', {}).get('accuracy', float('nan')):.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, nargs="?")
    p.add_argument("--vgg-weights", help="VGG16 notop weights file (default: the ImageNet lookup)")
    p.add_argument("--backbones", nargs="*", default=["vgg16@150", "efficientnet_lite0@224"])
    p.add_argument("--images", type=int, default=256, help="images for decode and end-to-end rates")
    p.add_argument("--backbone-images", type=int, help="images per backbone-only rate and round (default: --images)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per rate; the best is kept")
    p.add_argument("--predict-images", type=int, default=1000)
    p.add_argument("--predict-backbone", default="efficientnet_lite0@224")
    p.add_argument("--rss-images", type=int, nargs=2, default=[1000, 10000])
    p.add_argument("--rss-backbone", default="efficientnet_lite0@224")
    p.add_argument("--train-epochs", type=int, default=10)
    p.add_argument("--train-backbones", nargs="*", default=["vgg16@150", "efficientnet_lite0@224"])
    p.add_argument("--quick", action="store_true", help="small sizes everywhere (a smoke run)")
    p.add_argument("--rss-child", nargs=5, help=argparse.SUPPRESS)
    p.add_argument("--predict-child", nargs=5, help=argparse.SUPPRESS)
    p.add_argument("--naive-child", nargs=7, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child:
        name, size, weights, folder, cache = args.rss_child
        return rss_child(name, int(size), None if weights == "None" else weights, folder, cache)
    if args.naive_child:
        name, size, weights, train, val, epochs, batch = args.naive_child
        torch.set_num_threads(default_threads())
        return print(naive_train(name, int(size), None if weights == "None" else weights, Path(train), Path(val),
                                 int(epochs), int(batch)))
    if args.predict_child:
        name, size, weights, folder, how = args.predict_child
        return predict_child(name, int(size), None if weights == "None" else weights, folder, how)
    if args.folder is None:
        p.error("IMAGE_FOLDER is required")
    if args.quick:
        args.images, args.backbone_images, args.predict_images, args.rounds = 64, 64, 96, 2
        args.rss_images, args.train_epochs = [64, 256], 2

    def weights_for(name):
        return args.vgg_weights if name == "vgg16" and args.vgg_weights else "imagenet"

    def parse(spec):
        name, size = spec.split("@")
        return name, int(size), weights_for(name)

    paths = images_in(args.folder)
    cores = default_threads()
    print(f"{len(paths)} images in {args.folder}; {cores} cores; torch {torch.__version__}", file=sys.stderr)
    root = Path(tempfile.mkdtemp(prefix="headstart-bench-"))
    os.environ["HEADSTART_CACHE"] = str(root)
    t_start = time.perf_counter()
    try:
        torch.set_num_threads(cores)
        mm = matmul_gflops()
        row("-", "fp32 matmul 4096x4096 (torch)", f"{mm:.1f} GFLOP/s")
        for spec in args.backbones:
            bench_backbone(*parse(spec), paths, args, root, mm)
        if args.predict_backbone:
            predict_compare(*parse(args.predict_backbone), paths, args, root)
        if args.rss_backbone:
            rss_compare(*parse(args.rss_backbone), paths, args, root)
        for spec in args.train_backbones:
            train_compare(*parse(spec), args.folder, args, root)
        mm2 = matmul_gflops()
        row("-", "fp32 matmul 4096x4096 again (load drift)", f"{mm2:.1f} GFLOP/s", f"{mm2 / mm:.2f}x the first")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    w = [max(len(r[i]) for r in ROWS + [("backbone", "measure", "value", "")]) for i in range(3)]
    print(f"headstart speed benchmark: {args.folder}, {cores} cores, batch {args.batch_size}, "
          f"torch {torch.__version__}, {time.perf_counter() - t_start:.0f} s")
    print(f"| {'backbone':<{w[0]}} | {'measure':<{w[1]}} | {'value':>{w[2]}} | ratio / note |")
    print(f"|{'-' * (w[0] + 2)}|{'-' * (w[1] + 2)}|{'-' * (w[2] + 2)}|---|")
    for r in ROWS:
        print(f"| {r[0]:<{w[0]}} | {r[1]:<{w[1]}} | {r[2]:>{w[2]}} | {r[3]} |")


if __name__ == "__main__":
    main()
