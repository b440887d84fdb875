"""Suspect images: files that decode fine but are probably not a picture of their class — "image not found"
placeholders, blank frames, one file repeated, one file under two labels. Flagged for a look, never dropped.

    >>> find_suspects(paths, labels, classes, digests)
    [{'path': '.../imageNotFound.gif', 'class': 'ants', 'reason': 'a grey, mostly flat picture ...'}]

The checks are cheap (a 64-pixel thumbnail per image, JPEGs decoded at 1/8 scale) and relative where a
fixed rule would flood: "grey and flat" is only suspect in a dataset of colour photos, so grayscale data
(digits, X-rays, scans) is never flagged for being grey.
"""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..errors import ImageReadError
from .images import load_image

__all__ = ["PixelStats", "pixel_stats", "find_suspects"]

_THUMB = 64
BLANK_TONE_STD = 3.0      # luminance std (of 255) under which a picture is one flat tone
GREY_CHROMA = 2.0         # mean |channel - grey| (of 255) under which a picture has no colour
FLAT_SHARE = 0.85         # share of the picture in one colour (8 levels per channel) that makes it "flat"
COLOUR_DATASET = 0.5      # share of colour pictures that makes a dataset a colour one


@dataclass(frozen=True)
class PixelStats:
    tone_std: float   # spread of brightness, 0..~128
    chroma: float     # how far from grey, 0..~128
    flat: float       # share of the thumbnail in its most common colour, 0..1


def pixel_stats(path: str | Path) -> PixelStats | None:
    """Brightness spread, colourfulness and flatness of a thumbnail of ``path``; None if it cannot be read."""
    try:
        im = load_image(path, min_size=_THUMB)
    except ImageReadError:
        return None
    # the centre square, as a crop-resize model sees it: a thumbnail of a whole 20000x20 strip would average
    # it into one flat tone
    w, h = im.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    a = np.asarray(im.resize((min(side, _THUMB),) * 2, Image.BILINEAR, box=box), dtype=np.float32)
    grey = a.mean(axis=2)
    q = (a // 32).astype(np.int32)
    codes = q[..., 0] * 64 + q[..., 1] * 8 + q[..., 2]
    flat = float(np.bincount(codes.ravel(), minlength=512).max()) / codes.size
    return PixelStats(float(grey.std()), float(np.abs(a - grey[..., None]).mean()), flat)


def find_suspects(paths: Sequence[str | Path], labels: Sequence[int], classes: Sequence[str],
                  digests: Sequence[str | None] | None = None, threads: int = 2) -> list[dict]:
    """Suspect images among ``paths`` (with their label indices), as ``{"path", "class", "reason"}`` rows.

    Flags: a blank picture (one flat tone); a grey picture mostly in one colour when most of the data is in
    colour (a placeholder); with ``digests``, a file whose content repeats in its class or appears under
    another class too. Unreadable files are not this function's business (they are skipped elsewhere).
    """
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        stats = list(pool.map(pixel_stats, paths))
    readable = [s for s in stats if s is not None]
    colour_data = bool(readable) and np.mean([s.chroma >= GREY_CHROMA for s in readable]) >= COLOUR_DATASET
    out: dict[int, list[str]] = defaultdict(list)
    for i, s in enumerate(stats):
        if s is None:
            continue
        if s.tone_std < BLANK_TONE_STD:
            out[i].append(f"nearly one flat tone (brightness spread {s.tone_std:.1f} of 255): a blank, black or "
                          "white frame?")
        elif colour_data and s.chroma < GREY_CHROMA and s.flat >= FLAT_SHARE:
            out[i].append(f"a grey picture, {s.flat:.0%} one flat colour, among colour photos: an 'image not "
                          "found' placeholder?")
    if digests is not None:
        same: dict[str, list[int]] = defaultdict(list)
        for i, d in enumerate(digests):
            if d:
                same[d].append(i)
        for group in same.values():
            if len(group) < 2:
                continue
            for i in group:
                others = [j for j in group if j != i]
                other_classes = sorted({classes[labels[j]] for j in others} - {classes[labels[i]]})
                if other_classes:
                    out[i].append(f"the same file content is also labelled {other_classes}: which label is right?")
                else:
                    out[i].append(f"the same file content appears {len(group)} times in class "
                                  f"{classes[labels[i]]!r} (e.g. {Path(str(paths[others[0]])).name}): a placeholder "
                                  "or a copy?")
    return [{"path": str(paths[i]), "class": classes[labels[i]], "reason": "; ".join(reasons)}
            for i, reasons in sorted(out.items())]
