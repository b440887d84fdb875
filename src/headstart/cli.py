"""The ``headstart`` command: parses, calls the public API, prints. Errors become one line (``--debug``: traceback).

Exit codes: 0 ok, 1 failure (bad data, weights, run, disk; ``predict`` with no readable image), 2 usage,
130 interrupted (Ctrl-C).

Each command says what it is about to do (its data, its run) before it imports torch: the first line comes at
once, and a wrong path fails at once. torch, timm and ONNX Runtime load inside the commands that need them.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import gc
import io
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from .argparsing import Parser
from .config import (EXPLAIN_METHODS, AutoConfig, BackboneConfig, EngineConfig, HeadConfig, Recipe, ReportConfig,
                     ServeConfig, ShardConfig, SplitConfig, TrainConfig, cli_fields)
from .errors import ConfigError, DatasetError, HeadstartError
from .io import finite_json

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
  headstart export run --format onnx --out model.onnx    # one file: graph, classes, preprocessing (docs/onnx.md)
  headstart predict model.onnx new_photos/
  headstart predict run -- -photo-with-leading-dash.jpg
  headstart shard photos/ --out shards/ --max-count 1000    # tar shards (webdataset layout) + dataset.json
  headstart train 'shards/train-{000000..000009}.tar' --out run   # val/test shards are found beside them
  torchrun --nproc-per-node 2 -m headstart train photos/ --out run  # extraction spread over 2 processes

every command has its own examples: headstart COMMAND --help

exit codes:
  0    ok (unreadable images are skipped and listed; they do not fail a run)
  1    failure: one line "error: ..." says what was wrong and what to do (--debug shows the traceback);
       predict: no input could be read
  2    usage: unknown command or option, missing argument
  130  interrupted (Ctrl-C); features computed so far stay in the cache and a re-run reuses them

without a network: weights that are not local fail in seconds with what to do (--weights FILE, --random-init);
HF_HUB_OFFLINE=1 keeps headstart and huggingface_hub from asking the hub at all
"""

