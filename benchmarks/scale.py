"""Scale: feature extraction over 1 and 2 processes (torchrun, gloo), the distributed path's cost at 1 process
against the plain path, and the figures the paper estimate in docs/scale.md is built from.

    PYTHONPATH=src python benchmarks/scale.py ../shared/datasets/hymenoptera_data --rounds 3

Each round trains (1 epoch, default backbone efficientnet_lite0, its default engine) with a fresh feature cache
three ways, in rotated order: the plain command, ``torchrun --nproc-per-node 1`` and ``torchrun --nproc-per-node
2``; the ONNX graph is exported by a warm-up run and shared, and every run extracts every image. Extraction figures
come from the runs' own log lines, fit seconds from their ``data.json``. Then, in this process: cache bytes per
image per backbone, the cache read rate, head-training time and memory per image on synthetic features, and the
data set index's memory per image. Prints one table and a markdown copy; on a shared machine only the ratios
within one run mean much.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROWS: list[tuple[str, str, str]] = []


def row(measure: str, value: str, note: str = "") -> None:
    ROWS.append((measure, value, note))
    print(f"  {measure:<58} {value:>14}  {note}", file=sys.stderr, flush=True)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(mode: str, data: Path, work: Path, backbone: str) -> dict:
    """One 1-epoch training with a fresh cache; returns its extraction and fit figures."""
    cache, out = work / f"cache-{mode}", work / f"run-{mode}"
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    cache.mkdir(parents=True)  # the ONNX graph is kept beside it, in work/onnx: exported by the first run only
    argv = ["-m", "headstart", "train", str(data), "--out", str(out), "--cache", str(cache), "--epochs", "1",
            "--backbone", backbone]
    if mode == "plain":
        cmd = [sys.executable, *argv]
    else:
        n = mode.split("-")[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", n, "--master-addr", "127.0.0.1",
               "--master-port", str(_port()), *argv]
    env = os.environ | {"GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
    log = done.stderr
    report = json.loads((out / "data.json").read_text())
    result = {"wall": wall, "fit": report["seconds"]["total"]}
    spread = re.search(r"extraction over \d+ ranks: (\d+) images through the backbone, \d+ from the cache "
                       r"\(([\d.]+) s\)", log)
    reads = [(int(n), int(c), int(h), float(t)) for n, c, h, t in
             re.findall(r"(?:train|val) features: (\d+) images, (\d+) through the backbone, (\d+) from the cache "
                        r"\(([\d.]+) s\)", log)]
    if spread:
        result["extracted"], result["extract_s"] = int(spread[1]), float(spread[2])
        result["read_s"] = sum(t for *_, t in reads)
        result["read_n"] = sum(h for _, _, h, _ in reads)
    else:
        result["extracted"], result["extract_s"] = sum(c for _, c, _, _ in reads), sum(t for *_, t in reads)
    result["cache_bytes"] = sum(p.stat().st_size for p in cache.rglob("*.safetensors"))
    return result


def cache_figures() -> None:
    """Bytes per image in the cache, per backbone: the averages a frozen averaging head keeps, the whole map a
    flattening head keeps, and the boundary maps fine-tuning keeps (per view)."""
    from headstart.backbones.base import create_backbone
    from headstart.cache import entry_bytes
    from headstart.training.finetune import split_backbone

    for name, size in (("efficientnet_lite0", None), ("efficientnet_lite1", None), ("efficientnet_lite2", None),
                       ("vgg16", 150), ("vgg16", 224)):
        bb = create_backbone(name, weights=None, input_size=size)
        shape = bb.feature_shape
        lower, _ = split_backbone(bb, bb.entry.finetune_groups)
        label = f"{name}@{bb.data_config.input_size[0]}"
        row(f"cache per image, {label}: averages {shape[0]}", f"{entry_bytes((shape[0],)) / 1e3:.1f} kB")
        row(f"cache per image, {label}: maps {'x'.join(map(str, shape))}", f"{entry_bytes(shape) / 1e3:.1f} kB")
        row(f"cache per image per view, {label}: fine-tune boundary {'x'.join(map(str, lower.feature_shape))}",
            f"{entry_bytes(lower.feature_shape) / 1e3:.1f} kB")


def head_figures(n: int, width: int) -> None:
    """Head training on ``n`` synthetic feature vectors of ``width``: seconds per epoch and the memory it holds."""
    import torch

    from headstart.config import HeadConfig, TrainConfig
    from headstart.heads import Head
    from headstart.training.head import fit_head

    g = torch.Generator().manual_seed(0)
    # a first optimizer imports torch._dynamo (seconds): paid here, not in the timed run
    fit_head(Head(HeadConfig("avg"), (width,), 10), [torch.randn(64, width)], torch.arange(64) % 10,
             config=TrainConfig(epochs=1), progress=False)
    y = torch.randint(0, 10, (n,), generator=g)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    x = torch.randn(n, width, generator=g) + y[:, None].float() * 0.1
    xv, yv = x[: n // 10].clone(), y[: n // 10].clone()
    head = Head(HeadConfig("avg"), (width,), 10)
    t0 = time.perf_counter()
    history = fit_head(head, [x], y.numpy(), xv, yv.numpy(), TrainConfig(epochs=2, batch_size=256), progress=False)
    per_epoch = (time.perf_counter() - t0) / len(history)
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    row(f"head training, {n} x {width} features: s per epoch", f"{per_epoch:.2f} s",
        f"{per_epoch / n * 1e6:.1f} us per image")
    row(f"head training, {n} x {width} features: peak memory added", f"{peak / 1e6:.0f} MB",
        f"{peak / n:.0f} B per image; the features alone {4 * width} B")


def index_figures(n: int = 100_000) -> None:
    """Memory of a data set's sample list, per image: file paths, and tar shard members."""
    from headstart.data.shards import ShardMember

    for kind in ("files", "shards"):
        tracemalloc.start()
        if kind == "files":
            samples = [(Path(f"/data/photos/train/class_{i % 100:03d}/IMG_{i:08d}.jpg"), i % 100) for i in range(n)]
        else:
            shard = "/data/shards/train-000000.tar"
            samples = [(ShardMember(shard, f"{i:08d}.jpg", 512 * i, 100_000), i % 100) for i in range(n)]
        size, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        row(f"data set index per image ({kind})", f"{size / n:.0f} B", f"{n} samples")
        del samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="a data set (e.g. ../shared/datasets/hymenoptera_data)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--skip-runs", action="store_true", help="only the in-process figures")
    args = p.parse_args()
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="headstart-scale-"))
    try:
        if not args.skip_runs:
            runs(args, work)
        cache_figures()
        head_figures(100_000, 1280)
        head_figures(20_000, 8192)
        index_figures()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}", file=sys.stderr)
    print("\n| measure | value | note |\n|---|---|---|")
    for m, v, n in ROWS:
        print(f"| {m} | {v} | {n} |")


