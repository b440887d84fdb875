"""Tar shards in the webdataset layout: writing a data set as shards, and reading shards back as images.

    >>> write_shards(splits, "shards/", max_count=1000)   # shards/train-000000.tar ..., shards/dataset.json
    >>> scan = scan_shards("shards/train-{000000..000003}.tar")
    >>> scan.samples[0]                                    # (ShardMember('shards/train-000000.tar#00000000.jpg'), 0)

A sample is ``<key>.<ext>``, the image file's bytes unchanged (so its content digest, and its feature cache
entries, are the file's), ``<key>.cls``, its class index as text (the webdataset and timm convention), and
``<key>.json``, ``{"path": the file it came from}``. ``dataset.json`` beside the shards holds the class list and,
per split (train, val, test), the shard files and their image counts.

Writing goes through webdataset's ``ShardWriter``. Reading indexes each shard with the standard ``tarfile``
instead of streaming it with webdataset: a tar header says where each member's bytes start, so the index reads
only the headers and class labels (512 bytes per member, the image bytes are skipped), and each image is read
later, when and by whom it is needed: a rank reads the members of its own shards, and a cached image's bytes are
read once, for its digest. Streaming reads every byte of every shard in order, and gives no offsets.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import DatasetError, ImageReadError, StorageError
from .files import is_image_name

__all__ = ["ShardMember", "ShardScan", "MANIFEST", "is_shards", "expand_shards", "scan_shards", "manifest_beside",
           "shard_images", "write_shards", "by_shard", "shard_pattern"]

MANIFEST = "dataset.json"
FORMAT = "headstart-shards"
_SPLITS = ("train", "val", "test")


@dataclass(frozen=True, slots=True)
class ShardMember:
    """One image inside a tar shard: where its bytes are. Reads like a binary file opened afresh at each
    ``read``, which is what ``data.images.read_source`` takes; ``name`` (``shard.tar#member``) names it in
    reports."""

    shard: str
    member: str
    offset: int
    size: int

    @property
    def key(self) -> str:
        """The sample's key: the member name without its extension (webdataset's rule)."""
        from webdataset.tariterators import base_plus_ext

        return base_plus_ext(self.member)[0] or self.member

    @property
    def name(self) -> str:
        return f"{self.shard}#{self.member}"

    def read(self, n: int = -1) -> bytes:
        """The member's bytes (at most ``n``). Raises OSError: the shard cannot be read."""
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size if n < 0 else min(n, self.size))
        if len(data) < (self.size if n < 0 else min(n, self.size)):
            raise OSError(f"{self.shard} ends inside {self.member}; the shard is cut")
        return data

    def __str__(self) -> str:
        return self.name


@dataclass
class ShardScan:
    """What a set of shards holds: ``samples`` ``(ShardMember, class index)`` in shard order, the class names,
    and ``ignored`` ``(name, reason)`` rows for members and shards passed over."""

    samples: list[tuple[ShardMember, int]]
    classes: list[str]
    ignored: list[tuple[str, str]] = field(default_factory=list)


def is_shards(source) -> bool:
    """Whether ``source`` names tar shards: a ``.tar`` file or pattern (``train-{000000..000009}.tar``), or a
    folder holding a ``dataset.json`` written by ``write_shards``."""
    text = str(source)
    return text.endswith(".tar") or (Path(text).is_dir() and (Path(text) / MANIFEST).is_file())


def expand_shards(pattern: str | Path) -> list[Path]:
    """The shard files a pattern names (brace ranges and lists, webdataset's syntax), in order.

    Raises:
        DatasetError: a remote URL (only local files are read), or shards that do not exist.
    """
    from webdataset.shardlists import expand_urls

    text = str(pattern)
    if "://" in text or text.startswith("pipe:"):
        raise DatasetError(f"{text!r} is a URL; headstart reads shards from local (or mounted) files only. Copy "
                           "them to a disk or mount the bucket, then pass the local path.")
    paths = [Path(p) for p in expand_urls(text)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DatasetError(f"{len(missing)} of the {len(paths)} shard(s) named by {text!r} do not exist (e.g. "
                           f"{', '.join(missing[:3])}). Check the range in the pattern; `ls` the folder for the "
                           "shard names.")
    return paths


def manifest_beside(shard: str | Path) -> dict | None:
    """The ``dataset.json`` in the folder of ``shard`` (or in ``shard`` if it is that folder), or None.

    Raises:
        DatasetError: it exists but is not a manifest this version can read.
    """
    folder = Path(shard) if Path(shard).is_dir() else Path(shard).parent
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{str(path)!r} cannot be read ({type(exc).__name__}: {exc}); write the shards again "
                           "with `headstart shard`") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("classes"),
                                                                                            list):
        raise DatasetError(f"{str(path)!r} is not a shard manifest written by `headstart shard` (expected "
                           f"format {FORMAT!r} with a class list); move it away or write the shards again")
    return manifest


