"""Image -> tensor transforms built from a backbone's data config; no stats live anywhere else.

Resampling runs on uint8 tensors with torchvision's antialiased kernels, which give Pillow's results
(within 2 grey levels of 255) in a fraction of Pillow's time.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from ..config import DataConfig

__all__ = ["resize_for", "to_tensor", "hflip", "EvalTransform", "decode_size", "RESAMPLING"]

# part of the feature cache key: features made by another resampling code are not reused (2: images other than
# JPEG reduced by a whole factor after decoding)
RESAMPLING = "torchvision-antialias-2"
INTERPOLATION_MODES = {"nearest": TF.InterpolationMode.NEAREST, "bilinear": TF.InterpolationMode.BILINEAR,
          "bicubic": TF.InterpolationMode.BICUBIC}
_MAX_SPAN = 4  # a resized side longer than 4x the input side is cut first, so a 20000x20 strip costs a photo's time


def decode_size(cfg: DataConfig) -> int:
    """The smallest side a decoded image needs before ``resize_for`` (for JPEG draft decoding)."""
    h, w = cfg.input_size
    if cfg.resize_mode == "crop":
        return _short_side(cfg)
    return max(h, w)


def _short_side(cfg: DataConfig) -> int:
    return math.floor(max(cfg.input_size) / cfg.crop_pct)  # timm's scale_size: floor(img_size / crop_pct)


def pixels(im: Image.Image) -> torch.Tensor:
    """An RGB picture as a uint8 tensor ``(3, H, W)``."""
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)


def resize_for(im: Image.Image | torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """Resize to ``cfg.input_size`` as a uint8 tensor ``(3, h, w)``: the whole image (``squash``), or the
    shorter side to size/crop_pct and then the centre (``crop``, timm's eval transform)."""
    x = pixels(im) if isinstance(im, Image.Image) else im
    h, w = cfg.input_size
    if cfg.resize_mode == "squash":
        return _resize(x, h, w, cfg.interpolation)
    H, W = x.shape[-2:]
    short = _short_side(cfg)
    scale = short / min(W, H)
    # very long images: keep the centre span that can reach the output, with a wide margin for the filter
    keep_w, keep_h = min(W, math.ceil(_MAX_SPAN * w / scale)), min(H, math.ceil(_MAX_SPAN * h / scale))
    if (keep_w, keep_h) != (W, H):
        x = TF.center_crop(x, [keep_h, keep_w])
        H, W = keep_h, keep_w
    # torchvision's Resize(short): the longer side is int(short * long / short_side), as timm's eval transform has it
    new_h, new_w = (short, int(short * W / H)) if H <= W else (int(short * H / W), short)
    x = _resize(x, max(h, new_h), max(w, new_w), cfg.interpolation)
    return TF.center_crop(x, [h, w])


def _resize(x: torch.Tensor, h: int, w: int, interpolation: str) -> torch.Tensor:
    # torchvision's antialiased uint8 kernels run on the calling thread; torch's nearest (and flips) would
    # start an OpenMP team inside every decode thread, so nearest is plain indexing here (same rule: floor)
    if interpolation == "nearest":
        H, W = x.shape[-2:]
        rows = np.minimum((np.arange(h) * (H / h)).astype(np.int64), H - 1)
        cols = np.minimum((np.arange(w) * (W / w)).astype(np.int64), W - 1)
        return torch.from_numpy(np.ascontiguousarray(x.numpy()[:, rows][:, :, cols]))
    return TF.resize(x, [h, w], interpolation=INTERPOLATION_MODES[interpolation], antialias=True)


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror ``(C, H, W)`` pixels left-right (in numpy: a torch flip starts an OpenMP team per decode thread)."""
    return torch.from_numpy(np.ascontiguousarray(x.numpy()[..., ::-1]))


def to_tensor(x: torch.Tensor | Image.Image, cfg: DataConfig) -> torch.Tensor:
    """uint8 pixels ``(3, H, W)`` (or an RGB picture) -> normalised float tensor ``(3, H, W)``."""
    a = (pixels(x) if isinstance(x, Image.Image) else x).numpy()
    std = np.asarray(cfg.std, dtype=np.float32).reshape(3, 1, 1)
    mean = np.asarray(cfg.mean, dtype=np.float32).reshape(3, 1, 1)
    # one fused pass from uint8 to normalised float, in numpy (single-threaded, as decode threads must be):
    # (a / 255 - mean) / std == a * s + o
    out = np.empty(a.shape, dtype=np.float32)
    np.multiply(a, 1.0 / (255.0 * std), out=out)
    out += -mean / std
    return torch.from_numpy(out)


class EvalTransform:
    """The deterministic transform for a data config: resize, then normalise. Takes a picture or pixels."""

    pixels = True  # the input pipeline may hand it uint8 pixels (see ``load_pixels``)

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg

    def spec(self) -> None:
        return None  # the plain view: cache entries keyed "eval"

    def __call__(self, im: Image.Image | torch.Tensor, key: str | None = None) -> torch.Tensor:
        return to_tensor(resize_for(im, self.cfg), self.cfg)
