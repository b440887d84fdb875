"""End-to-end extraction with the decoders reading ahead vs taking turns with the engine, per engine, side by side.

    PYTHONPATH=src python benchmarks/turns.py ../shared/datasets/hymenoptera_data/train --rounds 8

Each round measures the engine's backbone-only rate (batches from memory, as many images as the folder has),
then extracts the folder into a fresh cache once per pipeline mode (order alternating), and prints each ratio
to that round's backbone-only rate. The medians over rounds decide the engine's ``read_ahead`` default.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from headstart.backbones.base import create_backbone
from headstart.engines import TorchRunner, make_runner, run_batches
from headstart.features import FeatureCache, extract_features
from headstart.predict import collect_images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--backbone", default="efficientnet_lite0@224")
    p.add_argument("--engines", nargs="*", default=["torch", "onnx"])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    name, size = args.backbone.split("@")
    paths = collect_images([args.folder])
    bb = create_backbone(name, "imagenet", int(size)).freeze().eval()
    root = Path(tempfile.mkdtemp(prefix="headstart-bench-"))
    runners = {"torch": TorchRunner(bb.body), "onnx": make_runner(bb, "onnx", cache=FeatureCache(root / "f"))}
    x = torch.randn(args.batch_size, 3, *bb.data_config.input_size)
    reps = max(1, len(paths) // len(x))
    ratios: dict[tuple[str, str], list[float]] = {}
    try:
        for r in range(args.rounds):
            for engine in args.engines:
                runner = runners[engine]
                runner(x)
                time.sleep(0.3)
                t = time.perf_counter()
                for _ in run_batches(runner, ((list(range(len(x))), x) for _ in range(reps))):  # as extraction runs it
                    pass
                backbone = reps * len(x) / (time.perf_counter() - t)
                line = f"round {r} {engine}: backbone only {backbone:.1f} img/s"
                for mode in (("ahead", "turns") if r % 2 == 0 else ("turns", "ahead")):
                    runner.read_ahead = mode == "ahead"  # the instance's setting hides the class default
                    time.sleep(0.3)
                    cache = FeatureCache(Path(tempfile.mkdtemp(dir=root)) / "features")
                    t = time.perf_counter()
                    ex = extract_features(bb, paths, cache, runner=runner, batch_size=args.batch_size, progress=False)
                    rate = ex.computed / (time.perf_counter() - t)
                    ratios.setdefault((engine, mode), []).append(rate / backbone)
                    line += f" | {mode} {rate:.1f} img/s ({rate / backbone:.2f}x)"
                    shutil.rmtree(cache.root.parent)
                del runner.read_ahead
                print(line, file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{args.backbone}, {len(paths)} images, {args.rounds} rounds: end to end / backbone only, same round")
    print("| engine | decoders | median | min | max |\n|---|---|---|---|---|")
    for (engine, mode), v in sorted(ratios.items()):
        print(f"| {engine} | {mode} | {np.median(v):.3f} | {min(v):.2f} | {max(v):.2f} |")


if __name__ == "__main__":
    main()
