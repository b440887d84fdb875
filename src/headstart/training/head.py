"""Training a head on cached backbone features (the frozen-backbone recipe).

    >>> history = fit_head(head, x_train, y_train, x_val, y_val, TrainConfig(epochs=50))
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..heads import Head

__all__ = ["TrainConfig", "fit_head", "class_weights"]


@dataclass(frozen=True)
class TrainConfig:
    """Head-training settings. ``patience`` epochs without a better validation loss stop training;
    the best epoch's weights are kept. ``class_weight="balanced"`` weights the loss by inverse frequency."""

    epochs: int = 60
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 5.0
    patience: int = 10
    class_weight: str | None = None
    label_smoothing: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError(f"epochs and batch size must be >= 1 and lr > 0; got {self}")
        if self.class_weight not in (None, "balanced"):
            raise ConfigError(f"class_weight must be None or 'balanced', got {self.class_weight!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(labels)
    w = np.ones(n_classes, dtype=np.float32)
    w[present] = compute_class_weight("balanced", classes=present, y=labels)
    return torch.from_numpy(w)


def _reset(module: nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    for m in module.modules():
        if hasattr(m, "reset_parameters") and m is not module:
            m.reset_parameters()


def _evaluate(layers, x, y, loss_fn, batch=1024):
    layers.eval()
    total, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            logits = layers(x[i:i + batch])
            total += float(loss_fn(logits, y[i:i + batch])) * len(logits)
            correct += int((logits.argmax(1) == y[i:i + batch]).sum())
    return total / max(len(x), 1), correct / max(len(x), 1)


def fit_head(head: Head, x_train: torch.Tensor, y_train, x_val: torch.Tensor | None = None, y_val=None,
             config: TrainConfig = TrainConfig(), progress: bool | None = None) -> list[dict]:
    """Train ``head`` on features; returns the per-epoch history. The best epoch's weights end in ``head``.

    ``x_*`` are feature maps ``(N, C, H, W)`` or pooled ``(N, C)``; ``y_*`` label indices.
    """
    y_train = torch.as_tensor(np.asarray(y_train), dtype=torch.long)
    pooled = head.pool(x_train)
    head.fit_standardizer(pooled)
    xt = (pooled - head.shift) * head.scale
    has_val = x_val is not None and len(x_val) > 0
    if has_val:
        y_val = torch.as_tensor(np.asarray(y_val), dtype=torch.long)
        xv = (head.pool(x_val) - head.shift) * head.scale
    layers = head.layers
    _reset(layers, config.seed)
    weight = class_weights(y_train.numpy(), head.num_classes) if config.class_weight else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)
    plain_loss = nn.CrossEntropyLoss()
    opt = torch.optim.AdamW(layers.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    history, best, best_state, stale = [], float("inf"), None, 0
    bar = tqdm(range(1, config.epochs + 1), desc="train head", unit="epoch", leave=False,
               disable=None if progress is None else not progress)
    for epoch in bar:
        t0 = time.perf_counter()
        layers.train()
        order = torch.randperm(len(xt), generator=gen)
        seen, loss_sum, correct = 0, 0.0, 0
        for i in range(0, len(xt), config.batch_size):
            idx = order[i:i + config.batch_size]
            logits = layers(xt[idx])
            loss = loss_fn(logits, y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(idx)
            loss_sum += float(loss) * len(idx)
            correct += int((logits.argmax(1) == y_train[idx]).sum())
        row = {"epoch": epoch, "train_loss": loss_sum / seen, "train_accuracy": correct / seen}
        if has_val:
            row["val_loss"], row["val_accuracy"] = _evaluate(layers, xv, y_val, plain_loss)
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        monitored = row["val_loss"] if has_val else row["train_loss"]
        if monitored < best - 1e-6:
            best, best_state, stale = monitored, copy.deepcopy(layers.state_dict()), 0
        else:
            stale += 1
        bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k.startswith("val_")})
        if stale >= config.patience:
            break
    if best_state is not None:
        layers.load_state_dict(best_state)
    layers.eval()
    for row in history:
        row["best"] = row["epoch"] == _best_epoch(history, has_val)
    return history


def _best_epoch(history, has_val) -> int:
    key = "val_loss" if has_val else "train_loss"
    return min(history, key=lambda r: r[key])["epoch"]
