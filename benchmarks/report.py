"""What the run report costs: the seconds it adds to a default ``headstart train`` against the train's own time,
and the size of the HTML file, on hymenoptera (or any data).

    PYTHONPATH=src python benchmarks/report.py ../shared/datasets/hymenoptera_data

Each ``headstart`` command runs in a fresh interpreter, as a user runs it: a default train with an empty feature
cache (the first run on a data set), the same train again (features from the cache), then ``headstart report``
on the saved run (its own validation set, with and without heatmaps, and the val folder as other data). The train's time is the one it
prints (``time: ... s``, from the start of training to the end), the report's the one ``train`` prints after it
(``report: ... (KB, s)``). What the report adds to the command a user waits for is measured directly too: warm trains with and without
``--no-report``, alternated, best of two each. The load average is printed beside: on a shared machine wall times carry it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_COMMAND = [sys.executable, "-m", "headstart"]  # as a user runs it
_TRAIN_TIME = re.compile(r"^time: ([\d.]+) s", re.M)
_REPORT = re.compile(r"^report: (\S+) \((\d+) KB, ([\d.]+) s\)", re.M)


def _run(argv: list[str], cache: str) -> tuple[float, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HEADSTART_CACHE=cache)
    t0 = time.perf_counter()
    proc = subprocess.run([*_COMMAND, *argv], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"headstart {' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return wall, proc.stdout


def _report_figures(stdout: str) -> tuple[Path, int, float]:
    m = _REPORT.search(stdout)
    if m is None:
        sys.exit(f"no report line in the output:\n{stdout[-2000:]}")
    return Path(m.group(1)), int(m.group(2)), float(m.group(3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", help="a data set headstart train takes (hymenoptera_data)")
    ap.add_argument("--work", help="folder for the runs and the cache (default: a new temporary folder)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="headstart-report-bench-"))
    cache = str(work / "cache")
    rows = []
    for name in ("cold cache", "warm cache"):
        run = work / f"run-{name.split()[0]}"
        wall, out = _run(["train", args.data, "--out", str(run), "--overwrite"], cache)
        train_s = float(_TRAIN_TIME.search(out).group(1))
        path, kb, report_s = _report_figures(out)
        rows.append((f"train ({name})", train_s, wall, report_s, path.stat().st_size))
    # what the report adds to the command a user waits for: warm trains with and without it, alternated
    walls = {"with": [], "without": []}
    for _ in range(2):
        for kind, extra in (("with", []), ("without", ["--no-report"])):
            wall, _ = _run(["train", args.data, "--out", str(work / f"run-{kind}"), "--overwrite", *extra], cache)
            walls[kind].append(wall)
    for what, extra in (("report RUN (its val set)", []), ("report RUN --heatmaps 0", ["--heatmaps", "0"])):
        wall, out = _run(["report", str(run), *extra, "--out", str(run / f"report{len(extra)}.html")], cache)
        path, kb, report_s = _report_figures(out)
        rows.append((what, None, wall, report_s, path.stat().st_size))
    val = Path(args.data) / "val"
    if val.is_dir():
        wall, out = _run(["report", str(run), str(val)], cache)
        path, kb, report_s = _report_figures(out)
        rows.append(("report RUN DATA/val", None, wall, report_s, path.stat().st_size))
    load = os.getloadavg()
    print(f"headstart report benchmark: {args.data}, {os.cpu_count()} cores, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1, 5, 15 min)")
    print("| command | train time (printed) | command wall time | report time | report / train | report size |")
    print("|---|---|---|---|---|---|")
    for what, train_s, wall, report_s, size in rows:
        share = f"{report_s / train_s:.1%}" if train_s else "-"
        train = f"{train_s:.1f} s" if train_s else "-"
        print(f"| {what} | {train} | {wall:.1f} s | {report_s:.2f} s | {share} | {size / 1024:.0f} KB |")
    with_, without = min(walls["with"]), min(walls["without"])
    print(f"warm train, command wall time (best of 2, alternated): with the report {with_:.1f} s, --no-report "
          f"{without:.1f} s: the report adds {with_ - without:.2f} s ({(with_ - without) / rows[1][1]:.1%} of the "
          f"warm train's printed time; all walls: with {walls['with']}, without {walls['without']})")
    print(f"runs in {work}")


if __name__ == "__main__":
    main()
