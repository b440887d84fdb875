"""The backbone registry: one entry per backbone, with its builder, weight sources and data config.

    >>> from headstart.backbones import registry
    >>> registry.get("vgg16").data_config.input_size
    (224, 224)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from ..errors import ConfigError, UnknownBackboneError

__all__ = ["DataConfig", "WeightSource", "BackboneEntry", "register", "get", "names", "TIMM_PREFIX"]

TIMM_PREFIX = "timm:"
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
_RESIZE_MODES = ("squash", "crop")


@dataclass(frozen=True)
class DataConfig:
    """How images must be prepared for a backbone's weights.

    ``resize_mode="squash"`` resizes the whole image to ``input_size`` (Keras' way);
    ``"crop"`` resizes the shorter side to ``input_size / crop_pct`` and takes the centre (timm's way).
    ``mean`` and ``std`` apply to pixels scaled to 0..1.
    """

    input_size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    resize_mode: str = "crop"
    crop_pct: float = 0.875

    def __post_init__(self):
        if self.interpolation not in _INTERPOLATIONS:
            raise ConfigError(f"interpolation {self.interpolation!r} is not one of {_INTERPOLATIONS}")
        if self.resize_mode not in _RESIZE_MODES:
            raise ConfigError(f"resize_mode {self.resize_mode!r} is not one of {_RESIZE_MODES}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(f"mean and std need three values each, std > 0; got mean={self.mean} std={self.std}")

    def with_input_size(self, size: int | tuple[int, int] | None) -> "DataConfig":
        if size is None:
            return self
        hw = (size, size) if isinstance(size, int) else tuple(size)
        return dataclasses.replace(self, input_size=(int(hw[0]), int(hw[1])))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown data config fields {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        for key in ("input_size", "mean", "std"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


@dataclass(frozen=True)
class WeightSource:
    """One place pretrained weights can come from, tried in order after a user's file.

    ``kind`` is ``"package"`` (a pip package that carries the file) or ``"hub"`` (timm / huggingface_hub).
    ``load`` returns a state dict of tensors in the source's own layout, or raises ``WeightsUnavailableError``.
    """

    kind: str
    label: str
    load: Callable[[], dict]
    available: Callable[[], bool]


@dataclass(frozen=True)
class BackboneEntry:
    """A registered backbone.

    ``build(input_size, include_top)`` returns the architecture with random weights: a module whose
    ``forward(x)`` gives the feature map ``(N, C, H, W)``; with ``include_top`` it also has
    ``forward_top(fmap)`` giving the original ImageNet logits.
    ``groups(body)`` lists ``(name, module)`` layer groups from input to output, for freezing.
    """

    name: str
    description: str
    build: Callable[[tuple[int, int], bool], nn.Module]
    groups: Callable[[nn.Module], list[tuple[str, nn.Module]]]
    data_config: DataConfig
    sources: tuple[WeightSource, ...] = field(default_factory=tuple)
    min_input_size: int = 32
    default_head: str = "avg"
    finetune_groups: int = 1  # layer groups unfrozen by the finetune recipe unless told otherwise


_REGISTRY: dict[str, BackboneEntry] = {}


def register(entry: BackboneEntry) -> BackboneEntry:
    if entry.name in _REGISTRY:
        raise ValueError(f"backbone {entry.name!r} is registered twice")
    _REGISTRY[entry.name] = entry
    return entry


def names() -> list[str]:
    """Registered backbone names, in registration order."""
    return list(_REGISTRY)


def get(name: str) -> BackboneEntry:
    """The entry for ``name``; ``timm:<model>`` makes one on the fly for any timm model.

    Raises:
        UnknownBackboneError: ``name`` is neither registered nor a known timm model.
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith(TIMM_PREFIX):
        from .timm_models import timm_entry

        return timm_entry(name[len(TIMM_PREFIX):])
    raise UnknownBackboneError(
        f"Unknown backbone {name!r}. Known: {', '.join(names())}, or any timm model as 'timm:<name>'. "
        "Run `headstart backbones` to see them."
    )