COMMAND_EXAMPLES = {
    "shard": """
  headstart shard photos/ --out shards/ --max-count 1000    # train-000000.tar ... + dataset.json
  headstart train 'shards/train-{000000..000009}.tar' --out run   # val/test shards are found beside them
  torchrun --nproc-per-node 2 -m headstart train shards/ --out run  # each rank reads its share of the shards
""",
    "serve": """
  headstart serve run                               # http://127.0.0.1:8000/ (a page, and the API)
  headstart serve model.onnx --port 9000 --max-batch 16     # an exported model; routes and limits: docs/serve.md
  HEADSTART_API_KEY=secret headstart serve run      # every request needs the key (header X-API-Key)
  curl -F file=@cat.jpg 'http://127.0.0.1:8000/predict?top_k=3'
""",
    "backbones": """
  headstart backbones                               # names, input sizes, whether ImageNet weights are local
  headstart summary efficientnet_lite2              # one backbone's layers
  headstart train photos/ --out run --backbone timm:resnet18   # any timm model, weights from the hub""",
    "summary": """
  headstart summary vgg16 --input-size 150 --frozen    # the Keras recipe's base: 4x4x512, 14,714,688 params
  headstart summary efficientnet_lite0 --head avg --hidden 256 --dropout 0.3 --classes 5
  headstart summary vgg16 --weights vgg16_notop.safetensors   # input size from the JSON beside the file

the table is the architecture: no weights are loaded unless --weights names a file, and no network is used""",
    "train": """
  headstart train photos/ --out run                 # efficientnet_lite0, frozen: a head on cached features
  headstart train photos/ --out run-vgg --backbone vgg16 --weights vgg16_notop.safetensors --input-size 150 --head flatten
  headstart train photos/ --out run --strategy finetune --overwrite     # replace the run in run/
  headstart train photos/ --out run --strategy finetune --resume        # continue a killed run
  headstart train photos/ --out run --auto --time-budget 5m   # offline backbones + chosen heads, best kept

DATA: DATA/train/<class>/ (with DATA/val/, DATA/test/), a folder of class folders (val: a seeded split), or a
CSV of path,label rows. Early stopping ends training when the validation loss stops improving (--patience).""",
    "lr-find": """
  headstart lr-find photos/                          # efficientnet_lite0's last groups; plot in lr_find.png
  headstart lr-find photos/ --backbone vgg16 --weights vgg16_notop.safetensors --input-size 150 --out vgg.png

The head is first trained on the cached activations at the fine-tuning boundary; the test then raises the
rate of the fine-tuned part (--unfreeze groups and the head) exponentially over 100 mini-batches and suggests
the steepest descent of the smoothed loss (or the minimum's rate / 10).""",
    "evaluate": """
  headstart evaluate run photos/val                 # accuracy, per-class precision/recall/F1, confusion matrix
  headstart evaluate run photos/test --format json --tta
  headstart evaluate model.onnx labelled.csv        # a CSV of path,label rows works too

DATA needs one sub-folder per class (as in training) or a CSV; for loose images use headstart predict.""",
    "predict": """
  headstart predict run new_photos/ --top-k 3       # folders are expanded to their images
  headstart predict run a.jpg b.png --format csv > predictions.csv
  headstart predict model.onnx new_photos/          # an exported model, on ONNX Runtime

exit status: 0 when at least one image was predicted (unreadable ones get an ERROR row); 1 when none could be read""",
    "report": """
  headstart report run                              # run/report.html: the run's validation set (train writes it too)
  headstart report run photos/test                  # run/report-test.html: the run evaluated on a test set
  headstart report run new.csv --out new.html --heatmaps 0

one HTML file that opens offline (images inside it, no JavaScript); the plots also go to run/plots/""",
    "export": """
  headstart export run                              # writes run/model.onnx
  headstart export run --out model.onnx && headstart predict model.onnx photo.jpg

using the file without headstart (onnxruntime, numpy, Pillow): docs/onnx.md""",
    "check": """
  headstart check photos/                           # unreadable, suspect, likely mislabelled, duplicated images
  headstart check photos/ --backbone vgg16 --weights vgg16_notop.safetensors --input-size 150
  headstart check photos/ --format json > check.json
  headstart train photos/ --out run --exclude wrong.txt     # leave out the images you decided against

nothing is removed; a listed image is worth a look (label quality: the out-of-fold probability of its label)""",
    "explain": """
  headstart explain run ant.jpg bee.png             # run/heatmaps/ant.heatmap.png ... for the predicted class
  headstart explain run photos/ --out maps/ --class bees    # where the model sees "bees", in every photo
  headstart explain run ant.jpg --method gradcam++

the overlays show the picture as the model saw it (resized, cropped); red is where the evidence is strongest""",
    "demo": """
  headstart demo                                    # into ./headstart-demo (an earlier demo there is replaced)
  headstart demo --out /tmp/demo --per-class 20     # a quicker run""",
}


def _examples(command: str) -> str:
    return "examples:" + COMMAND_EXAMPLES[command]


log = logging.getLogger("headstart")


_COMMAND = False  # set by command(): this process is the headstart command and ends with it


@contextlib.contextmanager
def _model_libraries():
    """Around a command's import of torch, timm and the rest: the collector paused while they load, then frozen.

    They make some 400,000 objects that live as long as the process; while they load the cyclic collector would
    scan all of them several times over, and again in each later full collection (one lands in every report).
    Only for the headstart command: a program that imports headstart keeps its own collector as it set it."""
    if not _COMMAND:
        yield
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def _cmd_backbones(args) -> None:
    # the header first: the registry needs torch and timm, which take a few seconds to import
    widths = (22, 10, 44)
    print(f"{'backbone':<{widths[0]}}{'input':<{widths[1]}}{'imagenet weights offline':<{widths[2]}}description",
          flush=True)
    with _model_libraries():
        from .backbones import registry

    for name in registry.names():
        e = registry.get(name)
        offline = next((s.label for s in e.sources if s.available()), None)
        size = "x".join(map(str, e.data_config.input_size))
        row = (name, size, offline or "no (use --weights FILE)")
        print("".join(f"{v:<{w}}" if len(v) < w else v + "  " for v, w in zip(row, widths)) + e.description)
    print("\nAny timm model also works as 'timm:<name>' (weights from the hub or its local cache).")


