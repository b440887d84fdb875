"""The settings, one dataclass per concern: the only home of every default and every choice.

    >>> TrainConfig().epochs
    60
    >>> Recipe(strategy="finetune").augmentation
    'light'

The CLI builds its flags from these fields (``headstart.cli``) and ``ImageClassifier`` takes the same names
with the same defaults; a test holds the three together. This module imports nothing heavy (no torch), so
``headstart --help`` starts at once.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field

from .errors import ConfigError

__all__ = ["DataConfig", "HeadConfig", "TrainConfig", "Recipe", "EngineConfig", "SplitConfig", "BackboneConfig",
           "ServeConfig", "ShardConfig", "ReportConfig", "AutoConfig", "STRATEGIES", "HEAD_POOLS", "HEAD_SEARCHES",
           "AUGMENTS", "ENGINES", "DEVICES", "INTERPOLATIONS", "RESIZE_MODES", "EXPLAIN_METHODS",
           "option", "cli_fields", "checked_classes", "MAX_SIDE"]

STRATEGIES = ("frozen", "frozen-aug", "finetune")
HEAD_POOLS = ("flatten", "avg")
HEAD_SEARCHES = ("auto", "off")
AUGMENTS = ("none", "light", "strong")
ENGINES = ("auto", "torch", "onnx")
DEVICES = ("auto", "cpu", "cuda")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
RESIZE_MODES = ("squash", "crop")
# `headstart explain --method`: the class-activation maps of the grad-cam package (docs/explain.md)
EXPLAIN_METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "eigencam")


def option(default, help: str, *, flag: str | None = None, dest: str | None = None, choices=None,
           cli: bool = True, **argparse_kwargs):
    """A dataclass field that also describes its command-line flag.

    ``flag`` defaults to ``--field-name``; ``dest`` is the name the CLI and ``ImageClassifier`` use when it
    differs from the field's; ``cli=False`` keeps a knob out of the CLI (still a named, documented default).
    """
    meta = {"help": help, "flag": flag, "dest": dest, "choices": choices, "cli": cli, "argparse": argparse_kwargs}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults: use a tuple")
    return field(default=default, metadata=meta)


def cli_fields(cls) -> list[dataclasses.Field]:
    """The fields of a config class that have a command-line flag."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", False)]


MAX_SIDE = 4096  # images are resized to the input size: past this, one batch alone would fill the memory


def checked_classes(classes, where: str) -> list[str]:
    """``classes`` as a list of unique, non-empty strings, else a ``ConfigError`` naming ``where`` they came from."""
    if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
        raise ConfigError(f"{where}: classes must be a list of names, got {classes!r}")
    if any(not c.strip() for c in classes) or len(set(classes)) != len(classes) or len(classes) < 2:
        raise ConfigError(f"{where}: classes must be two or more unique, non-empty names, got {list(classes)!r}")
    return list(classes)


