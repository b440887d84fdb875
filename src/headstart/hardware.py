"""The hardware edge: the one place that decides the device, the threads and the allocator settings.

    >>> hw = Hardware.resolve("auto")     # cuda when available, else cpu; threads = the cores this process may use
    >>> hw.apply()                        # once, before heavy work (torch threads, allocator)

Model and data code never pick a device: training and the engines receive a ``Hardware``.

The allocator: glibc's ``malloc`` serves every block over 32 MiB (less before its threshold adapts) with a
fresh ``mmap`` and returns it to the system on ``free``; a forward pass allocates and frees activations of
that size at every layer, so each pass would fault all their pages back in (kernel time instead of compute;
``benchmarks/RESULTS.md`` has the figures). PyTorch's CPU tuning guides get the same by preloading jemalloc or
tcmalloc, which a pip install cannot do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from dataclasses import dataclass

from .config import DEVICES
from .errors import ConfigError

__all__ = ["Hardware", "tune_malloc", "default_threads", "available_memory", "MALLOC_KEEP"]

log = logging.getLogger("headstart")

MALLOC_KEEP = 1 << 30  # blocks up to 1 GiB come from the heap, and up to 1 GiB of freed heap stays mapped
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
_state: dict[str, bool] = {}


def available_memory() -> int | None:
    """Bytes of memory this process can still take without swapping: the kernel's ``MemAvailable``, capped by
    the container's cgroup limit when there is one; ``None`` where neither can be read."""
    found = []
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, AttributeError):
            pass
    try:  # cgroup v2: the limit and what the group already uses
        limit = open("/sys/fs/cgroup/memory.max", encoding="ascii").read().strip()
        used = open("/sys/fs/cgroup/memory.current", encoding="ascii").read().strip()
        if limit != "max":
            found.append(max(0, int(limit) - int(used)))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def default_threads() -> int:
    """The cores this process may use (its CPU affinity, not the machine's count)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@dataclass(frozen=True)
class Hardware:
    """Where tensors live and how many threads work on them; made by ``resolve`` and handed in."""

    device: str = "cpu"
    threads: int = 1

    @classmethod
    def resolve(cls, device: str = "auto", threads: int | None = None) -> "Hardware":
        """``device``: ``auto`` (cuda when torch sees a GPU), ``cpu`` or ``cuda``.

        Raises:
            ConfigError: an unknown device, or ``cuda`` asked for where torch sees no GPU.
        """
        if device not in DEVICES:
            raise ConfigError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)} (--device)")
        import torch  # the config layer stays torch-free; the edge is where torch is first needed

        has_cuda = torch.cuda.is_available()
        if device == "cuda" and not has_cuda:
            raise ConfigError("--device cuda was asked for, but torch sees no CUDA device here "
                              f"(torch {torch.__version__}); use --device cpu or auto")
        chosen = "cuda" if device == "cuda" or (device == "auto" and has_cuda) else "cpu"
        return cls(chosen, threads or default_threads())

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def apply(self) -> "Hardware":
        """Give torch's intra-op pool ``threads`` and keep large freed blocks for reuse (``tune_malloc``)."""
        import torch

        tune_malloc()
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        return self


def tune_malloc() -> bool:
    """Keep large freed blocks for reuse instead of unmapping them (glibc only; once per process).

    Leaves the allocator alone when ``HEADSTART_MALLOC=system`` is set, when the user set glibc's own
    ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``, when another allocator is preloaded, or off glibc.
    The cost is memory: up to 1 GiB freed by one pass stays mapped for the next. Returns whether it applied.
    """
    if "done" in _state:
        return _state["done"]
    _state["done"] = False
    if (os.environ.get("HEADSTART_MALLOC", "").lower() == "system" or not sys.platform.startswith("linux")
            or any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
            or any(a in os.environ.get("LD_PRELOAD", "") for a in ("jemalloc", "tcmalloc", "mimalloc"))):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):  # musl has no thresholds
            return False
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MALLOC_KEEP) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, MALLOC_KEEP) == 1
    except OSError as exc:
        log.debug("malloc thresholds left alone: %s", exc)
        return False
    _state["done"] = ok
    return ok