def _cmd_summary(args) -> None:
    if args.weights:
        log.info("summary of %s with the preprocessing of %s", args.backbone, args.weights)
    else:
        log.info("summary of %s: the architecture only (no weights are loaded)", args.backbone)
    with _model_libraries():
        from .backbones.base import create_backbone
        from .backbones.concat import refuse_concatenation
        from .heads import Head, HeadConfig
        from .model import ImageModel
        from .summary import summary

    # shapes and counts do not depend on the weights' values: only a named file is read (its JSON may set the
    # input size), and no weight source is asked, so a summary never waits on the network
    bb = create_backbone(args.backbone, weights=args.weights or None, input_size=args.input_size)
    refuse_concatenation(bb, "headstart summary")
    if args.frozen:
        bb.freeze()
    model = bb
    if args.head:
        head = Head(HeadConfig(pool=args.head, hidden=tuple(args.hidden), dropout=args.dropout), bb.feature_shape,
                    args.classes)
        model = ImageModel(bb, head, [f"class_{i}" for i in range(args.classes)])
    print(summary(model))


def _classifier_from_args(args):
    with _model_libraries():
        from .api import ImageClassifier

    params = {name: getattr(args, name) for cls in TRAIN_CONFIGS for name in _dests(cls)}
    params["hidden"] = tuple(params["hidden"])
    return ImageClassifier(**params, cache=False if args.no_cache else (args.cache or True))


def _cmd_train(args) -> None:
    from .data.datasets import load_splits
    from .runfolder import check_new_run, check_output_folder, writing_run

    # before the model libraries load: a wrong --out, report setting or data layout fails at once
    check_output_folder(args.out)
    check_new_run(args.out, overwrite=args.overwrite, resume=args.resume)
    report = ReportConfig(skip=args.no_report, heatmaps=args.heatmaps)
    _check_settings(args)  # every setting, before the data is read (and before torch loads)
    splits = load_splits(args.data, val=args.val, test=args.test, val_fraction=args.val_fraction, seed=args.seed)
    log.info("data: %s", _describe_splits(splits))
    if args.exclude:
        from .data.datasets import read_path_list

        read_path_list(args.exclude)  # an unreadable list fails now, not after the model libraries load
    auto = AutoConfig(args.auto, args.time_budget)
    # the run is held from the training to its report, so no other writer replaces it in between
    if auto.auto:
        with writing_run(args.out):
            clf = _auto_train(args, splits, auto)
            if not report.skip:
                _write_run_report(clf, args.out, report)
        return
    clf = _classifier_from_args(args)
    with writing_run(args.out) if _primary() else contextlib.nullcontext():
        clf = clf.fit(splits, out=args.out, resume=args.resume, overwrite=args.overwrite)
        if clf.rank_ == 0:  # under torchrun, the other ranks only helped
            clf.save(args.out, keep_checkpoints=args.keep_checkpoints)
            _print_train_report(clf, args.out)
            if not report.skip:
                _write_run_report(clf, args.out, report)


def _write_run_report(clf, out, config: ReportConfig) -> None:
    """The report of the run just saved; the model is saved already, so whatever goes wrong here is a warning."""
    t0 = time.perf_counter()
    try:
        with _model_libraries():  # matplotlib and the template; the collector then skips the training's objects
            from .report import build_report

        path = build_report(out, heatmaps=config.heatmaps, classifier=clf)
    except Exception as exc:  # noqa: BLE001 - any failure of the report must leave the saved run usable
        log.warning("warning: the report was not written (%s: %s); the model is saved in %s. Try again with: "
                    "headstart report %s", type(exc).__name__, " ".join(str(exc).split())[:300], out, out)
        return
    _print_report_line(path, time.perf_counter() - t0)


def _print_report_line(path: Path, seconds: float) -> None:
    print(f"report: {path} ({path.stat().st_size / 1024:.0f} KB, {seconds:.1f} s)")


def _auto_train(args, splits, auto) -> None:
    from pathlib import Path

    with _model_libraries():
        from .auto import auto_fit, format_leaderboard
    from .io import write_json

    if args.strategy != "frozen":
        raise ConfigError(f"--auto chooses among frozen backbones and heads; it does not take --strategy "
                          f"{args.strategy}. Leave --strategy out, or drop --auto")
    print(f"--auto: trying offline backbones within {auto.time_budget} ({auto.seconds():.0f} s)", flush=True)
    params = {name: getattr(args, name) for cls in TRAIN_CONFIGS for name in _dests(cls)}
    params["hidden"] = tuple(params["hidden"])
    clf, board = auto_fit(splits, auto, params, cache=False if args.no_cache else (args.cache or True))
    if args.overwrite:
        from .runfolder import remove_checkpoints
        remove_checkpoints(args.out)
    clf.save(args.out)
    write_json(Path(args.out) / "leaderboard.json", board)
    print("leaderboard (score: the head choice's, see scored_by in leaderboard.json):")
    for line in format_leaderboard(board):
        print("  " + line)
    _print_train_report(clf, args.out)
    return clf


