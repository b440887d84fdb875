"""The Python facade: ``ImageClassifier`` (scikit-learn conventions) and ``load``.

    >>> clf = ImageClassifier(backbone="vgg16", input_size=150).fit("data/train", val="data/val")
    >>> clf.predict("cat.jpg"), clf.predict(["photos/", picture]), clf.score("data/test"), clf.classes_
    >>> clf.save("run"); clf = load("run")
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from .backbones import registry
from .backbones.base import EXTRACTION_BATCH, Backbone, create_backbone
from .backbones.concat import ConcatBackbone, refuse_concatenation
from .config import BackboneConfig, EngineConfig, HeadConfig, Recipe, SplitConfig, TrainConfig
from .data.datasets import Dataset, Splits, load_dataset, load_splits, read_path_list, without_paths
from .data.images import source_name
from .data.inputs import image_inputs
from .data.suspects import find_suspects
from .distributed import join
from .errors import ConfigError, DatasetError, ImageReadError, NotFittedError
from .evaluation import classification_metrics
from .export import OnnxModel, is_onnx_file
from .features import FeatureCache, cache_key, features_shape, members
from .hardware import Hardware, default_threads
from .heads import Head
from .label_errors import find_label_errors
from .model import ImageModel
from .predict import Predictor
from .runfolder import (CHECKPOINTS, bind_checkpoints, check_new_run, check_run_room, remove_checkpoints, replacing_run,
                        writing_run)
from .runs import RunReport, load_model, save_model, write_history, write_json
from .training.recipes import TrainResult, check_concatenation, feature_pool, find_lr, train_recipe

__all__ = ["ImageClassifier", "load"]

log = logging.getLogger("headstart")


class ImageClassifier:
    """A frozen pretrained backbone with a new head, trained on cached features.

    Args:
        backbone: registry name (``headstart backbones``) or ``timm:<model>``; several joined by ``+``
            (``"efficientnet_lite0+efficientnet_lite2"``) concatenate their pooled features (frozen strategies
            only, each member with its own preprocessing; ``backbones.concat``).
        weights: ``"imagenet"``, a weights file path, or ``None`` (random).
        input_size: image side in pixels; default: the weights' own.
        head: ``"flatten"`` or ``"avg"``; default: the backbone's (VGG: flatten, others: avg).
        hidden, dropout: Dense layers before the classifier, and dropout before each.
        cache: a folder for the feature cache, ``True`` for the default one, ``False`` for none.
        val_fraction: share of each class held out for validation when no val set is given.
        exclude: a text file of image paths (one per line, ``#`` comments) left out of train and val.
        strategy, augment, views, unfreeze, finetune_epochs, finetune_lr, finetune_rates: the training ``Recipe``.
        tta: average predictions over the image and its mirror (predict and evaluate).
        head_search: ``"auto"`` (frozen strategy): the head's size, regularisation and epochs chosen by
            cross-validation on train (on val from 500 images; ``training.select``); ``"off"``: as given.
        engine: runs the frozen backbone: ``"auto"`` (ONNX Runtime when usable, else torch), ``"torch"``, ``"onnx"``.
        The remaining arguments are ``TrainConfig`` fields.
    """

    def __init__(self, backbone: str = "efficientnet_lite0", weights: str | Path | None = "imagenet",
                 input_size: int | None = None, head: str | None = None, hidden: tuple[int, ...] = (),
                 dropout: float = 0.0, epochs: int = 60, batch_size: int = 32, lr: float = 1e-3,
                 weight_decay: float = 5.0, patience: int = 10, class_weight: str | None = None,
                 label_smoothing: float = 0.0, seed: int = 0, cache: bool | str | Path = True,
                 val_fraction: float = 0.2, exclude: str | Path | None = None, progress: bool | None = None,
                 strategy: str = "frozen",
                 augment: str | None = None, views: int = 5, unfreeze: int | None = None,
                 finetune_epochs: int = 15, finetune_lr: float | None = None, finetune_rates: int = 3,
                 tta: bool = False, engine: str = "auto", device: str = "auto", head_search: str = "auto"):
        # scikit-learn's rule: parameters are kept as given; the configs are built from them (and checked) here
        # and again whenever a parameter is changed by hand before fit
        self.backbone, self.weights, self.input_size = backbone, weights, input_size
        self.head, self.hidden, self.dropout = head, tuple(hidden), dropout
        self.epochs, self.batch_size, self.lr, self.weight_decay = epochs, batch_size, lr, weight_decay
        self.patience, self.class_weight, self.label_smoothing, self.seed = patience, class_weight, label_smoothing, seed
        self.head_search = head_search
        self.strategy, self.augment, self.views, self.unfreeze = strategy, augment, views, unfreeze
        self.finetune_epochs, self.finetune_lr, self.finetune_rates = finetune_epochs, finetune_lr, finetune_rates
        self.val_fraction, self.exclude, self.engine, self.device = val_fraction, exclude, engine, device
        self.cache, self.progress, self.tta = cache, progress, tta
        self._configs()

    def _configs(self) -> dict:
        """The config dataclasses for the current parameters (``headstart.config``); raises ConfigError."""
        check_concatenation(self.backbone, self.strategy, self.head, self.input_size, self.weights)
        return {
            "backbone": BackboneConfig(self.backbone, self.weights, self.input_size),
            "head": HeadConfig(self.head, tuple(self.hidden), self.dropout),
            "train": TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                                 weight_decay=self.weight_decay, patience=self.patience,
                                 class_weight=self.class_weight, label_smoothing=self.label_smoothing, seed=self.seed,
                                 head_search=self.head_search),
            "recipe": Recipe(strategy=self.strategy, augment=self.augment, views=self.views, unfreeze=self.unfreeze,
                             finetune_epochs=self.finetune_epochs, finetune_lr=self.finetune_lr,
                             finetune_rates=self.finetune_rates),
            "split": SplitConfig(self.val_fraction, None if self.exclude is None else str(self.exclude)),
            "engine": EngineConfig(self.engine, self.device),
        }

    @property
    def train_config(self) -> TrainConfig:
        return self._configs()["train"]

    @property
    def recipe(self) -> Recipe:
        return self._configs()["recipe"]

    # -- training -----------------------------------------------------------------------------
    def _feature_cache(self) -> FeatureCache | None:
        if self.cache is False or self.cache is None:
            return None
        return FeatureCache.default() if self.cache is True else FeatureCache(self.cache)

    def _hardware(self) -> Hardware:
        hardware = Hardware.resolve(self.device)
        return join(hardware.device).share(hardware).apply()  # under torchrun, a rank takes its share of the cores

    def fit(self, data: str | Path | Splits, val: str | Path | None = None, test: str | Path | None = None, *,
            out: str | Path | None = None, resume: bool = False, overwrite: bool = False) -> "ImageClassifier":
        """Train on ``data``; returns ``self``. What the training did is in ``report_``.

        ``data`` takes the layouts ``headstart train`` takes: a folder with ``train/`` (and ``val/``, ``test/``),
        a folder of class folders, or a CSV of ``path,label`` rows (``load_splits``); or the ``Splits`` that
        ``load_splits`` returned. ``val`` and ``test`` name other folders or CSVs for those sets.

        With ``out``, checkpoints go to ``out/checkpoints`` as training runs (``save(out)`` removes them), and
        ``resume=True`` continues from them (feature extraction resumes from the cache). A folder that already
        holds a run is refused unless ``overwrite`` (its checkpoints are deleted now, its other files when the
        new run is saved) or ``resume``.

        Under ``torchrun`` (``torchrun --nproc-per-node N script.py``), every rank calls ``fit``: the ranks share
        the extraction (and fine-tuning), rank 0 ends with the trained classifier, and the others with ``rank_``
        set and no model (``save`` writes nothing there).

        Raises:
            DatasetError: fewer than two classes, an empty class, unknown classes in val/test,
                or a class left with no readable image.
            StorageError: ``out`` holds a run, and neither ``overwrite`` nor ``resume`` is set; or another
                writer (a ``headstart train``, another ``fit``) is writing to ``out``.
        """
        # one writer to a run folder at a time, as for `headstart train` (whose lock this joins when it holds it);
        # under torchrun rank 0 alone writes the run
        primary = os.environ.get("RANK", "0") == "0"
        with writing_run(out) if out is not None and primary else contextlib.nullcontext():
            return self._fit(data, val, test, out=out, resume=resume, overwrite=overwrite)

    def _fit(self, data, val, test, *, out, resume: bool, overwrite: bool) -> "ImageClassifier":
        t_start = time.perf_counter()
        configs = self._configs()
        if out is not None:
            check_new_run(out, overwrite=overwrite, resume=resume)
            if overwrite and not resume and remove_checkpoints(out):
                log.info("--overwrite: removed the checkpoints of the earlier run in %s", out)
        hardware = self._hardware()
        dist = join(hardware.device)
        self.rank_ = dist.rank
        if isinstance(data, Splits):
            if val is not None or test is not None:
                raise ConfigError("fit got Splits and val/test too; put the val and test sets in load_splits(...)")
            splits = data
        else:
            splits = load_splits(data, val=val, test=test, val_fraction=self.val_fraction, seed=self.seed)
        splits, excluded = _excluding(splits, self.exclude)
        backbone = create_backbone(self.backbone, self.weights, self.input_size, batch=EXTRACTION_BATCH).freeze()
        log.info("backbone %s (%s), input %s, features %s, strategy %s", backbone.name, backbone.weights_source,
                 " + ".join("x".join(map(str, m.data_config.input_size)) for m in members(backbone)),
                 "x".join(map(str, backbone.feature_shape)), configs["recipe"].strategy)
        head = Head(configs["head"].resolved(backbone.default_head), backbone.feature_shape,
                    len(splits.train.classes))
        cache = self._feature_cache()
        if cache is not None:  # a doomed cache fails now, not an hour into extraction
            _check_cache_room(cache, configs["recipe"], backbone, head, splits)
        if out is not None and dist.primary:  # a full disk is found now, not when the trained model is saved
            check_run_room(out, _nbytes(backbone) + _nbytes(head),
                           3 * (_nbytes(head) + (_nbytes(backbone) if configs["recipe"].strategy == "finetune" else 0)))
        if out is not None and dist.primary:
            bind_checkpoints(out, _resume_key(splits, backbone, head, configs), resume)
        result = train_recipe(configs["recipe"], backbone, splits, head, configs["train"], cache,
                              checkpoint_dir=Path(out) / "checkpoints" if out else None, resume=resume,
                              progress=self.progress if dist.primary else False, engine=self.engine,
                              hardware=hardware, dist=dist)
        if not dist.primary:  # rank 0 holds the result and writes the run
            return self
        self.model_ = ImageModel(backbone, result.head, splits.train.classes).eval()  # the chosen head
        self.classes_ = list(splits.train.classes)
        self.history_ = result.history
        self.metrics_ = {}
        self.val_proba_ = None
        if result.val_features is not None and len(result.val_ok):
            self.val_proba_ = np.full((len(splits.val), len(self.classes_)), np.nan, dtype=np.float32)
            self.val_proba_[result.val_ok] = self.model_.scores(result.val_features)
            self.metrics_["val"] = classification_metrics(splits.val.labels[result.val_ok],
                                                          self.val_proba_[result.val_ok].argmax(1), self.classes_)
        if splits.test is not None:
            try:
                self.metrics_["test"] = self.evaluate(splits.test.root)
            except DatasetError as exc:  # an unusable test set must not throw the trained model away
                log.warning("the test set was not evaluated: %s", exc)
        self.report_ = _report(splits, result, configs["recipe"], backbone, cache, self.metrics_, self.history_)
        self.report_.excluded, self.report_.exclude_unmatched = excluded
        found = _label_errors(splits.train, result, self.seed)
        if found is not None:
            self.report_.label_errors, self.report_.duplicates_across_classes = found.suspects, found.duplicates
            self.report_.label_check_agreement = round(found.agreement, 4)
            self.report_.seconds["label_errors"] = found.seconds
        self.report_.seconds |= result.seconds | {"total": time.perf_counter() - t_start}
        return self

    def lr_find(self, data: str | Path | Splits, val: str | Path | None = None):
        """The learning-rate range test for fine-tuning (``training.lr_find``): the head trained on the cached
        boundary activations of ``data``'s training images, then the loss against a rising learning rate over
        the layer groups ``strategy="finetune"`` trains. Returns an ``LrFind`` (the curve, ``suggestion``); the
        classifier itself is not trained by it."""
        import dataclasses

        configs = self._configs()
        recipe = dataclasses.replace(configs["recipe"], strategy="finetune")
        splits = data if isinstance(data, Splits) else load_splits(data, val=val, val_fraction=self.val_fraction,
                                                                    seed=self.seed)
        backbone = create_backbone(self.backbone, self.weights, self.input_size).freeze()
        refuse_concatenation(backbone, "lr-find")
        head = Head(configs["head"].resolved(backbone.default_head), backbone.feature_shape,
                    len(splits.train.classes))
        return find_lr(recipe, backbone, splits, head, configs["train"], self._feature_cache(),
                       progress=self.progress, engine=self.engine, hardware=self._hardware())

    # -- using a trained model ------------------------------------------------------------------
    def _check(self):
        if not hasattr(self, "model_") and getattr(self, "rank_", 0) != 0:
            raise NotFittedError(f"This process is rank {self.rank_} of a torchrun group; rank 0 holds the trained "
                                 "classifier and writes the run folder.")
        if not hasattr(self, "model_"):
            raise NotFittedError("This ImageClassifier is not trained yet; call .fit(data) or headstart.load(run).")

    def predictor(self) -> Predictor:
        """A ``Predictor`` over the trained model; one per classifier and engine, so its engine is built once."""
        self._check()
        key = (id(self.model_), self.engine, self.device, self.tta)
        if getattr(self, "_predictor_key", None) != key:
            self._predictor_ = Predictor(self.model_, engine=self.engine, tta=self.tta, hardware=self._hardware(),
                                         cache=self._feature_cache())
            self._predictor_key = key
        return self._predictor_

    def predict_proba(self, data) -> np.ndarray:
        """Class probabilities, columns in ``classes_`` order: ``(n_classes,)`` for one image, ``(N, n_classes)``
        for several, with a NaN row for each one that could not be read (it is logged as skipped).

        ``data``: one image (a file path, bytes, a binary file, a PIL image, an ``(H, W, 3)`` uint8 array), a
        folder (its images, as ``headstart predict`` expands it), or a list of these (``data.inputs``).

        Raises:
            ImageReadError: ``data`` is one image and it cannot be read.
            ConfigError: ``data`` is not an image or a list of them.
        """
        images, one = image_inputs(data)
        probs, errors, _ = self.predictor().probabilities(images, progress=self.progress)
        if not one:
            return probs
        if errors:
            raise ImageReadError(source_name(images[0]), errors[0])
        return probs[0]

    def predict(self, data) -> str | list[str | None]:
        """The most probable class name: one name for one image, a list for several (``None`` for an image
        that could not be read). ``data`` as for ``predict_proba``."""
        probs = self.predict_proba(data)
        if probs.ndim == 1:
            return self.classes_[int(probs.argmax())]
        return [None if np.isnan(row).any() else self.classes_[int(row.argmax())] for row in probs]

    def score(self, data, y=None) -> float:
        """Accuracy, as scikit-learn's classifiers give it: on a labelled class-folder tree or CSV (``evaluate``'s
        data), or, with ``y``, of ``predict(data)`` against the true class names ``y``. Unreadable images are
        left out.

        Raises:
            ConfigError: ``y`` names a class the model lacks, or its length differs from the images'.
            DatasetError: ``data`` is not a labelled layout (without ``y``).
        """
        if y is None:
            return self.evaluate(data)["accuracy"]
        pred = self.predict(data)
        pred, y = ([pred], [y]) if isinstance(pred, str) else (pred, list(y))
        if len(y) != len(pred):
            raise ConfigError(f"score got {len(pred)} image(s) but {len(y)} label(s); give one class name per image")
        unknown = sorted({str(t) for t in y} - set(self.classes_))
        if unknown:
            raise ConfigError(f"score: label(s) {unknown} are not classes of this model ({', '.join(self.classes_)})")
        read = [(p, str(t)) for p, t in zip(pred, y) if p is not None]
        if not read:
            raise ConfigError("score: none of the images could be read (see the skipped lines above)")
        return sum(p == t for p, t in read) / len(read)

    def evaluate(self, data: str | Path | Dataset) -> dict:
        """Metrics on a labelled class-folder tree or CSV (or a ``Dataset`` read with this model's classes);
        unreadable files are listed under ``skipped``.

        ``backbone_passes`` and ``from_cache`` count every view of each image (``views``: 2 with ``tta``).

        Raises:
            DatasetError: ``data`` has no class folders (or labels) of this model.
        """
        ds, probs, ex = self.labelled_proba(data)
        ok = [i for i in range(len(ds)) if i not in ex.failed]
        m = classification_metrics(ds.labels[ok], probs[ok].argmax(1), self.classes_)
        return m | {"skipped": ex.errors, "backbone_passes": ex.computed, "from_cache": ex.cached, "views": ex.views,
                    "tta": self.tta}

    def labelled_proba(self, data: str | Path | Dataset):
        """``(dataset, probabilities, extraction)`` for labelled data (``evaluate``'s): the probabilities have a NaN
        row for each unreadable image (``extraction.failed`` says why); features come from the cache when it
        holds them.

        Raises:
            DatasetError: ``data`` has no class folders (or labels) of this model, or none of its images reads.
        """
        self._check()
        ds = data if isinstance(data, Dataset) else load_dataset(data, self.classes_)
        t0 = time.perf_counter()
        probs, failed, ex = self.predictor().probabilities(ds.paths, cache=self._feature_cache(),
                                                           progress=self.progress)
        views = f" x {ex.views} views (the image and its mirror)" if ex.views > 1 else ""
        log.info("evaluated %d images%s: %d through the backbone, %d from the cache, %d skipped (%.1f s)", len(ds),
                 views, ex.computed, ex.cached, len(failed), time.perf_counter() - t0)
        if len(failed) == len(ds):
            raise DatasetError(f"none of the {len(ds)} images in {ds.root!r} could be read (see the skipped lines); "
                               "nothing to evaluate")
        return ds, probs, ex

    def explain(self, images, target: str | int | None = None, method: str = "layercam") -> list[np.ndarray | None]:
        """Heatmaps of where the model looked: one float32 ``(H, W)`` array in [0, 1] per image, at the model's
        input size, for ``target`` (a class name or index; default: each image's predicted class). ``images``
        as for ``predict_proba``; an unreadable image gives ``None`` (one image: ``ImageReadError``). The
        pictures, labels and overlays: ``headstart.explain.explain`` and ``overlay``.

        Raises:
            ConfigError: an unknown class or ``method`` (``config.EXPLAIN_METHODS``), or a model loaded from an
                exported ONNX file (explain from its run folder).
            ImageReadError: ``images`` is one image and it cannot be read.
        """
        from .explain import explain

        sources, one = image_inputs(images)
        found = explain(self, sources, target=target, method=method)
        if one and found[0].error:
            raise ImageReadError(found[0].source, found[0].error)
        return [e.heatmap for e in found]

    # -- persistence ----------------------------------------------------------------------------
    def save(self, out: str | Path, *, keep_checkpoints: bool = False) -> Path:
        """Write the run folder (safetensors + JSON + history CSV) as one unit; returns its path.

        The files are written into a folder beside ``out`` that then replaces ``out`` whole, so a reader (or a
        save killed midway) finds the old run or the new one, never a mix; files headstart did not write in
        ``out`` are kept. The run is finished once saved, so the training checkpoints in ``out/checkpoints`` are
        deleted unless ``keep_checkpoints``.

        Raises:
            StorageError: another writer is writing to ``out``.
        """
        if getattr(self, "rank_", 0) != 0:  # on torchrun ranks other than 0: rank 0 writes the run
            return Path(out)
        self._check()
        if isinstance(self.model_, OnnxModel):
            raise ConfigError(f"this classifier was loaded from the exported file {self.model_.path}; it is "
                              "already saved. Save from the run folder it was exported from.")
        out = Path(out)
        configs = self._configs()
        training = {"train_config": configs["train"].to_dict(), "recipe": configs["recipe"].to_dict(),
                    "val_fraction": self.val_fraction, "engine": self.engine, "weights": _weights_name(self.weights)}
        report = getattr(self, "report_", None)
        if report is not None and report.head_selection:
            training["head_selection"] = report.head_selection
        had_checkpoints = (out / CHECKPOINTS).is_dir()
        # every file into a new folder, then that folder in place of out at once: an interrupted save leaves
        # the old run whole, and nothing of the old run (its report, an exported model.onnx) outlives it
        with writing_run(out), replacing_run(out, keep=(CHECKPOINTS,) if keep_checkpoints else ()) as new:
            save_model(self.model_, new, training)
            write_json(new / "metrics.json", getattr(self, "metrics_", {}))
            write_history(new / "history.csv", getattr(self, "history_", []))
            if report is not None:
                write_json(new / "data.json", report.data_json())
        if had_checkpoints and not keep_checkpoints:
            log.info("removed the training checkpoints in %s (the run is saved; --keep-checkpoints keeps them)", out)
        return out

    @classmethod
    def load(cls, run: str | Path) -> "ImageClassifier":
        if is_onnx_file(run):
            onnx_model = OnnxModel(run)
            clf = cls(backbone=onnx_model.backbone_identity.get("name", "unknown"),
                      head=onnx_model.head_config.get("pool"), engine="onnx")
            clf.model_, clf.classes_ = onnx_model, list(onnx_model.classes)
            clf.config_ = {"format": "headstart-onnx-model", "classes": clf.classes_,
                           "data_config": onnx_model.data_config.to_dict(), "backbone": onnx_model.backbone_identity,
                           "head": onnx_model.head_config, "headstart_version": onnx_model.headstart_version}
            return clf
        model, config = load_model(run)
        clf = cls(backbone=config["backbone"]["name"], head=config["head"]["pool"],
                  hidden=tuple(config["head"]["hidden"]), dropout=config["head"]["dropout"],
                  **_trained_with(config.get("training", {}), _input_size(model.backbone)))
        clf.model_, clf.classes_ = model, list(model.classes)
        clf.config_ = config
        return clf


def _resume_key(splits: Splits, backbone, head, configs: dict) -> dict:
    """What checkpoints belong to: a resumed run must have the same data (files and labels), classes, backbone,
    head and recipe; only the epoch limits may change."""
    def files(ds):
        if ds is None:
            return None
        rows = json.dumps([[str(p), int(y)] for p, y in ds.samples])
        return hashlib.sha256(rows.encode()).hexdigest()[:16]
    train = {k: v for k, v in configs["train"].to_dict().items() if k not in ("epochs", "patience")}
    recipe = {k: v for k, v in configs["recipe"].to_dict().items() if k != "finetune_epochs"}
    return {"data": {"train": files(splits.train), "val": files(splits.val)}, "classes": list(splits.train.classes),
            "backbone": backbone.identity(), "head": head.config.to_dict(), "recipe": recipe | {"train": train}}


def _nbytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def load(run: str | Path) -> ImageClassifier:
    """A trained classifier from a run folder, or from an ONNX file written by ``headstart export``
    (prediction and evaluation only; it runs on ONNX Runtime)."""
    return ImageClassifier.load(run)


def _input_size(backbone) -> tuple[int, int] | None:
    """A backbone's input size; None for a concatenation, whose members each have their own."""
    return None if isinstance(backbone, ConcatBackbone) else backbone.data_config.input_size


def _trained_with(training: dict, input_size: tuple[int, int] | None) -> dict:
    """The ``ImageClassifier`` parameters a run was trained with, from its config's ``training`` part (older
    runs lack some; those keep their defaults)."""
    params = {"input_size": None if input_size is None
              else input_size[0] if input_size[0] == input_size[1] else tuple(input_size)}
    if "weights" in training:
        params["weights"] = training["weights"]
    train = dict(training.get("train_config", {}))
    for name in ("epochs", "batch_size", "lr", "weight_decay", "patience", "class_weight", "label_smoothing", "seed",
                 "head_search"):
        if name in train:
            params[name] = train[name]
    recipe = dict(training.get("recipe", {}))
    for name in ("strategy", "views", "unfreeze", "finetune_epochs", "finetune_lr", "finetune_rates"):
        if name in recipe:
            params[name] = recipe[name]
    if recipe.get("augment") and recipe.get("strategy") != "frozen":
        params["augment"] = recipe["augment"]
    if "val_fraction" in training:
        params["val_fraction"] = training["val_fraction"]
    return params


def _excluding(splits: Splits, exclude) -> tuple[Splits, tuple[list[str], list[str]]]:
    """``splits`` without the images listed in the file ``exclude`` (train and val); with what was left out and
    the lines that named no image."""
    if exclude is None:
        return splits, ([], [])
    listed = read_path_list(exclude)
    train, out_train, left = without_paths(splits.train, listed, Path(exclude).parent)
    val, out_val = splits.val, []
    if splits.val is not None:
        val, out_val, left_val = without_paths(splits.val, listed, Path(exclude).parent)
        left = [line for line in left if line in set(left_val)]
    log.info("--exclude %s: left out %d image(s) listed there", exclude, len(out_train) + len(out_val))
    if left:
        log.warning("%d line(s) of %s name no image of the data, e.g. %s", len(left), exclude, left[0])
    return Splits(train, val, splits.test, splits.split_note), (out_train + out_val, left)


def _label_errors(train: Dataset, result, seed: int):
    """Likely label errors among the training images, from the features a frozen run's head reads (a fine-tuned
    run's extraction holds the maps at its boundary: they are taken through the top before it was fine-tuned);
    a failure is a warning."""
    feats, ok = result.train_features, result.train_ok
    if feats is None:
        feats, ok = result.train_extraction.features, result.train_extraction.ok
    try:
        found = find_label_errors(feats.numpy(), train.labels[ok], train.classes, [str(train.paths[i]) for i in ok],
                                  seed=seed)
    except Exception as exc:  # noqa: BLE001 - the model is trained; listing suspects must never lose it
        log.warning("the label-error check did not run (%s: %s); the model is saved as usual", type(exc).__name__, exc)
        return None
    if found.suspects:
        log.warning("%d training image(s) look mislabelled to a check that predicts %.0f%% of the given labels: see "
                    "data.json (label_errors) or the report; e.g. %s (labelled %s, looks like %s)",
                    len(found.suspects), 100 * found.agreement, found.suspects[0]["path"],
                    found.suspects[0]["given"], found.suspects[0]["suggested"])
    if found.duplicates:
        log.warning("%d near-duplicate pair(s) are filed under different classes (data.json: "
                    "duplicates_across_classes), e.g. %s and %s", len(found.duplicates), found.duplicates[0]["a"],
                    found.duplicates[0]["b"])
    return found


def _weights_name(weights) -> str | None:
    return None if weights is None else str(weights)


def _check_cache_room(cache: FeatureCache, recipe: Recipe, backbone: Backbone, head: Head, splits: Splits) -> None:
    views = 1 + (recipe.views if recipe.strategy != "frozen" else 0)
    n_images = sum(len(d) * (views if d is splits.train else 1)
                   for d in (splits.train, splits.val, splits.test) if d is not None)
    pool = feature_pool(recipe, head)
    if isinstance(backbone, ConcatBackbone):  # each member stores its own averages
        for m in backbone.members:
            cache.check_room(n_images, features_shape(m, "avg"), cache_key(m, pool="avg"))
        return
    cache.check_room(n_images, features_shape(backbone, pool), cache_key(backbone, pool=pool))


def _report(splits: Splits, result: TrainResult, recipe: Recipe, backbone: Backbone, cache: FeatureCache | None,
            metrics: dict, history: list[dict]) -> RunReport:
    tr, va = result.train_extraction, result.val_extraction
    suspects = _suspects(splits.train, tr) + (_suspects(splits.val, va) if va else [])
    if suspects:
        log.warning("%d suspect image(s) kept in the data (listed in data.json under suspect_images), e.g. %s: %s",
                    len(suspects), suspects[0]["path"], suspects[0]["reason"])
    duplicates = _shared_images(splits.train, tr.digests, splits.val, va.digests if va else [])
    if duplicates:
        log.warning("%d image(s) appear in both train and val (same content), e.g. %s; val accuracy will be "
                    "optimistic", len(duplicates), duplicates[0])
    return RunReport(
        split=splits.split_note, classes=list(splits.train.classes), recipe=recipe.to_dict(),
        backbone=backbone.identity(), train_counts=splits.train.counts(),
        val_counts=splits.val.counts() if splits.val is not None else {},
        skipped_unreadable=result.errors, ignored=splits.train.ignored, train_val_duplicates=duplicates,
        suspect_images=suspects, val_files=[str(p) for p in splits.val.paths] if splits.val is not None else [],
        val_labels=[splits.val.classes[y] for y in splits.val.labels] if splits.val is not None else [],
        cache_recomputed=[{"image": img, "entry": entry, "reason": why}
                          for img, entry, why in tr.recomputed + (va.recomputed if va else [])],
        cache_write_error=cache.write_error if cache is not None else None,
        backbone_passes=result.passes, from_cache=result.cached,
        best=next((h for h in history if h.get("best")), history[-1] if history else {}), metrics=metrics,
        stages=stage_bests(history), head_selection=result.selection, lr_find=result.lr_find)


def stage_bests(history: list[dict]) -> dict[str, dict]:
    """Each training stage's best epoch (lowest monitored loss: validation, else training), by stage name. A head
    refitted on all of train after cross-validation has validation scores on its saved epoch only: that one."""
    out: dict[str, dict] = {}
    for stage in dict.fromkeys(r.get("stage", "head") for r in history):
        rows = [r for r in history if r.get("stage", "head") == stage]
        scored = [r for r in rows if "val_loss" in r]
        out[stage] = min(scored, key=lambda r: r["val_loss"]) if scored else min(rows, key=lambda r: r["train_loss"])
    return out


def _suspects(ds: Dataset, ex) -> list[dict]:
    """Suspect images among the readable files of ``ds`` (see ``data.suspects``)."""
    return find_suspects([ds.paths[i] for i in ex.ok], ds.labels[ex.ok].tolist(), ds.classes,
                         [ex.digests[i] for i in ex.ok], threads=default_threads())


def _shared_images(train: Dataset, train_digests, val: Dataset | None, val_digests) -> list[list[str]]:
    if val is None:
        return []
    seen = {d: str(p) for p, d in zip(train.paths, train_digests) if d}
    return [[seen[d], str(p)] for p, d in zip(val.paths, val_digests) if d and d in seen]