def runs(args, work: Path) -> None:
    warm = train("plain", args.data, work, args.backbone)  # also exports the ONNX graph, once
    modes = ["plain", "torchrun-1", "torchrun-2"]
    got: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for m in modes[r % 3:] + modes[:r % 3]:
            got[m].append(train(m, args.data, work, args.backbone))
            print(f"  round {r + 1} {m}: {got[m][-1]}", file=sys.stderr, flush=True)
    images = warm["extracted"]
    med = {m: {k: statistics.median(x[k] for x in got[m]) for k in got[m][0]} for m in modes}
    for m in modes:
        rates = [x["extracted"] / x["extract_s"] for x in got[m]]
        row(f"extraction, {m} ({images} images)", f"{statistics.median(rates):.1f} img/s",
            f"median of {len(rates)}; range {min(rates):.1f}-{max(rates):.1f}")
    for m in modes[1:]:
        ratios = [b["fit"] / a["fit"] for a, b in zip(got["plain"], got[m])]
        row(f"fit seconds, {m} / plain (same round)", f"{statistics.median(ratios):.3f}",
            f"per round: {', '.join(f'{x:.3f}' for x in ratios)}")
        ratios = [b["extract_s"] / a["extract_s"] for a, b in zip(got["plain"], got[m])]
        row(f"extraction seconds, {m} / plain (same round)", f"{statistics.median(ratios):.3f}",
            f"per round: {', '.join(f'{x:.3f}' for x in ratios)}")
    for m in modes:
        row(f"fit seconds, {m}", f"{med[m]['fit']:.1f} s", f"wall with start-up {med[m]['wall']:.1f} s")
    reads = [x["read_n"] / x["read_s"] for m in modes[1:] for x in got[m] if x.get("read_s")]
    if reads:
        row("cache read after the spread extraction", f"{statistics.median(reads):.0f} img/s",
            "rank 0 reads every feature back")
    row("cache on disk per image (this backbone, its head's entries)",
        f"{med['plain']['cache_bytes'] / images / 1e3:.2f} kB", f"{images} images")


if __name__ == "__main__":
    main()
