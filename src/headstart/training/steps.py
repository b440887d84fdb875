"""How an epoch is cut into training steps on each rank, so that N ranks take the steps one process takes.

    >>> steps = RankSteps(n=1000, batch_size=32, dist=dist, seed=0)
    >>> for step in steps.epoch(e):                  # the same number of steps on every rank
    ...     per_image = loss_fn(model(x[step.idx]), y[step.idx]) * step.real
    ...     loss = per_image.sum() * steps.scale(step, y, class_weight)   # the one-process batch mean, over N ranks

The order is ``DistributedSampler``'s (seeded with ``seed + epoch`` through ``set_epoch``; with one replica it is
the one-process order). A rank's part of the sampler, taken ``batch_size / N`` at a time, is its every N-th image
of each one-process batch of ``batch_size``, so every step covers the same images on N ranks as in one process.
The sampler pads the last step with repeated images so the ranks have equal parts; those carry zero weight
(``real``), so each step's loss is exactly the one-process batch mean: per-image losses summed over the real
images, divided by the batch's whole weight (its image count, or the sum of its class weights), times N because
DistributedDataParallel averages the ranks' gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import DistributedSampler

from ..distributed import SINGLE, Distributed
from ..errors import ConfigError

__all__ = ["RankSteps", "Step", "check_batch"]


def check_batch(batch_size: int, dist: Distributed) -> None:
    """Raises ConfigError: ``batch_size`` is not a multiple of the number of ranks (the global batch would
    change)."""
    if batch_size % dist.world_size:
        raise ConfigError(f"--batch-size {batch_size} is not a multiple of the {dist.world_size} ranks; each step "
                          "trains on the same batch as one process, split evenly: use a batch size that "
                          f"{dist.world_size} divides, e.g. {dist.world_size * max(1, batch_size // dist.world_size)}")


@dataclass
class Step:
    idx: torch.Tensor     # this rank's image indices in the step (padding included)
    real: torch.Tensor    # float 1/0 per index: a real image of the step, or the sampler's padding
    count: int            # images in the whole step, over all ranks


class RankSteps:
    """The steps of each epoch on this rank (see the module's docstring).

    Raises:
        ConfigError: ``batch_size`` is not a multiple of the number of ranks (the global batch would change).
    """

    def __init__(self, n: int, batch_size: int, dist: Distributed = SINGLE, seed: int = 0):
        check_batch(batch_size, dist)
        self.n, self.batch_size, self.dist = n, batch_size, dist
        self.local = batch_size // dist.world_size
        self.sampler = DistributedSampler(range(n), num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                          seed=seed, drop_last=False)

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def epoch(self, epoch: int) -> Iterator[Step]:
        """This rank's steps of ``epoch`` (0-based), in order."""
        self.sampler.set_epoch(epoch)
        mine = torch.tensor(list(self.sampler), dtype=torch.long)
        world, rank = self.dist.world_size, self.dist.rank
        for s in range(len(self)):
            part = mine[s * self.local:(s + 1) * self.local]
            # the sampler hands rank r the padded order's positions r, r + N, r + 2N...; those past n are padding
            position = rank + world * torch.arange(s * self.local, s * self.local + len(part))
            yield Step(part, (position < self.n).float(), min(self.batch_size, self.n - s * self.batch_size))

    def scale(self, step: Step, labels: torch.Tensor, class_weight: torch.Tensor | None) -> float:
        """The factor that turns this rank's summed per-image losses into its share of the batch mean (with
        ``class_weight``, the weighted mean that ``CrossEntropyLoss`` takes)."""
        if class_weight is None:
            weight = float(step.count)
        else:
            local = float((class_weight[labels[step.idx]] * step.real).sum())
            weight = self.dist.sum([local])[0] if self.dist.world_size > 1 else local
        return self.dist.world_size / weight
