"""Heads: the new trainable part mapping backbone features to class scores.

    >>> head = Head(HeadConfig(pool="flatten", hidden=(256,), dropout=0.5), (512, 4, 4), num_classes=2)
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .config import HeadConfig
from .errors import ConfigError

__all__ = ["HeadConfig", "Head"]  # HeadConfig lives in headstart.config

class Head(nn.Module):
    """Pool or flatten, L2-normalise, standardise with statistics of the training features, then Dense layers.

    The standardisation (``shift``, ``scale``) is fixed at fit time and saved with the weights; it makes
    one learning rate work for backbones whose features differ in scale by orders of magnitude.
    """

    def __init__(self, config: HeadConfig, feature_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"a head needs at least 2 classes, got {num_classes}")
        if config.pool is None:
            raise ConfigError("the head's pooling is not chosen; use HeadConfig.resolved(backbone's default_head)")
        self.config = config
        self.num_classes = num_classes
        c = feature_shape[0]
        self.in_features = int(torch.tensor(feature_shape).prod()) if config.pool == "flatten" else c
        self.register_buffer("shift", torch.zeros(self.in_features))
        self.register_buffer("scale", torch.ones(self.in_features))
        layers, width = OrderedDict(), self.in_features
        for i, h in enumerate(config.hidden):
            if config.dropout:
                layers[f"dropout_{i}"] = nn.Dropout(config.dropout)
            layers[f"dense_{i}"] = nn.Linear(width, h)
            layers[f"relu_{i}"] = nn.ReLU()
            width = h
        if config.dropout:
            layers["dropout"] = nn.Dropout(config.dropout)
        layers["predictions"] = nn.Linear(width, num_classes)
        self.layers = nn.Sequential(layers)

    @property
    def feature_pool(self) -> str | None:
        """What ``extract_features(pool=...)`` may do to a frozen backbone's maps for this head: ``"avg"`` when
        it only reads their average (so the average is all that need be kept), else ``None``."""
        return "avg" if self.config.pool == "avg" else None

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        """Flatten or average-pool, then scale each image's vector to unit length (removes the overall
        activation level, which varies with contrast and exposure rather than with the class)."""
        x = fmap if fmap.ndim == 2 else fmap.flatten(1) if self.config.pool == "flatten" else fmap.mean(dim=(2, 3))
        return torch.nn.functional.normalize(x, dim=1)

    def standardize(self, pooled: torch.Tensor) -> torch.Tensor:
        """Fixed standardisation, clipped at +-10: a feature that barely varied in training can't blow up
        the logits when a fine-tuned backbone moves it (or an odd image does)."""
        return ((pooled - self.shift) * self.scale).clamp(-10.0, 10.0)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.layers(self.standardize(self.pool(fmap)))

    @torch.no_grad()
    def fit_standardizer(self, pooled: torch.Tensor) -> None:
        """Set ``shift``/``scale`` from pooled training features ``(N, in_features)``."""
        self.shift.copy_(pooled.mean(0))
        std = pooled.std(0) if len(pooled) > 1 else torch.ones(self.in_features)
        # one floor for all features: dead (always-zero) units stay zero instead of blowing up
        self.scale.copy_(1.0 / std.clamp_min(std.mean().clamp_min(1e-6) * 0.1))