def _check_settings(args) -> None:
    """Build each training config from the flags: their checks run here, with no model library loaded."""
    for cls in TRAIN_CONFIGS:
        values = {f.name: getattr(args, f.metadata["dest"] or f.name) for f in cli_fields(cls)}
        if "hidden" in values:
            values["hidden"] = tuple(values["hidden"])
        cls(**values)


def _primary() -> bool:
    """Whether this process writes the run (not a helper rank under torchrun); read before torch loads."""
    return os.environ.get("RANK", "0") == "0"


def _describe_splits(splits) -> str:
    sizes = [f"{len(splits.train)} train"]
    sizes += [f"{len(splits.val)} val"] if splits.val is not None else []
    sizes += [f"{len(splits.test)} test"] if splits.test is not None else []
    classes = splits.train.classes
    shown = ", ".join(classes[:8]) + (f", ... ({len(classes)} in all)" if len(classes) > 8 else "")
    return f"{len(classes)} classes ({shown}); {', '.join(sizes)} images ({splits.split_note})"


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
    if r.excluded:
        print(f"left out {len(r.excluded)} image(s) listed in --exclude (listed in {out}/data.json)")
    if r.label_errors:
        print(f"warning: {len(r.label_errors)} training image(s) look mislabelled{_agreement(r)} (nothing was removed; "
              f"listed in {out}/data.json under label_errors; leave them out with --exclude FILE):")
        for row in r.label_errors[:5]:
            print(f"  {row['path']}: labelled {row['given']}, looks like {row['suggested']} "
                  f"(label quality {row['quality']:.2f})")
    if r.duplicates_across_classes:
        print(f"warning: {len(r.duplicates_across_classes)} near-duplicate pair(s) are filed under different "
              f"classes (listed in {out}/data.json under duplicates_across_classes)")
    for line in _selection_lines(r.head_selection):
        print(line)
    for line in _best_lines(r.best, r.stages, len(clf.history_)):
        print(line)
    test = clf.metrics_.get("test")
    if test:
        print(f"test accuracy {test['accuracy']:.4f} ({test['n']} images), macro F1 {test['macro_f1']:.4f}")
    print(f"time: {r.seconds['total']:.1f} s ({r.recipe['strategy']})")
    print(f"saved to {out}")


def _agreement(report) -> str:
    """How far to trust a list of likely label errors: the check flags what its own out-of-fold head gets wrong
    confidently, so when that head predicts far fewer labels than the model does, hard images are among them."""
    share = report.label_check_agreement
    return "" if share is None else f" to a check that predicts {share:.0%} of the given labels"


def _selection_lines(selection: dict | None) -> list[str]:
    """The head's choice: how it was scored, each candidate's score, the one kept."""
    if not selection:
        return []
    chosen = selection["chosen"]
    lines = [f"head chosen by {selection['method']}: {chosen['name']}"
             + (f", {chosen['epochs']} epochs" if chosen.get("epochs") else "")
             + f" ({selection['seconds']:.1f} s for {len(selection['candidates'])} candidates)"]
    for row in selection["candidates"]:
        mark = "*" if row["name"] == chosen["name"] else " "
        lines.append(f"  {mark} {row['name']:<42} accuracy {row['accuracy']:.4f}  log loss {row['log_loss']:.4f}"
                     f"  {row['seconds']:5.1f} s")
    return lines


_STAGE_NAMES = {"head": "head-only stage", "finetune": "fine-tuning stage"}


def _scores(row: dict) -> str:
    if "val_accuracy" in row:
        return f"val accuracy {row['val_accuracy']:.4f}, val loss {row['val_loss']:.4f}"
    return f"train accuracy {row['train_accuracy']:.4f}, train loss {row['train_loss']:.4f} (no validation set)"


def _best_lines(best: dict, stages: dict, epochs: int) -> list[str]:
    """Which epoch's weights were saved, from which stage, and, after fine-tuning, whether it paid off."""
    if not best:
        return []
    stage = best.get("stage", "head")
    line = f"best epoch {best['epoch']} of {epochs}"
    if len(stages) > 1:
        line += f" ({_STAGE_NAMES.get(stage, stage)})"
    lines = [f"{line}: {_scores(best)}"]
    head, tuned = stages.get("head"), stages.get("finetune")
    if head and tuned:
        if stage == "head":
            lines.append(f"fine-tuning did not beat the head-only stage: its best epoch ({tuned['epoch']}) reached "
                         f"{_scores(tuned)}; the saved model is the head-only one, the backbone unchanged")
        else:
            lines.append(f"fine-tuning beat the head-only stage's best (epoch {head['epoch']}: {_scores(head)})")
    return lines


