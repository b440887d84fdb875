"""Inference engines for a frozen backbone: torch (inference mode, channels-last) or ONNX Runtime.

A runner (``headstart.protocols.Runner``) is a callable ``images (N, 3, H, W) float32 -> feature map
(N, C, h, w)`` over the same graph as ``backbone.body``; ``extract_features`` and the predictor take one
through ``runner=``.

    >>> runner = make_runner(backbone, engine="auto")   # ONNX Runtime when it is installed and exports work
    >>> runner.engine, runner(images).shape
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from .backbones.concat import ConcatBackbone
from .backbones.weights import state_digest
from .cache import FeatureCache
from .config import ENGINES
from .errors import ConfigError, EngineError
from .hardware import Hardware, default_threads
from .io import atomic_write

__all__ = ["ENGINES", "EngineError", "TorchRunner", "OnnxRunner", "LazyRunner", "ConcatRunner", "lazy_runner", "make_runner", "run_batches",
           "export_onnx", "backbone_onnx_path", "onnx_session", "set_torch_threads"]

log = logging.getLogger("headstart")

_EXPORT_VERSION = 1  # bump when the way graphs are exported changes, so cached files are rebuilt


# what to do about a graph ONNX Runtime cannot load: one in the engine cache is headstart's own to export again
CACHE_REMEDY = "delete the file to re-export it, or use --engine torch"


def set_torch_threads(threads: int | None = None) -> int:
    """Give torch's intra-op pool ``threads`` (default: the cores this process may use) and tune the allocator
    (``hardware.Hardware.apply``); returns the thread count."""
    return Hardware("cpu", threads or default_threads()).apply().threads


def _done(fn, x) -> Future:
    """``fn(x)`` run now, as a finished future (for runners that run one batch at a time)."""
    f: Future = Future()
    try:
        f.set_result(fn(x))
    except BaseException as exc:  # the caller's ``result()`` raises it, as a pool's future would
        f.set_exception(exc)
    return f


class TorchRunner:
    """Eager torch in inference mode with channels-last tensors (faster convolutions on CPU).

    Images are decoded in turns with its passes (``read_ahead = False``): torch's OpenMP threads spin-wait
    between operators, and a decode thread that takes one of their cores stalls the others at the next barrier
    (``benchmarks/turns.py`` measures both ways). On ``hardware.device == "cuda"`` the module runs on the GPU
    and features come back to the CPU.
    """

    engine = "torch"
    read_ahead = False
    lanes = 1

    def __init__(self, module: nn.Module, threads: int | None = None, channels_last: bool = True,
                 hardware: Hardware | None = None):
        self.module = module
        self.hardware = (hardware or Hardware("cpu", threads or default_threads())).apply()
        self.threads = self.hardware.threads
        self.channels_last = channels_last
        if self.hardware.cuda:
            module.to(self.hardware.device)
        if channels_last:
            # same values, another memory layout; state_dict digests and saved files are unchanged
            module.to(memory_format=torch.channels_last)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        was_training = self.module.training
        self.module.eval()  # a frozen backbone's batch norms use their running statistics, as in the export
        try:
            with torch.inference_mode():
                x = x.to(self.hardware.device)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                return self.module(x).contiguous().cpu()
        finally:
            self.module.train(was_training)

    def submit(self, x: torch.Tensor) -> Future:
        return _done(self, x)


class OnnxRunner:
    """An ONNX Runtime session over an exported graph with one image input and one output, run in lanes.

    By default each run uses one thread, and ``lanes`` runs (one per core) go at once on parts of the batch,
    with no barrier between operators: a core that the input pipeline takes for a moment delays one lane, not
    every operator of the pass. ``run_batches`` keeps the lanes busy across batches; a plain call splits the
    batch and joins. ``lanes=1`` is one run at a time on all ``threads`` (``benchmarks/speed.py`` compares
    the two). Idle threads sleep, so images are decoded while it runs (``read_ahead``).
    """

    engine = "onnx"
    read_ahead = True

    def __init__(self, path: str | Path, threads: int | None = None, lanes: int | None = None, output: int = 0,
                 remedy: str = CACHE_REMEDY):
        self.path = Path(path)
        threads = threads or default_threads()
        self.lanes = max(1, min(lanes or threads, threads))  # lanes=1: one run at a time on every thread
        self.output = output  # which of the graph's outputs a call returns
        self.session = onnx_session(path, threads // self.lanes, remedy)
        self.input_name = self.session.get_inputs()[0].name
        self._pool = ThreadPoolExecutor(self.lanes, thread_name_prefix="headstart-onnx")

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """One run on the calling thread."""
        arr = x.detach().contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: arr})[self.output])

    def submit(self, x: torch.Tensor) -> Future:
        """One run on a lane thread; its future gives the features."""
        return self._pool.submit(self.run, x)

    def outputs(self, arr: np.ndarray) -> list[np.ndarray]:
        """Every output of the graph on the batch ``arr``, its parts run at once on the lanes and joined (in numpy:
        torch.cat would wake torch's OpenMP team)."""
        chunks = [c for c in np.array_split(arr, self.lanes) if len(c)]
        if len(chunks) <= 1:
            return self.session.run(None, {self.input_name: arr})
        outs = list(self._pool.map(lambda c: self.session.run(None, {self.input_name: c}), chunks))
        return [np.concatenate(o) for o in zip(*outs)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.outputs(x.detach().contiguous().numpy())[self.output])


def run_batches(runner, batches: Iterable[tuple[list[int], torch.Tensor]]) -> Iterator[tuple[list[int], torch.Tensor]]:
    """``(indices, images)`` batches -> ``(indices, features)``, each through ``runner``.

    A runner with ``lanes > 1`` (``OnnxRunner``) gets each batch in ``lanes`` parts, run as lanes free up with
    one more part queued, so no lane waits for the caller or for the slowest part of a batch; results come
    as they finish, parts of batches and possibly out of order. Other runners are called once per batch, the
    next batch taken only after the last one's features are handed on (the torch engine takes turns).
    """
    lanes = runner.lanes
    if lanes <= 1:
        for idx, x in batches:
            with torch.inference_mode():
                yield idx, runner(x)
        return
    pending: dict[Future, list[int]] = {}
    try:
        for idx, x in batches:
            k = min(lanes, len(idx))
            for part, xs in zip(np.array_split(np.asarray(idx), k), torch.tensor_split(x, k)):
                while len(pending) > lanes:
                    yield from _finished(pending)
                pending[runner.submit(xs)] = part.tolist()
        while pending:
            yield from _finished(pending)
    finally:  # an error or an early stop: nothing is left running on the lanes
        for f in pending:
            f.cancel()
        wait(pending)


def _finished(pending: dict[Future, list[int]]) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Wait for at least one of ``pending`` and hand on (and forget) every finished one."""
    done, _ = wait(pending, return_when=FIRST_COMPLETED)
    for f in done:
        yield pending.pop(f), f.result()


def onnx_session(path: str | Path, threads: int | None = None, remedy: str = CACHE_REMEDY):
    """An ``onnxruntime.InferenceSession`` on the CPU with full graph optimisation and ``threads`` intra-op threads.

    Raises:
        EngineError: onnxruntime is not installed or the file is not a loadable graph.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise EngineError("the onnx engine needs onnxruntime (pip install onnxruntime); "
                          "or use --engine torch") from exc
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    # no busy-waiting between operators: the decode threads need those cycles on a small machine. The memory
    # arena stays on: without it peak memory is lower but the backbone slower (benchmarks/RESULTS.md)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors for unreadable graphs
        raise EngineError(f"ONNX Runtime cannot load {str(path)!r} ({type(exc).__name__}: {str(exc)[:200]}); "
                          f"{remedy}") from exc


def export_onnx(module: nn.Module, example: torch.Tensor, path: str | Path, *, input_name: str = "images",
                output_name: str | tuple[str, ...] = "features", metadata: dict[str, str] | None = None) -> Path:
    """Export ``module`` (eval mode, batch axis dynamic) to ``path`` atomically; ``metadata`` goes into
    the model's ``metadata_props``. ``output_name`` names the output (a tuple: several). Returns ``path``.

    Raises:
        EngineError: neither the TorchScript nor the dynamo exporter could translate the module.
    """
    try:
        import onnx
    except ImportError as exc:
        raise EngineError("exporting to ONNX needs the onnx package (pip install onnx); or use --engine torch") from exc

    path = Path(path)
    was_training = module.training
    module.eval()
    reasons = []
    try:
        for dynamo in (False, True):  # the TorchScript exporter is quicker and quiet; dynamo as a fallback
            buf = io.BytesIO()
            try:
                _export(module, example, buf, input_name, output_name, dynamo)
                model = onnx.load_from_string(buf.getvalue())
                break
            except Exception as exc:  # exporters raise many types; each means "try the other one"
                reasons.append(f"{'dynamo' if dynamo else 'torchscript'}: {type(exc).__name__}: {str(exc)[:200]}")
        else:
            raise EngineError(f"cannot export {type(module).__name__} to ONNX ({'; '.join(reasons)}); "
                              "use --engine torch")
    finally:
        module.train(was_training)
    for k, v in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    data = model.SerializeToString()
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return path


def _export(module, example, f, input_name, output_name, dynamo: bool) -> None:
    outputs = [output_name] if isinstance(output_name, str) else list(output_name)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            batch = torch.export.Dim("batch", min=1)
            torch.onnx.export(module, (example,), f, dynamo=True, input_names=[input_name],
                              output_names=outputs, dynamic_shapes=({0: batch},), verbose=False)
        else:
            torch.onnx.export(module, (example,), f, dynamo=False, input_names=[input_name],
                              output_names=outputs, opset_version=17, do_constant_folding=True,
                              dynamic_axes={name: {0: "batch"} for name in [input_name, *outputs]})


def _onnx_root(cache: FeatureCache | None) -> Path:
    return (cache or FeatureCache.default()).root.parent / "onnx"


def backbone_onnx_path(backbone, cache: FeatureCache | None = None) -> Path:
    """The backbone's graph as an ONNX file, exported on first use and kept next to the feature cache.

    Keyed like the feature cache: backbone name, weights digest and input size (plus the torch version
    and export scheme, which shape the graph).
    """
    # digest the weights as they are now: a backbone fine-tuned in place must not reuse an old graph
    key = {"backbone": backbone.name, "weights": state_digest(backbone.body.state_dict()),
           "input_size": list(backbone.data_config.input_size), "torch": torch.__version__.split("+")[0],
           "export": _EXPORT_VERSION}
    path = _onnx_root(cache) / f"{FeatureCache.namespace(key)}.onnx"
    digest_path = path.with_suffix(".sha256")
    if path.exists():
        try:
            recorded = digest_path.read_text(encoding="ascii").strip()
        except OSError:
            recorded = None
        if recorded is not None and recorded == _file_digest(path):
            return path
        # a graph that is not the one exported (damaged on disk, or its digest lost) would give wrong
        # features silently, and they would go into the feature cache: export it again
        log.warning("the cached ONNX graph %s does not match its recorded digest; exporting it again", path)
    log.info("exporting %s to ONNX (%s); once per backbone and weights", backbone.name, path)
    example = torch.zeros(2, 3, *backbone.data_config.input_size)
    export_onnx(backbone.body, example, path, metadata={"headstart_key": json.dumps(key, sort_keys=True)})
    atomic_write(digest_path, lambda tmp: Path(tmp).write_text(_file_digest(path) + "\n", encoding="ascii"))
    return path


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make_runner(backbone, engine: str = "auto", batch_size: int = 32, *, threads: int | None = None,
                cache: FeatureCache | None = None, hardware: Hardware | None = None):
    """A runner for ``backbone`` on ``engine``: ``"torch"``, ``"onnx"``, or ``"auto"`` (ONNX Runtime when it
    is installed and the export works, else torch; the reason is logged). ONNX Runtime is the default on the
    CPU because it was the faster or on par for every backbone in ``benchmarks/speed.py``; on a GPU
    (``hardware.device == "cuda"``) ``auto`` means torch.

    ``batch_size`` is the batch the runner will see (kept for engines that specialise on it).
    ``cache`` decides where exported graphs are kept (next to its feature folder; default: the default cache).
    ``hardware`` (default: the CPU with ``threads``) is where the torch engine runs.

    Raises:
        ConfigError: an unknown engine name.
        EngineError: ``engine="onnx"`` and ONNX Runtime cannot run this backbone.
    """
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)} (--engine)")
    hardware = hardware or Hardware("cpu", threads or default_threads())
    if engine == "torch" or (engine == "auto" and hardware.cuda):
        return TorchRunner(backbone.body, hardware=hardware)
    try:
        return OnnxRunner(backbone_onnx_path(backbone, cache), hardware.threads)
    except (EngineError, OSError) as exc:
        if engine == "onnx":
            raise EngineError(str(exc)) if isinstance(exc, OSError) else exc
        log.info("engine auto: using torch, because ONNX Runtime is not usable here (%s)", exc)
        return TorchRunner(backbone.body, hardware=hardware)


