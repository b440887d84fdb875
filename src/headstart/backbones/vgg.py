"""VGG16 and VGG19 convolutional bases with Keras' layer names (block1_conv1 ... block5_pool)."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from ..errors import ConfigError
from .registry import BackboneEntry, DataConfig, register
from .weights import timm_hub_source

__all__ = ["VGG16", "VGG19"]

# timm's and torchvision's ImageNet VGG weights expect these stats; a Keras/Caffe file brings its own JSON.
_DATA = DataConfig(input_size=(224, 224), resize_mode="squash", crop_pct=1.0, interpolation="bilinear")


def _keras_blocks(features: nn.Sequential) -> nn.Sequential:
    """Regroup a torchvision ``features`` stack into named blocks, cut after each max-pool."""
    blocks, layers, n_block, n_conv = OrderedDict(), OrderedDict(), 1, 0
    for layer in features:
        if isinstance(layer, nn.Conv2d):
            n_conv += 1
            layers[f"block{n_block}_conv{n_conv}"] = layer
        elif isinstance(layer, nn.ReLU):
            layers[f"block{n_block}_conv{n_conv}_relu"] = nn.ReLU(inplace=False)
        else:
            layers[f"block{n_block}_pool"] = layer
            blocks[f"block{n_block}"] = nn.Sequential(layers)
            layers, n_block, n_conv = OrderedDict(), n_block + 1, 0
    return nn.Sequential(blocks)


def _builder(cfg: str):
    def build(input_size, include_top):
        if include_top:
            raise ConfigError("the VGG backbones here are convolutional bases only (include_top=False)")
        return _keras_blocks(make_layers(cfgs[cfg]))

    return build


def _groups(body: nn.Module):
    return list(body.named_children())


VGG16 = register(BackboneEntry(
    name="vgg16",
    description="VGG16 conv base, 14.7M params, output 512 x H/32 x W/32 (the Keras recipe)",
    build=_builder("D"),
    groups=_groups,
    data_config=_DATA,
    sources=(timm_hub_source("vgg16.tv_in1k", keep_prefix="features."),),
    default_head="flatten",
))

VGG19 = register(BackboneEntry(
    name="vgg19",
    description="VGG19 conv base, 20.0M params, output 512 x H/32 x W/32",
    build=_builder("E"),
    groups=_groups,
    data_config=_DATA,
    sources=(timm_hub_source("vgg19.tv_in1k", keep_prefix="features."),),
    default_head="flatten",
))