def _cmd_lr_find(args) -> None:
    from .data.datasets import load_splits

    splits = load_splits(args.data, val=args.val, val_fraction=args.val_fraction, seed=args.seed)
    log.info("data: %s", _describe_splits(splits))
    from .training.lr_find import plot

    found = _classifier_from_args(args).lr_find(splits)
    if not found.lrs:
        raise ConfigError("the range test stopped at its first step (the loss was not finite); check the data")
    plot(found, args.out, title=f"lr-find: {args.backbone}")
    print(f"learning-rate range test over {len(found.lrs)} mini-batches ({found.lrs[0]:.1e} to "
          f"{found.lrs[-1]:.1e}), for the last layer group (earlier groups and the head keep their ratios):")
    print(f"  suggestion {found.suggestion:.2e}  (steepest descent {found.steepest:.2e}, minimum/10 "
          f"{found.valley:.2e})")
    print(f"plot: {args.out}")
    print(f"use it: headstart train {args.data} --strategy finetune --finetune-lr {found.suggestion:.2e} "
          "(finetune runs this test by itself when --finetune-lr is not given)")


def _cmd_evaluate(args) -> None:
    from .data.datasets import load_dataset
    from .runfolder import run_classes

    classes = run_classes(args.run)
    data = args.data
    if classes is not None:  # the data checked before the model libraries load
        data = load_dataset(args.data, classes)
        log.info("evaluating %s on %s: %d images in %d classes", args.run, args.data, len(data), len(classes))
    with _model_libraries():
        from .api import load
        from .evaluation import format_metrics

    clf = load(args.run)
    clf.tta = args.tta
    clf.engine, clf.device = args.engine, args.device
    if args.no_cache:
        clf.cache = False
    m = clf.evaluate(data)
    print(json.dumps(finite_json(m), indent=2, allow_nan=False) if args.format == "json" else format_metrics(m))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value} (1: the best class, 3: the top three)")
    return value


def _cmd_predict(args) -> None:
    from .data.inputs import collect_images

    images = collect_images(args.paths)
    if not images:
        raise DatasetError(f"found no image files in {', '.join(args.paths)} (expected .jpg .jpeg .png .gif .bmp "
                           ".webp); nothing to predict")
    log.info("predicting %d image(s) with %s", len(images), args.run)
    with _model_libraries():
        from .api import load

    clf = load(args.run)
    clf.tta = args.tta
    clf.engine, clf.device = args.engine, args.device
    rows = clf.predictor().predict_images(images, top_k=args.top_k)
    if args.format == "json":
        print(json.dumps(finite_json(rows), indent=2, allow_nan=False))
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
    if n_err == len(rows):
        raise DatasetError(f"none of the {len(rows)} input(s) could be read as an image (see the ERROR rows)")
    if n_err:
        print(f"{n_err} of {len(rows)} file(s) could not be read", file=sys.stderr)


def _cmd_check(args) -> None:
    log.info("checking %s with %s: unreadable, suspect, likely mislabelled and duplicated images", args.data,
             args.backbone)
    from .data.datasets import load_splits, read_path_list

    load_splits(args.data, val=args.val, val_fraction=0.0)  # a wrong path fails before the model libraries load
    if args.exclude:
        read_path_list(args.exclude)
    with _model_libraries():
        from .checks import check_data
        from .features import FeatureCache

    cache = None if args.no_cache else (FeatureCache(args.cache) if args.cache else True)
    r = check_data(args.data, val=args.val, backbone=args.backbone, weights=args.weights, input_size=args.input_size,
                   exclude=args.exclude, cache=cache, engine=args.engine)
    if args.format == "json":
        print(json.dumps(r.as_dict(), indent=2))
        return
    n = sum(r.counts.values())
    print(f"{n} images in {len(r.classes)} classes ({', '.join(f'{c} {k}' for c, k in r.counts.items())}); "
          f"backbone passes {r.backbone_passes}, from cache {r.from_cache}; {r.seconds['total']:.1f} s")
    if r.excluded:
        print(f"left out {len(r.excluded)} image(s) listed in {args.exclude}")
    for title, rows in (("unreadable (skipped)", [f"{p}: {why}" for p, why in r.skipped_unreadable]),
                        ("suspect images", [f"{s['path']}: {s['reason']}" for s in r.suspect_images])):
        if rows:
            print(f"\n{title}: {len(rows)}")
            print("\n".join(f"  {row}" for row in rows))
    if r.label_errors:
        width = max(len(e["path"]) for e in r.label_errors) + 2
        print(f"\nlikely label errors: {len(r.label_errors)}{_agreement(r)} (most likely first; quality: "
              "probability of the given label, out of fold)")
        print(f"  {'rank':>4}  {'path':<{width}}{'given':<12}{'suggested':<12}quality")
        for e in r.label_errors:
            print(f"  {e['rank']:>4}  {e['path']:<{width}}{e['given']:<12}{e['suggested']:<12}{e['quality']:.3f}")
    else:
        print("\nlikely label errors: none found")
    if r.duplicates_across_classes:
        print(f"\nnear-duplicates in different classes: {len(r.duplicates_across_classes)}")
        for d in r.duplicates_across_classes:
            print(f"  {d['similarity']:.3f}  {d['a']} ({d['labels'][0]})  ~  {d['b']} ({d['labels'][1]})")


