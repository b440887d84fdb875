"""How soon headstart answers: CPU seconds for ``--help`` and each command's help, the time to the first line
of output of ``train`` and ``backbones``, and whole commands (``backbones``, ``train`` on 24 small photos with its
report, ``predict`` of one photo), for two source trees side by side (an older checkout and this one).

    PYTHONPATH=src python benchmarks/startup.py --old ../base/src --new src --rounds 3

Each figure is the median over ``--rounds`` runs, each a fresh interpreter running ``python -m headstart``.
CPU seconds are the child's user + system time (``os.wait4``); the first line is timed from the spawn to the
first line on stdout or stderr, and the process is stopped there. On a shared machine wall times carry the load: the table shows the load average.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

_COMMAND = [sys.executable, "-m", "headstart"]


def _env(src: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(src).resolve()), HF_HUB_OFFLINE="1")
    env["HEADSTART_CACHE"] = tempfile.mkdtemp(prefix="headstart-startup-cache-")
    return env


def cpu_seconds(src: str, argv: list[str]) -> float:
    """User + system CPU seconds of one ``headstart ARGV`` run to its end."""
    proc = subprocess.Popen([*_COMMAND, *argv], env=_env(src), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    return usage.ru_utime + usage.ru_stime


def first_line(src: str, argv: list[str]) -> tuple[float, float, str]:
    """``(wall seconds, CPU seconds, text)`` up to the first line ``headstart ARGV`` writes; the run is stopped
    there."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([*_COMMAND, *argv], env=_env(src), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    line = ""
    for line in proc.stdout:
        if line.strip():
            break
    wall = time.perf_counter() - t0
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)  # only the process this function started
    proc.stdout.close()
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = -9
    return wall, usage.ru_utime + usage.ru_stime, line.strip()


def whole(src: str, argv: list[str]) -> tuple[float, float]:
    """``(wall seconds, CPU seconds)`` of one ``headstart ARGV`` run to its end (it must succeed)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([*_COMMAND, *argv], env=_env(src), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"headstart {' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime


def _photos(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for c, colour in (("ants", (200, 80, 40)), ("bees", (220, 200, 40))):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = np.clip(np.array(colour) + rng.normal(0, 30, (96, 128, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(root / split / c / f"{c}_{i}.jpg")
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="src folder of the older checkout")
    ap.add_argument("--new", default=str(Path(__file__).resolve().parents[1] / "src"), help="src folder to compare")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="headstart-startup-"))
    data = _photos(work / "photos")
    trees = {"old": args.old, "new": args.new}
    helps = [["--help"], ["train", "--help"], ["predict", "--help"], ["summary", "--help"]]
    rows = []
    for argv in helps:
        med = {k: statistics.median(cpu_seconds(src, argv) for _ in range(args.rounds)) for k, src in trees.items()}
        rows.append((f"CPU s: headstart {' '.join(argv)}", med["old"], med["new"], ""))
    for name, argv in (("train", ["train", str(data), "--out", None]), ("backbones", ["backbones"])):
        got = {}
        for k, src in trees.items():
            runs = []
            for r in range(args.rounds):
                call = [str(work / f"run-{k}-{r}") if a is None else a for a in argv]
                runs.append(first_line(src, call))
            got[k] = (statistics.median(w for w, _, _ in runs), statistics.median(c for _, c, _ in runs), runs[0][2])
        rows.append((f"wall s to first line: headstart {name}", got["old"][0], got["new"][0], ""))
        rows.append((f"CPU s to first line: headstart {name}", got["old"][1], got["new"][1],
                     f"old: {got['old'][2][:50]!r}; new: {got['new'][2][:50]!r}"))
    photo = next((data / "val" / "ants").iterdir())
    for name, argv in (("backbones", ["backbones"]), ("train", ["train", str(data), "--out", None]),
                       ("predict", ["predict", None, str(photo)])):
        got = {}
        for k, src in trees.items():
            runs = []
            for r in range(args.rounds):
                run = str(work / f"whole-{k}-{r}")
                call = [run if a is None else a for a in argv]
                if name == "train":
                    call += ["--overwrite"]
                runs.append(whole(src, call))
            got[k] = (statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs))
        rows.append((f"wall s, whole command: headstart {name}", got["old"][0], got["new"][0], ""))
        rows.append((f"CPU s, whole command: headstart {name}", got["old"][1], got["new"][1], ""))
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; median of {args.rounds} rounds; "
          f"old = {args.old}, new = {args.new}\n")
    print(f"| {'measure':<44} | {'old':>7} | {'new':>7} | {'old/new':>7} | first line |")
    print(f"|{'-' * 46}|{'-' * 9}|{'-' * 9}|{'-' * 9}|---|")
    for name, old, new, note in rows:
        ratio = old / new if new > 0 else float("inf")
        print(f"| {name:<44} | {old:>7.2f} | {new:>7.2f} | {ratio:>6.1f}x | {note} |")


if __name__ == "__main__":
    main()
