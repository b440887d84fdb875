"""The epoch loop shared by head training and fine-tuning: AdamW, warm-up + cosine, label smoothing,
gradient clipping, early stopping on validation loss, best-epoch weights, atomic checkpoints and resume.

Training data may come as several cached views of each image (augmentation): each epoch draws one view
per image, so an epoch costs one pass over the images, as with on-the-fly augmentation.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..distributed import SINGLE, Distributed
from ..errors import RunFormatError
from ..hardware import tune_malloc
from .steps import RankSteps

__all__ = ["run_loop"]

log = logging.getLogger("headstart")


def _lr_factor(step: int, total: int, warmup: int, cosine: bool) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if not cosine:
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _set_train(module: nn.Module) -> None:
    """Train mode, but BatchNorm keeps its ImageNet statistics (inference mode), as Keras advises for
    fine-tuning on small data: batch statistics of a few dozen images would wreck them."""
    module.train()
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def run_loop(module: nn.Module, param_groups: list[dict], train_views: list[torch.Tensor], y_train: torch.Tensor,
             x_val: torch.Tensor | None, y_val: torch.Tensor | None, config: TrainConfig, *,
             class_weight: torch.Tensor | None = None, checkpoint: Path | None = None, resume: bool = False,
             on_epoch: Callable[[dict], None] | None = None, progress: bool | None = None,
             desc: str = "train", baseline: float = float("inf"), dist: Distributed = SINGLE) -> list[dict]:
    """Train ``module`` (inputs -> logits) and leave the best epoch's weights in it; returns the history.

    ``train_views``: one tensor ``(N, ...)`` per view. ``checkpoint``: a file written atomically after each
    epoch (weights, optimizer, generator, history); with ``resume`` an existing one is continued.
    ``baseline``: the monitored loss of the weights as given; an epoch must beat it to replace them.
    ``dist``: the process group; over several ranks, each takes its part of every step (``steps.RankSteps``),
    gradients are averaged (DistributedDataParallel) and rank 0 writes the checkpoint: the same steps, and the
    same history up to rounding, as one process.
    """
    tune_malloc()  # fine-tuning lite0 on 2 cores: 15.9 vs 10.2 img/s (see headstart.hardware)
    opt = torch.optim.AdamW(param_groups, lr=config.lr, weight_decay=config.weight_decay)
    base_lrs = [g["lr"] for g in opt.param_groups]
    loss_fn = nn.CrossEntropyLoss(weight=class_weight, label_smoothing=config.label_smoothing, reduction="none")
    plain = nn.CrossEntropyLoss(reduction="sum")
    n, k = len(y_train), len(train_views)
    steps = RankSteps(n, config.batch_size, dist, config.seed)
    steps_per_epoch = len(steps)
    total_steps = steps_per_epoch * config.epochs
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)  # dropout draws
    state = {"epoch": 0, "step": 0, "best": baseline, "best_epoch": 0, "stale": 0, "history": [], "done": False}
    best_state = copy.deepcopy(module.state_dict())
    if resume and checkpoint is not None and checkpoint.exists():
        best_state = _restore(checkpoint, module, opt, gen, state)
        log.info("resumed from %s after epoch %d", checkpoint, state["epoch"])
    dist.agree(state["epoch"], f"the epoch to resume from; every rank must see the same {checkpoint}: put --out "
                               "on a file system all nodes share")
    model = dist.wrap(module)  # gradients averaged over the ranks (the module itself for one process)
    has_val = x_val is not None and len(x_val) > 0
    bar = tqdm(total=config.epochs, initial=state["epoch"], desc=desc, unit="epoch", leave=False,
               disable=None if progress is None else not progress)
    while not state["done"] and state["epoch"] < config.epochs:
        t0 = time.perf_counter()
        _set_train(module)
        views = torch.randint(0, k, (n,), generator=gen)
        loss_sum, correct = 0.0, 0
        for step in steps.epoch(state["epoch"]):
            idx = step.idx
            x = torch.stack([train_views[int(v)][int(j)] for j, v in zip(idx, views[idx])]) if k > 1 \
                else train_views[0][idx]
            for g, base in zip(opt.param_groups, base_lrs):
                g["lr"] = base * _lr_factor(state["step"], total_steps, warmup, config.cosine)
            logits = model(x)
            per_image = loss_fn(logits, y_train[idx]) * step.real
            scale = steps.scale(step, y_train, class_weight)
            loss = per_image.sum() * scale  # this rank's share of the step's batch mean
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip_grad:
                nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], config.clip_grad)
            opt.step()
            state["step"] += 1
            loss_sum += float(loss.detach()) / dist.world_size * step.count
            correct += int(((logits.argmax(1) == y_train[idx]).float() * step.real).sum())
        loss_sum, correct = dist.sum([loss_sum, correct])
        state["epoch"] += 1
        row = {"epoch": state["epoch"], "train_loss": loss_sum / n, "train_accuracy": correct / n,
               "lr": opt.param_groups[0]["lr"]}
        if has_val:
            row["val_loss"], row["val_accuracy"] = _evaluate(module, x_val, y_val, plain, config.batch_size, dist)
        row["seconds"] = time.perf_counter() - t0
        state["history"].append(row)
        monitored = row["val_loss"] if has_val else row["train_loss"]
        if monitored < state["best"] - 1e-6:
            state["best"], state["stale"], state["best_epoch"] = monitored, 0, state["epoch"]
            best_state = copy.deepcopy(module.state_dict())
        else:
            state["stale"] += 1
        state["done"] = state["stale"] >= config.patience
        if checkpoint is not None and dist.primary:
            _save(checkpoint, module, opt, gen, state, best_state)
        if on_epoch is not None:
            on_epoch(row)
        bar.update(1)
        bar.set_postfix({kk: f"{v:.3f}" for kk, v in row.items() if kk.startswith("val_")})
    bar.close()
    module.load_state_dict(best_state)
    module.eval()
    for row in state["history"]:
        row["best"] = row["epoch"] == state["best_epoch"]
    return state["history"]


def _evaluate(module, x, y, loss_fn, batch, dist: Distributed = SINGLE):
    """Mean loss (``loss_fn`` sums) and accuracy on ``x``; each rank takes a contiguous part, summed over ranks."""
    module.eval()
    total, correct = 0.0, 0
    lo, hi = len(x) * dist.rank // dist.world_size, len(x) * (dist.rank + 1) // dist.world_size
    chunk = max(batch, 256)
    with torch.no_grad():
        for i in range(lo, hi, chunk):
            j = min(i + chunk, hi)
            logits = module(x[i:j])
            total += float(loss_fn(logits, y[i:j]))
            correct += int((logits.argmax(1) == y[i:j]).sum())
    total, correct = dist.sum([total, correct])
    return total / len(x), correct / len(x)


def _best_path(path: Path) -> Path:
    return path.with_name(path.stem + ".best.safetensors")


def _save(path: Path, module, opt, gen, state, best_state) -> None:
    """The last epoch (weights, optimizer, generators, history) in one atomic file; the best epoch's weights
    in a second file, written right after whenever this epoch is the best. A kill between the two leaves
    the best equal to the last epoch's weights, which the first file holds."""
    from ..features import atomic_write

    tensors = {f"model.{k}": v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    opt_state = opt.state_dict()
    scalars = {}
    for pid, s in opt_state["state"].items():
        for name, v in s.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{name}"] = v.detach().contiguous().clone().reshape(v.shape)
            else:
                scalars[f"{pid}.{name}"] = v
    tensors["rng"] = gen.get_state()
    tensors["torch_rng"] = torch.get_rng_state()  # dropout masks
    meta = {"state": json.dumps(state), "opt_scalars": json.dumps(scalars),
            "param_groups": json.dumps([{k: v for k, v in g.items() if k != "params"}
                                        for g in opt_state["param_groups"]])}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    if state["best_epoch"] == state["epoch"]:
        best = {k: v.detach().contiguous() for k, v in best_state.items()}
        atomic_write(_best_path(path), lambda tmp: save_file(best, tmp, metadata={"epoch": str(state["epoch"])}))


def _load_best(path: Path, saved: dict, module, initial: dict) -> dict:
    from safetensors import safe_open

    if saved["best_epoch"] == saved["epoch"]:
        return copy.deepcopy(module.state_dict())
    if saved["best_epoch"] == 0:  # nothing beat the weights training started from (rebuilt the same way)
        return initial
    bp = _best_path(path)
    with safe_open(str(bp), "pt") as f:
        if (f.metadata() or {}).get("epoch") != str(saved["best_epoch"]):
            raise RunFormatError(f"{str(bp)!r} does not hold epoch {saved['best_epoch']}; delete the checkpoints")
    return load_file(str(bp))


def _restore(path: Path, module, opt, gen, state) -> dict:
    from safetensors import safe_open

    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        saved = json.loads(meta["state"])
        scalars = json.loads(meta["opt_scalars"])
        groups = json.loads(meta["param_groups"])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as exc:
        raise RunFormatError(f"checkpoint {str(path)!r} is damaged ({exc}); delete it to start over") from exc
    try:
        initial = copy.deepcopy(module.state_dict())
        module.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        best = _load_best(path, saved, module, initial)
        opt_state = {"state": {}, "param_groups": []}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, pid, name = k.split(".", 2)
                opt_state["state"].setdefault(int(pid), {})[name] = v
        for k, v in scalars.items():
            pid, name = k.split(".", 1)
            opt_state["state"].setdefault(int(pid), {})[name] = v
        for g, saved_g in zip(opt.state_dict()["param_groups"], groups):
            opt_state["param_groups"].append(saved_g | {"params": g["params"]})
        opt.load_state_dict(opt_state)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise RunFormatError(f"checkpoint {str(path)!r} does not fit this training ({str(exc)[:200]}); "
                             "resume with the same settings, or delete it to start over") from exc
    gen.set_state(tensors["rng"])
    torch.set_rng_state(tensors["torch_rng"])
    state.update(saved)
    return best
