"""Feature extraction spread over the ranks of a process group, through the shared feature cache.

    >>> totals = spread_extraction(dist, lower, [(train.paths, None), (val.paths, None)], cache)

Each rank runs its part of every extraction job (whole tar shards per rank, else every N-th image) through the
backbone into the cache, in chunks so memory stays flat, then the ranks meet; afterwards every image any rank
could read is in the cache, and training reads the features from there as a single process would. The cache
writes whole entries atomically, so a rank that dies leaves only whole entries behind, and a rerun computes only
what is missing.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Sequence

from ..cache import FeatureCache
from ..data.shards import by_shard
from ..distributed import Distributed
from ..errors import ConfigError
from ..features import extract_features, features_shape

__all__ = ["spread_extraction", "CHUNK_BYTES"]

log = logging.getLogger("headstart")

CHUNK_BYTES = 256 * 2**20  # features held per chunk of a rank's part; the cache keeps them, not the rank


def spread_extraction(dist: Distributed, source, jobs: Sequence[tuple[Sequence, object]], cache: FeatureCache | None,
                      *, runner=None, pool: str | None = None, progress=None) -> list[tuple[int, int]]:
    """Extract this rank's part of each ``(images, transform)`` job into ``cache``, then wait for every rank.

    Returns, per job, ``(backbone passes, cache hits)`` summed over the ranks (the same on every rank).

    Raises:
        ConfigError: no cache (the ranks share their work through it).
    """
    if cache is None:
        raise ConfigError("training under torchrun shares the extracted features through the feature cache; drop "
                          "--no-cache (and point --cache to a folder every node can reach, or one per node)")
    per_image = 4 * math.prod(features_shape(source, pool))
    chunk = max(1024, CHUNK_BYTES // per_image)
    counts: list[float] = []
    t0 = time.perf_counter()
    for images, transform in jobs:
        mine = by_shard(images, dist.world_size)[dist.rank]
        computed = cached = 0
        for start in range(0, len(mine), chunk):
            part = [images[i] for i in mine[start:start + chunk]]
            ex = extract_features(source, part, cache, transform=transform, runner=runner, pool=pool,
                                  progress=progress, desc=f"rank {dist.rank} features")
            computed, cached = computed + ex.computed, cached + ex.cached
        counts += [computed, cached]
    # the sum waits for every rank, and each rank's writes are done before it joins: one step for both
    totals = dist.sum(counts)
    log.info("extraction over %d ranks: %d images through the backbone, %d from the cache (%.1f s)",
             dist.world_size, sum(totals[0::2]), sum(totals[1::2]), time.perf_counter() - t0)
    return [(int(totals[i]), int(totals[i + 1])) for i in range(0, len(totals), 2)]
