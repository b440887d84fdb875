"""The learning-rate range test (fastai's ``lr_find``): the loss against an exponentially rising learning rate.

    >>> found = range_test(model, groups, [x], y)     # groups: the optimizer's, their lrs relative to the last
    >>> found.suggestion, found.steepest, found.valley

Mini-batches are drawn from the training inputs with the learning rate multiplied by a constant factor each step
(``start`` to ``end`` over ``steps``); the loss is smoothed (exponential average with bias correction, as
fastai) and the test stops once it passes four times its minimum. The suggestion is the steepest descent of the
smoothed loss when the loss does come down before its minimum, but not above the minimum's rate / 10 (fastai's
two rules, the safer of the two); on a flat curve (a head trained beforehand), a tenth of the last rate before the
loss rises above its flat stretch. The model's weights are put back afterwards.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .loop import _set_train

__all__ = ["LrFind", "range_test", "plot"]


@dataclass
class LrFind:
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)     # smoothed
    suggestion: float = float("nan")
    steepest: float = float("nan")
    valley: float = float("nan")                          # the minimum's learning rate / 10
    edge: float = float("nan")                            # the last rate before the loss passes twice its minimum

    def to_dict(self) -> dict:
        return {"suggestion": self.suggestion, "steepest": self.steepest, "minimum_over_10": self.valley,
                "edge": self.edge, "lrs": self.lrs, "losses": self.losses}


def range_test(model: nn.Module, param_groups: list[dict], views: list[torch.Tensor], y: torch.Tensor, *,
               start: float = 1e-7, end: float = 10.0, steps: int = 100, batch_size: int = 32, beta: float = 0.98,
               weight: torch.Tensor | None = None, seed: int = 0, device: str = "cpu") -> LrFind:
    """Run the range test on ``model`` (inputs -> logits). ``param_groups``' ``lr`` values are relative: the
    rising learning rate multiplies them, so a group at 0.5 runs at half the tested rate. Returns the curve and
    the suggested rate (for a group at 1.0)."""
    saved = copy.deepcopy(model.state_dict())
    model.to(device)
    scales = [g["lr"] for g in param_groups]
    opt = torch.optim.AdamW([dict(g) for g in param_groups], lr=start)
    loss_fn = nn.CrossEntropyLoss(weight=weight.to(device) if weight is not None else None)
    gen = torch.Generator().manual_seed(seed)
    n, factor = len(y), (end / start) ** (1 / max(1, steps - 1))
    found, avg, best = LrFind(), 0.0, float("inf")
    _set_train(model)
    try:
        for step in range(steps):
            lr = start * factor ** step
            for g, s in zip(opt.param_groups, scales):
                g["lr"] = lr * s
            idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
            view = views[int(torch.randint(0, len(views), (1,), generator=gen))]
            loss = loss_fn(model(view[idx].to(device)), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                break
            avg = beta * avg + (1 - beta) * value
            smooth = avg / (1 - beta ** (step + 1))
            found.lrs.append(lr)
            found.losses.append(smooth)
            best = min(best, smooth)
            if step > 10 and smooth > 4 * best:
                break
    finally:
        model.load_state_dict(saved)
        model.to("cpu").eval()
    _suggest(found)
    return found


def _suggest(found: LrFind) -> None:
    if len(found.lrs) < 10:
        return
    lrs, losses = np.log10(found.lrs), np.asarray(found.losses)
    # as fastai: the first tenth (the average still settling) and the last steps (the blow-up) say nothing
    lo, hi = len(lrs) // 10, len(lrs) - 5
    grads = np.gradient(losses[lo:hi], lrs[lo:hi])
    found.steepest = float(10 ** lrs[lo + int(np.argmin(grads))])
    low = int(np.argmin(losses))
    found.valley = float(10 ** lrs[low] / 10)
    # where the loss climbs: past twice its minimum, after it (noise on a flat curve stays well under that)
    above = np.nonzero(losses[low:] > 2 * losses[low])[0]
    found.edge = float(10 ** lrs[low + int(above[0]) - 1] if len(above) else found.lrs[-1])
    # the steepest descent when the loss does come down before its minimum, but never past the minimum's tenth
    # (a drop just before the blow-up is no place to train); a head trained beforehand often leaves a flat curve
    descends = losses[low] < 0.95 * losses[lo] and 10 ** lrs[lo] < found.steepest < 10 ** lrs[low]
    if descends:
        found.suggestion = min(found.steepest, found.valley)
    else:
        # flat, then rising: the minimum is wherever the noise put it, often the sweep's first rate, and its tenth
        # would lie below every rate tried; a tenth of the last rate before the loss leaves its flat stretch
        # (the minimum itself counts: it may lie in the last steps, when the sweep ended still going down)
        flat = np.nonzero(losses[:max(hi, low + 1)] <= 1.1 * losses[low])[0]
        found.suggestion = max(float(10 ** lrs[int(flat[-1])] / 10), found.lrs[0])


def plot(found: LrFind, path: str | Path, title: str = "learning-rate range test") -> Path:
    """The smoothed loss against the learning rate (log scale) with the suggestion marked, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(found.lrs, found.losses)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (last layer group)")
    ax.set_ylabel("training loss (smoothed)")
    if math.isfinite(found.suggestion):
        ax.axvline(found.suggestion, color="tab:red", linestyle="--", label=f"suggestion {found.suggestion:.2e}")
        if math.isfinite(found.edge) and found.edge > found.suggestion:
            ax.axvline(found.edge, color="tab:gray", linestyle=":",
                       label=f"loss at twice its minimum after {found.edge:.2e}")
        ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
