"""Load on `headstart serve`: concurrent clients posting photos, beside `headstart predict` on the same photos.

    PYTHONPATH=src python benchmarks/serve.py RUN ../shared/datasets/hymenoptera_data

Starts ``headstart serve RUN --port 0`` (defaults otherwise) as its own process on 127.0.0.1 and, in one run:

1. the engine's own time for one image, and the offline ``headstart predict`` rate over the photos (the
   predictor the command uses, in this process, while the server is idle);
2. for 1, 4, 16 and 64 concurrent clients, ``--requests`` requests of one photo each: throughput, latency
   p50/p95/p99, counts by status, and the mean engine batch;
3. the same with one upload in ten bad (not an image, truncated, empty, a decompression-bomb header, a body
   over the size limit): every bad one must get its 4xx, every good one its own answer, nothing lost;
4. 10,000 requests from 16 clients, the server's resident memory sampled along the way.

Prints the tables and the checks of issue 15; figures are only comparable within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch

import headstart
from headstart.predict import collect_images


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` in MB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def png_header(width: int, height: int) -> bytes:
    """A PNG declaring ``width`` x ``height`` pixels that holds almost none: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


class ServerProcess:
    def __init__(self, run: Path, extra: list[str]):
        self.proc = subprocess.Popen([sys.executable, "-m", "headstart.cli", "--quiet", "serve", str(run),
                                      "--port", "0", *extra], stdout=subprocess.PIPE, text=True)
        pool = ThreadPoolExecutor(1)
        try:
            line = pool.submit(self.proc.stdout.readline).result(timeout=600)
        except TimeoutError:
            self.proc.kill()
            raise SystemExit("the server printed no address within 10 minutes")
        finally:
            pool.shutdown(wait=False)
        if not line.startswith("serving on "):
            raise SystemExit(f"the server did not start: {line!r}")
        self.url = line.split()[2].rstrip("/")
        while True:
            try:
                if httpx.get(self.url + "/ready", timeout=30).status_code == 200:
                    break
            except httpx.TimeoutException:
                pass
            time.sleep(0.2)

    def batching(self) -> dict:
        return httpx.get(self.url + "/model", timeout=60).json()["batching"]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=300)


async def load(url: str, uploads: list[tuple[str, bytes, int | None]], clients: int,
               on_done=None) -> tuple[float, list[tuple[int, float, str, object]]]:
    """Post ``uploads`` (name, bytes, expected status) from ``clients`` concurrent clients, one image per request.

    Returns the wall time and, per request in order, ``(status, seconds, name, body or error text)``.
    """
    results: list = [None] * len(uploads)
    nxt = iter(range(len(uploads)))
    done = 0

    async def client(http: httpx.AsyncClient):
        nonlocal done
        for i in nxt:
            name, data, _ = uploads[i]
            t0 = time.perf_counter()
            try:
                r = await http.post(url + "/predict", files={"file": (name, data, "image/jpeg")})
                body = r.json()
                results[i] = (r.status_code, time.perf_counter() - t0, name, body)
            except (httpx.HTTPError, ValueError) as exc:  # lost: no answer, or not JSON
                results[i] = (0, time.perf_counter() - t0, name, f"{type(exc).__name__}: {exc}")
            done += 1
            if on_done is not None:
                on_done(done)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return time.perf_counter() - t0, results


def summary(wall: float, results, uploads) -> dict:
    codes = Counter(r[0] for r in results)
    lat = np.array([r[1] for r in results if r[0] == 200]) * 1000
    wrong = 0  # an answer that is not this request's own: another upload's name, or the wrong status
    for (status, _, name, body), (_, _, expected) in zip(results, uploads):
        if expected is not None and status != expected and status != 503:
            wrong += 1
        elif status == 200 and (len(body) != 1 or body[0]["path"] != name):
            wrong += 1
    lost = [f"{name}: {body}" for status, _, name, body in results if status == 0]
    return {"n": len(results), "wall": wall, "rps": len(results) / wall, "ok_rps": codes[200] / wall, "lost_why": lost,
            "p50": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "p95": float(np.percentile(lat, 95)) if len(lat) else float("nan"),
            "p99": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
            "codes": dict(sorted(codes.items())), "wrong": wrong, "lost": codes[0],
            "other_5xx": sum(v for k, v in codes.items() if k >= 500 and k != 503)}


