"""Tar shards: `headstart shard` writes a data set as webdataset shards, and training, evaluation and prediction
read them as they read the folder: same samples, same hygiene, same cache entries, same model."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_folder, make_image
from headstart.cli import main
from headstart.data.datasets import load_splits
from headstart.data.shards import by_shard, scan_shards
from headstart.errors import DatasetError


def _data(tmp_path: Path) -> Path:
    root = make_folder(tmp_path / "data", per_class=8, val_per_class=4)
    cut = make_image(root / "train" / "blue" / "cut.png", (40, 60, 200), seed=99)
    cut.write_bytes(cut.read_bytes()[:200])          # a truncated file: skipped, reported
    (root / "train" / "red" / "notes.txt").write_text("not an image")  # passed over at the scan
    return root


def _train(data, out, cache, *extra) -> dict:
    assert main(["train", str(data), "--out", str(out), "--backbone", "test_tiny", "--epochs", "30",
                 "--head-search", "off", "--cache", str(cache), *extra]) == 0
    return {name: json.loads((out / name).read_text()) for name in ("metrics.json", "data.json")}


def test_a_data_set_trained_from_shards_equals_the_one_trained_from_its_folder(tmp_path, capsys):
    data = _data(tmp_path)
    assert main(["shard", str(data), "--out", str(tmp_path / "shards"), "--max-count", "5"]) == 0
    printed = capsys.readouterr().out
    pattern = str(tmp_path / "shards" / "train-{000000..000003}.tar")
    assert f"train with: headstart train '{pattern}'" in printed
    manifest = json.loads((tmp_path / "shards" / "dataset.json").read_text())
    assert manifest["classes"] == ["blue", "red"] and manifest["splits"]["train"]["images"] == 17
    assert manifest["splits"]["val"]["shards"] == ["val-000000.tar", "val-000001.tar"]

    cache = tmp_path / "cache"
    folder = _train(data, tmp_path / "run-folder", cache)
    shards = _train(pattern, tmp_path / "run-shards", cache)     # val: the val shards listed beside them
    assert shards["metrics.json"]["val"] == folder["metrics.json"]["val"]
    a, b = load_file(tmp_path / "run-folder" / "model.safetensors"), load_file(tmp_path / "run-shards" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the image bytes are the files' own, so the shard run is served from the folder run's cache entries
    assert shards["data.json"]["backbone_passes"] == {"train": 0, "val": 0}
    assert shards["data.json"]["split"].startswith(f"validation set: {tmp_path / 'shards' / 'val-{000000..000001}.tar'}")
    # the same hygiene: the truncated image is skipped with the reason, named by its place in the shard
    (path, reason), = shards["data.json"]["skipped_unreadable"]
    assert ".tar#" in path and "truncated" in reason
    assert "truncated" in folder["data.json"]["skipped_unreadable"][0][1]
    assert any("notes.txt" in p for p, _ in manifest["ignored"])

    # evaluate and predict read shards too
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run-shards"), str(tmp_path / "shards" / "val-{000000..000001}.tar"),
                 "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == folder["metrics.json"]["val"]["accuracy"]
    assert main(["predict", str(tmp_path / "run-shards"), str(tmp_path / "shards" / "val-000000.tar"),
                 "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 5 and all(r["path"].startswith(str(tmp_path / "shards" / "val-000000.tar#")) for r in rows)
    assert all(r["error"] is None for r in rows)


def test_a_shard_folder_trains_with_its_splits_and_refuses_to_be_written_over(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=4, val_per_class=2)
    assert main(["shard", str(data), "--out", str(tmp_path / "s")]) == 0
    splits = load_splits(tmp_path / "s")
    assert (len(splits.train), len(splits.val)) == (8, 4)
    assert [str(p) for p in splits.train.paths] == [str(p) for p in sorted(splits.train.paths, key=str)]
    assert main(["shard", str(data), "--out", str(tmp_path / "s")]) == 1
    assert "already holds shards" in capsys.readouterr().err


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    import io

    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_damaged_and_odd_shards_are_passed_over_with_a_reason(tmp_path):
    png = make_image(tmp_path / "a.png", (200, 50, 40)).read_bytes()
    _tar(tmp_path / "x-000000.tar", {"a.png": png, "a.cls": b"0", "b.png": png, "c.png": png, "c.cls": b"seven",
                                     "d.txt": b"hello", "e.png": png, "e.cls": b"1", "noext": b"?"})
    good = _tar(tmp_path / "x-000001.tar", {"f.png": png, "f.cls": b"1", "g.png": png, "g.cls": b"0"})
    cut = tmp_path / "x-000002.tar"
    whole = _tar(tmp_path / "whole.tar", {"h.cls": b"1", "h.png": png, "i.cls": b"0", "i.png": png})
    with tarfile.open(whole) as tar:
        end = tar.getmember("i.png").offset_data + 100
    cut.write_bytes(whole.read_bytes()[:end])        # ends inside i.png
    scan = scan_shards(str(tmp_path / "x-{000000..000002}.tar"))
    assert [s.member for s, _ in scan.samples] == ["a.png", "e.png", "f.png", "g.png", "h.png"]
    assert scan.samples[-1][0].read() == png       # a member reads as the bytes that were put in
    assert scan.classes == ["0", "1"]  # no dataset.json beside them: the .cls numbers name the classes
    reasons = dict(scan.ignored)
    assert "has no b.cls" in reasons[f"{tmp_path / 'x-000000.tar'}#b.png"]
    assert "'seven'" in reasons[f"{tmp_path / 'x-000000.tar'}#c.png"]
    assert "not an image" in reasons[f"{tmp_path / 'x-000000.tar'}#d.txt"]
    assert "is damaged after" in reasons[str(cut)]
    assert "is cut" in reasons[f"{cut}#i.png"]
    with pytest.raises(DatasetError, match=r"1 of the 4 shard\(s\).*x-000003.tar"):
        scan_shards(str(tmp_path / "x-{000000..000003}.tar"))
    with pytest.raises(DatasetError, match="local"):
        scan_shards("https://example.org/x-{000000..000001}.tar")
    with pytest.raises(DatasetError, match="training data lacks"):
        scan_shards(str(good), classes=["1"])


def test_ranks_read_whole_shards():
    from headstart.data.shards import ShardMember

    images = [ShardMember(f"s{i // 3}.tar", f"{i}.png", 0, 1) for i in range(10)]  # shards of 3, 3, 3, 1
    parts = by_shard(images, 2)
    assert parts == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9]]
    assert by_shard(list(range(5)), 2) == [[0, 2, 4], [1, 3]]  # files: every other image
