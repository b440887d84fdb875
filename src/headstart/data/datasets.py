"""Datasets: image folders (one folder per class), CSV files, tar shards, and train/val/test layouts.

    >>> splits = load_splits("data")          # data/train, data/val (or a stratified split)
    >>> splits.train.classes
    ['ants', 'bees']
    >>> load_splits("shards/train-{000000..000003}.tar").val   # the val shards listed beside them
"""

from __future__ import annotations

import csv
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import ShardConfig
from ..errors import DatasetError
from . import shards
from .files import is_image_name, is_junk_name

__all__ = ["Dataset", "Splits", "scan_folder", "read_csv", "read_shards", "load_dataset", "load_splits",
           "shard_dataset", "read_path_list", "without_paths"]

_VAL_NAMES = ("val", "validation", "valid")


@dataclass
class Dataset:
    """Samples ``(image, label index)`` and ``classes`` in index order; ``ignored`` lists files passed over.
    An image is a file ``Path`` or, for tar shards, a ``shards.ShardMember``."""

    samples: list[tuple[Path | shards.ShardMember, int]]
    classes: list[str]
    root: str = ""
    ignored: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def paths(self) -> list[Path | shards.ShardMember]:
        return [p for p, _ in self.samples]

    @property
    def labels(self) -> np.ndarray:
        return np.array([y for _, y in self.samples], dtype=np.int64)

    def subset(self, indices) -> "Dataset":
        return Dataset([self.samples[i] for i in indices], list(self.classes), self.root)

    def counts(self) -> dict[str, int]:
        c = np.bincount(self.labels, minlength=len(self.classes)) if self.samples else [0] * len(self.classes)
        return {name: int(n) for name, n in zip(self.classes, c)}


@dataclass
class Splits:
    train: Dataset
    val: Dataset | None
    test: Dataset | None
    split_note: str  # how val was obtained, written into the run


def _walk_images(folder: Path, ignored: list) -> list[Path]:
    """Image files below ``folder``, sorted; follows links but never loops; skips hidden and junk."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            ignored.append((dirpath, "folder already visited (symlink loop)"))
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not is_junk_name(d))
        for f in sorted(filenames):
            p = Path(dirpath) / f
            if is_junk_name(f):
                continue
            if not is_image_name(f):
                ignored.append((str(p), "not an image file name (expected .jpg .jpeg .png .gif .bmp .webp)"))
            elif not p.is_file():
                ignored.append((str(p), "broken link or not a regular file"))
            else:
                found.append(p)
    return found


def scan_folder(root: str | Path, classes: list[str] | None = None) -> Dataset:
    """One sub-folder per class under ``root``; ``classes`` fixes the index order (from training).

    Raises:
        DatasetError: ``root`` is missing, has under two classes (no class folder at all, with ``classes``),
            an empty class, classes whose names differ only in case, or a class that ``classes`` lacks.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"Data folder {str(root)!r} does not exist or is not a folder. "
                           "Expected a folder with one sub-folder per class.")
    folder_of = {}  # class name (normalised) -> the folder's name on disk
    for d in sorted(root.iterdir()):
        if d.is_dir() and not is_junk_name(d.name):
            folder_of[class_name(d.name)] = d.name
    found = sorted(folder_of)
    _refuse_case_clashes(found, f"Class folders in {str(root)!r}", "merge or rename one of the folders")
    if classes is None:
        classes = found
        if len(classes) < 2:
            raise DatasetError(f"{str(root)!r} has {len(classes)} class folder(s) {found}; a classifier needs at "
                               "least two. Put each class's images in its own sub-folder.")
    else:
        if not found:
            raise DatasetError(f"{str(root)!r} has no class folders; labelled data needs one sub-folder per class, "
                               f"as in training ({', '.join(classes)}). To classify loose images, use "
                               f"`headstart predict RUN {root}`.")
        extra = sorted(set(found) - set(classes))
        splits = [e for e in extra if e in ("train", "test", *_VAL_NAMES)]
        if splits:
            raise DatasetError(f"{str(root)!r} holds the split folder(s) {splits}, not class folders; pass one of "
                               f"them, e.g. {str(root / splits[-1])!r}")
        by_case = {c.lower(): c for c in classes}
        near = [f"{e!r} (training has {by_case[e.lower()]!r})" for e in extra if e.lower() in by_case]
        if near:
            raise DatasetError(f"{str(root)!r} has class folder(s) differing from training only in case: "
                               f"{', '.join(near)}. Rename them to match training exactly.")
        if extra:
            raise DatasetError(f"{str(root)!r} has class(es) {extra} that the training data lacks (training classes: "
                               f"{classes}). Add them to training or remove them here.")
    ignored, samples = [], []
    for idx, name in enumerate(classes):
        if name not in found:
            continue
        files = _walk_images(root / folder_of[name], ignored)
        if not files:
            raise DatasetError(f"Class folder {str(root / folder_of[name])!r} holds no images (.jpg .jpeg .png .gif .bmp .webp). "
                               "Add images or remove the folder.")
        samples += [(p, idx) for p in files]
    return Dataset(samples, list(classes), str(root), ignored)


