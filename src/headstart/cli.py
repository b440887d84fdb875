"""The ``headstart`` command: parses, calls the public API, prints. Errors become one line (``--debug``: traceback).

Exit codes: 0 ok, 1 failure (bad data, weights, run, disk), 2 usage, 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import csv
import errno
import io
import json
import logging
import sys
import traceback
from pathlib import Path

from .config import (BackboneConfig, EngineConfig, HeadConfig, Recipe, ShardConfig, SplitConfig, TrainConfig,
                     cli_fields)
from .errors import HeadstartError

__all__ = ["main", "error_message", "build_parser", "TRAIN_CONFIGS"]

# the configs whose fields are `headstart train`'s flags and ImageClassifier's parameters
TRAIN_CONFIGS = (BackboneConfig, HeadConfig, TrainConfig, Recipe, SplitConfig, EngineConfig)

EXAMPLES = """examples:
  headstart demo                                   # offline end-to-end run on scikit-learn's digits
  headstart backbones
  headstart summary vgg16 --input-size 150 --frozen
  headstart train photos/ --out run                # efficientnet_lite0, frozen, cached features
  headstart train photos/ --out run --backbone vgg16 --weights vgg16_notop.safetensors --input-size 150 --head flatten
  headstart train photos/ --out run --strategy frozen-aug --augment strong --views 5
  headstart train photos/ --out run --strategy finetune --backbone vgg16 --weights vgg16_notop.safetensors --input-size 150
  headstart train photos/ --out run --strategy finetune --resume      # continue a killed run
  headstart evaluate run photos/val --format json --tta
  headstart predict run new_photos/ --top-k 3 --format csv
  headstart export run --format onnx --out model.onnx    # one file: graph, classes, preprocessing
  headstart predict model.onnx new_photos/
  headstart predict run -- -photo-with-leading-dash.jpg
  headstart shard photos/ --out shards/ --max-count 1000    # tar shards (webdataset layout) + dataset.json
  headstart train 'shards/train-{000000..000009}.tar' --out run   # val/test shards are found beside them
  torchrun --nproc-per-node 2 -m headstart train photos/ --out run  # extraction spread over 2 processes

exit codes:
  0    ok (unreadable images are skipped and listed; they do not fail a run)
  1    failure: one line "error: ..." says what was wrong and what to do (--debug shows the traceback)
  2    usage: unknown command or option, missing argument
  130  interrupted (Ctrl-C); features computed so far stay in the cache and a re-run reuses them
