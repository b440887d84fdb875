"""Data: datasets (folders, CSV), image reading and hygiene, transforms.

Names load on first use: finding and counting the images of a data set (``datasets``, ``files``) needs no
torch, so a command reports its data (or a wrong path) before the model libraries are imported.
"""

from importlib import import_module

__all__ = ["Dataset", "Splits", "load_dataset", "load_splits", "scan_folder", "IMAGE_EXTENSIONS", "load_image",
           "EvalTransform", "image_inputs"]

_WHERE = {"Dataset": ".datasets", "Splits": ".datasets", "load_dataset": ".datasets", "load_splits": ".datasets",
          "scan_folder": ".datasets", "IMAGE_EXTENSIONS": ".files", "load_image": ".images",
          "EvalTransform": ".transforms", "image_inputs": ".inputs"}


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'headstart.data' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
