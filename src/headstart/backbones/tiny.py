"""``test_tiny``: a backbone of a few thousand parameters for the test suite, hidden from ``headstart backbones``.

It follows the whole backbone contract (layer groups in sequence, BatchNorm, an ONNX-exportable graph, a data
config of its own) so fast tests exercise every path a real backbone takes, in milliseconds. Its "pretrained"
weights are a fixed seeded draw, available offline; they know nothing of ImageNet.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ..config import DataConfig
from ..errors import ConfigError
from .registry import BackboneEntry, WeightSource, register

__all__ = ["TINY"]

_WIDTHS = (8, 16, 32)


def _block(c_in: int, c_out: int, name: str) -> nn.Sequential:
    return nn.Sequential(OrderedDict([
        (f"{name}_conv", nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False)),
        (f"{name}_bn", nn.BatchNorm2d(c_out)),
        (f"{name}_relu", nn.ReLU()),
    ]))


def _build(input_size, include_top):
    if include_top:
        raise ConfigError("test_tiny has no ImageNet top (include_top=False only)")
    blocks, c_in = OrderedDict(), 3
    for i, c in enumerate(_WIDTHS, start=1):
        blocks[f"block{i}"] = _block(c_in, c, f"block{i}")
        c_in = c
    return nn.Sequential(blocks)


def _seeded_weights() -> dict:
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        return {k: v.clone() for k, v in _build((32, 32), False).state_dict().items()}


TINY = register(BackboneEntry(
    name="test_tiny",
    description="a 6k-parameter backbone for tests (fixed seeded weights, not pretrained)",
    build=_build,
    groups=lambda body: list(body.named_children()),
    data_config=DataConfig(input_size=(32, 32), resize_mode="squash", crop_pct=1.0),
    sources=(WeightSource(kind="package", label="builtin:test_tiny", load=_seeded_weights, available=lambda: True),),
    min_input_size=8,
    default_head="avg",
    finetune_groups=1,
    hidden=True,
))