class LazyRunner:
    """``make_runner(backbone, engine, ...)`` on the first call, so work served from the feature cache
    exports and loads nothing; later calls reuse the same runner (one ONNX session for train, val and test)."""

    def __init__(self, backbone, engine: str = "auto", batch_size: int = 32, **kwargs):
        if engine not in ENGINES:
            raise ConfigError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)} (--engine)")
        self.backbone, self.requested, self.batch_size, self.kwargs = backbone, engine, batch_size, kwargs
        self.runner = None

    @property
    def engine(self) -> str | None:
        """The engine in use (``None`` until the first batch)."""
        return self.runner.engine if self.runner is not None else None

    def _made(self):
        if self.runner is None:
            self.runner = make_runner(self.backbone, self.requested, self.batch_size, **self.kwargs)
        return self.runner

    @property
    def read_ahead(self) -> bool:
        """Whether images should be decoded while this runner computes (makes the runner when asked)."""
        return self._made().read_ahead

    @property
    def lanes(self) -> int:
        """How many runs go at once (see ``run_batches``; makes the runner when asked)."""
        return self._made().lanes

    def submit(self, x: torch.Tensor) -> Future:
        return self._made().submit(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._made()(x)


class ConcatRunner:
    """One ``LazyRunner`` per member of a ``ConcatBackbone`` (``members``, which ``extract_features`` uses);
    called on one prepared tensor per member, it returns their joined features."""

    def __init__(self, backbone: ConcatBackbone, engine: str = "auto", batch_size: int = 32, **kwargs):
        self.backbone = backbone
        self.members = [LazyRunner(m, engine, batch_size, **kwargs) for m in backbone.members]

    @property
    def engine(self) -> str | None:
        engines = [r.engine for r in self.members]
        return None if all(e is None for e in engines) else "+".join(str(e) for e in engines)

    def __call__(self, images) -> torch.Tensor:
        return self.backbone.join([r(x) for r, x in zip(self.members, images)])


def lazy_runner(backbone, engine: str = "auto", batch_size: int = 32, **kwargs):
    """``LazyRunner`` for a backbone (or a feature source), ``ConcatRunner`` for a concatenation."""
    kind = ConcatRunner if isinstance(backbone, ConcatBackbone) else LazyRunner
    return kind(backbone, engine, batch_size, **kwargs)
