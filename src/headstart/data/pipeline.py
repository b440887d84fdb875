"""The input pipeline: images decoded and resized in threads while the backbone runs (bounded read-ahead), or
in turns with it.

    >>> for idx, batch, errors in decoded_batches(paths, range(len(paths)), EvalTransform(cfg), 32):
    ...     features = runner(batch)

Pillow and numpy release the GIL while decoding, resizing and normalising, so threads overlap with the
backbone's own threads. At most ``prefetch`` images wait decoded beyond the batch being assembled, so memory
stays flat however many images there are and however slow the backbone is.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from ..errors import ImageReadError
from ..protocols import Transform
from .images import ImageSource, load_image, load_pixels

__all__ = ["decoded_batches", "default_decode_threads", "map_ahead"]


def default_decode_threads(cores: int) -> int:
    """Decode threads beside a backbone using ``cores``: two on a 2-core machine, half the cores on larger ones.

    Decoding a photo costs about a quarter of a light backbone's pass (efficientnet_lite0), so one thread
    falls behind whenever the cores are shared (``benchmarks/RESULTS.md``).
    """
    return max(2, cores // 2)


def _stack(items: list[torch.Tensor]) -> torch.Tensor:
    # numpy copies on the calling thread; torch.stack would wake torch's OpenMP team, whose threads then spin
    # for a while after each batch, taking the cores from the decode threads and ONNX Runtime
    return torch.from_numpy(np.stack([t.numpy() for t in items]))


def _prepare(source, transform: Transform, min_size, key):
    try:
        # transforms that work on tensors take pixels straight from the JPEG decoder, without a Pillow copy
        im = (load_pixels if transform.pixels else load_image)(source, min_size=min_size)
        return transform(im, key)
    except ImageReadError as exc:
        return exc


def decoded_batches(
    paths: Sequence[ImageSource],
    indices: Iterable[int],
    transform: Transform,
    batch_size: int,
    *,
    min_size: int | None = None,
    threads: int = 1,
    prefetch: int | None = None,
    keys: Sequence[str | None] | None = None,
    read_ahead: bool = True,
) -> Iterator[tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]]:
    """Yield ``(indices, batch (n, 3, H, W) or None, errors [(index, reason)])`` in input order.

    ``paths[i]`` (a path, bytes or picture: ``ImageSource``) for each ``i`` in ``indices`` is read (JPEGs in
    draft mode down to ``min_size``), passed through ``transform`` and stacked; unreadable images become
    ``errors`` rows, never exceptions.
    ``prefetch`` (default: two batches) bounds the images decoded ahead of the consumer; reading ahead, the
    first batch holds a quarter of ``batch_size`` images, so the consumer starts sooner. The transform
    receives ``keys[i]``, the image's content digest (an augmented view seeds its draw with it).
    ``read_ahead=False`` takes turns instead: nothing is decoded while the consumer holds a batch, and the next
    one is decoded by all ``threads`` when it asks (for engines whose threads spin-wait, see ``TorchRunner``).
    """
    if not read_ahead:
        return _in_turns(paths, list(indices), transform, batch_size, min_size, threads, keys)
    return _read_ahead(paths, indices, transform, batch_size, min_size, threads, prefetch, keys)


def _decoders(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="headstart-decode")


def _in_turns(paths, todo, transform, batch_size, min_size, threads, keys):
    pool = _decoders(threads)
    try:
        for start in range(0, len(todo), batch_size):
            part = todo[start:start + batch_size]
            items = pool.map(lambda i: _prepare(paths[i], transform, min_size, keys[i] if keys else None), part)
            idx, good, errors = [], [], []
            for i, item in zip(part, items):
                if isinstance(item, ImageReadError):
                    errors.append((i, item.reason))
                else:
                    idx.append(i)
                    good.append(item)
            yield idx, _stack(good) if good else None, errors
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def map_ahead(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, window: int) -> Iterator[tuple]:
    """``(item, fn(item))`` in the order of ``items``, computed on ``pool`` with at most ``window`` calls
    submitted beyond the one being handed on: work and memory stay bounded however many items there are, and a
    consumer that starts on the first results does not wait for a map over them all."""
    pending: deque = deque()
    for item in items:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) > window:
            item, fut = pending.popleft()
            yield item, fut.result()
    while pending:
        item, fut = pending.popleft()
        yield item, fut.result()


def _read_ahead(paths, indices, transform, batch_size, min_size, threads, prefetch, keys):
    prefetch = max(1, prefetch or 2 * batch_size)
    pool = _decoders(threads)

    def prepare(i):
        return _prepare(paths[i], transform, min_size, keys[i] if keys else None)

    # the first batch is a quarter of the size: the backbone starts once a few images are ready, not a whole
    # batch
    size = max(1, batch_size // 4)
    try:
        idx, items, errors = [], [], []
        for i, item in map_ahead(pool, prepare, indices, prefetch):
            if isinstance(item, ImageReadError):
                errors.append((i, item.reason))
            else:
                idx.append(i)
                items.append(item)
            if len(items) == size:
                yield idx, _stack(items), errors
                idx, items, errors = [], [], []
                size = batch_size
        if items or errors:
            yield idx, _stack(items) if items else None, errors
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