"""


def _cmd_backbones(args) -> None:
    from .backbones import registry

    rows = []
    for name in registry.names():
        e = registry.get(name)
        offline = next((s.label for s in e.sources if s.available()), None)
        size = "x".join(map(str, e.data_config.input_size))
        rows.append((name, size, offline or "no (use --weights FILE)", e.description))
    w = [max(len(r[i]) for r in rows + [("backbone", "input", "imagenet weights offline", "")]) + 2 for i in range(3)]
    print(f"{'backbone':<{w[0]}}{'input':<{w[1]}}{'imagenet weights offline':<{w[2]}}description")
    for r in rows:
        print(f"{r[0]:<{w[0]}}{r[1]:<{w[1]}}{r[2]:<{w[2]}}{r[3]}")
    print("\nAny timm model also works as 'timm:<name>' (weights from the hub or its local cache).")


def _cmd_summary(args) -> None:
    from .backbones.base import create_backbone
    from .heads import Head, HeadConfig
    from .model import ImageModel
    from .summary import summary

    weights = args.weights or (None if args.random else "imagenet")
    try:
        bb = create_backbone(args.backbone, weights=weights, input_size=args.input_size)
    except HeadstartError as exc:
        if weights != "imagenet":
            raise
        # the table is about shapes and counts: random weights give the same ones
        logging.getLogger("headstart").info("%s; showing the architecture with random weights", exc)
        bb = create_backbone(args.backbone, weights=None, input_size=args.input_size)
    if args.frozen:
        bb.freeze()
    model = bb
    if args.head:
        head = Head(HeadConfig(pool=args.head, hidden=tuple(args.hidden), dropout=args.dropout), bb.feature_shape,
                    args.classes)
        model = ImageModel(bb, head, [f"class_{i}" for i in range(args.classes)])
    print(summary(model))


def _classifier_from_args(args):
    from .api import ImageClassifier

    params = {name: getattr(args, name) for cls in TRAIN_CONFIGS for name in _dests(cls)}
    params["hidden"] = tuple(params["hidden"])
    return ImageClassifier(**params, cache=False if args.no_cache else (args.cache or True))


def _cmd_train(args) -> None:
    from .runs import check_output_folder

    check_output_folder(args.out)  # before the data scan and feature extraction, not after
    clf = _classifier_from_args(args).fit(args.data, val=args.val, test=args.test, out=args.out, resume=args.resume)
    if clf.rank_ == 0:  # under torchrun, the other ranks only helped
        clf.save(args.out)
        _print_train_report(clf, args.out)


def _print_train_report(clf, out) -> None:
    r = clf.report_
    print(f"classes: {', '.join(clf.classes_)}   ({r.split})")
    print(f"backbone passes: train {r.backbone_passes['train']}, val {r.backbone_passes['val']}; "
          f"from cache: train {r.from_cache['train']}, val {r.from_cache['val']}")
    if r.skipped_unreadable:
        print(f"skipped {len(r.skipped_unreadable)} unreadable file(s) (listed in {out}/data.json):")
        for p, reason in r.skipped_unreadable[:10]:
            print(f"  {p}: {reason}")
    if r.cache_recomputed:
        print(f"recomputed damaged feature cache entries: {len(r.cache_recomputed)} (listed in {out}/data.json)")
    if r.cache_write_error:
        print(f"warning: the feature cache could not be written ({r.cache_write_error}); features were not kept")
    if r.suspect_images:
        print(f"warning: {len(r.suspect_images)} suspect image(s) kept in the data; look at them "
              f"(listed in {out}/data.json):")
        for row in r.suspect_images[:5]:
            print(f"  {row['path']}: {row['reason']}")
    if r.train_val_duplicates:
        print(f"warning: {len(r.train_val_duplicates)} image(s) are in both train and val")
    best = r.best
    line = f"best epoch {best['epoch']} of {len(clf.history_)}"
    if "val_accuracy" in best:
        line += f": val accuracy {best['val_accuracy']:.4f}, val loss {best['val_loss']:.4f}"
    print(line)
    print(f"time: {r.seconds['total']:.1f} s ({r.recipe['strategy']})")
    print(f"saved to {out}")


def _cmd_evaluate(args) -> None:
    from .api import load
    from .evaluation import format_metrics

    clf = load(args.run)
    clf.tta = args.tta
    clf.engine, clf.device = args.engine, args.device
    if args.no_cache:
        clf.cache = False
    m = clf.evaluate(args.data)
    print(json.dumps(m, indent=2) if args.format == "json" else format_metrics(m))


def _cmd_predict(args) -> None:
    from .api import load

    clf = load(args.run)
    clf.tta = args.tta
    clf.engine, clf.device = args.engine, args.device
    rows = clf.predictor().predict(args.paths, top_k=args.top_k)
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    elif args.format == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["path", "label", "probability", "top_k", "error"])
        for r in rows:
            w.writerow([r["path"], r["label"] or "", "" if r["probability"] is None else f"{r['probability']:.6f}",
                        ";".join(f"{t['label']}:{t['probability']:.6f}" for t in r["top_k"]), r["error"] or ""])
        print(buf.getvalue(), end="")
    else:
        width = max([len(r["path"]) for r in rows] + [4]) + 2
        for r in rows:
            if r["error"]:
                print(f"{r['path']:<{width}}ERROR {r['error']}")
            else:
                print(f"{r['path']:<{width}}" + "  ".join(f"{t['label']} {t['probability']:.3f}" for t in r["top_k"]))
    n_err = sum(1 for r in rows if r["error"])
    if n_err:
        print(f"{n_err} of {len(rows)} file(s) could not be read", file=sys.stderr)


def _cmd_export(args) -> None:
    from .errors import ConfigError
    from .export import export_onnx_model, is_onnx_file
    from .runs import load_model

    if is_onnx_file(args.run):
        raise ConfigError(f"{args.run} is already an exported model; pass the run folder it came from")
    model, _ = load_model(args.run)
    out = Path(args.out) if args.out else Path(args.run) / "model.onnx"
    export_onnx_model(model, out)
    size = "x".join(map(str, model.backbone.data_config.input_size))
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MB): {model.backbone.name} + head, input {size}, "
          f"classes {', '.join(model.classes)}")
    print(f"use it with: headstart predict {out} IMAGES...")


def _cmd_shard(args) -> None:
    from .data.datasets import shard_dataset
    from .data.shards import shard_pattern

    config = ShardConfig(**{f.name: getattr(args, f.name) for f in cli_fields(ShardConfig)})
    manifest = shard_dataset(args.data, args.out, config)
    for split, part in manifest["splits"].items():
        print(f"{split}: {part['images']} images in {len(part['shards'])} shard(s): "
              f"{Path(args.out) / shard_pattern(part['shards'])}")
    for path, reason in manifest["skipped"][:10]:
        print(f"  left out {path}: {reason}")
    if manifest["skipped"]:
        print(f"left out {len(manifest['skipped'])} unreadable file(s) (listed in {Path(args.out) / 'dataset.json'})")
    if manifest["ignored"]:
        print(f"passed over {len(manifest['ignored'])} file(s) that are not images (listed under ignored in "
              f"{Path(args.out) / 'dataset.json'})")
    train = manifest["splits"]["train"]["shards"]
    print(f"classes: {', '.join(manifest['classes'])}")
    print(f"train with: headstart train '{Path(args.out) / shard_pattern(train)}' --out RUN")


def _cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(Path(args.out), per_class=args.per_class, backbone=args.backbone)


def _dests(cls) -> list[str]:
    """The argparse destinations (and ImageClassifier parameters) of a config class's flags."""
    return [f.metadata["dest"] or f.name for f in cli_fields(cls)]


