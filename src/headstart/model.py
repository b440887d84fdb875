"""The model: backbone + head, the thing that is trained, saved and exported.

A model is what a ``Predictor`` scores images with (the same members for an exported ``OnnxModel``):
``feature_source`` and ``feature_pool`` say what extraction runs and keeps, ``make_runner`` builds the engine
for it, and ``scores`` turns features into class probabilities.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .backbones.base import Backbone
from .backbones.concat import ConcatBackbone
from .cache import FeatureCache
from .engines import lazy_runner
from .hardware import Hardware
from .heads import Head
from .protocols import Runner

__all__ = ["ImageModel"]


class ImageModel(nn.Module):
    """``forward(images) -> logits``; ``classes`` in index order."""

    def __init__(self, backbone: Backbone | ConcatBackbone, head: Head, classes: list[str]):
        super().__init__()
        if len(classes) != head.num_classes:
            raise ValueError(f"{len(classes)} class names for a head with {head.num_classes} outputs")
        self.backbone = backbone
        self.head = head
        self.classes = list(classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    @property
    def data_config(self):
        """The backbone's preprocessing (a concatenation has none of its own: ConfigError)."""
        return self.backbone.data_config

    @property
    def feature_source(self) -> Backbone | ConcatBackbone:
        return self.backbone

    @property
    def feature_pool(self) -> str | None:
        return self.head.feature_pool

    def make_runner(self, engine: str = "auto", batch_size: int = 32, *, hardware: Hardware | None = None,
                    cache: FeatureCache | None = None) -> Runner:
        """The backbone's engine (``headstart.engines``; one per member of a concatenation), built on its first
        batch."""
        return lazy_runner(self.backbone, engine, batch_size, hardware=hardware, cache=cache)

    def scores(self, features: torch.Tensor) -> np.ndarray:
        """Class probabilities ``(N, classes)`` from the backbone's features."""
        with torch.inference_mode():
            return self.head(features).softmax(-1).numpy()