def scan_shards(shards: str | Path | Sequence[Path], classes: list[str] | None = None) -> ShardScan:
    """Index the images in ``shards`` (a pattern, or a list of shard files) without reading their bytes.

    Class names come from the ``dataset.json`` beside the shards; shards without one (written by another tool)
    name their classes by the ``.cls`` numbers. ``classes`` fixes the index order (from training). Members that
    are not images, lack a class, or have a class out of range are passed over and listed in ``ignored``, as is
    a shard that cannot be read to its end (the members before the damage are kept).

    Raises:
        DatasetError: missing shards, a class that ``classes`` lacks, or no image at all.
    """
    paths = expand_shards(shards) if isinstance(shards, (str, Path)) else [Path(p) for p in shards]
    if not paths:
        raise DatasetError(f"{shards!r} names no shard files; expected e.g. 'DIR/train-{{000000..000009}}.tar'")
    manifest = manifest_beside(paths[0])
    names = list(manifest["classes"]) if manifest else None
    found: list[tuple[ShardMember, int]] = []
    ignored: list[tuple[str, str]] = []
    for path in paths:
        for member, text in _scan_one(path, ignored):
            if text is None:
                ignored.append((member.name, f"has no {member.key}.cls (its class index) in the shard"))
            elif not text.isdigit() or (names is not None and int(text) >= len(names)):
                expected = f"0..{len(names) - 1}" if names is not None else "a number"
                ignored.append((member.name, f"has class {text!r} in {member.key}.cls; expected {expected}"))
            else:
                found.append((member, int(text)))
    if names is None:  # foreign shards: the .cls numbers are the classes
        names = [str(i) for i in range(max((c for _, c in found), default=-1) + 1)]
    samples = found
    if classes is not None:
        extra = sorted({names[c] for _, c in found} - set(classes))
        if extra:
            raise DatasetError(f"shards {str(shards)!r} hold class(es) {extra} that the training data lacks "
                               f"(training classes: {classes}). Remove them, or train on them too.")
        index = {c: i for i, c in enumerate(classes)}
        samples = [(m, index[names[c]]) for m, c in found]
        names = list(classes)
    if not samples:
        raise DatasetError(f"shards {str(shards)!r} hold no image with a class ({len(ignored)} member(s) or "
                           "shard(s) passed over); expected <key>.jpg (or .png ...) with <key>.cls in each sample")
    return ShardScan(samples, names, ignored)


def _scan_one(path: Path, ignored: list) -> list[tuple[ShardMember, str | None]]:
    """The images of one shard with the text of their ``.cls`` (None: none), in member order; members that
    belong to no sample, and damage, go to ``ignored``."""
    from webdataset.tariterators import base_plus_ext  # the webdataset rule for splitting keys from extensions

    images: dict[str, tarfile.TarInfo] = {}
    labels: dict[str, str] = {}
    order: list[str] = []
    n = 0
    try:
        with tarfile.open(path, "r:") as tar:  # "r:": uncompressed, so members can be read at their offsets
            for info in tar:
                n += 1
                if not info.isreg():
                    continue
                key, ext = base_plus_ext(info.name)
                if key is None:
                    ignored.append((f"{path}#{info.name}", "has no extension, so it belongs to no sample"))
                    continue
                ext = ext.lower()
                if ext == "cls":
                    labels[key] = tar.extractfile(info).read(32).decode("ascii", "replace").strip()
                elif is_image_name("x." + ext):
                    if key in images:
                        ignored.append((f"{path}#{info.name}", f"a second image of sample {key!r}; the first, "
                                                               f"{images[key].name}, is used"))
                        continue
                    images[key] = info
                    order.append(key)
                elif ext != "json":
                    ignored.append((f"{path}#{info.name}", "not an image (expected .jpg .jpeg .png .gif .bmp .webp)"))
    except (tarfile.TarError, OSError, EOFError) as exc:
        kind = "cannot be opened as an uncompressed tar file" if n == 0 else f"is damaged after {n} member(s)"
        ignored.append((str(path), f"{kind} ({type(exc).__name__}: {str(exc)[:100]}); "
                                   f"{'the samples before the damage are used' if n else 'write it again'}"))
    size = path.stat().st_size if n else 0
    kept = []
    for k in order:
        info = images[k]
        if info.offset_data + info.size > size:
            ignored.append((f"{path}#{info.name}", "is cut: the shard ends inside it"))
        else:
            kept.append((ShardMember(str(path), info.name, info.offset_data, info.size), labels.get(k)))
    return kept


def shard_images(pattern: str | Path) -> list[ShardMember]:
    """Every image in the shards of ``pattern``, with or without a class (for prediction), in shard order.

    Raises:
        DatasetError: missing shards.
    """
    ignored: list = []
    return [m for path in expand_shards(pattern) for m, _ in _scan_one(path, ignored)]


