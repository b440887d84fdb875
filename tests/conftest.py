"""Shared fixtures: small generated image folders, an isolated feature cache, offline hub."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the network

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
HYMENOPTERA = SHARED / "datasets" / "hymenoptera_data"
VGG16_NOTOP = SHARED / "weights" / "vgg16_imagenet_notop.safetensors"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADSTART_CACHE", str(tmp_path / "feature-cache"))


def make_image(path: Path, colour, size=(40, 32), seed=0, fmt=None):
    """A noisy picture dominated by ``colour`` (a class signal a random conv net can still see)."""
    rng = np.random.default_rng(seed)
    a = np.clip(np.array(colour, dtype=np.float32) + rng.normal(0, 30, (size[1], size[0], 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a.astype(np.uint8)).save(path, format=fmt)
    return path


COLOURS = {"blue": (40, 60, 200), "red": (200, 50, 40), "green": (40, 190, 60)}


def make_folder(root: Path, classes=("blue", "red"), per_class=8, val_per_class=4, seed=0) -> Path:
    for split, n in (("train", per_class), ("val", val_per_class)):
        for ci, c in enumerate(classes):
            for i in range(n):
                make_image(root / split / c / f"{c}_{i}.png", COLOURS[c], seed=seed * 1000 + ci * 100 + i
                           + (50 if split == "val" else 0))
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_folder(tmp_path / "data")


def needs_shared(*paths):
    missing = [p for p in paths if not Path(p).exists()]
    return pytest.mark.skipif(bool(missing), reason=f"needs {missing} (../shared beside the checkout)")


def random_vgg_weights(path: Path, input_size: int = 32) -> Path:
    """A VGG16 weights file of random values: processes given it build the same backbone and share a cache."""
    from safetensors.torch import save_file

    from headstart import create_backbone

    torch_state = create_backbone("vgg16", weights=None, input_size=input_size).body.state_dict()
    save_file({k: v.contiguous() for k, v in torch_state.items()}, str(path))
    return path
