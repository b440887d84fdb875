"""Training a head on cached backbone features (the frozen and frozen-aug recipes).

    >>> history = fit_head(head, [x_train], y_train, x_val, y_val, TrainConfig(epochs=50))
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import TrainConfig
from ..heads import Head
from .loop import run_loop

__all__ = ["TrainConfig", "fit_head", "class_weights"]


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(labels)
    w = np.ones(n_classes, dtype=np.float32)
    w[present] = compute_class_weight("balanced", classes=present, y=labels)
    return torch.from_numpy(w)


def _reset(module: torch.nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    for m in module.modules():
        if hasattr(m, "reset_parameters") and m is not module:
            m.reset_parameters()


def fit_head(head: Head, x_train, y_train, x_val: torch.Tensor | None = None, y_val=None,
             config: TrainConfig = TrainConfig(), progress: bool | None = None, device: str = "cpu") -> list[dict]:
    """Train ``head`` on features; returns the per-epoch history. The best epoch's weights end in ``head``.

    ``x_train`` is a feature tensor ``(N, C, H, W)`` / ``(N, C)``, or a list of them (one per augmented
    view of the same N images); ``y_*`` are label indices. The head's standardisation is fitted on all views.
    """
    views = list(x_train) if isinstance(x_train, (list, tuple)) else [x_train]
    y_train = torch.as_tensor(np.asarray(y_train), dtype=torch.long)
    pooled = [head.pool(v) for v in views]
    head.fit_standardizer(torch.cat(pooled))
    inputs = [head.standardize(p) for p in pooled]
    xv = yv = None
    if x_val is not None and len(x_val):
        xv = head.standardize(head.pool(x_val))
        yv = torch.as_tensor(np.asarray(y_val), dtype=torch.long)
    _reset(head.layers, config.seed)
    weight = class_weights(y_train.numpy(), head.num_classes) if config.class_weight else None
    history = run_loop(head.layers, [{"params": list(head.layers.parameters())}], inputs, y_train, xv, yv,
                       config, class_weight=weight, progress=progress, desc="train head", device=device)
    head.layers.to("cpu")  # a trained head is saved, exported and used for prediction on the CPU
    return history
