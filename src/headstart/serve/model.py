"""The model behind the service: a run folder or an exported ONNX file, with the predictor ``headstart predict``
would use for it.

    >>> served = ServedModel.open("run")            # or "model.onnx"
    >>> served.warm_up(32)
    >>> served.probabilities(torch.stack([served.predictor.prepare(data, name="cat.jpg")]))   # (1, classes)

It is loaded as ``headstart.load`` loads it and predicts with ``ImageClassifier.predictor()`` (same
preprocessing, same engine), so the service and ``headstart predict`` give the same answer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from .._version import __version__
from ..api import load
from ..backbones.concat import refuse_concatenation
from ..errors import RunFormatError
from ..export import is_onnx_file

__all__ = ["ServedModel"]

log = logging.getLogger("headstart")


class ServedModel:
    """``classes``, ``data_config``, ``predictor``, ``info()`` for the model routes, and ``probabilities(images)``.

    Not thread-safe: the service runs it on one model thread (``predictor.prepare`` may run in any thread).
    """

    def __init__(self, classifier, name: str, metrics: dict | None):
        self.name = name
        self.classes = list(classifier.classes_)
        refuse_concatenation(classifier.model_.feature_source, "headstart serve")
        self.predictor = classifier.predictor()
        self.data_config = self.predictor.model.data_config
        self._config, self._metrics = classifier.config_, metrics

    @classmethod
    def open(cls, source: str | Path, engine: str = "auto", device: str = "auto",
             name: str | None = None) -> "ServedModel":
        """The model in ``source``: a run folder (``headstart train --out``) or a file from ``headstart export``.

        ``engine`` runs a run's backbone (``auto``, ``torch``, ``onnx``); the engine is built by ``warm_up``.

        Raises:
            RunFormatError: ``source`` is neither, or is damaged. EngineError, ConfigError: ``engine`` cannot run it.
        """
        source = Path(source)
        if not is_onnx_file(source) and not source.is_dir():
            raise RunFormatError(f"{str(source)!r} is neither a run folder nor an exported .onnx file; pass the "
                                 "folder given to `headstart train --out` or a file from `headstart export`")
        clf = load(source)
        clf.engine, clf.device = engine, device
        metrics = None if is_onnx_file(source) else _metrics(source)
        return cls(clf, name or (source.stem if source.is_file() else source.resolve().name), metrics)

    @property
    def engine(self) -> str | None:
        """The engine running the model (``None`` until ``warm_up``)."""
        return getattr(self.predictor.runner, "engine", None)

    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        """Class probabilities ``(N, classes)`` of prepared images ``(N, 3, H, W)``."""
        return np.asarray(self.predictor.probabilities_of_batch(images), dtype=np.float32)

    def warm_up(self, max_batch: int) -> None:
        """Build the engine (a run's backbone is exported to ONNX on first use) and run a batch of one and of
        ``max_batch``, so the first requests do not pay for session set-up and memory arenas."""
        for n in sorted({1, max_batch}):
            self.probabilities(torch.zeros((n, 3, *self.data_config.input_size)))

    def info(self) -> dict:
        """What ``GET /model`` shows: name, classes in order, backbone, head, data config, validation metrics,
        engine and versions."""
        c = self._config
        return {"name": self.name, "classes": self.classes, "backbone": c.get("backbone"), "head": c.get("head"),
                "data_config": self.data_config.to_dict(), "metrics": self._metrics, "engine": self.engine,
                "format": "onnx" if c.get("format") == "headstart-onnx-model" else "run",
                "headstart_version": c.get("headstart_version"), "server_version": __version__}


def _metrics(run: Path) -> dict | None:
    """The run's saved metrics (``metrics.json``), or None when it has none or they cannot be read."""
    path = run / "metrics.json"
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("cannot read %s (%s); /model shows no metrics", path, exc)
        return None
    return metrics if isinstance(metrics, dict) else None
