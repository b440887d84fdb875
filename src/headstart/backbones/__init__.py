"""Backbones: the registry, the factory and weight resolution.

    >>> from headstart.backbones import create_backbone
    >>> base = create_backbone("vgg16", weights=None, input_size=150).freeze()
"""

from . import timm_models as _timm_models  # noqa: F401  (registers the EfficientNet-Lite family and timm:)
from . import tiny as _tiny  # noqa: F401  (registers test_tiny, hidden)
from . import vgg as _vgg  # noqa: F401  (registers vgg16, vgg19)
from .base import Backbone, create_backbone
from .concat import ConcatBackbone
from .registry import BackboneEntry, DataConfig, get, names, register, register_provider

__all__ = ["Backbone", "BackboneEntry", "ConcatBackbone", "DataConfig", "create_backbone", "get", "names", "register", "register_provider"]
