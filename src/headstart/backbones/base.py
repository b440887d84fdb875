"""The Backbone module and ``create_backbone``, the one factory for every registered backbone.

    >>> bb = create_backbone("vgg16", weights=None, input_size=150)
    >>> bb.feature_shape
    (512, 4, 4)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .. import hardware
from ..errors import ConfigError, WeightsUnavailableError
from . import registry
from .concat import ConcatBackbone, is_concatenation, member_names
from .registry import BackboneEntry, DataConfig
from .weights import match_state_dict, read_preprocessing_json, read_weights_file, state_digest

__all__ = ["Backbone", "create_backbone", "activation_bytes", "check_activation_memory", "EXTRACTION_BATCH"]

EXTRACTION_BATCH = 32  # images per forward pass when features are extracted (``extract_features``)


class Backbone(nn.Module):
    """A pretrained network without its classifier.

    Attributes:
        name: the registry name.
        data_config: the preprocessing its weights expect.
        num_features: channels of the feature map.
        feature_shape: ``(C, H, W)`` of the feature map at ``data_config.input_size``.
        weights_source: where the weights came from (``package:...``, ``file:...``, ``hub:...``, ``random``).
        weights_digest: a digest of the weights' content, for cache keys and run provenance.
    """

    def __init__(self, entry: BackboneEntry, body: nn.Module, data_config: DataConfig,
                 weights_source: str, include_top: bool = False):
        super().__init__()
        self.entry = entry
        self.name = entry.name
        self.body = body
        self.data_config = data_config
        self.weights_source = weights_source
        self.include_top = include_top
        self.weights_digest = state_digest(self.body.state_dict())
        with torch.inference_mode():
            was_training = body.training
            body.eval()
            probe = body(torch.zeros(1, 3, *data_config.input_size))
            body.train(was_training)
        self.feature_shape = tuple(probe.shape[1:])
        self.num_features = self.feature_shape[0]

    @property
    def default_head(self) -> str:
        """The head's pooling when none is given (VGG: flatten, others: avg)."""
        return self.entry.default_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(N, 3, H, W)``, normalised per ``data_config`` -> feature map ``(N, C, h, w)``."""
        return self.body(x)

    def forward_top(self, fmap: torch.Tensor) -> torch.Tensor:
        """The original ImageNet logits from a feature map; only with ``include_top=True``."""
        if not self.include_top:
            raise ConfigError(f"{self.name} was created without its top; pass include_top=True")
        return self.body.forward_top(fmap)

    def layer_groups(self) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` from input to output: VGG ``block1..block5``, EfficientNet ``stem, stage1..``."""
        return self.entry.groups(self.body)

    def freeze(self) -> "Backbone":
        """Make every backbone parameter non-trainable (``base.trainable = False``)."""
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def unfreeze(self, last_groups: int | None = None) -> "Backbone":
        """Make the last ``last_groups`` layer groups trainable (all of them with ``None``)."""
        groups = self.layer_groups()
        if last_groups is None:
            last_groups = len(groups)
        if not 0 <= last_groups <= len(groups):
            raise ConfigError(f"{self.name} has {len(groups)} layer groups; cannot unfreeze {last_groups}")
        self.freeze()
        for _, module in groups[len(groups) - last_groups:]:
            for p in module.parameters():
                p.requires_grad_(True)
        return self

    def identity(self) -> dict:
        """What a run records to rebuild this backbone and key its features."""
        return {
            "name": self.name,
            "weights_source": self.weights_source,
            "weights_digest": self.weights_digest,
            "feature_shape": list(self.feature_shape),
        }


def create_backbone(
    name: str,
    weights: str | Path | None = "imagenet",
    input_size: int | tuple[int, int] | None = None,
    include_top: bool = False,
    data_config: DataConfig | list[DataConfig] | None = None,
    batch: int = 1,
) -> Backbone | ConcatBackbone:
    """Build a registered backbone, Keras-style.

    Args:
        name: a registry name (``headstart backbones``) or ``timm:<model>``.
        weights: ``"imagenet"`` (bundled package, then the hub), a path to a safetensors / PyTorch
            state-dict file (a JSON with the same stem may give its preprocessing), or ``None`` for
            random initialisation.
        input_size: square side or ``(h, w)``; defaults to the weights' own.
        include_top: keep the ImageNet classifier (EfficientNet / timm models only).
        data_config: overrides the preprocessing entirely (used when loading a saved model); for a
            concatenation, a list with one per member.
        batch: the images one forward pass will take; above the weights' own input size, the memory that
            needs is estimated and checked before anything of that size is allocated.

    ``name`` may join several backbones with ``+`` (``efficientnet_lite0+efficientnet_lite2``): the result is
    a ``ConcatBackbone`` of the members, each with its own weights (``"imagenet"`` or ``None``) and preprocessing.

    Raises:
        UnknownBackboneError, WeightsUnavailableError, WeightsMismatchError, ConfigError.
    """
    if is_concatenation(name):
        return _concatenation(name, weights, input_size, include_top, data_config)
    entry = registry.get(name)
    cfg = data_config or entry.data_config
    state, source = None, "random"
    if weights is not None and str(weights) != "imagenet":
        path = Path(weights)
        state, source = read_weights_file(path), f"file:{path.name}"
        if data_config is None:
            cfg = read_preprocessing_json(path, entry.data_config) or cfg
    elif weights is not None:
        state, source = _from_sources(entry)
    if input_size is not None:
        cfg = cfg.with_input_size(input_size)
    if min(cfg.input_size) < entry.min_input_size:
        raise ConfigError(
            f"input size {cfg.input_size} is too small for {name}: each side must be at least "
            f"{entry.min_input_size} pixels. Pass --input-size {entry.min_input_size} or more."
        )
    check_activation_memory(entry, cfg.input_size, batch)  # before the probe pass below runs at this size
    with torch.random.fork_rng():
        torch.manual_seed(0)  # random initialisation is reproducible too (and so its feature cache key)
        body = entry.build(cfg.input_size, include_top)
    if state is not None:
        body.load_state_dict(match_state_dict(body.state_dict(), state, f"{name} weights from {source}"),
                             strict=False)
    return Backbone(entry, body, cfg, source, include_top=include_top)