def _cmd_explain(args) -> None:
    from .data.inputs import collect_images

    images = collect_images(args.paths)
    if not images:
        raise DatasetError(f"found no image files in {', '.join(args.paths)} (expected .jpg .jpeg .png .gif .bmp "
                           ".webp); nothing to explain")
    out = Path(args.out) if args.out else Path(args.run) / "heatmaps"
    log.info("explaining %d image(s) with %s (%s); overlays to %s", len(images), args.run, args.method, out)
    with _model_libraries():
        from .api import load
        from .explain import explain, overlay, overlay_names

    found = explain(load(args.run), images, target=args.target, method=args.method)
    out.mkdir(parents=True, exist_ok=True)
    width = max([len(e.source) for e in found] + [4]) + 2
    for e, name in zip(found, overlay_names([e.source for e in found])):
        if e.error:
            print(f"{e.source:<{width}}ERROR {e.error}")
            continue
        overlay(e).save(out / name)
        print(f"{e.source:<{width}}{e.label} {e.probability:.3f}  {out / name}")
    if all(e.error for e in found):
        raise DatasetError(f"none of the {len(found)} input(s) could be read as an image (see the ERROR rows)")


def _cmd_export(args) -> None:
    out = Path(args.out) if args.out else Path(args.run) / "model.onnx"
    log.info("exporting %s (backbone + head) to %s", args.run, out)
    from .errors import ConfigError
    with _model_libraries():
        from .export import export_onnx_model, is_onnx_file
        from .runs import load_model

    if is_onnx_file(args.run):
        raise ConfigError(f"{args.run} is already an exported model; pass the run folder it came from")
    model, _ = load_model(args.run)
    export_onnx_model(model, out)
    size = "x".join(map(str, model.backbone.data_config.input_size))
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MB): {model.backbone.name} + head, input {size}, "
          f"classes {', '.join(model.classes)}")
    print(f"use it with: headstart predict {out} IMAGES...   (without headstart: docs/onnx.md)")


def _cmd_report(args) -> None:
    from .data.datasets import load_dataset
    from .runfolder import run_classes

    config = ReportConfig(heatmaps=args.heatmaps)
    classes = run_classes(args.run)
    if args.data is not None and classes is not None:  # the data checked before the model libraries load
        load_dataset(args.data, classes)
    log.info("report of %s on %s", args.run, args.data or "its validation set")
    with _model_libraries():
        from .report import build_report

    t0 = time.perf_counter()
    path = build_report(args.run, args.data, out=args.out, heatmaps=config.heatmaps)
    _print_report_line(path, time.perf_counter() - t0)


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
    log.info("demo in %s: scikit-learn's digits as PNG folders, then train (%s), evaluate and predict", args.out,
             args.backbone)
    with _model_libraries():
        from .demo import run_demo

    run_demo(Path(args.out), per_class=args.per_class, backbone=args.backbone)


def _cmd_serve(args) -> None:
    import os

    with _model_libraries():
        from .serve import serve  # FastAPI and uvicorn load only for this command

    values = {name: getattr(args, name) for name in _dests(ServeConfig)}
    values["api_key"] = values["api_key"] or os.environ.get("HEADSTART_API_KEY") or None
    serve(args.run, ServeConfig(**values), engine=args.engine, device=args.device)


