"""`headstart serve`: a real server process on 127.0.0.1 answering like `headstart predict`, refusing bad input
with a clear 4xx (and staying up), batching concurrent requests, and stopping cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import socket
import struct
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import headstart
from headstart.cli import main
from headstart.serve.batcher import MicroBatcher, Overloaded

from conftest import COLOURS, make_image, png_header
from serve_process import Server, tiny_run

KEY = "test-key-3f9a"


# -- a trained run and server processes ------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """Uploads unlike the training images: larger, JPEG and PNG, one per class and then some."""
    root = tmp_path_factory.mktemp("photos")
    out = []
    for i, (name, colour) in enumerate(COLOURS.items()):
        out.append(make_image(root / f"{name}_{i}.jpg", colour, size=(400, 300), seed=500 + i))
        out.append(make_image(root / f"{name}_{i}.png", colour, size=(64, 48), seed=600 + i))
    return out


@pytest.fixture(scope="module")
def server(run, tmp_path_factory):
    s = Server(run, tmp_path_factory.mktemp("server"))
    yield s
    assert s.stop() == 0, s.stderr()


@pytest.fixture(scope="module")
def strict(run, tmp_path_factory):
    """Small limits, and a key from the environment (so it stays out of the command line)."""
    s = Server(run, tmp_path_factory.mktemp("strict"), "--max-body-mb", "1", "--max-images", "4",
               "--max-queue", "3", "--name", "colours", env={"HEADSTART_API_KEY": KEY})
    yield s
    assert s.stop() == 0, s.stderr()


def post(url, files, top_k=None, **kw) -> httpx.Response:
    params = {"top_k": top_k} if top_k is not None else None
    return httpx.post(url + "/predict", files=[("file", (Path(f).name, Path(f).read_bytes())) for f in files],
                      params=params, timeout=60, **kw)


# -- answers ---------------------------------------------------------------------------------------------

def test_health_ready_and_model_describe_the_run(server, run):
    assert httpx.get(server.url + "/health").json() == {"status": "alive"}
    assert httpx.get(server.url + "/ready").json()["status"] == "ready"
    info = httpx.get(server.url + "/model").json()
    saved = json.loads((run / "metrics.json").read_text())
    assert info["name"] == "run" and info["classes"] == ["blue", "green", "red"]
    assert info["backbone"]["name"] == "test_tiny" and info["data_config"]["input_size"] == [32, 32]
    assert info["metrics"]["val"]["accuracy"] == saved["val"]["accuracy"]
    assert info["headstart_version"] == headstart.__version__ and info["engine"] == "onnx"


def test_the_service_answers_as_headstart_predict_does(server, run, photos, capsys):
    assert main(["predict", str(run), *map(str, photos), "--format", "json", "--top-k", "2"]) == 0
    expected = json.loads(capsys.readouterr().out)
    r = post(server.url, photos, top_k=2)
    assert r.status_code == 200, r.text
    got = r.json()
    assert [g["path"] for g in got] == [p.name for p in photos]  # the upload's file name, not a server path
    assert [g["label"] for g in got] == [e["label"] for e in expected]
    assert [g["label"] for g in got] == [p.stem.split("_")[0] for p in photos]  # and they are right
    for g, e in zip(got, expected):
        assert set(g) == {"path", "label", "probability", "top_k", "error"} and g["error"] is None
        assert [t["label"] for t in g["top_k"]] == [t["label"] for t in e["top_k"]]
        np.testing.assert_allclose([t["probability"] for t in g["top_k"]], [t["probability"] for t in e["top_k"]],
                                   atol=1e-5)


def test_tta_answers_as_headstart_predict_tta(server, run, photos, capsys):
    assert main(["predict", str(run), *map(str, photos), "--format", "json", "--top-k", "3", "--tta"]) == 0
    expected = json.loads(capsys.readouterr().out)
    plain = post(server.url, photos, top_k=3).json()
    got = httpx.post(server.url + "/predict?top_k=3&tta=1", timeout=60,
                     files=[("file", (p.name, p.read_bytes())) for p in photos]).json()
    for g, e, p in zip(got, expected, plain):
        np.testing.assert_allclose([t["probability"] for t in g["top_k"]], [t["probability"] for t in e["top_k"]],
                                   atol=1e-5)
        assert [t["label"] for t in g["top_k"]] == [t["label"] for t in e["top_k"]]
    assert any(abs(g["probability"] - p["probability"]) > 1e-4 for g, p in zip(got, plain))  # it did something


def test_one_raw_image_body_is_named_by_its_content_disposition(server, photos):
    data = photos[1].read_bytes()
    r = httpx.post(server.url + "/predict?top_k=5", content=data,
                   headers={"Content-Type": "image/png", "Content-Disposition": 'inline; filename="mine.png"'})
    assert r.status_code == 200, r.text
    (row,) = r.json()
    assert row["path"] == "mine.png" and row["label"] == "blue"
    assert len(row["top_k"]) == 3  # clipped to the classes, as predict does
    anonymous = httpx.post(server.url + "/predict", content=data, headers={"Content-Type": "image/png"}).json()
    assert anonymous[0]["path"] == "upload" and anonymous[0]["probability"] == pytest.approx(row["probability"])


def test_concurrent_requests_each_get_their_own_answer(server, photos):
    single = {p.name: post(server.url, [p]).json()[0] for p in photos}

    async def many():
        async with httpx.AsyncClient(timeout=60) as client:
            order = [photos[i % len(photos)] for i in range(48)]
            responses = await asyncio.gather(*(client.post(server.url + "/predict",
                                                           files={"file": (p.name, p.read_bytes())})
                                               for p in order))
            return order, responses

    order, responses = asyncio.run(many())
    assert [r.status_code for r in responses] == [200] * len(order)
    for p, r in zip(order, responses):
        (row,) = r.json()
        assert row["path"] == p.name and row["label"] == single[p.name]["label"]
        assert row["probability"] == pytest.approx(single[p.name]["probability"], abs=1e-5)


def test_several_images_in_one_request_go_through_as_one_batch(server, photos):
    r = post(server.url, photos)
    assert r.status_code == 200 and len(r.json()) == len(photos)
    assert httpx.get(server.url + "/model").json()["batching"]["largest_batch"] >= len(photos)


# -- bad input: a clear 4xx, and the service keeps serving ---------------------------------------------------

def _jpeg(colour=(200, 50, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (300, 200), colour).save(buf, "JPEG")
    return buf.getvalue()


BAD_UPLOADS = {
    "text": (b"this is not an image\n", "not a readable image"),
    "empty": (b"", "empty"),
    "truncated": (_jpeg()[:900], "truncated"),
    "bomb": (png_header(12000, 12000), "144 megapixels"),
    "huge-bomb": (png_header(40000, 40000), "too large to decode safely"),
    "pdf": (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "not a readable image"),
}


@pytest.mark.parametrize("kind", sorted(BAD_UPLOADS))
def test_an_unreadable_upload_is_a_422_naming_the_reason(server, photos, kind):
    data, reason = BAD_UPLOADS[kind]
    r = httpx.post(server.url + "/predict", files={"file": (f"{kind}.jpg", data)}, timeout=60)
    assert r.status_code == 422, r.text
    body = r.json()
    assert f"{kind}.jpg: " in body["error"] and reason in body["error"]
    assert body["rows"] == [{"path": f"{kind}.jpg", "label": None, "probability": None, "top_k": [],
                             "error": body["rows"][0]["error"]}] and reason in body["rows"][0]["error"]
    assert "BytesIO" not in body["error"]
    assert post(server.url, photos[:1]).status_code == 200  # still serving


def test_good_and_bad_images_together_give_a_422_with_every_row(server, photos):
    files = [("file", ("good.png", photos[1].read_bytes())), ("file", ("bad.jpg", b"nope")),
             ("file", ("also_good.jpg", photos[0].read_bytes()))]
    r = httpx.post(server.url + "/predict", files=files, timeout=60)
    assert r.status_code == 422 and "1 of 3" in r.json()["error"] and "bad.jpg" in r.json()["error"]
    rows = r.json()["rows"]
    assert [row["path"] for row in rows] == ["good.png", "bad.jpg", "also_good.jpg"]
    assert [row["label"] for row in rows] == ["blue", None, "blue"] and rows[1]["error"]


@pytest.mark.parametrize("case, status, says", [
    ("no files", 422, "no files"),
    ("broken multipart", 400, "multipart body cannot be read"),
    ("urlencoded", 415, "multipart/form-data"),
    ("top_k 0", 422, "top_k must be >= 1"),
    ("top_k text", 422, "top_k"),
    ("unknown route", 404, "no route GET /nothing"),
    ("wrong method", 405, "GET is not allowed"),
])
def test_malformed_requests_get_a_json_error(server, photos, case, status, says):
    url, multipart = server.url, {"Content-Type": "multipart/form-data; boundary=x"}
    r = {
        "no files": lambda: httpx.post(url + "/predict", headers=multipart,
                                       content=b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\nb\r\n--x--\r\n'),
        "broken multipart": lambda: httpx.post(url + "/predict", headers=multipart, content=b"a=b"),
        "urlencoded": lambda: httpx.post(url + "/predict", data={"a": "b"}),
        "top_k 0": lambda: post(url, photos[:1], top_k=0),
        "top_k text": lambda: post(url, photos[:1], top_k="many"),
        "unknown route": lambda: httpx.get(url + "/nothing"),
        "wrong method": lambda: httpx.get(url + "/predict"),
    }[case]()
    assert r.status_code == status, r.text
    assert says in r.json()["error"]


def test_limits_and_the_key(strict, photos):
    url = strict.url
    assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/ready").status_code == 200
    missing = post(url, photos[:1])
    assert missing.status_code == 401 and "API key" in missing.json()["error"]
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert post(url, photos[:1], headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(url + "/model").status_code == 401
    bearer, header = {"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY}
    assert post(url, photos[:1], headers=bearer).status_code == 200
    assert post(url, photos[:1], headers=header).status_code == 200

    big = httpx.post(url + "/predict", files={"file": ("big.jpg", os.urandom(2 * 2**20))}, headers=bearer)
    assert big.status_code == 413 and "at most 1 MB" in big.json()["error"]
    chunked = httpx.post(url + "/predict", content=iter([os.urandom(2**19)] * 4),
                         headers=bearer | {"Content-Type": "image/jpeg"})
    assert chunked.status_code == 413 and "--max-body-mb" in chunked.json()["error"]
    # clients that send their whole body before reading, on kept-alive connections among good uploads, each get
    # the 413 (not a reset connection that loses it)
    big_body, photo = os.urandom(2 * 2**20), photos[0].read_bytes()

    async def one(http, i):
        body = big_body if i % 3 == 2 else photo
        r = await http.post(url + "/predict", files={"file": (f"{i}.jpg", body, "image/jpeg")}, headers=bearer)
        return body is big_body, r.status_code

    async def mixed():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=4)) as http:
            return await asyncio.gather(*(one(http, i) for i in range(24)))

    answers = asyncio.run(mixed())
    assert [code for big, code in answers if big] == [413] * 8
    assert {code for big, code in answers if not big} <= {200, 503}
    too_many = post(url, photos[:1] * 5, headers=bearer)
    assert too_many.status_code == 413 and "more than 4 images" in too_many.json()["error"]
    full = post(url, photos[:4], headers=bearer)  # 4 images for a queue of 3
    assert full.status_code == 503 and "--max-queue" in full.json()["error"]
    assert int(full.headers["Retry-After"]) >= 1
    assert post(url, photos[:3], headers=bearer).status_code == 200  # still serving


def test_the_deadline_and_the_queue_bound_answer_overloaded():
    """The batcher alone, on a model that takes 0.3 s a batch: an image left waiting past the timeout gets
    Overloaded instead of a late answer; one past the queue bound, at once."""
    calls = []

    def slow(x):
        calls.append(len(x))
        time.sleep(0.3)
        return x.reshape(len(x), -1)[:, :2].numpy()

    async def scenario():
        b = MicroBatcher(slow, max_batch=1, max_wait_s=0.0, max_queue=3, timeout_s=0.1)
        b.start()
        xs = [np.full((3, 2, 2), i, np.float32) for i in range(3)]
        import torch
        futures = b.submit([torch.from_numpy(x) for x in xs])
        with pytest.raises(Overloaded, match="queue|busy"):
            b.submit([torch.zeros(3, 2, 2)])
        results = await asyncio.gather(*futures, return_exceptions=True)
        await b.close()
        return results

    first, *late = asyncio.run(scenario())
    assert first.tolist() == [0.0, 0.0]
    assert all(isinstance(r, Overloaded) and "--timeout" in str(r) and r.retry_after >= 1 for r in late)
    assert calls == [1]  # the late images never reached the model


# -- the OIP v2 routes -----------------------------------------------------------------------------------

def test_open_inference_protocol_v2(server, photos):
    url, name = server.url, "run"
    assert httpx.get(url + "/v2").json()["name"] == "headstart"
    assert httpx.get(url + "/v2/health/live").status_code == 200
    assert httpx.get(url + "/v2/health/ready").status_code == 200
    meta = httpx.get(f"{url}/v2/models/{name}").json()
    assert meta["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"] for o in meta["outputs"]} == {"label", "probabilities"}
    assert httpx.get(f"{url}/v2/models/{name}/ready").json()["ready"] is True

    images = [p.read_bytes() for p in photos[:3]]
    request = {"id": "r1", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [3],
                                       "data": [base64.b64encode(d).decode() for d in images]}]}
    r = httpx.post(f"{url}/v2/models/{name}/infer", json=request, timeout=60)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert r.json()["id"] == "r1" and r.json()["model_name"] == name
    rows = post(url, photos[:3], top_k=3).json()
    assert out["label"]["data"] == [row["label"] for row in rows]
    probs = np.array(out["probabilities"]["data"]).reshape(out["probabilities"]["shape"])
    assert probs.shape == (3, 3)
    classes = httpx.get(url + "/model").json()["classes"]
    for p, row in zip(probs, rows):
        np.testing.assert_allclose([p[classes.index(t["label"])] for t in row["top_k"]],
                                   [t["probability"] for t in row["top_k"]], atol=1e-5)

    # Triton's binary tensor data extension: the files raw after the JSON header, each length-prefixed
    blob = b"".join(struct.pack("<I", len(d)) + d for d in images)
    header = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3],
                                     "parameters": {"binary_data_size": len(blob)}}],
                         "outputs": [{"name": "label"}]}).encode()
    r = httpx.post(f"{url}/v2/models/{name}/versions/1/infer", content=header + blob,
                   headers={"Inference-Header-Content-Length": str(len(header)),
                            "Content-Type": "application/octet-stream"}, timeout=60)
    assert r.status_code == 200, r.text
    assert [o["name"] for o in r.json()["outputs"]] == ["label"]
    assert r.json()["outputs"][0]["data"] == out["label"]["data"]


@pytest.mark.parametrize("path, body, status, says", [
    ("/v2/models/other/infer", {"inputs": []}, 404, "no model 'other'"),
    ("/v2/models/run/versions/7/infer", {"inputs": []}, 404, "only version"),
    ("/v2/models/run/infer", {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
     400, "BYTES"),
    ("/v2/models/run/infer", {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]},
     400, "base64"),
    ("/v2/models/run/infer", {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                                          "data": [base64.b64encode(b"x").decode()]}]}, 400, "holds 2 element"),
    ("/v2/models/run/infer", {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                          "data": [base64.b64encode(b"not an image").decode()]}]},
     422, "element 0: is not a readable image"),
    ("/v2/models/run/infer", {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                          "data": [base64.b64encode(_jpeg()).decode()]}],
                              "outputs": [{"name": "logits"}]}, 400, "unknown output"),
])
def test_open_inference_protocol_errors(server, path, body, status, says):
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == status, r.text
    assert says in r.json()["error"]


def test_the_page_and_its_files_are_served_from_the_package(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "/static/app.js" in page.text and "http" not in page.text.replace("http-equiv", "")
    for name in ("app.js", "style.css"):
        assert httpx.get(f"{server.url}/static/{name}").status_code == 200
    assert httpx.get(server.url + "/static/../config.py").status_code == 404


# -- stopping --------------------------------------------------------------------------------------------

def _raw_request(port: int, body: bytes, name: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.sendall((f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
               f"Content-Disposition: inline; filename=\"{name}\"\r\nContent-Length: {len(body)}\r\n\r\n").encode())
    return s


def _response(s: socket.socket) -> tuple[int, dict]:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.slow  # several processes: runs in the slow tier
def test_sigterm_finishes_requests_in_flight_then_exits_0(run, photos, tmp_path):
    s = Server(run, tmp_path)
    bodies = [p.read_bytes() for p in photos[1::2]]  # PNGs
    socks = [_raw_request(s.port, b, f"slow_{i}.png") for i, b in enumerate(bodies)]
    for sock, b in zip(socks, bodies):
        sock.sendall(b[:len(b) // 2])  # requests in flight: headers in, bodies half sent
    time.sleep(1.0)  # the server has read the requests' headers
    s.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    for sock, b in zip(socks, bodies):
        sock.sendall(b[len(b) // 2:])
    answers = [_response(sock) for sock in socks]
    assert [status for status, _ in answers] == [200] * len(bodies)
    assert [a[0]["path"] for _, a in answers] == [f"slow_{i}.png" for i in range(len(bodies))]
    assert [a[0]["label"] for _, a in answers] == [p.stem.split("_")[0] for p in photos[1::2]]
    assert s.stop() == 0, s.stderr()
    with pytest.raises(httpx.ConnectError):
        httpx.get(s.url + "/health")  # and it is gone


def test_a_port_in_use_is_a_one_line_error(run, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", str(run), "--port", str(taken.getsockname()[1])]) == 1
    err = capsys.readouterr().err
    assert "address already in use" in err.lower() and "error: the server could not listen on 127.0.0.1:" in err


def test_cors_is_off_unless_an_origin_is_given(run):
    from fastapi.testclient import TestClient

    from headstart.config import ServeConfig
    from headstart.serve import ServedModel, create_app

    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
    for cors, allowed in (((), None), (("http://app.example",), "http://app.example")):
        with TestClient(create_app(ServedModel.open(run), ServeConfig(cors=cors))) as client:
            assert client.get("/health", headers={"Origin": "http://app.example"}).headers.get(
                "access-control-allow-origin") == allowed
            assert client.options("/predict", headers=preflight).headers.get("access-control-allow-origin") == allowed
