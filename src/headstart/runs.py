"""The run folder: a trained model as safetensors + readable JSON, and loading it back without executing code.

    RUN/model.safetensors   backbone + head weights (every member's, for a concatenation)
    RUN/config.json         backbone identity and weights digest, data config, classes, head, training

A concatenated backbone (``a+b``) records each member's identity (with its data config) under
``backbone.members``, and ``data_config`` is then the list of the members' data configs, in member order.
    RUN/metrics.json        validation (and test) metrics
    RUN/history.csv         one row per epoch
    RUN/data.json           how the data was split, files skipped or ignored, warnings
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ._version import __version__
from .backbones import registry
from .backbones.base import create_backbone
from .backbones.concat import ConcatBackbone, is_concatenation
from .backbones.weights import state_digest
from .config import ConfigError, DataConfig, HeadConfig, checked_classes
from .errors import HeadstartError, RunFormatError, StorageError
from .heads import Head
from .io import atomic_write, read_json, write_json
from .model import ImageModel
from .runfolder import CONFIG_FILE, WEIGHTS_FILE, check_output_folder

__all__ = ["FORMAT_VERSION", "RunReport", "save_model", "write_json", "write_history", "load_model", "read_config",
           "check_output_folder"]

FORMAT_VERSION = 1
log = logging.getLogger("headstart")


@dataclass
class RunReport:
    """What a training did, beside the model: the data it saw, what it skipped and why, the cache's part, the
    time it took. Built by ``ImageClassifier.fit``, printed by the CLI, written to the run's ``data.json``."""

    split: str                                   # how the validation set was obtained
    classes: list[str]
    recipe: dict
    backbone: dict                               # identity: name, weights source and digest, feature shape
    train_counts: dict[str, int]
    val_counts: dict[str, int]
    skipped_unreadable: list[tuple[str, str]]    # (path, reason), train and val
    ignored: list[tuple[str, str]]               # files passed over while scanning
    train_val_duplicates: list[list[str]]
    suspect_images: list[dict]
    val_files: list[str]
    val_labels: list[str]                        # the class of each of val_files
    cache_recomputed: list[dict]
    cache_write_error: str | None
    backbone_passes: dict[str, int]              # images through the (lower) backbone, per split
    from_cache: dict[str, int]
    seconds: dict[str, float] = field(default_factory=dict)  # "extraction", "training", "total"
    best: dict = field(default_factory=dict)     # the history row of the saved weights
    stages: dict[str, dict] = field(default_factory=dict)  # each training stage's best row ("head", "finetune")
    metrics: dict = field(default_factory=dict)  # "val" / "test" -> classification_metrics
    label_errors: list[dict] = field(default_factory=list)  # likely mislabelled training images (label_errors.py)
    duplicates_across_classes: list[dict] = field(default_factory=list)  # near-duplicate pairs in two classes
    label_check_agreement: float | None = None   # share of given labels the label-error check's head predicts
    excluded: list[str] = field(default_factory=list)       # images left out by --exclude FILE
    exclude_unmatched: list[str] = field(default_factory=list)  # lines of that file that named no image
    head_selection: dict | None = None           # how the head was chosen (training.select), if it was
    lr_find: dict | None = None                  # the range test that set the fine-tuning rate, if one did

    def data_json(self) -> dict:
        """The run's ``data.json``: everything but the metrics (``metrics.json``) and the best epoch."""
        d = asdict(self)
        for key in ("metrics", "best"):
            d.pop(key)
        return d


def write_history(path: Path, history: list[dict]) -> None:
    if not history:
        return
    keys = list(dict.fromkeys(k for row in history for k in row))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(buf.getvalue(), encoding="utf-8"))


def save_model(model: ImageModel, out: str | Path, training: dict | None = None) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``out`` (each atomically); returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    bb = model.backbone
    config = {
        "format": "headstart-model",
        "format_version": FORMAT_VERSION,
        "headstart_version": __version__,
        "backbone": _identity(bb),
        "data_config": ([c.to_dict() for c in bb.data_configs] if isinstance(bb, ConcatBackbone)
                        else bb.data_config.to_dict()),
        "classes": model.classes,
        "head": model.head.config.to_dict(),
        "training": training or {},
        # the whole file's content: a config.json from another save (an interrupted re-save, files mixed by
        # hand) is refused instead of pairing these weights with other classes
        "model_digest": state_digest(state),
    }
    # the weights file carries its own copy of the config: a save killed between the two renames leaves
    # weights that still know their classes, so a reader gets the new model or the old one, never a mix
    meta = {"format": "headstart-model", "config": json.dumps(config, default=str)}
    atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(state, tmp, metadata=meta))
    write_json(out / CONFIG_FILE, config)
    return out


def _identity(bb) -> dict:
    """The backbone's identity, each weights digest taken from the weights being saved."""
    if isinstance(bb, ConcatBackbone):
        ident = bb.identity()
        ident["members"] = [m | {"weights_digest": state_digest(b.body.state_dict())}
                            for m, b in zip(ident["members"], bb.members)]
        return ident
    return bb.identity() | {"weights_digest": state_digest(bb.body.state_dict())}