def _dests(cls) -> list[str]:
    """The argparse destinations (and ImageClassifier parameters) of a config class's flags."""
    return [f.metadata["dest"] or f.name for f in cli_fields(cls)]


def _add_config_args(p, cls, only: tuple[str, ...] | None = None) -> None:
    """One flag per field of ``cls`` (``headstart.config.option``): its name, default, choices and help come
    from the field, so the CLI cannot drift from the library's defaults (the help shows each default)."""
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
        p.add_argument(meta["flag"] or "--" + f.name.replace("_", "-"), dest=meta["dest"] or f.name,
                       default=default, help=meta["help"], **kwargs)


def _add_train_args(p) -> None:
    for cls in TRAIN_CONFIGS:
        _add_config_args(p, cls)
    p.add_argument("--random-init", dest="weights", action="store_const", const=None, default=argparse.SUPPRESS,
                   help="random weights instead of pretrained ones")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep --out/checkpoints once the run is saved (default: removed)")
    p.add_argument("--val", help="validation folder or CSV (default: DATA/val, else a stratified split)")
    p.add_argument("--test", help="test folder or CSV (default: DATA/test if present)")
    p.add_argument("--cache", help="feature cache folder (default: $HEADSTART_CACHE or ~/.cache/headstart)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    _add_config_args(p, ReportConfig)


def _add_engine_arg(p) -> None:
    _add_config_args(p, EngineConfig)


def _command(sub, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".", epilog=_examples(name))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="headstart", description="Transfer learning on images.", epilog=EXAMPLES)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--quiet", action="store_true", help="only results and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "backbones", "list backbones and whether their weights are available offline")
    p.set_defaults(func=_cmd_backbones)

    p = _command(sub, "summary", "a Keras-style layer table of a backbone (and head)")
    p.add_argument("backbone", help="registry name (headstart backbones) or timm:<model>")
    _add_config_args(p, BackboneConfig, only=("input_size",))
    p.add_argument("--weights", metavar="FILE", help="weights file whose JSON may set the preprocessing")
    p.add_argument("--random", action="store_true", help=argparse.SUPPRESS)  # the table never loads weights now
    p.add_argument("--frozen", action="store_true", help="freeze the backbone (base.trainable = False)")
    _add_config_args(p, HeadConfig)
    p.add_argument("--classes", type=int, default=2, help="number of classes for --head")
    p.set_defaults(func=_cmd_summary)

    p = _command(sub, "train", "train a classifier on an image folder or CSV")
    p.add_argument("data", help="DATA/train[/val][/test] with class folders, a folder of class folders, or a CSV")
    p.add_argument("--out", required=True, help="run folder to write")
    _add_train_args(p)
    _add_config_args(p, AutoConfig)
    p.set_defaults(func=_cmd_train)

    p = _command(sub, "lr-find", "the learning-rate range test for fine-tuning: loss against a rising rate, plotted")
    p.add_argument("data", help="DATA/train[/val] with class folders, a folder of class folders, or a CSV")
    p.add_argument("--out", default="lr_find.png", help="PNG to write the plot to")
    _add_train_args(p)
    p.set_defaults(func=_cmd_lr_find)

    p = _command(sub, "evaluate", "accuracy, per-class report and confusion matrix on labelled data")
    p.add_argument("run", help="run folder, or an ONNX file from `headstart export`")
    p.add_argument("data", help="a folder of class folders, or a CSV of path,label rows")
    p.add_argument("--format", choices=["table", "json"], default="table", help="a readable report, or JSON")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    p.add_argument("--tta", action="store_true", help="average over the image and its mirror")
    _add_engine_arg(p)
    p.set_defaults(func=_cmd_evaluate)

    p = _command(sub, "predict", "predict image files or folders")
    p.add_argument("run", help="run folder, or an ONNX file from `headstart export`")
    p.add_argument("paths", nargs="+", help="image files and folders (expanded to their images)")
    p.add_argument("--top-k", type=_positive_int, default=1, help="classes shown per image, most probable first")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table", help="one row per image")
    p.add_argument("--tta", action="store_true", help="average over the image and its mirror")
    _add_engine_arg(p)
    p.set_defaults(func=_cmd_predict)

    p = _command(sub, "report", "a self-contained HTML report of a run on its validation set or on labelled data")
    p.add_argument("run", help="run folder written by `headstart train`")
    p.add_argument("data", nargs="?", help="a folder of class folders, or a CSV of path,label rows "
                                           "(default: the run's own validation set)")
    p.add_argument("--out", help="HTML file to write (default: RUN/report.html, or RUN/report-<data>.html for DATA)")
    _add_config_args(p, ReportConfig, only=("heatmaps",))
    p.set_defaults(func=_cmd_report)

    p = _command(sub, "check", "find unreadable, suspect, likely mislabelled and duplicated images (no training)")
    p.add_argument("data", help="DATA/train[/val] with class folders, a folder of class folders, or a CSV")
    _add_config_args(p, BackboneConfig)
    _add_config_args(p, SplitConfig, only=("exclude",))
    p.add_argument("--val", help="a validation folder or CSV to check too (default: DATA/val if present)")
    p.add_argument("--format", choices=["table", "json"], default="table", help="a readable report, or JSON")
    p.add_argument("--cache", help="feature cache folder (default: $HEADSTART_CACHE or ~/.cache/headstart)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    _add_engine_arg(p)
    p.set_defaults(func=_cmd_check)

    p = _command(sub, "explain", "heatmaps of where the model looked, saved as overlays (LayerCAM by default)")
    p.add_argument("run", help="run folder written by `headstart train`")
    p.add_argument("paths", nargs="+", help="image files and folders (expanded to their images)")
    p.add_argument("--out", help="folder for the <name>.heatmap.png overlays (default: RUN/heatmaps)")
    p.add_argument("--class", dest="target", metavar="NAME", help="explain this class (default: the predicted one)")
    p.add_argument("--method", choices=EXPLAIN_METHODS, default="layercam", help="the class-activation map")
    p.set_defaults(func=_cmd_explain)

    p = _command(sub, "export", "the whole model (backbone + head) as one ONNX file with its metadata")
    p.add_argument("run", help="run folder written by `headstart train`")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="the file format")
    p.add_argument("--out", help="file to write (default: RUN/model.onnx)")
    p.set_defaults(func=_cmd_export)

    p = _command(sub, "serve", "an HTTP service (and a page at /) for a run or an exported ONNX file")
    p.add_argument("run", help="run folder, or an ONNX file from `headstart export`")
    _add_config_args(p, ServeConfig)
    _add_engine_arg(p)
    p.set_defaults(func=_cmd_serve)

    p = _command(sub, "shard", "write an image folder or CSV as tar shards (webdataset layout) for training at scale")
    p.add_argument("data", help="DATA/train[/val][/test] with class folders, a folder of class folders, or a CSV")
    p.add_argument("--out", required=True, help="folder to write the shards and dataset.json to (empty or new)")
    _add_config_args(p, ShardConfig)
    p.set_defaults(func=_cmd_shard)

    p = _command(sub, "demo", "offline end to end: digits as PNG folders -> train -> evaluate -> predict")
    p.add_argument("--out", default="headstart-demo", help="folder for the demo data and run")
    p.add_argument("--per-class", type=int, default=60, help="images per class to use")
    p.add_argument("--backbone", default="efficientnet_lite0", help="registry name (headstart backbones)")
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
        text = f"unexpected {type(exc).__name__}: {str(exc)[:300]}; run with --debug for the traceback"
    return "error: " + " ".join(text.split())  # one line, whatever the message held


@contextlib.contextmanager
def _log_above_progress_bars():
    """Log lines go through tqdm while a command runs, so in a terminal each one gets a line of its own instead
    of landing inside a progress bar's line."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm(tqdm_class=tqdm):
        yield


def main(argv: list[str] | None = None) -> int:
    """Run the command in ``argv``; returns the exit code (0 ok, 1 failure, 2 usage, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    # huggingface_hub prints through a handler of its own; passed on to ours too, each line would show twice
    logging.getLogger("huggingface_hub").propagate = False
    try:
        with _log_above_progress_bars():
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
    except Exception as exc:  # a bug or a case no check foresaw: still one line, the traceback on request
        if args.debug:
            raise
        print(error_message(exc), file=sys.stderr)
        return 1
    return 0


def command() -> None:
    """The ``headstart`` console command (and ``python -m headstart``): ``main()``, then exit with its code."""
    global _COMMAND
    _COMMAND = True
    code = main()
    # At exit the interpreter runs its cycle collector over every object torch, torchvision and timm made at
    # import (hundreds of thousands), which takes longer than most commands' own output. main() has closed its
    # files and locks, and what atexit and weakref finalizers do still runs; frozen, those objects are skipped.
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    command()