def _finite(name: str, value, lo: float | None = None, hi: float | None = None, *, lo_open=False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ConfigError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{name} must be <= {hi}, got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """How images must be prepared for a backbone's weights.

    ``resize_mode="squash"`` resizes the whole image to ``input_size`` (Keras' way);
    ``"crop"`` resizes the shorter side to ``input_size / crop_pct`` and takes the centre (timm's way).
    ``mean`` and ``std`` apply to pixels scaled to 0..1.
    """

    input_size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    resize_mode: str = "crop"
    crop_pct: float = 0.875

    def __post_init__(self):
        size, mean, std = self.input_size, self.mean, self.std
        if (not isinstance(size, tuple) or len(size) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= MAX_SIDE for s in size)):
            raise ConfigError(f"input_size must be two whole numbers from 1 to {MAX_SIDE} (height, width), got "
                              f"{size!r}")
        for name, values in (("mean", mean), ("std", std)):
            if not isinstance(values, tuple) or len(values) != 3:
                raise ConfigError(f"{name} needs three numbers (R, G, B), got {values!r}")
            for v in values:
                _finite(name, v, 0.0 if name == "std" else None, lo_open=True)
            if name == "mean" and not all(-10 <= v <= 10 for v in values):
                raise ConfigError(f"mean is for pixels scaled to 0..1, got {values!r}")
            # past these the normalised pixels overflow float32 or all round to the same value
            if name == "std" and not all(1e-4 <= v <= 10 for v in values):
                raise ConfigError(f"std is for pixels scaled to 0..1 (ImageNet's is about 0.22, caffe-style 1/255), "
                                  f"each from 0.0001 to 10; got {values!r}")
        _finite("crop_pct", self.crop_pct, 0.0, 1.0, lo_open=True)
        if max(size) / self.crop_pct > MAX_SIDE:  # the resize before the centre crop would be this large
            raise ConfigError(f"crop_pct {self.crop_pct!r} would resize images to {max(size) / self.crop_pct:.3g} px "
                              f"before the {size[0]}x{size[1]} crop, over {MAX_SIDE}; expected at least "
                              f"{max(size) / MAX_SIDE:.3g} (timm's weights use 0.75 to 1.0)")
        if not isinstance(self.interpolation, str) or not isinstance(self.resize_mode, str):
            raise ConfigError(f"interpolation and resize_mode must be names, got {self.interpolation!r} and "
                              f"{self.resize_mode!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"interpolation {self.interpolation!r} is not one of {INTERPOLATIONS}")
        if self.resize_mode not in RESIZE_MODES:
            raise ConfigError(f"resize_mode {self.resize_mode!r} is not one of {RESIZE_MODES}")

    def with_input_size(self, size: int | tuple[int, int] | None) -> "DataConfig":
        if size is None:
            return self
        hw = (size, size) if isinstance(size, int) else tuple(size)
        return dataclasses.replace(self, input_size=(int(hw[0]), int(hw[1])))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown data config fields {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        for key in ("input_size", "mean", "std"):
            if isinstance(d.get(key), list):
                d[key] = tuple(d[key])
        return cls(**d)


@dataclass(frozen=True)
class BackboneConfig:
    """Which backbone, with which weights, at which input size."""

    backbone: str = option("efficientnet_lite0", "registry name (`headstart backbones`) or timm:<model>; several "
                           "joined by + (efficientnet_lite0+efficientnet_lite2) concatenate their features")
    weights: str | None = option("imagenet", "weights file (safetensors or a PyTorch state dict), or imagenet: from "
                                 "a package or the hub", metavar="FILE")
    input_size: int | None = option(None, "image side in pixels (default: the weights' own)", type=int)

    def __post_init__(self):
        size = self.input_size
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= MAX_SIDE):
            raise ConfigError(f"input size must be a whole number of pixels from 1 to {MAX_SIDE}, got {size!r} "
                              "(--input-size)")


MAX_HIDDEN = 16384  # a Dense layer this wide on a 25088-wide VGG map is already 1.6 GB of weights


@dataclass(frozen=True)
class HeadConfig:
    """``pool``: ``flatten`` (Keras' Flatten on the C x H x W map) or ``avg`` (global average pooling); ``None``
    takes the backbone's default. ``hidden``: widths of Dense + ReLU layers before the classifier; ``dropout``:
    rate before each Dense."""

    pool: str | None = option(None, "flatten the feature map (the Keras recipe) or average-pool it (default: the "
                              "backbone's: VGG flatten, others avg)", flag="--head", dest="head", choices=HEAD_POOLS)
    hidden: tuple[int, ...] = option((), "widths of hidden Dense layers (default: none)", nargs="*", type=int,
                                     metavar="WIDTH")
    dropout: float = option(0.0, "dropout rate before each Dense layer", type=float)

    def __post_init__(self):
        if self.pool is not None and self.pool not in HEAD_POOLS:
            raise ConfigError(f"head pool {self.pool!r} is not one of {HEAD_POOLS}; use --head flatten or --head avg")
        _finite("dropout", self.dropout, 0.0)
        if not self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not all(isinstance(h, int) and not isinstance(h, bool) and 1 <= h <= MAX_HIDDEN for h in self.hidden):
            raise ConfigError(f"hidden layer widths must be whole numbers from 1 to {MAX_HIDDEN}, got "
                              f"{self.hidden!r} (--hidden)")
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))

    def resolved(self, default_pool: str) -> "HeadConfig":
        """This config with the backbone's default pooling filled in."""
        return self if self.pool is not None else dataclasses.replace(self, pool=default_pool)

    def to_dict(self) -> dict:
        return asdict(self) | {"hidden": list(self.hidden)}

    @classmethod
    def from_dict(cls, d: dict) -> "HeadConfig":
        hidden = d.get("hidden", ())
        if not isinstance(hidden, (list, tuple)):
            raise ConfigError(f"head hidden widths must be a list, got {hidden!r}")
        return cls(pool=d["pool"], hidden=tuple(hidden), dropout=d.get("dropout", 0.0))


