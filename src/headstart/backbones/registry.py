"""The backbone registry: one entry per backbone, with its builder, weight sources and data config.

    >>> from headstart.backbones import registry
    >>> registry.get("vgg16").data_config.input_size
    (224, 224)
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from ..config import DataConfig
from ..errors import UnknownBackboneError

__all__ = ["DataConfig", "WeightSource", "BackboneEntry", "register", "register_provider", "get", "names"]


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
    hidden: bool = False  # left out of `headstart backbones` (the test suite's tiny backbone)


_REGISTRY: dict[str, BackboneEntry] = {}
_PROVIDERS: dict[str, Callable[[str], BackboneEntry]] = {}


def register(entry: BackboneEntry) -> BackboneEntry:
    if entry.name in _REGISTRY:
        raise ValueError(f"backbone {entry.name!r} is registered twice")
    _REGISTRY[entry.name] = entry
    return entry


def register_provider(prefix: str, make_entry: Callable[[str], BackboneEntry]) -> None:
    """Serve every name ``prefix<rest>`` with ``make_entry(rest)`` (``timm:`` makes an entry for any timm model)."""
    if prefix in _PROVIDERS:
        raise ValueError(f"backbone prefix {prefix!r} is registered twice")
    _PROVIDERS[prefix] = make_entry


def names(include_hidden: bool = False) -> list[str]:
    """Registered backbone names, in registration order."""
    return [n for n, e in _REGISTRY.items() if include_hidden or not e.hidden]


def get(name: str) -> BackboneEntry:
    """The entry for ``name``; a registered prefix (``timm:<model>``) makes one on the fly.

    Raises:
        UnknownBackboneError: ``name`` is neither registered nor served by a provider.
    """
    if name in _REGISTRY:
        return _REGISTRY[name]
    for prefix, make_entry in _PROVIDERS.items():
        if name.startswith(prefix):
            return make_entry(name[len(prefix):])
    prefixes = "".join(f", or any model as '{p}<name>'" for p in _PROVIDERS)
    close = difflib.get_close_matches(name, names(), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownBackboneError(
        f"Unknown backbone {name!r}.{hint} Known: {', '.join(names())}{prefixes}. Run `headstart backbones` to see "
        "them."
    )
