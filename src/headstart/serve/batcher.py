"""Micro-batching: images from concurrent requests gathered into one engine call, run on one model thread.

    >>> batcher = MicroBatcher(model.probabilities, max_batch=32, max_wait_s=0.005, max_queue=256, timeout_s=10)
    >>> batcher.start()                          # inside the running event loop
    >>> with batcher.incoming(2):                # two images being decoded for this request
    ...     xs = await decode(...)
    ...     probs = await asyncio.gather(*batcher.submit(xs))
    >>> await batcher.close()                    # finishes what was submitted

One task on the event loop gathers images and hands each batch to a single model thread, so the loop never
waits on the model and the engine sees one batch at a time (its own threads use the cores). While a batch
runs, new images queue up, so batches grow with the load by themselves. A batch waits for more images only
while some are being decoded, and then at most ``max_wait_s``: one client alone never waits for a batch.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from ..errors import HeadstartError

__all__ = ["MicroBatcher", "Overloaded"]


class Overloaded(HeadstartError):
    """The service cannot take or finish this request in time; ``retry_after`` is a fair wait in seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Item:
    x: torch.Tensor
    future: asyncio.Future
    deadline: float


@dataclass
class _Stats:
    """Running figures for ``Retry-After`` and for tests: batches run and their sizes."""

    batches: int = 0
    images: int = 0
    largest: int = 0
    seconds_per_image: float = 0.01  # updated from each batch (an exponential average)
    sizes: deque = field(default_factory=lambda: deque(maxlen=1000))


class MicroBatcher:
    """Gathers images into batches of at most ``max_batch`` for ``run`` (``(N, 3, H, W) -> (N, classes)``).

    ``submit`` refuses with ``Overloaded`` when ``max_queue`` images already wait; an image still waiting
    ``timeout_s`` after it was submitted gets ``Overloaded`` too, instead of a late answer.
    """

    def __init__(self, run: Callable[[torch.Tensor], np.ndarray], *, max_batch: int, max_wait_s: float,
                 max_queue: int, timeout_s: float):
        self.run, self.max_batch, self.max_wait_s = run, max_batch, max_wait_s
        self.max_queue, self.timeout_s = max_queue, timeout_s
        self.stats = _Stats()
        self._queue: deque[_Item] = deque()
        self._decoding = 0
        self._busy = False
        self._changed: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="headstart-model")

    def start(self) -> None:
        """Start the gathering task on the running event loop."""
        self._changed = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._gather(), name="headstart-batcher")

    @contextmanager
    def incoming(self, n: int) -> Iterator[None]:
        """Mark ``n`` images as being decoded, so a batch forming now waits for them (up to ``max_wait_s``)."""
        self._decoding += n
        try:
            yield
        finally:
            self._decoding -= n
            self._changed.set()

    def retry_after(self) -> int:
        """Seconds until the images waiting now are likely done (at least 1)."""
        return max(1, math.ceil(len(self._queue) * self.stats.seconds_per_image))

    def check_room(self, n: int) -> None:
        """Raise ``Overloaded`` now if ``n`` more images would not fit in the queue (before decoding them)."""
        if len(self._queue) + self._decoding + n > self.max_queue:
            raise Overloaded(f"the service is busy: {len(self._queue)} images wait for the model (at most "
                             f"{self.max_queue}, --max-queue); retry in a moment", self.retry_after())

    def submit(self, xs: list[torch.Tensor]) -> list[asyncio.Future]:
        """Queue prepared images; each future gives that image's probabilities ``(classes,)``.

        Raises:
            Overloaded: the queue is full.
        """
        if self._task is None or self._task.done():
            raise Overloaded("the service is not running its model (starting or stopping); retry in a moment", 1)
        if len(self._queue) + len(xs) > self.max_queue:
            raise Overloaded(f"the service is busy: {len(self._queue)} images wait for the model (at most "
                             f"{self.max_queue}, --max-queue); retry in a moment", self.retry_after())
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.timeout_s
        items = [_Item(x, loop.create_future(), deadline) for x in xs]
        self._queue.extend(items)
        self._changed.set()
        return [it.future for it in items]

    async def call(self, fn: Callable, *args):
        """Run ``fn(*args)`` on the model thread (between batches) and return its result."""
        return await asyncio.get_running_loop().run_in_executor(self._model_thread, fn, *args)

    async def close(self) -> None:
        """Run what is queued, then stop the task and the model thread."""
        while self._queue or self._decoding or self._busy:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._model_thread.shutdown(wait=True)

    async def _gather(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._changed.clear()
                await self._changed.wait()
            # wait for images being decoded, while the batch has room, at most max_wait_s after its first image
            until = time.monotonic() + self.max_wait_s
            while self._decoding and len(self._queue) < self.max_batch:
                left = until - time.monotonic()
                if left <= 0:
                    break
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch = self._take()
            if not batch:
                continue
            t0 = time.perf_counter()
            self._busy = True
            try:
                x = torch.from_numpy(np.stack([it.x.numpy() for it in batch]))  # numpy: no torch thread team
                probs = await loop.run_in_executor(self._model_thread, self.run, x)
            except Exception as exc:  # the engine failed on this batch: its requests get the error, others go on
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(exc)
                continue
            finally:
                self._busy = False
            self._record(len(batch), time.perf_counter() - t0)
            for it, p in zip(batch, probs):
                if not it.future.done():  # a client that went away cancelled its future
                    it.future.set_result(p)

    def _take(self) -> list[_Item]:
        """Up to ``max_batch`` queued images whose requests still want them; those past their deadline get 503."""
        now = time.monotonic()
        batch: list[_Item] = []
        while self._queue and len(batch) < self.max_batch:
            it = self._queue.popleft()
            if it.future.done():
                continue
            if now > it.deadline:
                it.future.set_exception(Overloaded(
                    f"the image waited more than {self.timeout_s:g} s for the model (--timeout); the service is "
                    "overloaded, retry in a moment", self.retry_after()))
                continue
            batch.append(it)
        return batch

    def _record(self, n: int, seconds: float) -> None:
        s = self.stats
        s.batches += 1
        s.images += n
        s.largest = max(s.largest, n)
        s.sizes.append(n)
        s.seconds_per_image = 0.8 * s.seconds_per_image + 0.2 * seconds / n
