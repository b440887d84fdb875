"""The allocator setting: a large block freed by one forward pass is reused by the next, not faulted in again."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

import headstart

SRC = str(Path(headstart.__file__).resolve().parents[1])

# allocates and frees a 64 MiB block (an activation's size) six times; prints whether the setting applied
# and the page faults the last five took
PROBE = r"""
import resource
import numpy as np
from headstart.hardware import tune_malloc
applied = tune_malloc()
a = np.ones(64 << 20, np.uint8); del a
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    a = np.ones(64 << 20, np.uint8); del a
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(**env) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "HEADSTART_MALLOC"))}
    out = subprocess.run([sys.executable, "-c", PROBE], env=clean | {"PYTHONPATH": SRC} | env,
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])


# the thresholds and the page-fault counts are glibc's on Linux; elsewhere there is nothing to measure
glibc_linux = pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"),
                                 reason="glibc's malloc thresholds on Linux")


@glibc_linux
def test_large_blocks_are_reused_instead_of_faulted_in_again():
    applied, faults = _probe()
    assert applied
    assert faults < 100, f"{faults} page faults for five 64 MiB blocks: the heap did not keep them"


@glibc_linux
def test_headstart_malloc_system_leaves_the_allocator_alone():
    applied, faults = _probe(HEADSTART_MALLOC="system")
    assert not applied
    # glibc's default: each block mapped afresh and every page faulted in (5 x 32 with 2 MiB huge pages)
    assert faults >= 5 * 32