def class_name(text: str) -> str:
    """A label as headstart keeps it: Unicode NFC, surrounding spaces stripped (from a CSV and a folder alike),
    so names that only look the same are the same class."""
    return unicodedata.normalize("NFC", text).strip()


def _refuse_case_clashes(names, where: str, fix: str) -> None:
    seen = {}
    for name in names:
        key = name.casefold()
        if key in seen and seen[key] != name:
            raise DatasetError(f"{where}: labels {seen[key]!r} and {name!r} differ only in case; {fix}")
        seen.setdefault(key, name)


_PATH_HEADERS = ("path", "file", "filepath", "filename", "image")
_LABEL_HEADERS = ("label", "class", "category")


def _csv_columns(header: list[str], path: Path) -> tuple[int, int] | None:
    """The (path, label) column indices a header names, None when the first row is data; unknown names refused."""
    names = [class_name(h).lower() for h in header]
    paths = [i for i, n in enumerate(names) if n in _PATH_HEADERS]
    labels = [i for i, n in enumerate(names) if n in _LABEL_HEADERS]
    if paths and labels:
        return paths[0], labels[0]
    if not paths and not labels and len(header) >= 2 and not any(n in _PATH_HEADERS + _LABEL_HEADERS for n in names) \
            and Path(header[0].strip()).suffix:
        return None  # no header: the first row is an image and its label
    raise DatasetError(f"{str(path)!r} has the header {header!r}; expected a column for the image "
                       f"({'/'.join(_PATH_HEADERS)}) and one for the label ({'/'.join(_LABEL_HEADERS)}), in any "
                       "order, or no header and 'path,label' rows")


def read_csv(path: str | Path, classes: list[str] | None = None) -> Dataset:
    """A CSV (RFC 4180, UTF-8, a BOM allowed) of image paths and labels; relative paths are from its folder.

    The header names the columns (``path``/``file``/``filepath``/``filename``/``image`` and
    ``label``/``class``/``category``, in any order); without one, rows are ``path,label``.
    """
    path = Path(path)
    rows = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            table = list(csv.reader(f, strict=True))
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{str(path)!r} is not UTF-8 text (byte {exc.start}: {exc.reason}); expected a UTF-8 "
                           "CSV. Save it as 'CSV UTF-8' (or convert it, e.g. iconv -f latin1 -t utf-8)") from None
    except csv.Error as exc:
        raise DatasetError(f"{str(path)!r} is not a valid CSV ({exc}); expected 'path,label' rows") from None
    table = [(i + 1, row) for i, row in enumerate(table) if row and "".join(row).strip()]
    if not table:
        raise DatasetError(f"{str(path)!r} has no rows; expected 'path,label' rows")
    columns = _csv_columns(table[0][1], path)
    if columns is None:
        columns = (0, 1)
    else:
        table = table[1:]
    p_col, l_col = columns
    for line, row in table:
        if len(row) <= max(p_col, l_col):
            raise DatasetError(f"{str(path)!r} line {line}: expected a path and a label, got {row!r}")
        image, label = row[p_col].strip(), class_name(row[l_col])
        if not label:
            raise DatasetError(f"{str(path)!r} line {line}: the label of {image!r} is empty; give every row a label "
                               "or remove the row")
        if not image or "\x00" in image:
            raise DatasetError(f"{str(path)!r} line {line}: expected an image path, got {image!r}")
        rows.append((image, label))
    found = sorted({label for _, label in rows})
    _refuse_case_clashes(found, repr(str(path)), "use one spelling for each class")
    if classes is None:
        classes = found
        if len(classes) < 2:
            raise DatasetError(f"{str(path)!r} names {len(classes)} label(s) {found}; a classifier needs two or more.")
    else:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise DatasetError(f"{str(path)!r} has label(s) {extra} that the training data lacks ({classes}).")
    index = {c: i for i, c in enumerate(classes)}
    samples = [((path.parent / p) if not Path(p).is_absolute() else Path(p), index[label]) for p, label in rows]
    return Dataset(samples, list(classes), str(path))


