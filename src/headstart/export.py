"""Export a trained model (backbone + head) as one ONNX file that carries its classes and preprocessing.

    >>> path = export_onnx_model(headstart.load("run").model_, "run/model.onnx")
    >>> model = OnnxModel(path); model.classes, model.data_config.input_size

The graph maps normalised images ``images (N, 3, H, W)`` to ``logits`` and ``probabilities (N, classes)``.
Its ``metadata_props`` hold JSON strings: ``classes``, ``data_config`` (input size, resize policy, mean,
std, interpolation), ``backbone``, ``head`` and ``headstart_version``, so any ONNX runtime can prepare
images the way the weights expect without headstart.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ._version import __version__
from .backbones.concat import refuse_concatenation
from .cache import FeatureCache
from .config import DataConfig, checked_classes
from .engines import OnnxRunner, export_onnx
from .errors import ConfigError, EngineError, RunFormatError
from .hardware import Hardware, default_threads
from .io import read_json
from .protocols import Runner

__all__ = ["FORMAT", "export_onnx_model", "OnnxModel", "is_onnx_file"]

FORMAT = "headstart-onnx-model"
_FORMAT_VERSION = "1"


def is_onnx_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".onnx" and Path(path).is_file()


class _Exported(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.backbone, self.head = model.backbone.body, model.head

    def forward(self, images):
        logits = self.head(self.backbone(images))
        return logits, logits.softmax(-1)


def export_onnx_model(model, out: str | Path, *, check: bool = True) -> Path:
    """Write ``model`` (an ``ImageModel``) to ``out`` as ONNX with its metadata; returns ``out``.

    With ``check``, the file is run on ONNX Runtime against torch on two random images before returning.

    Raises:
        EngineError: the graph cannot be exported, or the exported graph disagrees with torch.
        ConfigError: a concatenated backbone (not exported).
    """
    refuse_concatenation(model.backbone, "headstart export")
    out = Path(out)
    model = model.eval()
    meta = {
        "format": FORMAT, "format_version": _FORMAT_VERSION, "headstart_version": __version__,
        "classes": json.dumps(list(model.classes)),
        "data_config": json.dumps(model.backbone.data_config.to_dict()),
        "backbone": json.dumps(model.backbone.identity()),
        "head": json.dumps(model.head.config.to_dict()),
    }
    example = torch.zeros(2, 3, *model.backbone.data_config.input_size)
    wrapper = _Exported(model).eval()
    export_onnx(wrapper, example, out, output_name=("logits", "probabilities"), metadata=meta)
    if check:
        x = torch.randn_like(example)
        with torch.inference_mode():
            expected = wrapper(x)[1]
        got = torch.from_numpy(OnnxModel(out).probabilities(x))
        diff = float((got - expected).abs().max())
        if diff > 1e-3:
            out.unlink(missing_ok=True)
            raise EngineError(f"the exported graph's probabilities differ from torch by {diff:.2g} (> 1e-3); "
                              "the export is not usable. Please report this with the backbone name.")
    return out


# a user's exported file is theirs: never advise deleting it
_REMEDY = ("export it again from the run folder it came from (headstart export RUN --out FILE), or predict from "
           "that run folder")


class OnnxModel:
    """An exported model on ONNX Runtime: ``classes``, ``data_config`` from the file's metadata, and
    ``logits(images)`` / ``probabilities(images)`` for normalised image batches.

    For a ``Predictor`` it is its own feature source: its "features" are the class probabilities, keyed in
    the feature cache by the file's content.

    Raises (on construction):
        RunFormatError: the file is not a headstart ONNX export or its metadata is damaged.
        EngineError: ONNX Runtime is missing or cannot load the file.
    """

    training = False
    feature_pool = None

    def __init__(self, path: str | Path, threads: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise RunFormatError(f"{str(self.path)!r} does not exist; pass a file written by `headstart export`")
        self.threads = threads or default_threads()
        self.runner = OnnxRunner(self.path, self.threads, remedy=_REMEDY)  # in lanes, as the backbone's engine
        self.session = self.runner.session
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("format") != FORMAT:
            raise RunFormatError(f"{str(self.path)!r} is an ONNX file but not a headstart export (no "
                                 f"'format: {FORMAT}' metadata); export the run with `headstart export RUN`")
        try:
            self.classes = checked_classes(read_json(meta["classes"]), "classes")
            data_config = read_json(meta["data_config"])
            if not isinstance(data_config, dict):
                raise ConfigError(f"data_config must be an object, got {data_config!r}")
            self.data_config = DataConfig.from_dict(data_config)
            self.backbone_identity = read_json(meta.get("backbone", "{}"))
            self.head_config = read_json(meta.get("head", "{}"))
            if not isinstance(self.backbone_identity, dict) or not isinstance(self.head_config, dict):
                raise ConfigError("backbone and head must be objects")
        except (KeyError, ValueError, TypeError, ConfigError) as exc:
            raise RunFormatError(f"the metadata in {str(self.path)!r} is damaged ({exc}); export the run again") from exc
        inputs = self.session.get_inputs()[0].shape
        if len(inputs) != 4 or any(isinstance(g, int) and g != m for g, m in zip(inputs[2:], self.data_config.input_size)):
            raise RunFormatError(f"{str(self.path)!r} asks for input size {self.data_config.input_size} in its metadata "
                                 f"but its graph takes {inputs}; export the run again")
        outputs = self.session.get_outputs()[0].shape
        if len(outputs) != 2 or (isinstance(outputs[1], int) and outputs[1] != len(self.classes)):
            raise RunFormatError(f"{str(self.path)!r} names {len(self.classes)} classes in its metadata but its "
                                 f"graph gives outputs of shape {outputs}; export the run again")
        self.headstart_version = meta.get("headstart_version")
        self.engine = "onnx"
        self.name = f"onnx-model:{self.backbone_identity.get('name', 'unknown')}"
        self.weights_digest = hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]
        self.feature_shape = (len(self.classes),)

    def _run(self, images) -> list[np.ndarray]:
        arr = images.detach().contiguous().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        return self.runner.outputs(arr.astype(np.float32, copy=False))

    def logits(self, images) -> np.ndarray:
        return self._run(images)[0]

    def probabilities(self, images) -> np.ndarray:
        return self._run(images)[1]

    # -- the model members a Predictor uses (see headstart.model.ImageModel) --------------------------------
    @property
    def feature_source(self) -> "OnnxModel":
        return self

    def make_runner(self, engine: str = "auto", batch_size: int = 32, *, hardware: Hardware | None = None,
                    cache: FeatureCache | None = None) -> Runner:
        """A runner over the graph's probabilities output.

        Raises:
            ConfigError: ``engine="torch"``: an exported model runs on ONNX Runtime only.
        """
        if engine == "torch":
            raise ConfigError(f"{self.path} is an exported ONNX model and runs on ONNX Runtime only; "
                              "drop --engine torch, or predict from the run folder")
        return OnnxRunner(self.path, hardware.threads if hardware else self.threads, output=1, remedy=_REMEDY)

    def scores(self, features: torch.Tensor) -> np.ndarray:
        return features.numpy()

    def eval(self) -> "OnnxModel":
        return self

    def train(self, mode: bool = True) -> "OnnxModel":
        return self
