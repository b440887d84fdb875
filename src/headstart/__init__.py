"""headstart: transfer learning on images. A pretrained backbone, a new head, a good classifier now.

    >>> import headstart
    >>> clf = headstart.ImageClassifier().fit("photos/")      # efficientnet_lite0, frozen, cached features
    >>> clf.predict("new.jpg"); clf.save("run")
    >>> clf = headstart.load("run")

The public names are loaded on first use, so ``import headstart`` (and ``headstart --help``) costs nothing
until a model is needed.
"""

from importlib import import_module

from ._version import __version__

__all__ = ["ImageClassifier", "load", "Backbone", "DataConfig", "create_backbone", "Head", "HeadConfig",
           "HeadstartError", "summary", "__version__"]

_WHERE = {"ImageClassifier": ".api", "load": ".api", "Backbone": ".backbones", "create_backbone": ".backbones",
          "DataConfig": ".config", "HeadConfig": ".config", "Head": ".heads", "HeadstartError": ".errors",
          "summary": ".summary"}


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'headstart' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