def _add_config_args(p, cls, only: tuple[str, ...] | None = None) -> None:
    """One flag per field of ``cls`` (``headstart.config.option``): its name, default, choices and help come
    from the field, so the CLI cannot drift from the library's defaults."""
    for f in cli_fields(cls):
        if only is not None and f.name not in only:
            continue
        meta = f.metadata
        kwargs = dict(meta["argparse"])
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
        if isinstance(f.default, bool) and "action" not in kwargs:
            kwargs["action"] = "store_true"
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        shown = "" if default in (None, False, []) or kwargs.get("action") else " (default: %(default)s)"
        p.add_argument(meta["flag"] or "--" + f.name.replace("_", "-"), dest=meta["dest"] or f.name,
                       default=default, help=meta["help"] + shown, **kwargs)


def _add_train_args(p) -> None:
    for cls in TRAIN_CONFIGS:
        _add_config_args(p, cls)
    p.add_argument("--random-init", dest="weights", action="store_const", const=None, default=argparse.SUPPRESS,
                   help="random weights instead of pretrained ones")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--val", help="validation folder or CSV (default: DATA/val, else a stratified split)")
    p.add_argument("--test", help="test folder or CSV (default: DATA/test if present)")
    p.add_argument("--cache", help="feature cache folder (default: $HEADSTART_CACHE or ~/.cache/headstart)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")


