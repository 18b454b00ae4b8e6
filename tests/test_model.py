"""Tests of the backbones, necks, head and the assembled DBNet."""

from __future__ import annotations

import typing
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision
from torch import nn
from torchvision import models
from torchvision.ops import DeformConv2d

from dbnet.config import ModelConfig
from dbnet.errors import CheckpointError, ConfigError
from dbnet.model.backbones import BACKBONES, ModulatedDeformConv3x3, build_backbone
from dbnet.model.dbnet import build_model
from dbnet.model.head import DBHead
from dbnet.model.necks import ASF, FPN, ScaleAttention, build_neck

OUTPUT_KEYS = {"prob_logits", "prob", "thresh", "binary_logits", "binary"}


def _save_state(path: Path, net: nn.Module) -> Path:
    torch.save(net.state_dict(), path)
    return path


def test_backbone_list_matches_the_config() -> None:
    allowed = typing.get_args(typing.get_type_hints(ModelConfig)["backbone"])
    assert sorted(BACKBONES) == sorted(allowed)


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_strides_and_channels(name: str) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(name).eval()
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 64, 96))

    assert len(features) == 4
    for i, (feature, channels) in enumerate(zip(features, backbone.out_channels, strict=True)):
        stride = 2 ** (i + 2)
        expected = (1, channels, 64 // stride, 96 // stride)
        assert tuple(feature.shape) == expected, f"{name} level {i}: {tuple(feature.shape)}"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", BACKBONES)
def test_dbnet_outputs(name: str, training: bool) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=name, inner_channels=32)).train(training)
    calls = []
    model.head.threshold.register_forward_hook(lambda *_: calls.append(1))

    with torch.set_grad_enabled(training):
        out = model(torch.randn(1, 3, 64, 64))

    if not training:
        assert set(out) == {"prob"}, f"{name} eval returned {sorted(out)}"
        assert not calls, "the threshold branch ran in eval mode"
    else:
        assert set(out) == OUTPUT_KEYS, f"{name} train returned {sorted(out)}"
        assert calls == [1]
        torch.testing.assert_close(out["prob"], out["prob_logits"].sigmoid())
        torch.testing.assert_close(out["binary_logits"], 50.0 * (out["prob"] - out["thresh"]))
        torch.testing.assert_close(out["binary"], out["binary_logits"].sigmoid())
        assert out["thresh"].min() >= 0.0 and out["thresh"].max() <= 1.0
    for key, value in out.items():
        assert tuple(value.shape) == (1, 1, 64, 64), f"{name} {key}: {tuple(value.shape)}"
        assert value.dtype == torch.float32
        assert torch.isfinite(value).all(), f"{name} {key} not finite"
    assert out["prob"].min() >= 0.0 and out["prob"].max() <= 1.0


