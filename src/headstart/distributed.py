"""The process group, at the hardware edge: which rank this process is among how many, and the few collective
steps training takes (a barrier, sums, the DDP wrapper).

    >>> dist = join("cpu")        # under torchrun: joins its process group (gloo); otherwise one process
    >>> dist.rank, dist.world_size, dist.primary
    >>> dist.sum([loss_sum, correct])     # the same sums on every rank

``torchrun --nproc-per-node N -m headstart train ...`` starts N processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` and a rendezvous (``MASTER_ADDR``/``MASTER_PORT``) in their environment;
``join`` reads them. The backend follows the device, here and nowhere else: gloo for the CPU, NCCL for CUDA.
Training code receives a ``Distributed`` and never touches ``torch.distributed``; model and data code never
see one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence

import torch
from torch import nn

from .errors import ConfigError
from .hardware import Hardware

__all__ = ["Distributed", "join", "SINGLE", "TORCHRUN_VARS"]

log = logging.getLogger("headstart")

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# a barrier waits for the slowest rank's share of the extraction: hours of images on a slow node must not time out
_TIMEOUT = timedelta(hours=6)


@dataclass(frozen=True)
class Distributed:
    """This process's place in the process group (``backend`` None: a single process, no group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None

    @property
    def active(self) -> bool:
        """Whether there are other ranks to share the work with. A group of one (``torchrun --nproc-per-node 1``)
        takes the single-process path: the same results, none of the sharing's cost."""
        return self.backend is not None and self.world_size > 1

    @property
    def primary(self) -> bool:
        """Rank 0: the one that writes the run folder, the checkpoints and the logs."""
        return self.rank == 0

    def share(self, hardware: Hardware) -> Hardware:
        """``hardware`` with this rank's share of its machine's threads (at least one): the ranks on one machine
        split its cores. (A CUDA rank's device is its own GPU: ``join`` made it the current one.)"""
        return dataclasses.replace(hardware, threads=max(1, hardware.threads // self.local_world_size))

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def sum(self, values: Sequence[float]) -> list[float]:
        """``values`` summed over the ranks (float64; the same result on every rank)."""
        if not self.active:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._device())
        torch.distributed.all_reduce(t)
        return t.cpu().tolist()

    def agree(self, value: int, what: str) -> int:
        """``value``, checked to be the same on every rank.

        Raises:
            ConfigError: the ranks differ (``what`` says what it is, and the fix).
        """
        if not self.active:
            return value
        t = torch.tensor([value, -value], dtype=torch.int64, device=self._device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        if int(t[0]) != -int(t[1]):
            raise ConfigError(f"the ranks disagree on {what}: from {-int(t[1])} to {int(t[0])}")
        return value

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` under DistributedDataParallel (gradients averaged over the ranks in ``backward``), or
        itself for a single process. Buffers are not broadcast: training keeps BatchNorm statistics frozen."""
        if not self.active:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.local_rank] if self.backend == "nccl" else None
        return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)

    def _device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")


SINGLE = Distributed()


def join(device: str = "cpu") -> Distributed:
    """The process group torchrun started this process in, joined on the first call (later calls return the
    same), or ``SINGLE`` outside torchrun. ``device`` (``cpu`` or ``cuda``) picks the backend: gloo or NCCL.
    On ranks other than 0, headstart logs only errors.

    Raises:
        ConfigError: torchrun's environment is incomplete, or NCCL is asked for where it is not available.
    """
    if "WORLD_SIZE" not in os.environ and "RANK" not in os.environ:
        return SINGLE
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise ConfigError(f"this process looks started by torchrun but {', '.join(missing)} is not set; start it "
                          "with `torchrun --nproc-per-node N -m headstart train ...`")
    env = {k: int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"]))
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl" and not torch.distributed.is_nccl_available():
        raise ConfigError("CUDA training under torchrun needs NCCL, which this torch build lacks; use --device cpu")
    if not torch.distributed.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(env["LOCAL_RANK"])
        torch.distributed.init_process_group(backend, timeout=_TIMEOUT)
    elif torch.distributed.get_backend() != backend:
        raise ConfigError(f"the process group already uses {torch.distributed.get_backend()}, not {backend}")
    if env["RANK"] != 0:
        logging.getLogger("headstart").setLevel(logging.ERROR)
    return Distributed(env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], local_world, backend)
