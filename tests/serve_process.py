"""A `headstart serve` process for tests: started on 127.0.0.1 with --port 0, ready when /ready says so."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

import headstart
from conftest import make_folder


def tiny_run(root: Path) -> Path:
    """A run of the tiny backbone trained on generated blue / green / red pictures, saved in ``root/run``."""
    data = make_folder(root / "data", classes=("blue", "red", "green"))
    clf = headstart.ImageClassifier(backbone="test_tiny", epochs=40, patience=40, head_search="off",
                                    cache=root / "cache")
    return clf.fit(data).save(root / "run")


class Server:
    """``headstart serve RUN --port 0 ...`` in its own process; ``url`` once it printed its address."""

    def __init__(self, run: Path, tmp: Path, *args: str, env: dict | None = None):
        self.log = tmp / f"serve-{time.monotonic_ns()}.log"
        self._stderr = open(self.log, "w")
        # one cache for every server of the session: the backbone is exported to ONNX once
        environment = os.environ | {"HEADSTART_CACHE": str(tmp.parent / "serve-cache")} | (env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "headstart.cli", "serve", str(run), "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=environment)
        try:
            self._wait_until_ready()
        except BaseException:  # a server that failed its start is not left running
            self.proc.kill()
            self.proc.wait()
            self._stderr.close()
            raise

    def _wait_until_ready(self) -> None:
        pool = ThreadPoolExecutor(1)  # the address line, or the end of a server that failed to start
        try:
            line = pool.submit(self.proc.stdout.readline).result(timeout=180)
        finally:
            pool.shutdown(wait=False)  # on a timeout the caller kills the server, which ends the read
        assert line.startswith("serving on http://127.0.0.1:"), f"no address printed: {line!r}\n{self.stderr()}"
        self.url = line.split()[2].rstrip("/")
        self.port = int(self.url.rsplit(":", 1)[1])
        deadline = time.monotonic() + 180
        while not self._ready():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.stderr()
            time.sleep(0.1)

    def _ready(self) -> bool:
        try:
            return httpx.get(self.url + "/ready", timeout=30).status_code == 200
        except httpx.TimeoutException:  # a busy machine: ask again
            return False

    def stderr(self) -> str:
        self._stderr.flush()
        return self.log.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=120)
        finally:
            self._stderr.close()
