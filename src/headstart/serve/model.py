"""The model behind the service: a run folder or an exported ONNX file as one call, images -> probabilities.

    >>> served = ServedModel.open("run")            # or "model.onnx"
    >>> served.warm_up(32); served.probabilities(images)   # (N, 3, H, W) normalised -> (N, classes)

A run's backbone runs on its inference engine (``headstart.engines``, ONNX Runtime by default) and its head
follows in torch, as ``headstart predict`` does; an exported file runs whole on ONNX Runtime.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..config import DataConfig
from ..engines import make_runner
from ..errors import RunFormatError
from ..export import OnnxModel, is_onnx_file
from ..runs import load_model

__all__ = ["ServedModel"]

log = logging.getLogger("headstart")


class ServedModel:
    """``classes``, ``data_config``, ``info()`` for the model routes, and ``probabilities(images)``.

    Not thread-safe: the service calls it from one model thread.
    """

    def __init__(self, name: str, classes: list[str], data_config: DataConfig, info: dict, run):
        self.name, self.classes, self.data_config = name, list(classes), data_config
        self._info, self._run = info, run
        self.engine: str | None = None

    @classmethod
    def open(cls, source: str | Path, engine: str = "auto", name: str | None = None) -> "ServedModel":
        """The model in ``source``: a run folder (``headstart train --out``) or a file from ``headstart export``.

        ``engine`` runs a run's backbone (``auto``, ``torch``, ``onnx``; an exported file is always ONNX Runtime).
        The engine itself is made by ``warm_up``.

        Raises:
            RunFormatError: ``source`` is neither, or is damaged. EngineError: ONNX Runtime cannot load the file.
        """
        source = Path(source)
        name = name or (source.stem if source.is_file() else source.resolve().name)
        if is_onnx_file(source):
            m = OnnxModel(source)
            info = {"backbone": m.backbone_identity, "head": m.head_config, "headstart_version": m.headstart_version,
                    "metrics": None, "format": "onnx"}
            served = cls(name, m.classes, m.data_config, info, m.probabilities)
            served.engine = "onnx"
            return served
        if not source.is_dir():
            raise RunFormatError(f"{str(source)!r} is neither a run folder nor an exported .onnx file; pass the "
                                 "folder given to `headstart train --out` or a file from `headstart export`")
        model, config = load_model(source)
        info = {"backbone": config["backbone"], "head": config["head"], "metrics": _metrics(source),
                "headstart_version": config.get("headstart_version"), "format": "run"}
        served = cls(name, model.classes, model.data_config, info, None)
        served._model, served._requested = model, engine
        return served

    def warm_up(self, max_batch: int) -> None:
        """Make the engine (a run's backbone is exported to ONNX on first use) and run a batch of one and of
        ``max_batch``, so the first requests do not pay for session set-up and memory arenas."""
        if self._run is None:
            runner = make_runner(self._model.backbone, self._requested, max_batch)
            head = self._model.head.eval()

            def run(x: torch.Tensor) -> np.ndarray:
                feats = runner(x)
                with torch.inference_mode():
                    return head(feats).softmax(-1).numpy()

            self._run, self.engine = run, runner.engine
        for n in sorted({1, max_batch}):
            self.probabilities(torch.zeros((n, 3, *self.data_config.input_size)))

    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        """Class probabilities ``(N, classes)`` for normalised images ``(N, 3, H, W)``; call ``warm_up`` first."""
        return np.asarray(self._run(images), dtype=np.float32)

    def info(self) -> dict:
        """What ``GET /model`` shows: name, classes in order, backbone, head, data config, validation metrics,
        engine and versions."""
        return {"name": self.name, "classes": self.classes, "data_config": self.data_config.to_dict(),
                "engine": self.engine, "server_version": __version__, **self._info}


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
