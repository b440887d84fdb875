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
import secrets
import time
from typing import Sequence

from ..cache import FeatureCache
from ..data.shards import by_shard
from ..distributed import Distributed
from ..errors import ConfigError, StorageError
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
        StorageError: after an extraction that computed features, when the ranks' cache folders are not one
            folder (one cache per node): the message says how to merge them; the rerun then goes on to train.
    """
    if cache is None:
        raise ConfigError("training under torchrun shares the extracted features through the feature cache; drop "
                          "--no-cache (and point --cache to a folder every node can reach, or one per node)")
    shared = _shared(dist, cache)
    if not shared:
        log.warning("the feature cache %s is not one folder for all %d ranks (one per node?): each node fills its "
                    "own; if any feature is computed, training stops so they can be merged", cache.root,
                    dist.world_size)
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
    if not shared and sum(totals[0::2]):  # once the caches are merged, a rerun finds everything and goes on
        raise StorageError(f"every rank extracted its part into its own node's cache {str(cache.root)!r}, but the "
                           "ranks do not share one cache folder, so the training cannot read the other nodes' part. "
                           "Copy every node's cache into the training nodes' (all nodes for --strategy finetune, "
                           "the node of rank 0 otherwise): `rsync -a NODE:CACHE/ CACHE/` (entries have unique names; "
                           "nothing is overwritten), then run the same command again: it reads every feature from "
                           "the cache. Or put --cache on a file system all nodes share.")
    return [(int(totals[i]), int(totals[i + 1])) for i in range(0, len(totals), 2)]


def _shared(dist: Distributed, cache: FeatureCache) -> bool:
    """Whether every rank's cache folder is the same folder: each rank leaves a marker named by a token drawn on
    rank 0, and each looks for all of them."""
    token = int(dist.sum([secrets.randbits(48) if dist.primary else 0])[0])
    folder = cache.root / ".ranks"
    mine = folder / f"{token:x}-{dist.rank}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        mine.touch()
    except OSError as exc:
        raise StorageError(f"the feature cache folder {str(cache.root)!r} cannot be written ({exc}); point --cache "
                           "to a writable folder") from exc
    dist.barrier()
    seen = sum(1 for r in range(dist.world_size) if (folder / f"{token:x}-{r}").exists())
    dist.barrier()  # everyone has looked before anyone's marker goes
    mine.unlink(missing_ok=True)
    return int(dist.sum([seen == dist.world_size])[0]) == dist.world_size
