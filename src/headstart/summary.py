"""A Keras-style ``model.summary()``: layer (type), output shape, parameters, trainable; then the totals.

    >>> print(summary(create_backbone("vgg16", weights=None, input_size=150).freeze()))
"""

from __future__ import annotations

import torch
from torch import nn

from .model import ImageModel

__all__ = ["summary"]

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Sigmoid, nn.Identity)


def _rows(model) -> list[tuple[str, nn.Module]]:
    """The layers shown: each layer group's parts (activations folded into the layer before, as Keras)."""
    backbone = model.backbone if isinstance(model, ImageModel) else model
    rows = []
    for group, module in backbone.layer_groups():
        children = list(module.named_children())
        if not children or not any(True for _ in module.parameters()) and len(children) == 0:
            rows.append((group, module))
            continue
        for name, child in children:
            if isinstance(child, _ACTIVATIONS):
                continue
            rows.append((name if name.startswith(group) else f"{group}.{name}", child))
    return rows


def _shape(t) -> str:
    if isinstance(t, (tuple, list)):
        t = t[0]
    return "(None, " + ", ".join(str(s) for s in t.shape[1:]) + ")"


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GB"


def summary(model, input_size: tuple[int, int] | None = None) -> str:
    """The summary table of a ``Backbone`` or ``ImageModel`` as text.

    Shapes are PyTorch's ``(batch, channels, height, width)``; a Keras 4x4x512 is ``(None, 512, 4, 4)``.
    """
    is_model = isinstance(model, ImageModel)
    backbone = model.backbone if is_model else model
    h, w = input_size or backbone.data_config.input_size
    rows = _rows(model)
    shapes: dict[int, str] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, key=id(m): shapes.__setitem__(key, _shape(out)))
             for _, m in rows]
    if is_model:
        hooks += [m.register_forward_hook(lambda mod, inp, out, key=id(m): shapes.__setitem__(key, _shape(out)))
                  for _, m in model.head.layers.named_children()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            fmap = backbone(torch.zeros(1, 3, h, w))
            pooled = model.head.pool(fmap) if is_model else None
            if is_model:
                model.head(fmap)
    finally:
        for hk in hooks:
            hk.remove()
        model.train(was_training)

    table = [("input (InputLayer)", f"(None, 3, {h}, {w})", 0, "")]
    for name, m in rows:
        params = list(m.parameters())
        n = sum(p.numel() for p in params)
        trainable = "" if not params else ("yes" if all(p.requires_grad for p in params)
                                           else "no" if not any(p.requires_grad for p in params) else "partly")
        table.append((f"{name} ({type(m).__name__})", shapes.get(id(m), "?"), n, trainable))
    if is_model:
        pool_name = "flatten (Flatten)" if model.head.config.pool == "flatten" else \
            "global_average_pooling (GlobalAveragePooling2D)"
        table.append((pool_name, _shape(pooled), 0, ""))
        for name, m in model.head.layers.named_children():
            if isinstance(m, _ACTIVATIONS) or isinstance(m, nn.ReLU):
                continue
            params = list(m.parameters())
            n = sum(p.numel() for p in params)
            tr = "" if not params else ("yes" if all(p.requires_grad for p in params) else "no")
            table.append((f"head.{name} ({type(m).__name__})", shapes.get(id(m), "?"), n, tr))

    unique = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in unique)
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    nbytes = {True: 0, False: 0}
    for p in unique:
        nbytes[p.requires_grad] += p.numel() * p.element_size()

    c1 = max(32, *(len(r[0]) for r in table)) + 2
    c2 = max(22, *(len(r[1]) for r in table)) + 2
    width = c1 + c2 + 14 + 10
    title = model.backbone.name + " + head" if is_model else backbone.name
    out = [f'Model: "{title}"  (input 3x{h}x{w}; shapes are (batch, channels, height, width))', "=" * width,
           f"{'Layer (type)':<{c1}}{'Output Shape':<{c2}}{'Param #':>14}{'Trainable':>10}", "=" * width]
    for name, shape, n, tr in table:
        out.append(f"{name:<{c1}}{shape:<{c2}}{n:>14,}{tr:>10}")
    out += ["=" * width,
            f"Total params: {total:,} ({_fmt_bytes(nbytes[True] + nbytes[False])})",
            f"Trainable params: {trainable:,} ({_fmt_bytes(nbytes[True])})",
            f"Non-trainable params: {total - trainable:,} ({_fmt_bytes(nbytes[False])})",
            "=" * width]
    return "\n".join(out)