def by_shard(images: Sequence, parts: int) -> list[list[int]]:
    """Indices of ``images`` in ``parts`` groups: whole shards round-robin when they are ``ShardMember``s (each
    part reads its own shard files), else every ``parts``-th image."""
    shards: dict[str, list[int]] = defaultdict(list)
    for i, im in enumerate(images):
        shards[im.shard if isinstance(im, ShardMember) else f"#{i % parts}"].append(i)
    groups: list[list[int]] = [[] for _ in range(parts)]
    for j, (_, idx) in enumerate(sorted(shards.items(), key=lambda kv: kv[1][0])):
        groups[j % parts] += idx
    return [sorted(g) for g in groups]


def shard_pattern(names: Sequence[str]) -> str:
    """``train-{000000..000003}.tar`` for consecutive shard names (the one name when there is one)."""
    if len(names) == 1:
        return names[0]
    first, last = names[0], names[-1]
    stem, ext = first.rsplit("-", 1)[0], ".tar"
    return f"{stem}-{{{first[len(stem) + 1:-len(ext)]}..{last[len(stem) + 1:-len(ext)]}}}{ext}"


def write_shards(splits, out: str | Path, *, max_count: int, max_size: int, source: str = "",
                 read=None) -> dict:
    """Write ``splits`` (``train``, ``val``, ``test``: datasets of ``(path, label)`` samples, or None) as
    ``out/<split>-000000.tar``... with at most ``max_count`` images and about ``max_size`` bytes per shard,
    then ``out/dataset.json``; returns that manifest (with the files the data set's scan passed over, ``ignored``).

    Each shard is written under a temporary name and renamed when whole, and the manifest comes last, so an
    interrupted run leaves no shard that looks complete but is not. ``read`` reads a file's bytes (default:
    ``Path.read_bytes``); a file it cannot read is left out and listed under ``skipped`` in the manifest.

    Raises:
        StorageError: ``out`` already holds shards or a manifest, or cannot be written.
    """
    import webdataset as wds

    out = Path(out)
    if out.exists() and (any(out.glob("*.tar")) or (out / MANIFEST).exists()):
        raise StorageError(f"{str(out)!r} already holds shards; choose an empty folder or delete them first")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create {str(out)!r} ({exc.strerror or exc}); choose another --out") from exc
    read = read or (lambda p: Path(p).read_bytes())
    classes = splits.train.classes
    manifest = {"format": FORMAT, "version": 1, "classes": list(classes), "source": source, "splits": {},
                "skipped": [], "ignored": [list(row) for row in getattr(splits.train, "ignored", [])]}
    for split in _SPLITS:
        ds = getattr(splits, split, None)
        if ds is None or not len(ds):
            continue
        files = _write_split(wds, out, split, ds, classes, max_count, max_size, read, manifest["skipped"])
        manifest["splits"][split] = {"shards": [f.name for f in files],
                                     "images": sum(files.values()),
                                     "counts": ds.counts()}
    text = json.dumps(manifest, indent=1)
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out / MANIFEST)
    return manifest


def _write_split(wds, out: Path, split: str, ds, classes, max_count, max_size, read, skipped) -> dict[Path, int]:
    """Write one split's shards; returns ``{shard file: images in it}``."""
    written: dict[Path, int] = {}
    opened: dict[str, object] = {}

    def opener(fname):  # webdataset writes each shard to this file object...
        opened[fname] = open(fname + ".tmp", "wb")
        return opened[fname]

    def finished(fname):  # ...and calls this once the shard is whole: only then does it get its name
        opened.pop(fname).close()
        os.replace(fname + ".tmp", fname)

    base = Path(ds.root) if ds.root and Path(ds.root).is_dir() else None
    # mtime=0: the same data set gives the same shard bytes
    writer = wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=max_count, maxsize=max_size, verbose=0,
                             opener=opener, post=finished, encoder=False, mtime=0)
    try:
        for j, (path, label) in enumerate(ds.samples):
            try:
                data = read(path)
            except (OSError, ImageReadError) as exc:
                skipped.append([str(path), getattr(exc, "reason", None) or f"cannot be read ({exc})"])
                continue
            ext = Path(path).suffix.lower().lstrip(".") or "jpg"
            origin = str(Path(path).relative_to(base)) if base and Path(path).is_relative_to(base) else str(path)
            writer.write({"__key__": f"{j:08d}", ext: data, "cls": str(label).encode(),
                          "json": json.dumps({"path": origin, "class": classes[label]}).encode()})
            written[Path(writer.fname)] = written.get(Path(writer.fname), 0) + 1
    finally:
        writer.close()
        for fname, f in opened.items():  # a shard left unfinished by an error: not kept
            f.close()
            Path(fname + ".tmp").unlink(missing_ok=True)
    # ShardWriter opens its first shard at once: an empty one is not part of the data set
    for f in out.glob(f"{split}-*.tar"):
        if f not in written:
            f.unlink()
    return written
