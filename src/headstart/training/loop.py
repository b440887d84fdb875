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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..distributed import SINGLE, Distributed
from ..errors import RunFormatError, TrainingError
from ..io import atomic_write
from .steps import RankSteps

__all__ = ["run_loop", "Trainer", "LoopData"]

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


@dataclass
class LoopData:
    """What the loop trains on: one tensor ``(N, ...)`` per cached view of the training images, their labels,
    and the validation inputs and labels (or ``None``)."""

    views: list[torch.Tensor]
    y: torch.Tensor
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None

    @property
    def has_val(self) -> bool:
        return self.x_val is not None and len(self.x_val) > 0


def run_loop(module: nn.Module, param_groups: list[dict], train_views: list[torch.Tensor], y_train: torch.Tensor,
             x_val: torch.Tensor | None, y_val: torch.Tensor | None, config: TrainConfig, *,
             class_weight: torch.Tensor | None = None, checkpoint: Path | None = None, resume: bool = False,
             on_epoch: Callable[[dict], None] | None = None, progress: bool | None = None,
             desc: str = "train", baseline: float = float("inf"), device: str = "cpu",
             dist: Distributed = SINGLE) -> list[dict]:
    """Train ``module`` (inputs -> logits) and leave the best epoch's weights in it; returns the history.

    ``train_views``: one tensor ``(N, ...)`` per view. ``checkpoint``: a file written atomically after each
    epoch (weights, optimizer, generator, history); with ``resume`` an existing one is continued.
    ``baseline``: the monitored loss of the weights as given; an epoch must beat it to replace them.
    ``device``: where the module and each batch run (the caller's ``Hardware.device``). ``dist``: the process
    group (see ``Trainer``).
    """
    trainer = Trainer(module, param_groups, config, class_weight=class_weight, baseline=baseline, device=device,
                      dist=dist)
    if resume and checkpoint is not None and checkpoint.exists():
        trainer.restore(checkpoint)
    dist.agree(trainer.state["epoch"], f"the epoch to resume from; every rank must see the same {checkpoint}: put "
                                       "--out on a file system all nodes share")
    return trainer.fit(LoopData(train_views, y_train, x_val, y_val), checkpoint=checkpoint, on_epoch=on_epoch,
                       progress=progress, desc=desc)