def read_config(run: str | Path) -> dict:
    run = Path(run)
    path = run / CONFIG_FILE
    if not path.is_file():
        raise RunFormatError(f"{str(run)!r} is not a headstart run: {CONFIG_FILE} is missing. "
                             "Pass the folder given to `headstart train --out`.")
    try:
        config = read_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunFormatError(f"{str(path)!r} is damaged ({exc}); retrain or restore the run") from exc
    return _checked_format(config, run, path)


def _checked_format(config, run: Path, path: Path) -> dict:
    if not isinstance(config, dict) or config.get("format") != "headstart-model":
        raise RunFormatError(f"{str(path)!r} is not a headstart model config")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise RunFormatError(f"{str(run)!r} was written in run format {version!r}; this headstart "
                             f"({__version__}) reads format {FORMAT_VERSION}. Use a matching headstart version.")
    return config


_MAX_SIDE = 4096  # a probe pass runs at the input size: a crafted config must not make it huge


def _check_sizes(run: Path, data_config: DataConfig | list[DataConfig], head_cfg: HeadConfig, classes: list,
                 state: dict) -> None:
    """Refuse, before anything is allocated, a config whose sizes are absurd or disagree with the weights."""
    for dc in data_config if isinstance(data_config, list) else [data_config]:
        if not all(isinstance(s, int) and 1 <= s <= _MAX_SIDE for s in dc.input_size):
            raise RunFormatError(f"{str(run / CONFIG_FILE)!r} asks for input size {dc.input_size}; expected sides "
                                 f"from 1 to {_MAX_SIDE}. The config was altered; retrain or restore the run.")
    widths = [*head_cfg.hidden, len(classes)]
    names = [*(f"head.layers.dense_{i}.weight" for i in range(len(head_cfg.hidden))), "head.layers.predictions.weight"]
    for name, width in zip(names, widths):
        t = state.get(name)
        if t is None or t.ndim != 2 or t.shape[0] != width:
            raise RunFormatError(f"the weights in {str(run)!r} do not match its config: {name} is "
                                 f"{None if t is None else tuple(t.shape)}, the config needs {width} outputs. "
                                 "The run was altered or mixed up; retrain or restore it.")


