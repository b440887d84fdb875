"""torchrun: N processes on gloo give the one-process result, share the extraction through the cache, survive a
killed rank, and write the run from rank 0 only.

The multi-process tests start `python -m torch.distributed.run` on 127.0.0.1 (gloo on the loopback interface),
each bounded in time; torchrun's start-up dominates, so they are few and use the tiny backbone.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import make_folder, make_image
from headstart.cli import main
from headstart.distributed import Distributed
from headstart.features import file_digest
from headstart.training.steps import RankSteps

TIMEOUT = 300  # seconds for one torchrun; a hang fails the test instead of the suite

TINY = ["--backbone", "test_tiny", "--epochs", "20"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, argv: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), "-m", "headstart", *argv]
    env = os.environ | {"GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{out[-3000:]}")
    return proc.returncode, out


def _run(nproc: int, argv: list[str]) -> str:
    code, out = _finish(_torchrun(nproc, argv))
    assert code == 0, out[-3000:]
    return out


def _ranks(proc: subprocess.Popen) -> dict[int, int]:
    """``{rank: pid}`` of the workers torchrun started (read from their environment)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != proc.pid:
                continue
            env = dict(kv.split("=", 1) for kv in (stat.parent / "environ").read_bytes().decode().split("\0") if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(stat.parent.name)
    return found


def _wait_for(what, proc: subprocess.Popen, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = what()
        if got:
            return got
        if proc.poll() is not None:
            pytest.fail("torchrun ended before the moment the test waits for:\n" + proc.communicate()[0][-3000:])
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"waited {timeout} s in vain")


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model.safetensors")


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(wa[k].dtype == wb[k].dtype and torch.equal(wa[k], wb[k]) for k in wa)


def _json(run: Path, name: str) -> dict:
    return json.loads((run / name).read_text())


# -- the step arithmetic, without processes -------------------------------------------------------------------

@pytest.mark.parametrize("n,batch,world", [(13, 4, 2), (32, 8, 4), (33, 32, 2), (7, 8, 4)])
def test_every_step_covers_the_one_process_batch_over_the_ranks(n, batch, world):
    one = RankSteps(n, batch, Distributed(), seed=3)
    ranks = [RankSteps(n, batch, Distributed(rank=r, world_size=world), seed=3) for r in range(world)]
    for epoch in (0, 1):
        single = list(one.epoch(epoch))
        parts = [list(r.epoch(epoch)) for r in ranks]
        assert all(len(p) == len(single) for p in parts)  # every rank takes every step (DDP needs them all)
        for s, step in enumerate(single):
            real = sorted(int(i) for p in parts for i, keep in zip(p[s].idx, p[s].real) if keep)
            assert real == sorted(step.idx.tolist())
            assert all(p[s].count == step.count == len(step.idx) for p in parts)
    assert [int(i) for i in single[0].idx] != list(range(min(n, batch)))  # shuffled


def test_a_batch_the_ranks_cannot_share_evenly_is_refused():
    with pytest.raises(Exception, match="not a multiple of the 3 ranks"):
        RankSteps(10, 32, Distributed(rank=0, world_size=3))


# -- N processes ------------------------------------------------------------------------------------------------

@pytest.mark.slow  # several processes: runs in the slow tier
def test_two_ranks_frozen_give_exactly_the_one_process_model(tmp_path):
    data = make_folder(tmp_path / "data", per_class=10, val_per_class=4)
    assert main(["train", str(data), "--out", str(tmp_path / "one"), "--cache", str(tmp_path / "c1"), *TINY]) == 0
    out = _run(2, ["train", str(data), "--out", str(tmp_path / "two"), "--cache", str(tmp_path / "c2"), *TINY])
    assert "extraction over 2 ranks: 28 images through the backbone" in out
    assert out.count("saved to") == 1  # rank 0 alone reports and writes
    assert _same_weights(tmp_path / "one", tmp_path / "two")
    assert _json(tmp_path / "one", "metrics.json") == _json(tmp_path / "two", "metrics.json")
    assert _json(tmp_path / "two", "data.json")["backbone_passes"] == {"train": 20, "val": 8}  # over both ranks


@pytest.mark.slow  # several processes: runs in the slow tier
def test_four_ranks_on_two_cores_train_from_shards_as_one_process_from_the_folder(tmp_path):
    data = make_folder(tmp_path / "data", per_class=8, val_per_class=4)
    assert main(["shard", str(data), "--out", str(tmp_path / "shards"), "--max-count", "3"]) == 0
    aug = ["--strategy", "frozen-aug", "--views", "2"]
    assert main(["train", str(data), "--out", str(tmp_path / "one"), "--cache", str(tmp_path / "c1"), *TINY,
                 *aug]) == 0
    out = _run(4, ["train", str(tmp_path / "shards" / "train-{000000..000005}.tar"), "--out", str(tmp_path / "four"),
                   "--cache", str(tmp_path / "c4"), *TINY, *aug])
    assert "extraction over 4 ranks: 56 images through the backbone" in out  # 16 x 3 views + 8 val
    assert _same_weights(tmp_path / "one", tmp_path / "four")
    assert _json(tmp_path / "one", "metrics.json") == _json(tmp_path / "four", "metrics.json")


def _checkpoint_epoch(path: Path) -> int | None:
    try:
        with safe_open(str(path), "pt") as f:
            return json.loads(f.metadata()["state"])["epoch"]
    except Exception:  # noqa: BLE001 - not written yet, or being replaced
        return None


@pytest.mark.slow  # several processes: runs in the slow tier
def test_two_ranks_fine_tune_as_one_process_and_resume_after_a_killed_rank(tmp_path):
    data = make_folder(tmp_path / "data", per_class=32, val_per_class=6)
    args = ["--backbone", "test_tiny", "--epochs", "4", "--strategy", "finetune", "--finetune-epochs", "6",
            "--views", "1", "--batch-size", "8"]
    assert main(["train", str(data), "--out", str(tmp_path / "one"), "--cache", str(tmp_path / "c1"), *args]) == 0
    two = ["train", str(data), "--out", str(tmp_path / "two"), "--cache", str(tmp_path / "c2"), *args]
    proc = _torchrun(2, two)
    ckpt = tmp_path / "two" / "checkpoints" / "finetune.safetensors"
    _wait_for(lambda: (_checkpoint_epoch(ckpt) or 0) >= 1, proc)
    ranks = _ranks(proc)
    for pid in ranks.values():
        os.kill(pid, signal.SIGSTOP)  # hold both where they are
    stopped_at = _checkpoint_epoch(ckpt)
    os.kill(ranks[1], signal.SIGKILL)
    os.kill(ranks[0], signal.SIGCONT)
    code, out = _finish(proc)
    assert code != 0 and 1 <= stopped_at < 6
    assert not (tmp_path / "two" / "model.safetensors").exists()
    _run(2, [*two, "--resume"])
    one, resumed = _json(tmp_path / "one", "metrics.json"), _json(tmp_path / "two", "metrics.json")
    assert one["val"]["accuracy"] == resumed["val"]["accuracy"]
    h1 = list(csv.DictReader((tmp_path / "one" / "history.csv").open()))
    h2 = list(csv.DictReader((tmp_path / "two" / "history.csv").open()))
    assert len(h1) == len(h2)
    for a, b in zip(h1, h2):  # the same epochs and stages, the same losses and accuracies (not the same seconds)
        assert (a["epoch"], a["stage"]) == (b["epoch"], b["stage"]), (a, b)
        for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            assert abs(float(a[key]) - float(b[key])) <= 1e-4, (key, a, b)
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert max(float((w1[k].float() - w2[k].float()).abs().max()) for k in w1) <= 1e-4


@pytest.mark.slow  # several processes: runs in the slow tier
def test_a_rank_killed_during_extraction_leaves_whole_entries_and_the_rerun_fills_only_the_gaps(tmp_path):
    for split, n in (("train", 150), ("val", 5)):
        for c, colour in enumerate([(40, 60, 200), (200, 50, 40)]):
            for i in range(n):
                make_image(tmp_path / "data" / split / str(c) / f"{i}.jpg", colour, size=(96, 72),
                           seed=c * 1000 + i + (500 if split == "val" else 0))
    images = sorted((tmp_path / "data").rglob("*.jpg"))
    cache = tmp_path / "cache"
    argv = ["train", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--cache", str(cache),
            "--backbone", "test_tiny", "--epochs", "2", "--engine", "torch"]
    proc = _torchrun(2, argv)
    _wait_for(lambda: any(cache.glob("*/*.safetensors")), proc)  # the first batch is stored: extraction is on
    rank1 = _ranks(proc)[1]
    os.kill(rank1, signal.SIGSTOP)  # held mid-extraction while rank 0 ends its part, then killed
    time.sleep(0.5)
    os.kill(rank1, signal.SIGKILL)
    code, _ = _finish(proc)
    assert code != 0

    def entries() -> Counter:
        from headstart.cache import _shard_members

        return Counter(d for shard in cache.glob("*/*.safetensors") for d in _shard_members(shard))

    digests = {file_digest(p) for p in images}
    before = entries()
    assert 0 < len(before) < len(digests) and max(before.values()) == 1
    out = _run(2, argv)
    after = entries()
    assert set(after) == digests and max(after.values()) == 1  # none missing, none twice
    passes = _json(tmp_path / "run", "data.json")["backbone_passes"]
    assert passes["train"] + passes["val"] == len(digests) - len(before), out[-2000:]
