"""Fine-tuning the top of a backbone on activations cached at the freeze boundary.

The frozen lower groups run once per (image, view) and their output is cached; each epoch then runs
only the unfrozen upper groups and the head. BatchNorm layers keep their ImageNet statistics (inference
mode) while their scale and shift train, as Keras recommends for fine-tuning on small data.
"""

from __future__ import annotations

import torch
from torch import nn

from ..backbones.base import Backbone
from ..backbones.weights import state_digest
from ..errors import ConfigError

__all__ = ["LowerPart", "UpperPart", "split_backbone", "finetune_param_groups"]


def _apply(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, (nn.ModuleDict, nn.ModuleList)):
        for child in (module.values() if isinstance(module, nn.ModuleDict) else module):
            x = child(x)
        return x
    return module(x)


class UpperPart(nn.Module):
    """The last layer groups, run in order on boundary activations (shares modules with the backbone)."""

    def __init__(self, groups: list[tuple[str, nn.Module]]):
        super().__init__()
        self.names = [n for n, _ in groups]
        self.groups = nn.ModuleList([m for _, m in groups])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for g in self.groups:
            x = _apply(g, x)
        return x


class LowerPart(nn.Module):
    """The frozen first layer groups, looking like a backbone to ``extract_features`` (name, digest, config)."""

    def __init__(self, backbone: Backbone, groups: list[tuple[str, nn.Module]]):
        super().__init__()
        self.groups = nn.ModuleList([m for _, m in groups])
        self.name = f"{backbone.name}[..{groups[-1][0]}]"
        self.data_config = backbone.data_config
        self.weights_digest = state_digest(self.groups.state_dict())
        with torch.inference_mode():
            self.eval()
            self.feature_shape = tuple(self(torch.zeros(1, 3, *backbone.data_config.input_size)).shape[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for g in self.groups:
            x = _apply(g, x)
        return x

    @property
    def body(self) -> nn.Module:
        """The module an inference engine runs (as ``Backbone.body``)."""
        return self


def split_backbone(backbone: Backbone, unfreeze: int) -> tuple[LowerPart, UpperPart]:
    """Cut ``backbone`` before its last ``unfreeze`` layer groups; check the two parts compose to the whole.

    Raises:
        ConfigError: ``unfreeze`` out of range, or a backbone whose groups don't run in sequence.
    """
    groups = backbone.layer_groups()
    if not 1 <= unfreeze < len(groups):
        raise ConfigError(f"{backbone.name} has {len(groups)} layer groups ({', '.join(n for n, _ in groups)}); "
                          f"--unfreeze must be between 1 and {len(groups) - 1}, got {unfreeze}")
    lower, upper = LowerPart(backbone, groups[:-unfreeze]), UpperPart(groups[-unfreeze:])
    x = torch.randn(2, 3, *backbone.data_config.input_size)
    was = backbone.training
    backbone.eval()
    with torch.inference_mode():
        whole, parts = backbone(x), upper(lower(x))
    backbone.train(was)
    if whole.shape != parts.shape or not torch.allclose(whole, parts, atol=1e-4, rtol=1e-3):
        raise ConfigError(f"{backbone.name}'s layer groups do not run in sequence, so it cannot be fine-tuned "
                          "from cached activations; use --strategy frozen or frozen-aug")
    return lower, upper


def finetune_param_groups(upper: UpperPart, head: nn.Module, lr: float, head_lr: float, decay: float,
                          weight_decay: float, head_weight_decay: float) -> list[dict]:
    """Discriminative learning rates: the last group gets ``lr``, each earlier one ``decay`` times less."""
    for p in upper.parameters():
        p.requires_grad_(True)
    groups = [{"params": list(head.parameters()), "lr": head_lr, "weight_decay": head_weight_decay}]
    for depth, g in enumerate(reversed(upper.groups)):
        params = [p for p in g.parameters()]
        if params:
            groups.append({"params": params, "lr": lr * decay ** depth, "weight_decay": weight_decay})
    return groups