def read_shards(source: str | Path, classes: list[str] | None = None) -> Dataset:
    """The images in tar shards: a pattern (``DIR/val-{000000..000003}.tar``), or a folder written by
    ``shard_dataset`` that holds a single split (see ``data.shards.scan_shards``).

    Raises:
        DatasetError: missing or empty shards, classes that ``classes`` lacks, or a folder of several splits.
    """
    if Path(source).is_dir():
        manifest = shards.manifest_beside(source)
        listed = manifest["splits"] if manifest else {}
        if len(listed) != 1:
            names = ", ".join(f"'{Path(source) / shards.shard_pattern(v['shards'])}'" for v in listed.values())
            raise DatasetError(f"{str(source)!r} holds the shards of {len(listed)} splits; name the one to use: "
                               f"{names}")
        files = [Path(source) / f for f in next(iter(listed.values()))["shards"]]
        scan = shards.scan_shards(files, classes)
    else:
        scan = shards.scan_shards(str(source), classes)
    return Dataset(scan.samples, scan.classes, str(source), scan.ignored)


def _shard_splits(data: str | Path) -> tuple[list[Path] | str, list[Path] | None, list[Path] | None]:
    """Train, val and test shards for ``data``: a shard folder's splits, or a train pattern with the val and test
    shards its ``dataset.json`` lists beside it (when the pattern names train shards of that manifest)."""
    manifest = shards.manifest_beside(data) or {"splits": {}}
    folder = Path(data) if Path(data).is_dir() else Path(data).parent
    listed = {k: [folder / f for f in v["shards"]] for k, v in manifest["splits"].items()}
    if Path(data).is_dir():
        if "train" not in listed:
            raise DatasetError(f"{str(data)!r} has no train shards (its {shards.MANIFEST} lists "
                               f"{sorted(listed) or 'none'}); pass a shard pattern instead")
        return listed["train"], listed.get("val"), listed.get("test")
    named = shards.expand_shards(data)
    if set(named) <= set(listed.get("train", [])):
        return str(data), listed.get("val"), listed.get("test")
    return str(data), None, None


def _as_dataset(found: list[Path] | str | Path, classes: list[str] | None, root: str) -> Dataset:
    if isinstance(found, list):  # shard files from a manifest
        scan = shards.scan_shards(found, classes)
        return Dataset(scan.samples, scan.classes, root, scan.ignored)
    return load_dataset(found, classes)


def load_dataset(source: str | Path, classes: list[str] | None = None) -> Dataset:
    """A class-folder tree, a CSV file or tar shards (``read_shards``), by what ``source`` is."""
    if shards.is_shards(source):
        return read_shards(source, classes)
    source = Path(source)
    if source.suffix.lower() == ".csv" and source.is_file():
        return read_csv(source, classes)
    return scan_folder(source, classes)


