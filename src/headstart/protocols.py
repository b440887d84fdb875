"""The contracts between layers, declared once: what a runner, a transform and a feature source provide.

Everything that plays one of these roles implements every member, so callers never probe with ``getattr``.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:  # types only: this module must stay importable without torch
    import torch
    from PIL import Image

    from .config import DataConfig

__all__ = ["Runner", "Transform", "FeatureSource"]


@runtime_checkable
class Runner(Protocol):
    """An inference engine over a frozen graph: ``images (N, 3, H, W) float32 -> features (N, ...)``.

    ``read_ahead``: whether images should be decoded while it computes (False for engines whose threads
    spin-wait and want every core while they run). ``lanes``: how many runs may go at once on parts of a
    batch; ``submit`` starts one run and returns its future (``headstart.engines.run_batches`` uses both).
    """

    engine: str
    read_ahead: bool
    lanes: int

    def __call__(self, images: "torch.Tensor") -> "torch.Tensor": ...

    def submit(self, images: "torch.Tensor") -> Future: ...


@runtime_checkable
class Transform(Protocol):
    """One view of an image as a normalised tensor ``(3, H, W)``.

    ``pixels``: takes uint8 pixels ``(3, H, W)`` straight from the decoder (else a Pillow picture).
    ``spec()``: its part of the feature cache key (``None`` for the plain eval view).
    ``key``: the image's content digest, which seeds the random draw of an augmented view.
    """

    pixels: bool

    def spec(self) -> dict | None: ...

    def __call__(self, image: "torch.Tensor | Image.Image", key: str | None = None) -> "torch.Tensor": ...


@runtime_checkable
class FeatureSource(Protocol):
    """What extraction runs images through and keys the cache by: a backbone, the frozen lower part of one
    being fine-tuned, or an exported whole model."""

    name: str
    weights_digest: str
    data_config: "DataConfig"
    feature_shape: tuple[int, ...]
    training: bool

    def eval(self): ...

    def train(self, mode: bool = True): ...