@dataclass(frozen=True)
class TrainConfig:
    """The epoch loop: AdamW, early stopping on validation loss, the best epoch's weights kept.

    ``weight_decay`` is AdamW's decoupled decay; the head standardises its inputs, so a strong decay (5.0 by
    default) acts as the regularisation a small data set needs. ``class_weight="balanced"`` weights the loss
    by inverse class frequency.
    """

    epochs: int = option(60, "most epochs of head training", type=int)
    batch_size: int = option(32, "images per training step", type=int)
    lr: float = option(1e-3, "learning rate of the head", type=float)
    weight_decay: float = option(5.0, "AdamW decoupled weight decay of the head (strong: the head's inputs are "
                                 "standardised, so this is its regularisation)", type=float)
    patience: int = option(10, "early stopping: epochs without a better validation loss", type=int)
    class_weight: str | None = option(None, "class-weighted loss for imbalanced data", flag="--balanced",
                                      action="store_const", const="balanced")
    label_smoothing: float = option(0.0, "label smoothing of the loss", type=float)
    seed: int = option(0, "seed for the split, the views and the training", type=int)
    warmup_epochs: float = option(0.0, "epochs of linear learning-rate warm-up", cli=False)
    cosine: bool = option(False, "cosine learning-rate decay after the warm-up", cli=False)
    clip_grad: float | None = option(None, "gradient norm clipping", cli=False)
    head_search: str = option("auto", "frozen strategy: choose the head (logistic regression over a grid of C, or "
                              "one hidden layer with dropout) by cross-validation on train (on val from 500 "
                              "images); off: train the head as given", choices=HEAD_SEARCHES)

    def __post_init__(self):
        if self.head_search not in HEAD_SEARCHES:
            raise ConfigError(f"head_search must be one of {HEAD_SEARCHES}, got {self.head_search!r} (--head-search)")
        for name in ("epochs", "batch_size", "patience"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a whole number >= 1, got {value!r} (--{name.replace('_', '-')})")
        _finite("lr (--lr)", self.lr, 0.0, lo_open=True)
        _finite("weight_decay (--weight-decay)", self.weight_decay, 0.0)
        _finite("label_smoothing (--label-smoothing)", self.label_smoothing, 0.0)
        if not self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing} (--label-smoothing)")
        _finite("warmup_epochs", self.warmup_epochs, 0.0)
        if self.clip_grad is not None:
            _finite("clip_grad", self.clip_grad, 0.0, lo_open=True)
        if self.class_weight not in (None, "balanced"):
            raise ConfigError(f"class_weight must be None or 'balanced', got {self.class_weight!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Recipe:
    """How the backbone takes part: ``frozen`` (cached features, head only), ``frozen-aug`` (cached augmented
    views, head only) or ``finetune`` (head first, then the last layer groups).

    ``augment``: ``none``/``light``/``strong`` (default: none for frozen, light otherwise); ``views``: augmented
    views cached per training image; ``unfreeze``: layer groups fine-tuned (default: the backbone's own);
    ``finetune_lr`` for the last group, ``lr_decay`` per earlier group; the head gets ``head_lr_factor`` times
    ``finetune_lr``.
    """

    strategy: str = option("frozen", "frozen: head on cached features; frozen-aug: head on cached augmented views; "
                           "finetune: then the last layer groups too", choices=STRATEGIES)
    augment: str | None = option(None, "augmentation preset (default: none for frozen, light otherwise)",
                                 choices=AUGMENTS)
    views: int = option(5, "augmented views cached per training image", type=int)
    unfreeze: int | None = option(None, "layer groups to fine-tune (default: the backbone's; VGG: block5)", type=int)
    finetune_epochs: int = option(15, "most epochs of fine-tuning", type=int)
    finetune_lr: float | None = option(None, "learning rate of the last layer group; earlier ones get less "
                                       "(default: the learning-rate range test's suggestion, as lr-find)",
                                       type=float)
    finetune_rates: int = option(3, "without --finetune-lr and with a validation set: rates tried from the range "
                                 "test's suggestion up to where its loss climbs, the best on validation kept (1: the "
                                 "suggestion alone)", type=int)
    lr_decay: float = option(0.5, "learning-rate factor per earlier layer group", cli=False)
    head_lr_factor: float = option(10.0, "the head's learning rate while fine-tuning, as a multiple of finetune_lr",
                                   cli=False)
    finetune_weight_decay: float = option(0.01, "AdamW weight decay of the fine-tuned layers", cli=False)
    finetune_warmup_epochs: float = option(1.0, "warm-up epochs of fine-tuning", cli=False)
    finetune_clip_grad: float = option(1.0, "gradient norm clipping while fine-tuning", cli=False)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy {self.strategy!r} is not one of {STRATEGIES}")
        if self.views < 1:
            raise ConfigError(f"views must be >= 1, got {self.views}")
        if self.finetune_lr is not None:  # None: the learning-rate range test sets it
            _finite("finetune_lr (--finetune-lr)", self.finetune_lr, 0.0, lo_open=True)
        for name in ("lr_decay", "head_lr_factor"):
            _finite(name, getattr(self, name), 0.0, lo_open=True)
        _finite("finetune_weight_decay", self.finetune_weight_decay, 0.0)
        if self.finetune_epochs < 1:
            raise ConfigError(f"finetune_epochs must be >= 1, got {self.finetune_epochs} (--finetune-epochs)")
        if isinstance(self.finetune_rates, bool) or not isinstance(self.finetune_rates, int) or self.finetune_rates < 1:
            raise ConfigError(f"finetune_rates must be a whole number of at least 1, got {self.finetune_rates!r} "
                              "(--finetune-rates)")
        if self.augmentation not in AUGMENTS:
            raise ConfigError(f"augmentation {self.augmentation!r} is not one of {sorted(AUGMENTS)}")

    @property
    def augmentation(self) -> str:
        return self.augment or ("none" if self.strategy == "frozen" else "light")

    def finetune_patience(self) -> int:
        return max(3, self.finetune_epochs // 3)

    def to_dict(self) -> dict:
        return asdict(self) | {"augment": self.augmentation}


@dataclass(frozen=True)
class SplitConfig:
    """How validation data is found when none is given."""

    val_fraction: float = option(0.2, "share of each class held out for validation when there is no val set",
                                 type=float)
    exclude: str | None = option(None, "a text file of image paths to leave out of training and validation (one "
                                 "per line, # comments; e.g. the label errors `headstart check` lists)",
                                 metavar="FILE")

    def __post_init__(self):
        _finite("val_fraction (--val-fraction)", self.val_fraction, 0.0)
        if not self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be between 0 and 1 (a share of each class), got "
                              f"{self.val_fraction} (--val-fraction)")


@dataclass(frozen=True)
class EngineConfig:
    """Where the work runs: the inference engine of the frozen backbone, and the device (see ``hardware``)."""

    engine: str = option("auto", "runs the frozen backbone: ONNX Runtime when usable (auto), or torch",
                         choices=ENGINES)
    device: str = option("auto", "cpu, cuda, or auto (cuda when available)", choices=DEVICES)

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ConfigError(f"unknown engine {self.engine!r}; expected one of {', '.join(ENGINES)} (--engine)")
        if self.device not in DEVICES:
            raise ConfigError(f"unknown device {self.device!r}; expected one of {', '.join(DEVICES)} (--device)")


@dataclass(frozen=True)
class ServeConfig:
    """``headstart serve``: where it listens, how it batches, and the limits that keep it answering.

    Requests are gathered into one engine batch of up to ``max_batch`` images, waiting at most ``max_wait_ms``
    for images already being decoded. At most ``max_queue`` images wait for the model; past that, or
    ``timeout`` seconds after arrival without reaching it, a request is answered 503 with ``Retry-After``.
    ``api_key`` (or the ``HEADSTART_API_KEY`` environment variable) makes every model route ask for
    ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``.
    """

    host: str = option("127.0.0.1", "address to listen on (another host than 127.0.0.1 exposes the model to "
                       "the network)", metavar="ADDR")
    port: int = option(8000, "TCP port (0: any free port; the one chosen is printed)", type=int)
    max_batch: int = option(32, "most images in one engine batch", type=int, metavar="N")
    max_wait_ms: float = option(5.0, "most milliseconds a batch waits for images still being decoded", type=float,
                                metavar="MS")
    max_body_mb: float = option(20.0, "largest request body in MB (larger: 413)", type=float, metavar="MB")
    max_images: int = option(64, "most images in one request (more: 413)", type=int, metavar="N")
    max_megapixels: float = option(50.0, "largest image in megapixels (larger: 422, a decompression bomb)",
                                   type=float, metavar="MP")
    max_queue: int = option(256, "most images waiting for the model (more: 503 with Retry-After)", type=int,
                            metavar="N")
    timeout: float = option(10.0, "seconds a request may wait for the model (longer: 503 with Retry-After)",
                            type=float, metavar="S")
    api_key: str | None = option(None, "require this key (Authorization: Bearer KEY or X-API-Key: KEY); default: "
                                 "$HEADSTART_API_KEY, else no key", metavar="KEY")
    cors: tuple[str, ...] = option((), "allow browser pages from this origin (repeat for more; default: none)",
                                   metavar="ORIGIN", action="append")
    name: str | None = option(None, "the model's name in the routes (default: the run folder's or file's name)")
    access_log: bool = option(False, "log every request", action="store_true")
    decode_threads: int | None = option(None, "threads decoding uploads (default: two on two cores)", cli=False)
    shutdown_timeout: float = option(30.0, "seconds SIGINT/SIGTERM waits for requests in flight", cli=False)

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0..65535, got {self.port} (--port)")
        for name in ("max_batch", "max_images", "max_queue"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)} (--{name.replace('_', '-')})")
        _finite("max_wait_ms (--max-wait-ms)", self.max_wait_ms, 0.0)
        for name in ("max_body_mb", "max_megapixels", "timeout"):
            _finite(f"{name} (--{name.replace('_', '-')})", getattr(self, name), 0.0, lo_open=True)
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key is empty; give a non-empty --api-key or HEADSTART_API_KEY, or neither")
        object.__setattr__(self, "cors", tuple(self.cors or ()))