def _config_inside_weights(run: Path, state: dict) -> dict:
    """The config the weights file was saved with, when config.json is from another save; else an error."""
    path = run / WEIGHTS_FILE
    different = RunFormatError(f"{str(path)!r} and {CONFIG_FILE} in {str(run)!r} come from different saves (files "
                               "copied in by hand, or a save interrupted by an older headstart); save or train "
                               "the run again.")
    try:
        with safe_open(str(path), "pt") as f:
            config = read_json((f.metadata() or {}).get("config", "null"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise different from exc
    if not isinstance(config, dict) or config.get("model_digest") != state_digest(state):
        raise different
    config = _checked_format(config, run, path)
    log.warning("%s is from another save than %s (an interrupted save?); using the config saved with the weights "
                "(classes %s). Save the run again to make them agree.", run / CONFIG_FILE, path, config.get("classes"))
    return config


def check_regular_file(path: Path, what: str) -> None:
    """Refuse a FIFO, device or other special file before opening it: reading one would hang or never end."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # the reader's own error says it is missing
    if not stat.S_ISREG(mode):
        raise RunFormatError(f"{what} {str(path)!r} is not a regular file (a FIFO, device or folder); expected the "
                             "file `headstart train` wrote. Restore or retrain the run.")


def _parsed(config: dict, where: str):
    """The backbone identity, classes, data config and head config of a run's config, each checked."""
    try:
        bb_cfg = config["backbone"]
        if not isinstance(bb_cfg, dict) or not isinstance(bb_cfg.get("name"), str):
            raise ConfigError(f"backbone.name must be a backbone's name, got {bb_cfg!r}")
        classes = checked_classes(config["classes"], "classes")
        if not isinstance(config["head"], dict):
            raise ConfigError("head must be an object")
        data_config = _data_configs(bb_cfg, config["data_config"])
        head_cfg = HeadConfig.from_dict(config["head"])
    except (KeyError, TypeError, ValueError) as exc:
        raise RunFormatError(f"{where} lacks or garbles a field ({exc}); retrain or restore the run") from exc
    return bb_cfg, classes, data_config, head_cfg


def _data_configs(bb_cfg: dict, data_config) -> DataConfig | list[DataConfig]:
    """One data config, or for a concatenation one per member (as many as ``backbone.members`` records)."""
    if not is_concatenation(bb_cfg["name"]):
        if not isinstance(data_config, dict):
            raise ConfigError("data_config must be an object")
        return DataConfig.from_dict(data_config)
    members = bb_cfg.get("members")
    if (not isinstance(data_config, list) or not isinstance(members, list) or len(members) != len(data_config)
            or not all(isinstance(d, dict) for d in data_config) or not all(isinstance(m, dict) for m in members)):
        raise ConfigError(f"a concatenation ({bb_cfg['name']}) needs backbone.members and a data_config list, one "
                          "object per member")
    return [DataConfig.from_dict(d) for d in data_config]


_BOUND = ("backbone", "classes", "data_config", "head")  # what a prediction depends on


def _embedded_config(path: Path):
    try:
        with safe_open(str(path), "pt") as f:
            text = (f.metadata() or {}).get("config")
        return None if text is None else read_json(text)
    except (SafetensorError, OSError, ValueError):
        return None


def load_model(run: str | Path) -> tuple[ImageModel, dict]:
    """Rebuild the model saved in ``run`` (offline: no weights are fetched) and return it with its config.

    config.json is a readable copy of the config saved inside the weights file: a field a prediction depends
    on that differs between the two is refused, naming both values.

    Raises:
        RunFormatError: missing or damaged files, another format version, weights that do not match the
            config or hold non-finite values, or a config.json edited away from the weights' own copy.
    """
    run = Path(run)
    config = read_config(run)
    bb_cfg, classes, data_config, head_cfg = _parsed(config, repr(str(run / CONFIG_FILE)))
    check_regular_file(run / WEIGHTS_FILE, "the run's weights")
    try:
        state = load_file(str(run / WEIGHTS_FILE))
    except (SafetensorError, OSError) as exc:
        raise RunFormatError(f"{str(run / WEIGHTS_FILE)!r} is missing or damaged ({exc})") from exc
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise RunFormatError(f"the weights in {str(run / WEIGHTS_FILE)!r} hold NaN or infinite values ({bad[0]}"
                             f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); a diverged training or a "
                             "damaged file: retrain the run or restore it")
    if "model_digest" in config and state_digest(state) != config["model_digest"]:
        config = _config_inside_weights(run, state)
        bb_cfg, classes, data_config, head_cfg = _parsed(config, f"the config inside {str(run / WEIGHTS_FILE)!r}")
    else:
        inside = _embedded_config(run / WEIGHTS_FILE)
        if isinstance(inside, dict):
            for key in _BOUND:
                if json.dumps(inside.get(key), sort_keys=True) != json.dumps(config.get(key), sort_keys=True):
                    raise RunFormatError(
                        f"{CONFIG_FILE} in {str(run)!r} says {key} {config.get(key)!r} but the weights were saved "
                        f"with {inside.get(key)!r}; config.json is a readable copy and was edited. Restore it, "
                        "or retrain the run to change it")
    _check_sizes(run, data_config, head_cfg, classes, state)
    _check_backbone_tensors(run, bb_cfg, data_config, state)
    try:
        backbone = create_backbone(bb_cfg["name"], weights=None, data_config=data_config)
        head = Head(head_cfg, backbone.feature_shape, len(classes))
        model = ImageModel(backbone, head, classes)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as exc:
        raise RunFormatError(f"the weights in {str(run)!r} do not match its config ({str(exc)[:300]})") from exc
    except HeadstartError as exc:
        raise RunFormatError(f"cannot rebuild the model in {str(run)!r}: {exc}") from exc
    if isinstance(backbone, ConcatBackbone):
        for member, recorded in zip(backbone.members, bb_cfg["members"]):
            _check_weights(run, member, recorded)
    else:
        _check_weights(run, backbone, bb_cfg)
    model.eval()
    return model, config


def _check_backbone_tensors(run: Path, bb_cfg: dict, data_config, state: dict) -> None:
    """The weights' backbone tensors against the backbone the config names, built on torch's meta device (shapes
    only): a config naming a large network the weights do not hold is refused before that network is allocated."""
    name = bb_cfg["name"]
    if is_concatenation(name):
        return
    try:
        entry = registry.get(name)
    except HeadstartError as exc:
        raise RunFormatError(f"cannot rebuild the model in {str(run)!r}: {exc}") from exc
    try:
        with torch.device("meta"):
            body = entry.build(tuple(data_config.input_size), False)
    except Exception:  # noqa: BLE001 - a network that cannot be built on the meta device: the real build checks
        return
    want = {k: tuple(v.shape) for k, v in body.state_dict().items()}
    prefix = "backbone.body."
    have = {k[len(prefix):]: tuple(v.shape) for k, v in state.items() if k.startswith(prefix)}
    if want != have:
        missing = sorted(set(want) - set(have))
        other = sorted(k for k in set(want) & set(have) if want[k] != have[k])
        example = (missing or other or sorted(set(have) - set(want)))[0]
        raise RunFormatError(
            f"the weights in {str(run)!r} do not hold the backbone its config names ({name}: {len(missing)} of "
            f"its {len(want)} tensors missing, {len(other)} of another shape, e.g. {example!r}); the config or the "
            "weights were changed. Restore the run, or retrain it")


def _check_weights(run: Path, backbone, recorded: dict) -> None:
    """Refuse backbone weights other than those the config records; give the backbone its recorded identity."""
    digest = state_digest(backbone.body.state_dict())
    if digest != recorded.get("weights_digest"):
        raise RunFormatError(f"the backbone weights in {str(run)!r} (digest {digest}) are not those its config "
                             f"records ({recorded.get('weights_digest')}); the run was altered or mixed up")
    backbone.weights_digest = digest
    backbone.weights_source = recorded.get("weights_source", "run")
