"""Fuzzing the image reader: whatever bytes a file holds, ``load_image`` returns an RGB picture or raises
``ImageReadError`` (headstart's own type) — never a Pillow, zlib, struct or numpy exception — and
``load_pixels`` (the input pipeline's reader, another JPEG decoder) gives the same pixels or the same error."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import fuzz_examples
from headstart.data import load_image
from headstart.data.images import load_pixels
from headstart.errors import ImageReadError


def _seed_files() -> dict[str, bytes]:
    """Small valid files in each format the reader accepts, for mutation."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8))
    out = {}
    for name, im, kw in [
        ("png", rgb, {}),
        ("rgba.png", rgb.convert("RGBA"), {}),
        ("p.png", rgb.convert("P"), {}),
        ("jpg", rgb, {"quality": 80}),
        ("cmyk.jpg", rgb.convert("CMYK"), {}),
        ("bmp", rgb, {}),
        ("webp", rgb, {}),
    ]:
        buf = io.BytesIO()
        im.save(buf, format={"png": "PNG", "jpg": "JPEG", "bmp": "BMP", "webp": "WEBP"}[name.rsplit(".", 1)[-1]],
                **kw)
        out[name] = buf.getvalue()
    buf = io.BytesIO()  # an animated GIF
    frames = [rgb.convert("P"), rgb.rotate(90).convert("P")]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    out["gif"] = buf.getvalue()
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", exif=exif)
    out["exif.jpg"] = buf.getvalue()
    return out


SEEDS = _seed_files()


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@st.composite
def mutated(draw):
    """A valid file with a few bytes overwritten, a slice cut out, bytes inserted, or cut short."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[i:i + draw(st.integers(1, 64))]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[i:]
    return bytes(data)


# random bytes behind each format's magic number reach deeper into the decoders than plain noise
MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM", b"RIFF\x00\x00\x00\x00WEBP"]
anything = st.one_of(
    mutated(),
    st.builds(lambda m, b: m + b, st.sampled_from(MAGIC), st.binary(max_size=256)),
)


@settings(max_examples=fuzz_examples(400), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=anything, ext=st.sampled_from([".jpg", ".png", ".gif"]))
def test_any_bytes_give_rgb_or_our_error(fuzz_dir, data, ext):
    path = fuzz_dir / f"fuzz{ext}"
    path.write_bytes(data)
    try:
        im = load_image(path, min_size=8)
    except ImageReadError as exc:
        assert exc.path == str(path) and exc.reason  # a message a user can act on
        with pytest.raises(ImageReadError):
            load_pixels(path, min_size=8)
        return
    assert im.mode == "RGB" and min(im.size) >= 1
    assert np.array_equal(load_pixels(path, min_size=8).permute(1, 2, 0).numpy(), np.asarray(im))


def test_the_seeds_themselves_decode(fuzz_dir):
    for name, data in SEEDS.items():
        path = fuzz_dir / f"seed-{name}"
        path.write_bytes(data)
        assert load_image(path).mode == "RGB", name