@dataclass(frozen=True)
class ShardConfig:
    """How ``headstart shard`` cuts a data set into tar shards. A shard is the unit a rank reads, so a data set
    should have at least as many shards as there will be ranks; 1000 photos make a shard of about 100 MB."""

    max_count: int = option(1000, "most images per shard", type=int)
    max_size: int = option(1_000_000_000, "most bytes per shard (about)", cli=False)

    def __post_init__(self):
        if self.max_count < 1 or self.max_size < 1:
            raise ConfigError(f"max_count and max_size must be >= 1, got {self.max_count} and {self.max_size}")


@dataclass(frozen=True)
class ReportConfig:
    """The run report (``RUN/report.html``, ``headstart report``): ``headstart train`` writes one after saving
    the model unless ``skip``; ``heatmaps`` of the top-loss images get a heatmap beside them."""

    skip: bool = option(False, "do not write RUN/report.html after training", flag="--no-report", dest="no_report")
    heatmaps: int = option(16, "top-loss images shown with a heatmap of where the model looked (0: none)", type=int)

    def __post_init__(self):
        if isinstance(self.heatmaps, bool) or not isinstance(self.heatmaps, int) or self.heatmaps < 0:
            raise ConfigError(f"heatmaps must be a whole number of at least 0, got {self.heatmaps!r} (--heatmaps)")


@dataclass(frozen=True)
class AutoConfig:
    """``headstart train --auto``: offline backbones with heads chosen for each, tried in order of cost until
    ``time_budget`` (``90s``, ``15m``, ``1h``, or seconds) would be passed; the best by validation is saved."""

    auto: bool = option(False, "try the offline backbones (and --backbone/--weights), each with its head chosen "
                        "by validation, within --time-budget; save the best and a leaderboard")
    time_budget: str = option("15m", "--auto: wall time allowed for the search (90s, 15m, 1h)", metavar="TIME")

    def __post_init__(self):
        self.seconds()

    def seconds(self) -> float:
        text = str(self.time_budget).strip().lower()
        units = {"s": 1, "m": 60, "h": 3600}
        try:
            value = float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
        except ValueError:
            value = float("nan")
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"time budget {self.time_budget!r} is not a duration; give e.g. 90s, 15m or 1h")
        return value