def bad_uploads(photo: bytes, max_body_mb: float) -> list[tuple[str, bytes, int]]:
    """The bad uploads mixed in, with the status each must get."""
    return [("text.jpg", b"this is not an image\n" * 10, 422),
            ("truncated.jpg", photo[:len(photo) // 2], 422),
            ("empty.jpg", b"", 422),
            ("bomb.png", png_header(12000, 12000), 422),
            ("huge.jpg", os.urandom(int((max_body_mb + 1) * 2**20)), 413)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="run folder (or exported .onnx) to serve")
    ap.add_argument("photos", type=Path, help="folder of photos (recursively)")
    ap.add_argument("--requests", type=int, default=400, help="requests per concurrency level (default: 400)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--memory-requests", type=int, default=10_000, help="requests of the memory phase")
    ap.add_argument("--server-args", nargs=argparse.REMAINDER, default=[], help="extra `headstart serve` flags")
    args = ap.parse_args()

    paths = [p for p in collect_images([args.photos]) if p.suffix.lower() in (".jpg", ".jpeg")]
    photos = [(p.name, p.read_bytes()) for p in paths]
    print(f"serve benchmark: {args.run}, {len(photos)} JPEG photos from {args.photos}, {os.cpu_count()} cores, "
          f"load average before: {os.getloadavg()[0]:.1f}", flush=True)

    # 1. the engine alone, and the offline predictor, in this process (the server is not started yet)
    clf = headstart.load(args.run)
    predictor = clf.predictor()
    x1 = torch.stack([predictor.prepare(photos[0][1], name=photos[0][0])])
    for _ in range(5):
        predictor.probabilities_of_batch(x1)
    times = []
    for _ in range(60):
        t0 = time.perf_counter()
        predictor.probabilities_of_batch(x1)
        times.append(time.perf_counter() - t0)
    engine_ms = 1000 * float(np.median(times))
    predictor.predict(paths[:32])  # warm
    t0 = time.perf_counter()
    rows = predictor.predict(paths)
    predict_s = time.perf_counter() - t0
    predict_rate = len(paths) / predict_s
    offline = {r["path"]: r for r in rows}
    print(f"engine, one image (backbone + head, {predictor.runner.engine}): median {engine_ms:.1f} ms over 60 calls")
    print(f"headstart predict (offline, same photos): {predict_rate:.1f} img/s ({len(paths)} in {predict_s:.1f} s)",
          flush=True)
    del predictor, clf

    server = ServerProcess(args.run, args.server_args)
    atexit.register(lambda: server.proc.poll() is None and server.proc.kill())  # a failed run leaves no server
    max_body = 20.0
    if "--max-body-mb" in args.server_args:
        max_body = float(args.server_args[args.server_args.index("--max-body-mb") + 1])
    print(f"server: {server.url}, pid {server.proc.pid}, RSS after warm-up {rss_mb(server.proc.pid):.0f} MB",
          flush=True)

    def uploads_for(n: int, bad_every: int | None = None):
        bad = bad_uploads(photos[0][1], max_body)
        out = []
        for i in range(n):
            if bad_every and i % bad_every == bad_every - 1:
                name, data, status = bad[(i // bad_every) % len(bad)]
                out.append((f"{i:05d}_{name}", data, status))
            else:
                name, data = photos[i % len(photos)]
                out.append((f"{i:05d}_{name}", data, 200))
        return out

    tables = {}
    agree = []
    for mixed in (False, True):
        for c in args.clients:
            uploads = uploads_for(args.requests, 10 if mixed else None)
            before = server.batching()
            wall, results = asyncio.run(load(server.url, uploads, c))
            after = server.batching()
            s = summary(wall, results, uploads)
            batches = after["batches"] - before["batches"]
            s["mean_batch"] = (after["images"] - before["images"]) / batches if batches else float("nan")
            tables[(mixed, c)] = s
            if not mixed:  # the service's answer for each photo against predict's
                for status, _, name, body in results:
                    if status == 200:
                        ref = offline[str(paths[int(name[:5]) % len(paths)])]
                        agree.append(body[0]["label"] == ref["label"]
                                     and abs(body[0]["probability"] - ref["probability"]) < 1e-4)
            print(f"  {'mixed' if mixed else 'clean'} c={c:<3} {s['rps']:6.1f} req/s  p50 {s['p50']:6.1f} ms  "
                  f"p95 {s['p95']:6.1f}  p99 {s['p99']:6.1f}  batch {s['mean_batch']:.1f}  codes {s['codes']}",
                  flush=True)
            for line in s["lost_why"][:5]:
                print(f"    lost: {line}", flush=True)

    # 4. memory under a long load
    marks = {1000, 2500, 5000, 7500, args.memory_requests}
    rss = {}

    def sample(done: int) -> None:
        if done in marks:
            rss[done] = rss_mb(server.proc.pid)

    wall, results = asyncio.run(load(server.url, uploads_for(args.memory_requests), 16, on_done=sample))
    mem = summary(wall, results, uploads_for(args.memory_requests))
    rc = server.stop()

    # the report
    print(f"\nload average after: {os.getloadavg()[0]:.1f}; server exit code after SIGTERM: {rc}")
    print(f"\nengine, one image: {engine_ms:.1f} ms; headstart predict: {predict_rate:.1f} img/s\n")
    print("| photos | clients | requests | req/s | x predict | p50 ms | p95 ms | p99 ms | mean batch | status counts |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (mixed, c), s in tables.items():
        codes = ", ".join(f"{k}: {v}" for k, v in s["codes"].items())
        print(f"| {'10% bad' if mixed else 'all good'} | {c} | {s['n']} | {s['rps']:.1f} | "
              f"{s['ok_rps'] / predict_rate:.2f} | {s['p50']:.1f} | {s['p95']:.1f} | {s['p99']:.1f} | "
              f"{s['mean_batch']:.1f} | {codes} |")
    print(f"\nmemory phase: {mem['n']} requests from 16 clients in {mem['wall']:.0f} s ({mem['rps']:.1f} req/s), "
          f"codes {mem['codes']}")
    print("| requests done | server RSS MB |\n|---|---|")
    for k in sorted(rss):
        print(f"| {k} | {rss[k]:.0f} |")

    c16 = tables.get((False, 16))
    c1 = tables.get((False, 1))
    mixed_rows = [s for (m, _), s in tables.items() if m]
    checks = [
        ("16 clients: throughput >= 0.7x headstart predict", c16 and c16["rps"] / predict_rate >= 0.7,
         f"{c16['rps'] / predict_rate:.2f}x" if c16 else "-"),
        ("1 client: p50 latency <= 2x the engine's time for one image", c1 and c1["p50"] <= 2 * engine_ms,
         f"{c1['p50'] / engine_ms:.2f}x ({c1['p50']:.1f} vs {engine_ms:.1f} ms)" if c1 else "-"),
        ("mixed: no 5xx other than 503", all(s["other_5xx"] == 0 for s in mixed_rows),
         str(sum(s["other_5xx"] for s in mixed_rows))),
        ("mixed: none lost, none answered with another's answer or the wrong status",
         all(s["lost"] == 0 and s["wrong"] == 0 for s in mixed_rows),
         f"lost {sum(s['lost'] for s in mixed_rows)}, wrong {sum(s['wrong'] for s in mixed_rows)}"),
        ("the service's answers are headstart predict's (label, probability within 1e-4)", all(agree),
         f"{sum(agree)} of {len(agree)}"),
        (f"memory: RSS after {args.memory_requests} within 10% of after 1000",
         1000 in rss and args.memory_requests in rss and abs(rss[args.memory_requests] / rss[1000] - 1) <= 0.10,
         f"{rss.get(args.memory_requests, float('nan')) / rss.get(1000, float('nan')):.3f}x"),
        ("SIGTERM: exit code 0", rc == 0, str(rc)),
    ]
    print("\n| check | result | figure |\n|---|---|---|")
    for name, ok, fig in checks:
        print(f"| {name} | {'pass' if ok else 'FAIL'} | {fig} |")


if __name__ == "__main__":
    main()