def _concatenation(name, weights, input_size, include_top, data_configs) -> ConcatBackbone:
    names = member_names(name)
    for member in names:
        registry.get(member)  # an unknown member fails before any weights load
    if weights is not None and str(weights) != "imagenet":
        raise ConfigError(f"--weights {weights} names one backbone's weights, and {name!r} concatenates "
                          f"{len(names)}: each member takes its own ImageNet weights. Leave --weights out (or use "
                          "--random-init)")
    if input_size is not None:
        raise ConfigError(f"each member of {name!r} reads images at its own size; leave --input-size out")
    if include_top:
        raise ConfigError(f"{name!r} is a concatenation of backbones without their tops; include_top=False only")
    if data_configs is not None and len(data_configs) != len(names):
        raise ConfigError(f"{len(data_configs)} data configs for the {len(names)} members of {name!r}")
    configs = data_configs if data_configs is not None else [None] * len(names)
    return ConcatBackbone([create_backbone(n, weights, data_config=c) for n, c in zip(names, configs)])


def _from_sources(entry: BackboneEntry) -> tuple[dict, str]:
    reasons = []
    for src in entry.sources:
        try:
            return src.load(), src.label
        except WeightsUnavailableError as exc:
            reasons.append(f"{src.label}: {exc}")
    tried = "; ".join(reasons) or "it has no registered weight source"
    raise WeightsUnavailableError(
        f"No ImageNet weights for {entry.name!r} here ({tried}). Give a weights file with --weights FILE "
        f"(safetensors or a PyTorch state dict; Python: weights='FILE'), or train from random weights with "
        f"--random-init (Python: weights=None). HF_HUB_OFFLINE=1 keeps headstart from asking the hub."
    )


def activation_bytes(entry: BackboneEntry, input_size: tuple[int, int]) -> int | None:
    """An estimate of the memory one image's forward pass (no gradients) needs at ``input_size``: the largest
    input plus output of any layer, as a pass frees each layer's input once the next has run. Computed on
    torch's meta device (shapes only: nothing is allocated, nothing is computed); ``None`` for a network the
    meta device cannot run."""
    peak = 0

    def record(module, inputs, output):
        nonlocal peak
        tensors = [t for t in (*inputs, output) if isinstance(t, torch.Tensor)]
        peak = max(peak, sum(t.numel() * t.element_size() for t in tensors))

    try:
        with torch.device("meta"):
            body = entry.build(tuple(input_size), False)
        hooks = [m.register_forward_hook(record) for m in body.modules() if not list(m.children())]
        with torch.no_grad():
            body.eval()(torch.empty(1, 3, *input_size, device="meta"))
        for h in hooks:
            h.remove()
    except Exception:  # noqa: BLE001 - an op without a meta kernel: no estimate, the pass itself still runs
        return None
    return peak


def check_activation_memory(entry: BackboneEntry, input_size: tuple[int, int], batch: int) -> None:
    """Refuse an input size whose forward pass of ``batch`` images would need more memory than is available,
    before anything of that size is allocated. Sizes up to the weights' own are not checked (no cost there).

    Raises:
        ConfigError: the estimate (``activation_bytes``) exceeds ``hardware.available_memory()``.
    """
    h, w = input_size
    dh, dw = entry.data_config.input_size
    if h * w <= dh * dw:
        return
    available = hardware.available_memory()
    per_image = activation_bytes(entry, input_size) if available is not None else None
    if per_image is None or per_image * batch <= available:
        return
    images = "one image" if batch == 1 else f"a batch of {batch} images"
    raise ConfigError(f"input size {h}x{w} would need about {per_image * batch / 2**20:,.0f} MB for {images} "
                      f"through {entry.name} (estimated from its layers), but {available / 2**20:,.0f} MB of memory "
                      f"is available; pass a smaller --input-size ({entry.name}'s own is {dh}x{dw}) or free memory")
