"""Several backbones side by side (``efficientnet_lite0+efficientnet_lite2``): one feature vector made of the
members' pooled features, each member reading the images prepared its own way (its own data config).

    >>> bb = create_backbone("efficientnet_lite0+efficientnet_lite2")
    >>> [m.name for m in bb.members], bb.feature_shape
    (['efficientnet_lite0', 'efficientnet_lite2'], (2560,))

Each member is an ordinary ``Backbone``: extraction runs each one with its own transform and feature cache
entries (``features.extract_features``), then ``join`` averages each member's map over positions, scales it to
unit length (so a member whose activations are larger does not drown the other) and concatenates them. The head
only ever sees the joined vector. A concatenation is frozen: its head is trained on cached features.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["SEPARATOR", "ConcatBackbone", "member_names", "is_concatenation", "refuse_concatenation"]

SEPARATOR = "+"


def is_concatenation(name: str) -> bool:
    return isinstance(name, str) and SEPARATOR in name


def member_names(name: str) -> list[str]:
    """The member names of ``a+b[+c...]``.

    Raises:
        ConfigError: an empty member (``efficientnet_lite0+``), or fewer than two members.
    """
    parts = [p.strip() for p in name.split(SEPARATOR)]
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"backbone {name!r} has an empty member; join two or more backbone names with "
                          f"'{SEPARATOR}', e.g. efficientnet_lite0+efficientnet_lite2 (`headstart backbones` lists "
                          "them)")
    return parts


class ConcatBackbone(nn.Module):
    """Frozen backbones whose pooled, unit-length features are concatenated.

    ``forward(images)`` takes one tensor per member, each prepared with that member's ``data_config``, and
    returns ``(N, sum of the members' num_features)``. It has no single ``data_config``: ``data_configs`` lists
    the members' own.
    """

    default_head = "avg"
    include_top = False

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if len(members) < 2:
            raise ConfigError(f"a concatenation needs two or more backbones, got {len(members)}")
        self.members = nn.ModuleList(members)
        self.name = SEPARATOR.join(m.name for m in members)
        self.feature_shape = (sum(m.num_features for m in members),)
        self.num_features = self.feature_shape[0]

    @property
    def weights_digest(self) -> str:
        """One digest over the members' (part of the run's identity; each member keys its own cache entries)."""
        joined = "+".join(m.weights_digest for m in self.members)
        return hashlib.sha256(joined.encode()).hexdigest()[:16]

    @property
    def weights_source(self) -> str:
        return SEPARATOR.join(m.weights_source for m in self.members)

    @property
    def data_configs(self) -> list:
        return [m.data_config for m in self.members]

    @property
    def data_config(self):
        raise ConfigError(refusal(self.name, "this"))

    @staticmethod
    def join(features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Each member's features (maps ``(N, C, h, w)`` or averages ``(N, C)``) averaged over positions, scaled
        to unit length and concatenated, in member order."""
        pooled = [f.mean(dim=(2, 3)) if f.ndim == 4 else f for f in features]
        return torch.cat([nn.functional.normalize(p.float(), dim=1) for p in pooled], dim=1)

    def forward(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(images) != len(self.members):
            raise ConfigError(f"{self.name} takes {len(self.members)} image tensors (one per member), got "
                              f"{len(images)}")
        return self.join([m(x) for m, x in zip(self.members, images)])

    def freeze(self) -> "ConcatBackbone":
        for m in self.members:
            m.freeze()
        return self

    def identity(self) -> dict:
        """What a run records: the joined name and digest, and each member's identity and data config."""
        return {"name": self.name, "weights_source": self.weights_source, "weights_digest": self.weights_digest,
                "feature_shape": list(self.feature_shape),
                "members": [m.identity() | {"data_config": m.data_config.to_dict()} for m in self.members]}


def refusal(name: str, command: str) -> str:
    return (f"{command} takes one backbone, and {name!r} concatenates several (each with its own preprocessing). "
            "`headstart predict` and `headstart evaluate` run a concatenated run; for this, train one backbone "
            "(--backbone NAME)")


def refuse_concatenation(backbone, command: str) -> None:
    """Raise ConfigError (a one-line message naming what does run it) when ``backbone`` is a concatenation."""
    if isinstance(backbone, ConcatBackbone):
        raise ConfigError(refusal(backbone.name, command))