class Trainer:
    """AdamW over ``param_groups`` with the schedule of ``config``; early stopping on the monitored loss (val,
    else train) and the best epoch's weights kept. Its progress is ``state`` (a plain dict: checkpoints carry
    it as JSON).

    Over the ranks of a process group (``dist``), each rank takes its part of every step (``steps.RankSteps``),
    gradients are averaged by DistributedDataParallel, validation is split between the ranks and summed, and
    rank 0 alone writes the checkpoint: the same steps, and the same history up to rounding, as one process."""

    def __init__(self, module: nn.Module, param_groups: list[dict], config: TrainConfig, *,
                 class_weight: torch.Tensor | None = None, baseline: float = float("inf"), device: str = "cpu",
                 dist: Distributed = SINGLE):
        self.module, self.config, self.device, self.dist = module.to(device), config, device, dist
        self.opt = torch.optim.AdamW(param_groups, lr=config.lr, weight_decay=config.weight_decay)
        self.base_lrs = [g["lr"] for g in self.opt.param_groups]
        self.class_weight = class_weight.to(device) if class_weight is not None else None
        # per image: a step's loss is summed over this rank's images and scaled to the whole batch's mean
        self.loss_fn = nn.CrossEntropyLoss(weight=self.class_weight, label_smoothing=config.label_smoothing,
                                           reduction="none")
        self.plain = nn.CrossEntropyLoss(reduction="sum")
        self.gen = torch.Generator().manual_seed(config.seed)
        torch.manual_seed(config.seed)  # dropout draws
        self.state = {"epoch": 0, "step": 0, "best": baseline, "best_epoch": 0, "stale": 0, "history": [],
                      "done": False}
        self.best_state = copy.deepcopy(module.state_dict())

    def restore(self, checkpoint: Path) -> None:
        self.best_state = _restore(checkpoint, self.module, self.opt, self.gen, self.state)
        log.info("resumed from %s after epoch %d", checkpoint, self.state["epoch"])

    def fit(self, data: LoopData, *, checkpoint: Path | None = None, on_epoch: Callable[[dict], None] | None = None,
            progress: bool | None = None, desc: str = "train") -> list[dict]:
        state, config = self.state, self.config
        # wrapped once the weights are final (restored or not); DDP starts every rank from rank 0's weights
        self.model = self.dist.wrap(self.module)
        bar = tqdm(total=config.epochs, initial=state["epoch"], desc=desc, unit="epoch", leave=False,
                   disable=None if progress is None else not progress)
        while not state["done"] and state["epoch"] < config.epochs:
            row = self._epoch(data)
            self._track_best(row, data.has_val)
            if checkpoint is not None and self.dist.primary:
                _save(checkpoint, self.module, self.opt, self.gen, state, self.best_state)
            if on_epoch is not None:
                on_epoch(row)
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k.startswith("val_")})
        bar.close()
        self.module.load_state_dict(self.best_state)
        self.module.eval()
        for row in state["history"]:
            row["best"] = row["epoch"] == state["best_epoch"]
        return state["history"]

    def _epoch(self, data: LoopData) -> dict:
        t0 = time.perf_counter()
        state, config, n, k = self.state, self.config, len(data.y), len(data.views)
        steps = RankSteps(n, config.batch_size, self.dist, config.seed)
        total, warmup = len(steps) * config.epochs, int(round(config.warmup_epochs * len(steps)))
        _set_train(self.module)
        views = torch.randint(0, k, (n,), generator=self.gen)
        loss_sum, correct = 0.0, 0
        for step in steps.epoch(state["epoch"]):
            idx = step.idx
            x = torch.stack([data.views[int(v)][int(j)] for j, v in zip(idx, views[idx])]) if k > 1 \
                else data.views[0][idx]
            for g, base in zip(self.opt.param_groups, self.base_lrs):
                g["lr"] = base * _lr_factor(state["step"], total, warmup, config.cosine)
            scale = steps.scale(step, data.y, self.class_weight.cpu() if self.class_weight is not None else None)
            loss, hits = self._step(x.to(self.device), data.y[idx].to(self.device), step.real.to(self.device), scale)
            state["step"] += 1
            loss_sum += loss * step.count
            correct += hits
        loss_sum, correct = self.dist.sum([loss_sum, correct])
        state["epoch"] += 1
        row = {"epoch": state["epoch"], "train_loss": loss_sum / n, "train_accuracy": correct / n,
               "lr": self.opt.param_groups[0]["lr"]}
        if data.has_val:
            row["val_loss"], row["val_accuracy"] = _evaluate(self.module, data.x_val, data.y_val, self.plain,
                                                             config.batch_size, self.device, self.dist)
        if data.has_val and not math.isfinite(row["val_loss"]):
            self._diverged(row["val_loss"], "validation")
        row["seconds"] = time.perf_counter() - t0
        state["history"].append(row)
        return row

    def _step(self, x: torch.Tensor, y: torch.Tensor, real: torch.Tensor, scale: float) -> tuple[float, int]:
        """One optimizer step on this rank's part of a batch; returns its share of the batch's mean loss (the
        shares of all ranks add up to it) and its correct predictions. ``real``: 0 for the sampler's padding."""
        logits = self.model(x)
        loss = (self.loss_fn(logits, y) * real).sum() * scale
        if not bool(torch.isfinite(loss)):
            self._diverged(float(loss), "training")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.clip_grad:
            nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], self.config.clip_grad)
        self.opt.step()
        return float(loss.detach()) / self.dist.world_size, int(((logits.argmax(1) == y).float() * real).sum())

    def _diverged(self, loss: float, where: str):
        lrs = ", ".join(f"{g['lr']:.3g}" for g in self.opt.param_groups)
        raise TrainingError(f"the {where} loss became {loss} at epoch {self.state['epoch'] + 1}; expected a finite "
                            f"number. The learning rate (now {lrs}) is likely too high, or the features hold "
                            "NaN (check the backbone's weights and mean/std): lower --lr (or --finetune-lr)")

    def _track_best(self, row: dict, has_val: bool) -> None:
        state = self.state
        monitored = row["val_loss"] if has_val else row["train_loss"]
        if monitored < state["best"] - 1e-6:
            state["best"], state["stale"], state["best_epoch"] = monitored, 0, state["epoch"]
            self.best_state = copy.deepcopy(self.module.state_dict())
        else:
            state["stale"] += 1
        state["done"] = state["stale"] >= self.config.patience


def _evaluate(module, x, y, loss_fn, batch, device="cpu", dist: Distributed = SINGLE):
    """Mean loss (``loss_fn`` sums) and accuracy on ``x``; each rank takes a contiguous part, summed over ranks."""
    module.eval()
    total, correct, step = 0.0, 0, max(batch, 256)
    lo, hi = len(x) * dist.rank // dist.world_size, len(x) * (dist.rank + 1) // dist.world_size
    with torch.no_grad():
        for i in range(lo, hi, step):
            j = min(i + step, hi)
            xs, ys = x[i:j].to(device), y[i:j].to(device)
            logits = module(xs)
            total += float(loss_fn(logits, ys))
            correct += int((logits.argmax(1) == ys).sum())
    total, correct = dist.sum([total, correct])
    return total / len(x), correct / len(x)


def _best_path(path: Path) -> Path:
    return path.with_name(path.stem + ".best.safetensors")


def _save(path: Path, module, opt, gen, state, best_state) -> None:
    """The last epoch (weights, optimizer, generators, history) in one atomic file; the best epoch's weights
    in a second file, written right after whenever this epoch is the best. A kill between the two leaves
    the best equal to the last epoch's weights, which the first file holds."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    opt_state = opt.state_dict()
    scalars = {}
    for pid, s in opt_state["state"].items():
        for name, v in s.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{name}"] = v.detach().cpu().contiguous().clone().reshape(v.shape)
            else:
                scalars[f"{pid}.{name}"] = v
    tensors["rng"] = gen.get_state()
    tensors["torch_rng"] = torch.get_rng_state()  # dropout masks
    meta = {"state": json.dumps(state), "opt_scalars": json.dumps(scalars),
            "param_groups": json.dumps([{k: v for k, v in g.items() if k != "params"}
                                        for g in opt_state["param_groups"]])}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    if state["best_epoch"] == state["epoch"]:
        best = {k: v.detach().cpu().contiguous() for k, v in best_state.items()}
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