def stratified_split(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Split ``ds`` into (train, val), ``fraction`` of each class to val (at least one each when possible)."""
    rng = np.random.default_rng(seed)
    labels = ds.labels
    tr, va = [], []
    for c in range(len(ds.classes)):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * fraction))
        n_val = min(max(n_val, 1), len(idx) - 1) if len(idx) > 1 else 0
        va += idx[:n_val].tolist()
        tr += idx[n_val:].tolist()
    return ds.subset(sorted(tr)), ds.subset(sorted(va))


def load_splits(data: str | Path, val: str | Path | None = None, test: str | Path | None = None,
                val_fraction: float = 0.2, seed: int = 0) -> Splits:
    """Find train / val / test.

    ``data`` is either a folder with ``train/`` (and optionally ``val/`` or ``validation/``, ``test/``),
    a folder of class folders, a CSV, or tar shards: a train shard pattern (its val and test shards are those
    listed beside it) or a folder written by ``shard_dataset``. Without a val set, ``val_fraction`` of each class
    is held out.
    """
    test_ds = None
    if shards.is_shards(data):
        found, found_val, found_test = _shard_splits(data)
        train = _as_dataset(found, None, str(data))
        val = val if val is not None else found_val
        test = test if test is not None else found_test
        data = Path(str(data))
    elif Path(data).is_dir() and (Path(data) / "train").is_dir():
        data = Path(data)
        train = load_dataset(data / "train")
        if val is None:
            val = next((data / n for n in _VAL_NAMES if (data / n).is_dir()), None)
        if test is None and (data / "test").is_dir():
            test = data / "test"
    else:
        data = Path(data)
        train = load_dataset(data)
    ignored = list(train.ignored)
    if val is not None:
        val_ds = _as_dataset(val, train.classes, str(val))
        ignored += val_ds.ignored
        note = f"validation set: {_described(val)}"
    elif val_fraction > 0:
        train, val_ds = stratified_split(train, val_fraction, seed)
        note = f"validation set: {val_fraction:.0%} of each class held out from {data} with seed {seed}"
    else:
        val_ds, note = None, "no validation set"
    if test is not None:
        test_ds = _as_dataset(test, train.classes, str(test))
        ignored += test_ds.ignored
    train.ignored = ignored
    return Splits(train, val_ds, test_ds, note)


def _described(source) -> str:
    if isinstance(source, list):  # shard files listed in a manifest
        return str(source[0].parent / shards.shard_pattern([p.name for p in source]))
    return str(source)


def shard_dataset(data: str | Path, out: str | Path, config: ShardConfig = ShardConfig()) -> dict:
    """Write the data set at ``data`` (any layout ``load_splits`` reads; no split is made up) as tar shards in
    ``out`` with its ``dataset.json`` (``data.shards.write_shards``); returns that manifest.

    Raises:
        DatasetError: as ``load_splits``. StorageError: ``out`` holds shards already or cannot be written.
    """
    from .images import read_source  # pulls torch in: only when shards are written, not when data is scanned

    splits = load_splits(data, val_fraction=0.0)
    return shards.write_shards(splits, out, max_count=config.max_count, max_size=config.max_size, source=str(data),
                               read=read_source)


def read_path_list(path: str | Path) -> list[str]:
    """The paths listed in a text file, one per line; blank lines and ``#`` comments are passed over.

    Raises:
        DatasetError: the file cannot be read.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read the exclude list {path}: {exc}; give a text file with one image path "
                           "per line (# starts a comment)") from exc
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [line for line in lines if line]


def _keys(image) -> set[str]:
    name = getattr(image, "name", None) if isinstance(image, shards.ShardMember) else None
    if name is not None:
        return {str(name)}
    return {str(image), os.path.realpath(image)}


def without_paths(ds: Dataset, listed: list[str], base: str | Path | None = None) -> tuple[Dataset, list[str], list[str]]:
    """``ds`` without the images named in ``listed`` (as written, relative to the current folder, or relative
    to ``base``, the list's own folder); returns ``(dataset, excluded paths, lines that named no image)``."""
    wanted: dict[str, str] = {}
    for line in listed:
        for key in {line, os.path.realpath(line)} | ({os.path.realpath(Path(base) / line)} if base else set()):
            wanted[key] = line
    kept, excluded, used = [], [], set()
    for sample in ds.samples:
        hit = next((wanted[k] for k in _keys(sample[0]) if k in wanted), None)
        if hit is None:
            kept.append(sample)
        else:
            excluded.append(str(sample[0]))
            used.add(hit)
    out = Dataset(kept, list(ds.classes), ds.root, list(ds.ignored))
    return out, excluded, [line for line in listed if line not in used]
