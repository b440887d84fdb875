"""Do the heatmaps point at the evidence? Each CAM method at the last feature map and one resolution finer, side
by side on the same trained model (issue 14; the slow test in tests/test_explain.py checks the default).

    PYTHONPATH=src python benchmarks/heatmaps.py efficientnet_lite0 vgg16 --vgg16-weights ../shared/weights/vgg16_imagenet_notop.safetensors

The data are the test's: grey textured images, the class decided by a red or blue square of 1/5 of the side at a
random place; a frozen average-pooling head is trained on the test's 14 + 4 images per class, and the held-out
images here are drawn with another seed. "inside" counts images whose heatmap maximum lies in the square.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import headstart  # noqa: E402
import headstart.explain as explain_module  # noqa: E402
from headstart.explain import _POOLS, _cam_class, _heatmaps, _read, target_layer  # noqa: E402
from test_explain import _PATCH_COLOURS, _patch_data, _patch_image  # noqa: E402

METHODS = ("gradcam", "hirescam", "layercam")


def _layers(model) -> list[tuple[str, torch.nn.Module, tuple[int, int]]]:
    """The last 4-D module (pools passed over) and the default target, with their map sizes, from one probe."""
    seen: list[tuple[torch.nn.Module, tuple[int, int]]] = []
    hooks = [m.register_forward_hook(lambda mod, _i, o: seen.append((mod, tuple(o.shape[-2:])))
                                     if isinstance(o, torch.Tensor) and o.ndim == 4 and not isinstance(mod, _POOLS)
                                     else None)
             for m in model.backbone.body.modules() if not list(m.children())]
    with torch.inference_mode():
        model.backbone(torch.zeros(1, 3, *model.data_config.input_size))
    for h in hooks:
        h.remove()
    chosen = target_layer(model)
    size = next(s for m, s in seen if m is chosen)
    return [("last map", *seen[-1]), ("one finer (default)", chosen, size)]


def _maps(model, method, layer, x, smooth=True):
    """The maps ``headstart.explain`` makes, at ``layer`` with ``method``, for the predicted classes; with
    ``smooth=False``, the upsampled maps as the grad-cam package returns them (before headstart's smoothing)."""
    keep = explain_module._smooth
    if not smooth:
        explain_module._smooth = lambda heat, _cells: np.clip(np.nan_to_num(heat.astype(np.float32)), 0.0, 1.0)
    try:
        out = []
        for s in range(0, len(x), 8):
            out += _heatmaps(model, layer, _cam_class(method), x[s:s + 8], None)[0]
        return out
    finally:
        explain_module._smooth = keep


def _inside(maps, boxes, side) -> float:
    inside = 0
    for heat, (x0, y0, x1, y1) in zip(maps, boxes):
        y, xx = np.unravel_index(int(heat.argmax()), heat.shape)
        inside += x0 <= (xx + .5) * side / heat.shape[1] < x1 and y0 <= (y + .5) * side / heat.shape[0] < y1
    return inside / len(maps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("backbones", nargs="+")
    ap.add_argument("--vgg16-weights")
    ap.add_argument("--side", type=int, default=160)
    ap.add_argument("--held-out", type=int, default=30, help="per class")
    ap.add_argument("--seed", type=int, default=8)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="heatmaps-"))
    _patch_data(work / "data", args.side)
    rng = np.random.default_rng(args.seed)
    boxes = {}
    for name, colour in _PATCH_COLOURS.items():
        for i in range(args.held_out):
            path = work / "held" / f"{name}_{i}.png"
            boxes[path] = _patch_image(path, colour, args.side, rng)
    print(f"Held-out: {len(boxes)} images (seed {args.seed}). 'raw': the grad-cam package's upsampled map; "
          "'smoothed': headstart's (a Gaussian of one cell, zero outside the picture). 'another square': the "
          "smoothed maps scored against another image's square (chance, with the smoothing's pull to the middle).")
    print()
    print("| backbone | layer | map | method | inside: raw | inside: smoothed | another square | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    shuffled = list(boxes.values())[1:] + list(boxes.values())[:1]
    for name in args.backbones:
        kw = {"weights": args.vgg16_weights} if name == "vgg16" and args.vgg16_weights else {}
        clf = headstart.ImageClassifier(backbone=name, input_size=args.side, head="avg", progress=False, **kw)
        clf.fit(work / "data")
        model = clf.model_.eval()
        x = torch.stack([_read(p, p.name, model)[1] for p in boxes])
        names = {m: n for n, m in model.backbone.body.named_modules()}
        for where, layer, size in _layers(model):
            for method in METHODS:
                raw = _maps(model, method, layer, x, smooth=False)
                t = time.perf_counter()
                smoothed = _maps(model, method, layer, x)
                seconds = time.perf_counter() - t
                print(f"| {name} | {where}: `{names.get(layer)}` | {size[0]}x{size[1]} | {method} | "
                      f"{_inside(raw, boxes.values(), args.side):.3f} | {_inside(smoothed, boxes.values(), args.side):.3f} | "
                      f"{_inside(smoothed, shuffled, args.side):.3f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
