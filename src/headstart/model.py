"""The model: backbone + head, the thing that is trained, saved and exported."""

from __future__ import annotations

import torch
from torch import nn

from .backbones.base import Backbone
from .heads import Head

__all__ = ["ImageModel"]


class ImageModel(nn.Module):
    """``forward(images) -> logits``; ``classes`` in index order."""

    def __init__(self, backbone: Backbone, head: Head, classes: list[str]):
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
        return self.backbone.data_config