def _add_engine_arg(p) -> None:
    _add_config_args(p, EngineConfig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headstart", description="Transfer learning on images.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--quiet", action="store_true", help="only results and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("backbones", help="list backbones and whether their weights are available offline")
    p.set_defaults(func=_cmd_backbones)

    p = sub.add_parser("summary", help="a Keras-style layer table of a backbone (and head)")
    p.add_argument("backbone")
    _add_config_args(p, BackboneConfig, only=("input_size",))
    p.add_argument("--weights", help="weights file whose JSON may set the preprocessing")
    p.add_argument("--random", action="store_true", help="random weights (no weight lookup)")
    p.add_argument("--frozen", action="store_true", help="freeze the backbone (base.trainable = False)")
    _add_config_args(p, HeadConfig)
    p.add_argument("--classes", type=int, default=2, help="number of classes for --head (default: 2)")
    p.set_defaults(func=_cmd_summary)

    p = sub.add_parser("train", help="train a classifier on an image folder or CSV")
    p.add_argument("data", help="DATA/train[/val][/test] with class folders, a folder of class folders, or a CSV")
    p.add_argument("--out", required=True, help="run folder to write")
    _add_train_args(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="accuracy, per-class report and confusion matrix on labelled data")
    p.add_argument("run")
    p.add_argument("data")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--tta", action="store_true", help="average over the image and its mirror")
    _add_engine_arg(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("predict", help="predict image files or folders")
    p.add_argument("run", help="run folder, or an ONNX file from `headstart export`")
    p.add_argument("paths", nargs="+")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--tta", action="store_true", help="average over the image and its mirror")
    _add_engine_arg(p)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("export", help="the whole model (backbone + head) as one ONNX file with its metadata")
    p.add_argument("run", help="run folder written by `headstart train`")
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("--out", help="file to write (default: RUN/model.onnx)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("shard", help="write an image folder or CSV as tar shards (webdataset layout) for training "
                                      "at scale")
    p.add_argument("data", help="DATA/train[/val][/test] with class folders, a folder of class folders, or a CSV")
    p.add_argument("--out", required=True, help="folder to write the shards and dataset.json to (empty or new)")
    _add_config_args(p, ShardConfig)
    p.set_defaults(func=_cmd_shard)

    p = sub.add_parser("demo", help="offline end to end: digits as PNG folders -> train -> evaluate -> predict")
    p.add_argument("--out", default="headstart-demo", help="folder for the demo data and run (default: %(default)s)")
    p.add_argument("--per-class", type=int, default=60, help="images per class to use (default: %(default)s)")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.set_defaults(func=_cmd_demo)
    return parser


def error_message(exc: BaseException) -> str:
    """The one line the CLI prints for an exception: what went wrong and what to do.

    headstart's own errors already say both; the few outside errors a run can meet get the fix added here.
    """
    if isinstance(exc, HeadstartError):
        text = str(exc)
    elif isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        text = (f"no space left on the device ({exc.filename or exc}); free some space, write the run or the "
                "cache (--cache) elsewhere, or use --no-cache")
    elif isinstance(exc, PermissionError):
        text = f"permission denied: {exc.filename or exc}; fix its permissions or choose another path"
    elif isinstance(exc, FileNotFoundError):
        text = f"no such file or folder: {exc.filename or exc}; check the path"
    elif isinstance(exc, OSError):
        text = f"{type(exc).__name__}: {exc}; run with --debug for the traceback"
    elif isinstance(exc, MemoryError):
        text = "out of memory; use a smaller --batch-size or --input-size, or fewer images at once"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return "error: " + " ".join(text.split())  # one line, whatever the message held


def main(argv: list[str] | None = None) -> int:
    """Run the command in ``argv``; returns the exit code (0 ok, 1 failure, 2 usage, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    try:
        args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print("interrupted; features computed so far stay in the cache and a re-run reuses them", file=sys.stderr)
        return 130
    except (HeadstartError, OSError, MemoryError) as exc:
        if args.debug:
            raise
        print(error_message(exc), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
