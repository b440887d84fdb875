"""Heatmaps of where a trained model looked: Grad-CAM and its relatives (the ``grad-cam`` package) over a frozen
backbone, for the predicted or a named class.

    >>> clf = headstart.load("run")
    >>> [e] = explain(clf, ["ant.jpg"])
    >>> e.label, e.probability, e.heatmap.shape          # ('ants', 0.97, (224, 224))
    >>> overlay(e).save("ant.heatmap.png")

The target layer is found, not named: the last module of the backbone at the resolution before its last feature
map's (pooling layers passed over). The default method is LayerCAM; its maps at that layer, smoothed by a Gaussian
of one of the layer's cells, peak on the evidence. Gradients start at that layer's output, marked as needing them
for the explanation only; the frozen backbone's parameters are never touched. A run whose backbone normally runs
on ONNX Runtime is explained with the torch backbone from the same run's weights.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import PurePath
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from .backbones.concat import refuse_concatenation
from .config import EXPLAIN_METHODS
from .data.images import ImageSource, load_pixels, source_name
from .data.transforms import decode_size, resize_for, to_tensor
from .errors import ConfigError, HeadstartError
from .model import ImageModel

__all__ = ["Explanation", "explain", "overlay", "overlay_names", "target_layer", "EXPLAIN_METHODS"]

log = logging.getLogger("headstart")

# images per backward pass: a VGG16 at 224 px keeps about 60 MB of activations per image for the gradients
_BATCH = 8
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@dataclass
class Explanation:
    """One image's heatmap for one class.

    ``heatmap``: float32 ``(H, W)`` in [0, 1] at the model's input size (1 = the strongest evidence);
    ``image``: the RGB picture as the model saw it (resized and cropped); ``label`` and ``probability``: the
    class explained and the model's probability for it; ``source``: the image's name. An image that could not
    be read has ``error`` set and no heatmap or picture.
    """

    heatmap: np.ndarray | None
    image: Image.Image | None
    label: str | None
    probability: float | None
    source: str
    error: str | None = None


def _cam_class(method: str):
    import pytorch_grad_cam as gc

    classes = {"gradcam": gc.GradCAM, "gradcam++": gc.GradCAMPlusPlus, "xgradcam": gc.XGradCAM,
               "layercam": gc.LayerCAM, "hirescam": gc.HiResCAM, "eigencam": gc.EigenCAM}
    if method not in classes:
        raise ConfigError(f"unknown explanation method {method!r}; expected one of {', '.join(EXPLAIN_METHODS)} "
                          "(--method)")
    return classes[method]


def _image_model(model) -> ImageModel:
    """The torch ``ImageModel`` of a classifier (``headstart.load``'s) or the model itself."""
    if hasattr(model, "_check"):  # an ImageClassifier: trained, or a clear error
        model._check()
        model = model.model_
    if isinstance(model, ImageModel):
        refuse_concatenation(model.backbone, "headstart explain")
        return model
    if hasattr(model, "path") and hasattr(model, "backbone_identity"):  # an exported OnnxModel
        raise ConfigError(f"{model.path} is an exported ONNX model, which has no gradients to explain with; pass "
                          "the run folder it was exported from (it holds the torch weights)")
    raise ConfigError(f"explain takes a trained classifier (headstart.load(RUN)) or its ImageModel, got "
                      f"{type(model).__name__}")


def target_layer(model: ImageModel) -> nn.Module:
    """The module whose map is explained: the last one of the backbone at the resolution before its last feature
    map's (pooling layers passed over), or the last feature map when the backbone has one resolution only.

    Found by running a probe image through the backbone, so it works for any registered family: VGG's
    ``block4_conv3_relu``, EfficientNet-Lite's last activation at stride 16 (``blocks.5.0.bn1.act``), a timm
    ResNet's last one in ``layer3``. The last map's cells are 32 px (16 px for VGG, whose last pool
    is passed over) at 224 px, as large as the objects of a small-object data set; one step finer, LayerCAM's
    maps peak on the evidence itself (docs/explain.md).

    Raises:
        ConfigError: the backbone has no such module (a token model such as a ViT).
    """
    body = model.backbone.body
    order: list[tuple[nn.Module, tuple[int, int]]] = []

    def record(module, _inputs, output):
        if isinstance(output, torch.Tensor) and output.ndim == 4 and not isinstance(module, _POOLS):
            order.append((module, tuple(output.shape[-2:])))

    leaves = [m for m in body.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(record) for m in leaves]
    try:
        with torch.inference_mode():
            model.backbone(torch.zeros(1, 3, *model.data_config.input_size))
    finally:
        for h in hooks:
            h.remove()
    if not order:
        raise ConfigError(f"{model.backbone.name} has no module with a 4-D feature map to explain (a token "
                          "model?); explain works on convolutional backbones")
    last_size = order[-1][1]
    finer = [m for m, size in order if size[0] > last_size[0] and size[1] > last_size[1]]
    return finer[-1] if finer else order[-1][0]


def _class_index(model: ImageModel, target) -> int | None:
    if target is None:
        return None
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        if 0 <= int(target) < len(model.classes):
            return int(target)
    elif isinstance(target, str) and target in model.classes:
        return model.classes.index(target)
    raise ConfigError(f"class {target!r} is not one of this model's classes ({', '.join(model.classes)}); "
                      "give one of them (--class NAME) or none for the predicted class")


def _read(src: ImageSource, name: str, model: ImageModel) -> tuple[Image.Image, torch.Tensor]:
    cfg = model.data_config
    seen = resize_for(load_pixels(src, min_size=decode_size(cfg), name=name), cfg)
    return Image.fromarray(seen.permute(1, 2, 0).numpy()), to_tensor(seen, cfg)


def explain(model, sources: Sequence[ImageSource] | ImageSource, *, target: str | int | None = None,
            method: str = "layercam", names: Sequence[str] | None = None) -> list[Explanation]:
    """One ``Explanation`` per image in ``sources`` (paths, bytes, PIL pictures, arrays), in order.

    ``model``: what ``headstart.load(RUN)`` returns, or its ``ImageModel``. ``target``: the class to explain,
    by name or index (default: each image's predicted class). ``method``: one of ``EXPLAIN_METHODS``.
    Unreadable images get an ``Explanation`` with ``error`` set; they never stop the others.

    Raises:
        ConfigError: an unknown class or method, an exported ONNX model, a backbone without a feature map.
    """
    m = _image_model(model)
    cam_class = _cam_class(method)
    wanted = _class_index(m, target)
    if isinstance(sources, (str, bytes, Image.Image, np.ndarray)) or hasattr(sources, "__fspath__"):
        sources = [sources]
    sources = list(sources)
    names = list(names) if names is not None else [source_name(s, f"<image {i}>") for i, s in enumerate(sources)]
    out: list[Explanation | None] = [None] * len(sources)
    readable: list[tuple[int, Image.Image, torch.Tensor]] = []
    for i, (src, name) in enumerate(zip(sources, names)):
        try:
            picture, x = _read(src, name, m)
        except HeadstartError as exc:
            log.warning("skipped %s", exc)
            out[i] = Explanation(None, None, None, None, name, error=getattr(exc, "reason", str(exc)))
            continue
        readable.append((i, picture, x))
    if readable:
        layer = target_layer(m)
        for start in range(0, len(readable), _BATCH):
            part = readable[start:start + _BATCH]
            maps, labels, probs = _heatmaps(m, layer, cam_class, torch.stack([x for _, _, x in part]), wanted)
            for (i, picture, _), heat, label, p in zip(part, maps, labels, probs):
                out[i] = Explanation(heat, picture, m.classes[label], p, names[i])
    return out  # type: ignore[return-value]


def _heatmaps(model: ImageModel, layer: nn.Module, cam_class, x: torch.Tensor, wanted: int | None):
    """Heatmaps ``(N, H, W)``, class indices and their probabilities for one batch of prepared images."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    was_training = model.training
    frozen = [p.requires_grad for p in model.parameters()]
    model.eval()
    # The parameters stay frozen. Autograd starts at the target layer: the backbone's input is taken without
    # gradients and the layer's output becomes a leaf that needs them, so its gradient exists without a trainable
    # parameter, and the backward pass runs through the layers after it only (Grad-CAM reads nothing earlier;
    # depthwise convolutions are slow to differentiate on a CPU).
    hooks = [model.backbone.register_forward_pre_hook(lambda _m, args: tuple(a.detach() for a in args)),
             layer.register_forward_hook(lambda _m, _args, out: out.detach().requires_grad_(True))]
    try:
        with torch.enable_grad(), cam_class(model=model, target_layers=[layer]) as cam:
            targets = None if wanted is None else [ClassifierOutputTarget(wanted)] * len(x)  # None: predicted
            maps = cam(input_tensor=x.detach(), targets=targets)
            logits = cam.outputs.detach()
            cells = cam.activations_and_grads.activations[0].shape[-2:]
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
        for p, flag in zip(model.parameters(), frozen):
            p.requires_grad_(flag)
    labels = logits.argmax(1).tolist() if wanted is None else [wanted] * len(x)
    probs = logits.softmax(1)[torch.arange(len(x)), torch.tensor(labels)].tolist()
    return [_smooth(h, cells) for h in maps], labels, probs


def _smooth(heat: np.ndarray, cells: tuple[int, int]) -> np.ndarray:
    """The upsampled map smoothed by a Gaussian of one cell of the target layer, with nothing (zero) outside the
    picture, and scaled to 0..1 again.

    Each cell's value is one estimate for the whole patch the cell covers; bilinear upsampling puts the maximum
    on one cell's centre, which lands on the strongest edge of an object (a colour edge excites more units than
    a uniform inside) or on the picture's border, where the backbone's own zero padding excites units. With the
    cell's neighbours weighed in, the maximum moves to the middle of the hot region, and a border cell counts the
    half of its neighbourhood outside the picture as no evidence (docs/explain.md: do the heatmaps point at the
    evidence?).
    """
    from scipy.ndimage import gaussian_filter

    heat = np.nan_to_num(heat.astype(np.float32))
    sigma = (heat.shape[0] / cells[0], heat.shape[1] / cells[1])
    heat = gaussian_filter(heat, sigma, mode="constant", cval=0.0)
    low, high = float(heat.min()), float(heat.max())
    return np.clip((heat - low) / (high - low), 0.0, 1.0) if high > low else np.zeros_like(heat)


def overlay_names(sources: Sequence[str]) -> list[str]:
    """File names ``<stem>.heatmap.png`` for the overlays of ``sources``, made unique (``ant_2.heatmap.png``)
    when two images share a stem."""
    names, seen = [], {}
    for src in sources:
        stem = re.sub(r"[^\w.-]+", "_", PurePath(src).stem).strip("_.") or "image"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(f"{stem}.heatmap.png" if seen[stem] == 1 else f"{stem}_{seen[stem]}.heatmap.png")
    return names


def overlay(explanation: Explanation, *, alpha: float = 0.45, colormap: str = "jet") -> Image.Image:
    """The heatmap blended over the picture the model saw, coloured with a matplotlib colormap.

    Raises:
        ConfigError: the explanation has no heatmap (its image could not be read).
    """
    if explanation.heatmap is None or explanation.image is None:
        raise ConfigError(f"{explanation.source} has no heatmap ({explanation.error}); nothing to overlay")
    import matplotlib

    colours = matplotlib.colormaps[colormap](explanation.heatmap)[..., :3]
    base = np.asarray(explanation.image, dtype=np.float32) / 255.0
    blended = (1 - alpha) * base + alpha * colours
    return Image.fromarray(np.clip(blended * 255 + 0.5, 0, 255).astype(np.uint8), "RGB")