@pytest.mark.parametrize("neck", ["fpn", "asf"])
def test_necks_fuse_to_quarter_scale(neck: str) -> None:
    in_channels = [8, 16, 24, 32]
    module = build_neck(neck, in_channels, inner_channels=16)
    features = [torch.randn(2, c, 16 // 2**i, 24 // 2**i) for i, c in enumerate(in_channels)]

    fused = module(features)

    assert tuple(fused.shape) == (2, 16, 16, 24)
    assert isinstance(module, ASF) == (neck == "asf")
    assert any(isinstance(m, ScaleAttention) for m in module.modules()) == (neck == "asf")


def test_fpn_top_down_reaches_the_finest_level() -> None:
    # A change in the coarsest input must change the finest level of the pyramid.
    torch.manual_seed(0)
    neck = FPN([4, 4, 4, 4], inner_channels=8).eval()
    features = [torch.randn(1, 4, 16 // 2**i, 16 // 2**i) for i in range(4)]
    finest = neck.levels(features)[0]

    features[3] = features[3] + 1.0
    assert not torch.allclose(neck.levels(features)[0], finest)


def test_asf_model_runs_and_differs_from_fpn() -> None:
    torch.manual_seed(0)
    fpn = build_model(ModelConfig(backbone="resnet18", inner_channels=32, neck="fpn"))
    asf = build_model(ModelConfig(backbone="resnet18", inner_channels=32, neck="asf"))
    assert isinstance(asf.neck, ASF) and not isinstance(fpn.neck, ASF)
    out = asf(torch.randn(2, 3, 64, 64))
    assert set(out) == OUTPUT_KEYS and tuple(out["prob"].shape) == (2, 1, 64, 64)


@pytest.mark.parametrize("name", ["resnet18_dcn", "resnet50_dcn"])
def test_dcn_variant_is_deformable_in_stages_3_to_5(name: str) -> None:
    backbone = build_backbone(name)
    deformable_per_stage = [
        sum(isinstance(m, DeformConv2d) for m in stage.modules()) for stage in backbone.stages
    ]
    blocks_per_stage = [len(stage) for stage in backbone.stages]

    assert deformable_per_stage[0] == 0
    assert deformable_per_stage[1:] == blocks_per_stage[1:]
    plain = build_backbone(name.removesuffix("_dcn"))
    assert not any(isinstance(m, DeformConv2d) for m in plain.modules())


def test_dcn_starts_as_the_plain_network(tmp_path: Path) -> None:
    # Zero offsets and unit modulation: with the same weights, DCN and plain ResNet agree.
    torch.manual_seed(0)
    weights = _save_state(tmp_path / "resnet18.pth", models.resnet18())
    plain = build_backbone("resnet18", pretrained=str(weights)).eval()
    deformable = build_backbone("resnet18_dcn", pretrained=str(weights)).eval()
    x = torch.randn(1, 3, 64, 64)

    with torch.no_grad():
        for a, b in zip(plain(x), deformable(x), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

    offset_convs = [
        m.offset_mask for m in deformable.modules() if isinstance(m, ModulatedDeformConv3x3)
    ]
    assert offset_convs and all(not conv.weight.any() for conv in offset_convs)


def test_dcn_gradient_reaches_the_offsets() -> None:
    torch.manual_seed(0)
    conv = ModulatedDeformConv3x3(4, 4, stride=2)
    conv(torch.randn(1, 4, 8, 8)).square().sum().backward()
    assert conv.offset_mask.weight.grad is not None and conv.offset_mask.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["resnet18_dcn", "mobilenet_v3_small"])
def test_bf16_autocast_forward_and_backward(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=name, inner_channels=32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 64, 64))
    out["binary"].float().mean().backward()

    assert all(torch.isfinite(v).all() for v in out.values())
    grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_db_initialisation_by_module_type() -> None:
    model = build_model(ModelConfig(backbone="mobilenet_v3_small", inner_channels=32))
    head_norms = [m for m in model.head.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(head_norms) == 4
    for norm in head_norms:
        assert torch.all(norm.weight == 1.0) and torch.allclose(norm.bias, torch.tensor(1e-4))

    # The backbone keeps torchvision's own initialisation (BatchNorm bias 0).
    backbone_norm = next(m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    assert torch.all(backbone_norm.bias == 0.0)


def test_head_binarisation_uses_k() -> None:
    head = DBHead(16, k=10.0)
    out = head(torch.randn(1, 16, 4, 4))
    assert tuple(out["prob"].shape) == (1, 1, 16, 16)
    torch.testing.assert_close(out["binary_logits"], 10.0 * (out["prob"] - out["thresh"]))


def test_mobilenet_width_narrows_the_channels() -> None:
    full = build_backbone("mobilenet_v3_large")
    narrow = build_backbone("mobilenet_v3_large", width=0.5)
    assert all(n < f for n, f in zip(narrow.out_channels, full.out_channels, strict=True))
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in full.parameters())
    model = build_model(ModelConfig(backbone="mobilenet_v3_large", width=0.5, inner_channels=32))
    assert tuple(model(torch.randn(1, 3, 64, 64))["prob"].shape) == (1, 1, 64, 64)


def test_resnet_refuses_a_width() -> None:
    with pytest.raises(ConfigError, match="model.width"):
        build_backbone("resnet18", width=0.5)


def test_unknown_backbone_and_neck() -> None:
    with pytest.raises(ConfigError, match="resnet101"):
        build_backbone("resnet101")
    with pytest.raises(ConfigError, match="bifpn"):
        build_neck("bifpn", [8, 16, 32, 64])


def test_channels_last_model() -> None:
    model = build_model(
        ModelConfig(backbone="mobilenet_v3_small", inner_channels=32, channels_last=True)
    )
    conv = model.backbone.stages[0][0][0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    assert tuple(model(x)["binary"].shape) == (1, 1, 64, 64)


@pytest.mark.parametrize(
    ("name", "net", "head_prefix"),
    [
        ("resnet18", models.resnet18, "fc."),
        ("mobilenet_v3_small", models.mobilenet_v3_small, "classifier."),
    ],
)
@pytest.mark.parametrize("with_head", [True, False], ids=["full", "features_only"])
def test_local_pretrained_weights_load(
    tmp_path: Path, name: str, net, head_prefix: str, with_head: bool
) -> None:
    torch.manual_seed(1)
    source = net()
    state = {
        k: v for k, v in source.state_dict().items() if with_head or not k.startswith(head_prefix)
    }
    path = tmp_path / "weights.pth"
    torch.save(state, path)

    torch.manual_seed(2)
    backbone = build_backbone(name, pretrained=str(path))

    if name == "resnet18":
        torch.testing.assert_close(backbone.stem[0].weight, source.conv1.weight)
        torch.testing.assert_close(
            backbone.stages[3][1].bn2.running_var, source.layer4[1].bn2.running_var
        )
    else:
        torch.testing.assert_close(backbone.stages[0][0][0].weight, source.features[0][0].weight)
        torch.testing.assert_close(backbone.stages[3][-1][0].weight, source.features[-1][0].weight)


def test_pretrained_file_through_build_model(tmp_path: Path) -> None:
    torch.manual_seed(3)
    source = models.resnet18()
    path = _save_state(tmp_path / "r18.pth", source)
    model = build_model(ModelConfig(backbone="resnet18", pretrained=str(path), inner_channels=32))
    torch.testing.assert_close(model.backbone.stem[0].weight, source.conv1.weight)


def test_missing_weights_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "resnet18.pth"
    with pytest.raises(CheckpointError, match="not found") as info:
        build_backbone("resnet18", pretrained=str(missing))
    assert str(missing) in str(info.value)


def test_weights_of_another_network_are_refused(tmp_path: Path) -> None:
    path = _save_state(tmp_path / "r34.pth", models.resnet34())
    with pytest.raises(CheckpointError, match="unexpected keys") as info:
        build_backbone("resnet18", pretrained=str(path))
    assert str(path) in str(info.value) and "resnet18" in str(info.value)


def test_weights_of_another_width_are_refused(tmp_path: Path) -> None:
    path = _save_state(tmp_path / "narrow.pth", models.mobilenet_v3_small(width_mult=0.5))
    with pytest.raises(CheckpointError, match="another shape"):
        build_backbone("mobilenet_v3_small", pretrained=str(path))


def test_weights_file_that_is_not_a_state_dict(tmp_path: Path) -> None:
    tensor_file = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_file)
    with pytest.raises(CheckpointError, match="expected a state dict"):
        build_backbone("resnet18", pretrained=str(tensor_file))

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="not a readable"):
        build_backbone("resnet18", pretrained=str(garbage))


def test_download_failure_asks_for_a_local_file(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise URLError("no route to host")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(CheckpointError, match="local file"):
        build_backbone("resnet18", pretrained="torchvision")


def test_torchvision_weights_need_width_one() -> None:
    with pytest.raises(ConfigError, match="width"):
        build_backbone("mobilenet_v3_small", width=0.75, pretrained="torchvision")
