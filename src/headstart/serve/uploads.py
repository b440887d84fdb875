"""Reading a request's images within the limits: the body size cap, multipart files or one raw body.

Starlette has no request-size limit of its own, so ``BodyLimit`` (an ASGI middleware) refuses a body whose
declared length is over the cap before reading it, and stops a body without one (chunked) once it passes.
"""

from __future__ import annotations

import re

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

__all__ = ["ApiError", "BodyLimit", "BodyTooLarge", "read_uploads"]

RAW_TYPES = ("image/", "application/octet-stream")
_MAX_NAME = 255
_FILENAME = re.compile(r'filename\*?=(?:UTF-8\'\')?"?([^";]+)"?', re.IGNORECASE)


class ApiError(Exception):
    """An answer other than 200, as JSON ``{"error": message, **extra}``."""

    def __init__(self, status: int, message: str, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = status, message, headers, extra


class BodyTooLarge(Exception):
    """The request body passed the limit while it was read (a 413)."""


def _too_large(max_bytes: int, got: str) -> str:
    return (f"the request body is {got}; this service takes at most {max_bytes / 2**20:g} MB (--max-body-mb). "
            "Send fewer or smaller images per request")


# A client that writes its whole body before it reads (most HTTP clients) only sees the 413 if the server has
# read what it sent: answering and closing with bytes still unread makes the kernel reset the connection, and the
# answer is lost. Bodies up to this many times the limit are read and dropped first; larger ones are cut off.
DRAIN_FACTOR = 8


async def _drain(receive, budget: int) -> None:
    """Read and drop the rest of a request body, at most ``budget`` bytes (memory stays one chunk)."""
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class BodyLimit:
    """ASGI middleware: 413 for a body over ``max_bytes``, declared (answered at once) or streamed."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1").strip()
        if declared.isdigit() and int(declared) > self.max_bytes:
            message = _too_large(self.max_bytes, f"{int(declared) / 2**20:.1f} MB")
            if int(declared) <= DRAIN_FACTOR * self.max_bytes:
                await _drain(receive, int(declared))
            response = JSONResponse({"error": message}, 413, headers={"Connection": "close"})
            return await response(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    if message.get("more_body", False):
                        await _drain(receive, (DRAIN_FACTOR - 1) * self.max_bytes)
                    raise BodyTooLarge(_too_large(self.max_bytes, f"over {self.max_bytes / 2**20:g} MB"))
            return message

        return await self.app(scope, counted, send)


async def read_uploads(request: Request, max_images: int) -> list[tuple[str, bytes]]:
    """The request's images as ``(file name, bytes)``: every file of a multipart form, or one raw body
    (``Content-Type: image/*`` or ``application/octet-stream``; its name from ``Content-Disposition``, else
    ``upload``).

    Raises:
        ApiError: 413 more than ``max_images`` files; 422 a form without files; 415 another content type;
            400 a multipart body that cannot be parsed.
        BodyTooLarge: the body passed the size limit while it was read.
    """
    ctype = request.headers.get("content-type", "").lower()
    if ctype.startswith("multipart/form-data"):
        return await _form_files(request, max_images)
    if ctype.startswith(RAW_TYPES):
        match = _FILENAME.search(request.headers.get("content-disposition", ""))
        return [(_clean_name(match.group(1) if match else "", 0), await request.body())]
    raise ApiError(415, f"expected images as multipart/form-data files or one raw image body (Content-Type: "
                        f"image/*), got Content-Type {ctype or 'none'!r}")


async def _form_files(request: Request, max_images: int) -> list[tuple[str, bytes]]:
    try:
        # string fields are ignored but bounded; files beyond max_images are refused by the parser
        form = await request.form(max_files=max_images, max_fields=max_images + 16, max_part_size=64 * 1024)
    except HTTPException as exc:  # Starlette's parser errors come as a 400 with its message
        if "too many files" in str(exc.detail).lower():
            raise ApiError(413, f"more than {max_images} images in one request (--max-images); send them in "
                                "several requests") from exc
        raise ApiError(400, f"the multipart body cannot be read ({exc.detail})") from exc
    try:
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        if not files:
            raise ApiError(422, "the form has no files; send each image as a multipart file field (any field name, "
                                "with a filename), e.g. curl -F file=@photo.jpg")
        return [(_clean_name(f.filename, i), await f.read()) for i, f in enumerate(files)]
    finally:
        await form.close()


def _clean_name(name: str | None, index: int) -> str:
    """An upload's name as its row's ``path``: what the client sent, one line, bounded; never opened."""
    name = " ".join((name or "").split())[:_MAX_NAME]
    return name or ("upload" if index == 0 else f"upload_{index}")
