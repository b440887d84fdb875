"""The Open Inference Protocol v2 routes (KServe, Triton): health, metadata and infer, images as a BYTES input.

    POST /v2/models/NAME/infer
    {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": ["<base64 file>", "<base64 file>"]}]}
    -> {"model_name": NAME, "model_version": "1", "outputs": [
          {"name": "label", "datatype": "BYTES", "shape": [2], "data": ["bees", "ants"]},
          {"name": "probabilities", "datatype": "FP32", "shape": [2, C], "data": [...]}]}

JSON ``data`` holds each image file base64-encoded (JSON strings cannot carry raw bytes); with Triton's binary
tensor data extension (``Inference-Header-Content-Length``) the files travel raw after the JSON, each a 4-byte
little-endian length and its bytes. Outputs are always JSON.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct

import numpy as np
from fastapi import APIRouter, Depends, Request

from .. import __version__
from ..errors import ImageReadError
from .service import Service
from .uploads import ApiError

__all__ = ["oip_router", "INPUT", "OUTPUTS"]

INPUT = "image"
OUTPUTS = ("label", "probabilities")
VERSION = "1"


def oip_router(service: Service, authorised) -> APIRouter:
    """The v2 routes over ``service``; ``authorised`` guards metadata and infer (health stays open)."""
    model = service.model
    router = APIRouter(prefix="/v2")

    def named(name: str, version: str | None = None) -> None:
        if name != model.name:
            raise ApiError(404, f"no model {name!r} here; this server serves {model.name!r}")
        if version is not None and version != VERSION:
            raise ApiError(404, f"model {name!r} has only version {VERSION!r}, not {version!r}")

    @router.get("")
    async def server_metadata():
        return {"name": "headstart", "version": __version__, "extensions": ["binary_tensor_data"]}

    @router.get("/health/live")
    async def live():
        return {"live": True}

    @router.get("/health/ready")
    async def ready():
        service.check_ready()
        return {"ready": True}

    def metadata(name: str, version: str | None = None):
        named(name, version)
        return {"name": model.name, "versions": [VERSION], "platform": "headstart",
                "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
                "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(model.classes)]}],
                "parameters": {"classes": model.classes}}

    def model_ready(name: str, version: str | None = None):
        named(name, version)
        service.check_ready()
        return {"name": model.name, "ready": True}

    async def infer(request: Request, name: str, version: str | None = None):
        named(name, version)
        service.check_ready()
        header, images = _parse(await request.body(), request.headers.get("inference-header-content-length"))
        wanted = _wanted_outputs(header)
        results = await service.classify([(f"{INPUT}[{i}]", data) for i, data in enumerate(images)])
        bad = [f"element {i}: {r.reason}" for i, r in enumerate(results) if isinstance(r, ImageReadError)]
        if bad:
            raise ApiError(422, f"{len(bad)} of {len(images)} image(s) in input {INPUT!r} cannot be read as images "
                                f"({'; '.join(bad)})")
        probs = np.stack(results) if results else np.zeros((0, len(model.classes)), np.float32)
        outputs = {"label": {"name": "label", "datatype": "BYTES", "shape": [len(probs)],
                             "data": [model.classes[int(j)] for j in probs.argmax(1)]},
                   "probabilities": {"name": "probabilities", "datatype": "FP32", "shape": list(probs.shape),
                                     "data": [float(v) for v in probs.ravel()]}}
        body = {"model_name": model.name, "model_version": VERSION, "outputs": [outputs[o] for o in wanted]}
        if "id" in header:
            body["id"] = header["id"]
        return body

    guarded = [Depends(authorised)]
    for prefix in ("/models/{name}", "/models/{name}/versions/{version}"):
        router.add_api_route(prefix, metadata, methods=["GET"], dependencies=guarded)
        router.add_api_route(prefix + "/ready", model_ready, methods=["GET"])
        router.add_api_route(prefix + "/infer", infer, methods=["POST"], dependencies=guarded)
    return router


def _parse(body: bytes, header_length: str | None) -> tuple[dict, list[bytes]]:
    """The request's JSON and its images' bytes, from base64 JSON data or the binary extension."""
    binary = b""
    if header_length is not None:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise ApiError(400, f"Inference-Header-Content-Length is {header_length!r}; expected the JSON header's "
                                f"length in bytes, at most the body's {len(body)}")
        body, binary = body[:int(header_length)], body[int(header_length):]
    try:
        header = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the request is not JSON ({exc}); expected an OIP v2 inference request") from exc
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list) or len(header["inputs"]) != 1:
        raise ApiError(400, "expected {\"inputs\": [one input of datatype BYTES holding the image files]}")
    tensor = header["inputs"][0]
    if not isinstance(tensor, dict) or tensor.get("datatype") != "BYTES":
        raise ApiError(400, f"input {tensor.get('name') if isinstance(tensor, dict) else tensor!r} must have "
                            "datatype BYTES (one element per image file)")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise ApiError(400, f"input shape must be a list of non-negative integers, got {shape!r}")
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    images = _binary_elements(binary, size) if size is not None else _base64_elements(tensor.get("data"))
    if int(np.prod(shape)) != len(images):
        raise ApiError(400, f"input shape {shape} holds {int(np.prod(shape))} element(s) but {len(images)} were sent")
    return header, images


def _base64_elements(data) -> list[bytes]:
    flat = list(_flatten(data)) if isinstance(data, list) else None
    if flat is None or not all(isinstance(d, str) for d in flat):
        raise ApiError(400, "input data must be a list of base64 strings, one image file each")
    try:
        return [base64.b64decode(d, validate=True) for d in flat]
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, f"an input element is not valid base64 ({exc}); encode each image file's bytes") from exc


def _binary_elements(binary: bytes, size) -> list[bytes]:
    if not isinstance(size, int) or size != len(binary):
        raise ApiError(400, f"binary_data_size is {size!r} but {len(binary)} bytes follow the JSON header")
    out, pos = [], 0
    while pos < len(binary):
        if pos + 4 > len(binary):
            raise ApiError(400, "the binary BYTES data ends inside an element's 4-byte length")
        (n,) = struct.unpack_from("<I", binary, pos)
        if pos + 4 + n > len(binary):
            raise ApiError(400, f"a binary BYTES element says {n} bytes but only {len(binary) - pos - 4} remain")
        out.append(binary[pos + 4:pos + 4 + n])
        pos += 4 + n
    return out


def _flatten(data):
    for d in data:
        if isinstance(d, list):
            yield from _flatten(d)
        else:
            yield d


def _wanted_outputs(header: dict) -> list[str]:
    asked = header.get("outputs")
    if asked is None:
        return list(OUTPUTS)
    names = [o.get("name") if isinstance(o, dict) else o for o in asked] if isinstance(asked, list) else [asked]
    unknown = [n for n in names if n not in OUTPUTS]
    if unknown:
        raise ApiError(400, f"unknown output(s) {unknown}; this model has {list(OUTPUTS)}")
    return names
