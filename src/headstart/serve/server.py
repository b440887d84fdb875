"""Running the service under uvicorn: bind, print the address, and shut down cleanly on SIGINT/SIGTERM.

    >>> serve("run", ServeConfig(port=8000))      # returns after SIGINT/SIGTERM, once requests in flight are done
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from pathlib import Path

import uvicorn

from ..config import ServeConfig
from ..errors import HeadstartError
from .app import create_app
from .model import ServedModel

__all__ = ["serve", "ServeFailed"]

log = logging.getLogger("headstart")


class ServeFailed(HeadstartError):
    """The service could not start or keep its model (the reason is in the message)."""


class _Server(uvicorn.Server):
    """uvicorn's server, but a graceful stop on SIGINT/SIGTERM is a clean exit, and the bound address is printed.

    uvicorn re-raises the signal after its graceful shutdown, so the process would end by SIGTERM or
    KeyboardInterrupt; here a shutdown that finished the requests in flight is a normal return (exit 0).
    """

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    async def startup(self, sockets=None):
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            # one line on stdout, flushed: scripts and tests read the port chosen for --port 0 from it
            print(f"serving on http://{host}:{port}/ (Ctrl-C or SIGTERM to stop)", flush=True)


class _Errors(logging.Handler):
    """Keeps uvicorn's error messages, so a failure to start is one line that says why."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def serve(source: str | Path, config: ServeConfig, engine: str = "auto", device: str = "auto") -> None:
    """Serve the model in ``source`` (a run folder or an exported ``.onnx``) until SIGINT or SIGTERM.

    ``engine`` and ``device`` are those of ``headstart predict``. The model is loaded before the port opens (a damaged run fails here, not on the first request); it warms
    up while the server already answers ``/health`` (``/ready`` turns 200 when it is done).

    Raises:
        RunFormatError, EngineError: the model cannot be loaded. ServeFailed: the port cannot be bound, or
            the model could not be warmed up.
    """
    model = ServedModel.open(source, engine=engine, device=device, name=config.name)
    failures: list[str] = []
    server: _Server | None = None

    def fatal(reason: str) -> None:
        failures.append(reason)
        server.should_exit = True

    app = create_app(model, config, on_fatal=fatal)
    uv_config = uvicorn.Config(app, host=config.host, port=config.port, access_log=config.access_log,
                               log_level="info" if config.access_log else "warning", lifespan="on",
                               timeout_graceful_shutdown=config.shutdown_timeout, server_header=False,
                               log_config=None)
    server = _Server(uv_config)
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: anyone who can reach this machine can use the model%s", config.host,
                    "" if config.api_key else " (no --api-key set)")
    errors = _Errors()
    logging.getLogger("uvicorn.error").addHandler(errors)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn logs why and exits when it cannot bind or its lifespan startup fails
        why = errors.messages[-1] if errors.messages else f"exit {exc.code}"
        raise ServeFailed(f"the server could not listen on {config.host}:{config.port} ({why}); choose another "
                          "--port (0: any free one) or --host") from exc
    finally:
        logging.getLogger("uvicorn.error").removeHandler(errors)
    if failures:
        raise ServeFailed(failures[0])
    print("stopped", file=sys.stderr)
