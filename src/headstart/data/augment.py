"""Augmentation presets (``none``, ``light``, ``strong``) as deterministic, keyed views.

A view is a fixed random draw per (image content, view index, seed): the same image gets the same
augmented view every time, so augmented features can be cached and a run repeated exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np
import torchvision.transforms.functional as TF
from PIL import Image

from ..config import DataConfig
from ..errors import ConfigError
from .transforms import INTERPOLATION_MODES, hflip, resize_for, to_tensor

__all__ = ["AugmentConfig", "PRESETS", "AugmentedView", "FlipView"]


@dataclass(frozen=True)
class AugmentConfig:
    """Random resized crop (``scale`` of the area, aspect ``ratio``), horizontal flip, rotation (degrees),
    colour jitter (brightness, contrast, saturation as +-fractions; hue as a fraction of the circle)."""

    scale: tuple[float, float] = (0.6, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    rotation: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    "none": None,
    "light": AugmentConfig(scale=(0.6, 1.0), hflip=True),
    "strong": AugmentConfig(scale=(0.35, 1.0), hflip=True, rotation=15, brightness=0.3, contrast=0.3,
                            saturation=0.3, hue=0.03),
}


def preset(name: str) -> AugmentConfig | None:
    if name not in PRESETS:
        raise ConfigError(f"augmentation {name!r} is not one of {sorted(PRESETS)}")
    return PRESETS[name]


class AugmentedView:
    """View ``index`` of an image under ``aug``, drawn from a generator seeded by (image digest, index, seed)."""

    pixels = False  # torchvision's PIL-based geometry and colour ops

    def __init__(self, cfg: DataConfig, aug: AugmentConfig, index: int, seed: int = 0):
        self.cfg, self.aug, self.index, self.seed = cfg, aug, index, seed

    def spec(self) -> dict:
        return {"augment": self.aug.to_dict(), "view": self.index, "seed": self.seed}

    def __call__(self, im: Image.Image, key: str | None = None) -> "torch.Tensor":  # noqa: F821
        h = hashlib.sha256(f"{key}:{self.index}:{self.seed}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(h[:8], "little"))
        a = self.aug
        W, H = im.size
        area = W * H
        box = (0, 0, H, W)
        for _ in range(10):  # RandomResizedCrop's sampling, with our generator
            target = area * rng.uniform(*a.scale)
            ratio = np.exp(rng.uniform(np.log(a.ratio[0]), np.log(a.ratio[1])))
            w, hh = int(round(np.sqrt(target * ratio))), int(round(np.sqrt(target / ratio)))
            if 0 < w <= W and 0 < hh <= H:
                box = (int(rng.integers(0, H - hh + 1)), int(rng.integers(0, W - w + 1)), hh, w)
                break
        top, left, hh, w = box
        out = TF.resized_crop(im, top, left, hh, w, list(self.cfg.input_size),
                              interpolation=_interp(self.cfg.interpolation), antialias=True)
        if a.hflip and rng.random() < 0.5:
            out = TF.hflip(out)
        if a.rotation:
            out = TF.rotate(out, float(rng.uniform(-a.rotation, a.rotation)), interpolation=TF.InterpolationMode.BILINEAR)
        if a.brightness:
            out = TF.adjust_brightness(out, float(rng.uniform(1 - a.brightness, 1 + a.brightness)))
        if a.contrast:
            out = TF.adjust_contrast(out, float(rng.uniform(1 - a.contrast, 1 + a.contrast)))
        if a.saturation:
            out = TF.adjust_saturation(out, float(rng.uniform(1 - a.saturation, 1 + a.saturation)))
        if a.hue:
            out = TF.adjust_hue(out, float(rng.uniform(-a.hue, a.hue)))
        return to_tensor(out, self.cfg)


class FlipView:
    """The eval transform, mirrored: the test-time-augmentation view. Takes a picture or pixels."""

    pixels = True

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg

    def spec(self) -> dict:
        return {"tta": "hflip"}

    def __call__(self, im: "Image.Image | torch.Tensor", key: str | None = None):  # noqa: F821
        return to_tensor(hflip(resize_for(im, self.cfg)), self.cfg)


def _interp(name: str):
    return INTERPOLATION_MODES[name]
