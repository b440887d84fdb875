"""The HTTP service as a FastAPI app: the page, health, model metadata, prediction, and the OIP v2 routes.

    >>> app = create_app(ServedModel.open("run"), ServeConfig(max_batch=32))
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)      # or `headstart serve run`

Every error is JSON ``{"error": "..."}`` with a 4xx (the request's fault) or a 503 with ``Retry-After`` (busy,
or warming up); no route reads a path from the client.
"""

from __future__ import annotations

import hmac
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from ..config import ServeConfig
from ..errors import ImageReadError
from .batcher import Overloaded
from .uploads import ApiError, BodyLimit, BodyTooLarge, read_uploads
from .model import ServedModel
from .oip import oip_router
from .service import Service

__all__ = ["create_app"]

log = logging.getLogger("headstart")
STATIC = Path(__file__).parent / "static"
# the page may talk only to this server and show the images it was given (blob:) or the camera (mediastream:)
_PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: mediastream:; "
             "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


def create_app(model: ServedModel, config: ServeConfig, on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    """The service for ``model`` with the limits in ``config``; the model warms up when the app starts.

    ``on_fatal(reason)`` is called if the model cannot be warmed up.
    """
    service = Service(model, config, on_fatal)

    @asynccontextmanager
    async def lifespan(app):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title=f"headstart: {model.name}", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=int(config.max_body_mb * 2**20))
    if config.cors:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type"])
    _add_error_handlers(app)
    authorised = _key_check(config.api_key)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": _PAGE_CSP,
                                                            "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health():
        """Alive (the process answers); says nothing about the model."""
        return {"status": "alive"}

    @app.get("/ready")
    async def ready():
        """200 once the model is loaded and warmed up; 503 before."""
        service.check_ready()
        return {"status": "ready", "model": model.name}

    @app.get("/model", dependencies=[Depends(authorised)])
    async def model_info():
        stats = service.batcher.stats
        return model.info() | {"ready": service.ready, "max_batch": config.max_batch,
                               "max_images": config.max_images, "max_body_mb": config.max_body_mb,
                               "batching": {"batches": stats.batches, "images": stats.images,
                                            "largest_batch": stats.largest}}

    @app.post("/predict", dependencies=[Depends(authorised)])
    async def predict(request: Request, top_k: int = Query(1, description="classes per image, best first"),
                      tta: bool = Query(False, description="average with the mirror image (predict --tta)")):
        """Images as multipart form files (any field name, several at once) or one raw ``image/*`` body;
        the rows of ``headstart predict --format json``, with each upload's file name as ``path``."""
        if top_k < 1:
            raise ApiError(422, f"top_k must be >= 1, got {top_k}")
        service.check_ready()
        uploads = await read_uploads(request, config.max_images)
        results = await service.classify(uploads, tta=tta)
        return _rows_response(uploads, results, model.predictor, top_k)

    app.include_router(oip_router(service, authorised))
    return app


def _rows_response(uploads, results, predictor, top_k):
    """200 with the rows of ``headstart predict``; 422 naming the unreadable uploads, with every row (the
    readable ones predicted)."""
    errors = {i: r.reason for i, r in enumerate(results) if isinstance(r, ImageReadError)}
    rows = [predictor.row(name, None if i in errors else results[i], errors.get(i), top_k)
            for i, (name, _) in enumerate(uploads)]
    if errors:
        named = "; ".join(f"{uploads[i][0]}: {reason}" for i, reason in errors.items())
        raise ApiError(422, f"{len(errors)} of {len(uploads)} upload(s) cannot be read as images ({named})",
                       rows=rows)
    return rows


def _key_check(key: str | None):
    """A dependency that lets a request through only with ``key`` (no key configured: every request)."""

    async def authorised(request: Request) -> None:  # async: a sync dependency would take a thread per request
        if key is None:
            return
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        if given is None or not hmac.compare_digest(given.encode(), key.encode()):
            raise ApiError(401, "a valid API key is required: send it as 'Authorization: Bearer KEY' or "
                                "'X-API-Key: KEY'" + (" (the one sent is wrong)" if given else ""),
                           headers={"WWW-Authenticate": "Bearer"})

    return authorised


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse({"error": exc.message, **exc.extra}, exc.status, headers=exc.headers)

    @app.exception_handler(Overloaded)
    async def overloaded(request, exc: Overloaded):
        return JSONResponse({"error": str(exc)}, 503, headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(BodyTooLarge)
    async def too_large(request, exc: BodyTooLarge):
        return JSONResponse({"error": str(exc)}, 413, headers={"Connection": "close"})

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see / for the page and docs/serve.md for routes"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return JSONResponse({"error": message}, exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()) if p not in ('query', 'body'))}: {e.get('msg')}"
                 + (f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else "")
                 for e in exc.errors()]
        return JSONResponse({"error": "; ".join(parts)}, 422)

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):  # a bug or an engine failure: say so, keep serving
        log.exception("error answering %s %s", request.method, request.url.path)
        return JSONResponse({"error": f"internal error ({type(exc).__name__}: {str(exc)[:200]}); the service "
                                      "keeps running. Please report this."}, 500)
