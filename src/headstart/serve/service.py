"""The service's work without the web framework: uploads -> decoded in threads -> micro-batched -> rows.

    >>> service = Service(ServedModel.open("run"), ServeConfig())
    >>> await service.start()                     # in the event loop; warms the model up in the background
    >>> results = await service.classify([("cat.jpg", data)])    # probabilities or ImageReadError, per upload
    >>> await service.stop()
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from ..config import ServeConfig
from ..data.pipeline import default_decode_threads
from ..data.transforms import hflip
from ..errors import ImageReadError
from ..hardware import default_threads
from .batcher import MicroBatcher, Overloaded
from .decode import decode_upload
from .model import ServedModel

__all__ = ["Service"]

log = logging.getLogger("headstart")


class Service:
    """One model behind a micro-batcher, with decode threads beside it.

    ``on_fatal(reason)`` is called if the model cannot be warmed up (the server then stops).
    """

    def __init__(self, model: ServedModel, config: ServeConfig, on_fatal: Callable[[str], None] | None = None):
        self.model, self.config, self.on_fatal = model, config, on_fatal
        self.ready = False
        self.failure: str | None = None
        self.batcher = MicroBatcher(model.probabilities, max_batch=config.max_batch,
                                    max_wait_s=config.max_wait_ms / 1000, max_queue=config.max_queue,
                                    timeout_s=config.timeout)
        threads = config.decode_threads or default_decode_threads(default_threads())
        self._decoders = ThreadPoolExecutor(threads, thread_name_prefix="headstart-decode")
        self._warming: asyncio.Task | None = None
        self._max_pixels = int(config.max_megapixels * 1e6)

    async def start(self) -> None:
        """Start batching, and warm the model up on its thread; ``ready`` turns true when that is done."""
        self.batcher.start()
        self._warming = asyncio.get_running_loop().create_task(self._warm_up())

    async def _warm_up(self) -> None:
        try:
            await self.batcher.call(self.model.warm_up, self.config.max_batch)
        except Exception as exc:  # any failure here means the model cannot serve: say why and stop
            self.failure = f"the model could not be warmed up ({type(exc).__name__}: {exc})"
            log.error("error: %s", self.failure)
            if self.on_fatal is not None:
                self.on_fatal(self.failure)
            return
        self.ready = True
        log.info("model %s ready (%s, engine %s)", self.model.name, ", ".join(self.model.classes), self.model.engine)

    async def stop(self) -> None:
        """Finish the images already submitted, then stop the model and decode threads."""
        if self._warming is not None and not self._warming.done():
            await asyncio.wait([self._warming])
        await self.batcher.close()
        self._decoders.shutdown(wait=True, cancel_futures=True)

    def check_ready(self) -> None:
        """Raise ``Overloaded`` (a 503) while the model is still warming up, or could not be."""
        if not self.ready:
            raise Overloaded(self.failure or "the model is still warming up; retry in a moment", 1)

    async def classify(self, uploads: list[tuple[str, bytes]], tta: bool = False) -> list[np.ndarray | ImageReadError]:
        """Per upload ``(name, data)``: its class probabilities ``(classes,)``, or the ``ImageReadError`` saying
        why it cannot be read. Images are decoded in threads, then batched with other requests' images.

        With ``tta``, each image's mirror image goes into the batch too and the two are averaged, as
        ``headstart predict --tta`` does (mirroring a normalised tensor is mirroring the resized picture).

        Raises:
            Overloaded: warming up, the queue is full, or the images waited past ``--timeout``.
        """
        self.check_ready()
        views = 2 if tta else 1
        self.batcher.check_room(views * len(uploads))
        loop = asyncio.get_running_loop()
        with self.batcher.incoming(views * len(uploads)):
            decoded = await asyncio.gather(*(loop.run_in_executor(self._decoders, self._decode, data, name, tta)
                                             for name, data in uploads))
            good = [x for x in decoded if not isinstance(x, ImageReadError)]
            futures = self.batcher.submit([v for x in good for v in x]) if good else []
        try:
            probs = await asyncio.gather(*futures)
        except BaseException:
            for f in futures:  # a 503 for one image answers the request: free the others' places
                f.cancel()
            raise
        per_image = iter(np.mean(probs[i:i + views], axis=0) for i in range(0, len(probs), views))
        return [x if isinstance(x, ImageReadError) else next(per_image) for x in decoded]

    def _decode(self, data: bytes, name: str, tta: bool):
        """The image's prepared views (itself, and its mirror image with ``tta``), or the ``ImageReadError``."""
        try:
            x = decode_upload(data, name, self.model.predictor, self._max_pixels)
        except ImageReadError as exc:
            return exc
        return [x, hflip(x)] if tta else [x]
