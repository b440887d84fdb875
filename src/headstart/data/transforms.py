"""Image -> tensor transforms built from a backbone's data config; no stats live anywhere else."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..backbones.registry import DataConfig

__all__ = ["resize_for", "to_tensor", "EvalTransform", "decode_size"]

_RESAMPLE = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def decode_size(cfg: DataConfig) -> int:
    """The smallest side a decoded image needs before ``resize_for`` (for JPEG draft decoding)."""
    h, w = cfg.input_size
    if cfg.resize_mode == "crop":
        return int(round(max(h, w) / cfg.crop_pct))
    return max(h, w)


def resize_for(im: Image.Image, cfg: DataConfig) -> Image.Image:
    """Resize to ``cfg.input_size``: whole image (``squash``), or shorter side to size/crop_pct then the centre.

    The crop is taken from the source before resampling, so a 20000x20 strip costs no more than a photo.
    """
    h, w = cfg.input_size
    resample = _RESAMPLE[cfg.interpolation]
    if cfg.resize_mode == "squash":
        return im.resize((w, h), resample)
    W, H = im.size
    scale = (max(h, w) / cfg.crop_pct) / min(W, H)  # shorter side -> size / crop_pct
    bw, bh = min(W, w / scale), min(H, h / scale)
    left, top = (W - bw) / 2, (H - bh) / 2
    return im.resize((w, h), resample, box=(left, top, left + bw, top + bh))


def to_tensor(im: Image.Image, cfg: DataConfig) -> torch.Tensor:
    """RGB picture at input size -> normalised float tensor ``(3, H, W)``."""
    a = np.asarray(im)
    std = np.asarray(cfg.std, dtype=np.float32).reshape(3, 1, 1)
    mean = np.asarray(cfg.mean, dtype=np.float32).reshape(3, 1, 1)
    # one fused pass from uint8 HWC to normalised float CHW: (a / 255 - mean) / std == a * s + o
    out = np.empty((3, *a.shape[:2]), dtype=np.float32)
    np.multiply(a.transpose(2, 0, 1), 1.0 / (255.0 * std), out=out)
    out += -mean / std
    return torch.from_numpy(out)


class EvalTransform:
    """The deterministic transform for a data config: resize, then normalise."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg

    def __call__(self, im: Image.Image) -> torch.Tensor:
        return to_tensor(resize_for(im, self.cfg), self.cfg)
