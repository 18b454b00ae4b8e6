"""Feature extractors: ResNet, deformable ResNet and MobileNetV3, built from torchvision.

Every backbone returns four feature maps at strides 4, 8, 16 and 32 and lists their
channel counts in `out_channels`, which is all the neck needs to know.

ImageNet weights come from torchvision's download (`pretrained="torchvision"`) or from a
local file holding torchvision's state dict of the same network (`pretrained=<path>`).
They are loaded into the torchvision network before it is split into stages, so the
keys are torchvision's own.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision import models
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import DeformConv2d, deform_conv2d

from dbnet.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

_RESNETS: dict[str, tuple[Callable[..., models.ResNet], models.WeightsEnum]] = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (models.resnet34, models.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V1),
}

_MOBILENETS: dict[str, tuple[Callable[..., models.MobileNetV3], models.WeightsEnum]] = {
    "mobilenet_v3_large": (
        models.mobilenet_v3_large,
        models.MobileNet_V3_Large_Weights.IMAGENET1K_V1,
    ),
    "mobilenet_v3_small": (
        models.mobilenet_v3_small,
        models.MobileNet_V3_Small_Weights.IMAGENET1K_V1,
    ),
}

# NOTE: index of the last block of `features` at strides 4, 8, 16 and 32 in torchvision's
# MobileNetV3 (the block after each one halves the resolution). The last index is the final
# 1x1 expansion conv, kept in the stride-32 stage as PaddleOCR's DB MobileNetV3 does.
_MOBILENET_STAGE_ENDS: dict[str, tuple[int, int, int, int]] = {
    "mobilenet_v3_large": (3, 6, 12, 16),
    "mobilenet_v3_small": (1, 3, 8, 12),
}

BACKBONES: tuple[str, ...] = (
    *_RESNETS,
    *(f"{name}_dcn" for name in _RESNETS),
    *_MOBILENETS,
)


class ModulatedDeformConv3x3(DeformConv2d):
    """A 3x3 modulated deformable convolution (DCNv2) that starts as a plain 3x3 convolution.

    A zero-initialised 3x3 convolution predicts, per output pixel, 9 (dy, dx) offsets and
    9 modulation scalars. Offsets start at 0 and the modulation at 2 * sigmoid(0) = 1, so at
    initialisation the layer computes exactly the regular convolution whose `weight` it holds.
    `weight` keeps torchvision's key, so ImageNet weights of the plain conv load into it.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.offset_mask = nn.Conv2d(in_channels, 3 * 9, 3, stride=stride, padding=1)
        nn.init.zeros_(self.offset_mask.weight)
        nn.init.zeros_(self.offset_mask.bias)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """Applies the deformable convolution.

        Args:
            x: Features (N, C_in, H, W).

        Returns:
            Features (N, C_out, H / stride, W / stride).
        """
        offset_mask = self.offset_mask(x)  # (N, 27, H', W')
        offset, mask = offset_mask.split([18, 9], dim=1)  # (N, 18, H', W'), (N, 9, H', W')
        mask = 2.0 * mask.sigmoid()  # modulation in (0, 2), 1 at initialisation

        # NOTE: torchvision's CPU kernel has no bf16/fp16 version, so the deformable conv
        # runs in float32 (autocast off) and its output goes back to the input's dtype.
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = deform_conv2d(
                x.float(),
                offset.float(),
                self.weight.float(),
                stride=self.stride,
                padding=self.padding,
                dilation=self.dilation,
                mask=mask.float(),
            )  # (N, C_out, H', W')
        return out.to(x.dtype)


def _make_deformable(stage: nn.Sequential) -> None:
    """Replaces the 3x3 conv of each residual block of `stage` by a deformable one, in place.

    In a BasicBlock that is the second 3x3 conv (the first one may be strided), in a
    Bottleneck the middle conv, as in the DB paper's deformable ResNet.
    """
    for block in stage:
        if not isinstance(block, (BasicBlock, Bottleneck)):
            continue
        conv = block.conv2
        block.conv2 = ModulatedDeformConv3x3(conv.in_channels, conv.out_channels, conv.stride[0])


def _load_state(source: str, name: str, weights: models.WeightsEnum) -> Mapping[str, Tensor]:
    """Reads torchvision's state dict of `name` from the download or from a local file."""
    if source == "torchvision":
        try:
            return weights.get_state_dict(progress=False, check_hash=True)
        except OSError as exc:
            raise CheckpointError(
                f"could not download torchvision's ImageNet weights for {name} ({exc}); "
                f"without internet, fetch {weights.url} elsewhere and set "
                "model.pretrained to the local file path"
            ) from None

    path = Path(source).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"pretrained weights file not found: {path} "
            "(model.pretrained must be 'none', 'torchvision' or an existing file)"
        )
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: not a readable torch state dict (the file is empty)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # pickle protocol notes on bad files
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors have no common base class
        raise CheckpointError(
            f"{path}: not a readable torch state dict ({_load_failure(exc)}); it was not unpickled"
        ) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(
            f"{path}: expected a state dict (a mapping of names to tensors) of torchvision's "
            f"{name}, got {type(state).__name__}"
        )
    return state


def _load_failure(exc: Exception) -> str:
    """One line of a failed safe torch.load: the blocked object, else the specific line.

    torch's message spans paragraphs and suggests loading unsafely, which a file that failed
    the safe load must never be.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    specific = [line for line in lines if not line.startswith(boilerplate)]
    blocked = [line for line in specific if "GLOBAL" in line]
    if blocked:
        return blocked[0]
    return f"{type(exc).__name__}: {specific[0]}" if specific else type(exc).__name__


def _load_into(
    net: nn.Module,
    state: Mapping[str, Tensor],
    skipped_prefixes: tuple[str, ...],
    source: str,
    name: str,
) -> None:
    """Loads `state` into `net`, refusing missing, unexpected or misshapen keys.

    Keys under `skipped_prefixes` (the classifier) are ignored in the file; parameters of the
    deformable offset convs may be absent from it, since they start at zero.
    """
    state = {k: v for k, v in state.items() if not k.startswith(skipped_prefixes)}
    own = {k: v for k, v in net.state_dict().items() if not k.startswith(skipped_prefixes)}
    missing = [k for k in own if k not in state and ".offset_mask." not in k]
    unexpected = [k for k in state if k not in own]
    misshapen = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if misshapen:
        problems.append(f"{len(misshapen)} keys of another shape (e.g. {misshapen[0]})")
    if problems:
        raise CheckpointError(
            f"{source}: not torchvision's {name} state dict: {'; '.join(problems)}"
        )

    net.load_state_dict(state, strict=False)
    logger.info("loaded ImageNet weights of %s from %s", name, source)


class ResNetBackbone(nn.Module):
    """torchvision's ResNet without its classifier; optionally deformable in stages 3-5.

    Args:
        name: "resnet18", "resnet34" or "resnet50", with an optional "_dcn" suffix.
        pretrained: "none", "torchvision" or a path to torchvision's state dict.
    """

    def __init__(self, name: str, pretrained: str = "none") -> None:
        super().__init__()
        base = name.removesuffix("_dcn")
        builder, weights = _RESNETS[base]
        net = builder(weights=None)
        if name.endswith("_dcn"):
            for stage in (net.layer2, net.layer3, net.layer4):
                _make_deformable(stage)
        if pretrained != "none":
            state = _load_state(pretrained, base, weights)
            _load_into(net, state, ("fc.",), pretrained, base)

        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.stages = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        expansion = 4 if base == "resnet50" else 1
        self.out_channels = [64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion]

    def forward(self, x: Tensor) -> list[Tensor]:
        """Extracts the four feature maps.

        Args:
            x: Normalised images (N, 3, H, W).

        Returns:
            Features (N, out_channels[i], H / 2^(i+2), W / 2^(i+2)) for i = 0..3.
        """
        x = self.stem(x)  # (N, 64, H/4, W/4)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class MobileNetV3Backbone(nn.Module):
    """torchvision's MobileNetV3 `features`, cut into four stages at strides 4 to 32.

    Args:
        name: "mobilenet_v3_large" or "mobilenet_v3_small".
        width: torchvision's `width_mult`; channels are rounded to multiples of 8.
        pretrained: "none", "torchvision" or a path to torchvision's state dict.
    """

    def __init__(self, name: str, width: float = 1.0, pretrained: str = "none") -> None:
        super().__init__()
        builder, weights = _MOBILENETS[name]
        if pretrained == "torchvision" and width != 1.0:
            raise ConfigError(
                f"model.width: torchvision has ImageNet weights of {name} at width 1.0 only, "
                f"got {width}; set model.pretrained to 'none' or a local file of that width"
            )
        net = builder(weights=None, width_mult=width)
        if pretrained != "none":
            state = _load_state(pretrained, name, weights)
            _load_into(net, state, ("classifier.",), pretrained, name)

        stages = []
        start = 0
        for end in _MOBILENET_STAGE_ENDS[name]:
            stages.append(nn.Sequential(*net.features[start : end + 1]))
            start = end + 1
        self.stages = nn.ModuleList(stages)
        self.out_channels = [stage[-1].out_channels for stage in stages]

    def forward(self, x: Tensor) -> list[Tensor]:
        """Extracts the four feature maps.

        Args:
            x: Normalised images (N, 3, H, W).

        Returns:
            Features (N, out_channels[i], H / 2^(i+2), W / 2^(i+2)) for i = 0..3.
        """
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


def build_backbone(
    name: str, width: float = 1.0, pretrained: str = "none"
) -> ResNetBackbone | MobileNetV3Backbone:
    """Builds a backbone by name.

    Args:
        name: One of `BACKBONES`.
        width: Channel width multiplier. MobileNetV3 only: torchvision's ResNets have no
            width multiplier for BasicBlock and no ImageNet weights at other widths, so a
            narrow CPU model is a MobileNetV3.
        pretrained: "none", "torchvision" (download) or a path to torchvision's state dict
            of the same network (classifier keys may be present or not).

    Returns:
        The backbone, with its `out_channels` at strides 4, 8, 16 and 32.

    Raises:
        ConfigError: Unknown name, or a width the backbone does not support.
        CheckpointError: Weights that cannot be downloaded, read or matched to the network.
    """
    if name not in BACKBONES:
        raise ConfigError(f"model.backbone: got {name!r}, allowed: {', '.join(BACKBONES)}")
    if name in _MOBILENETS:
        return MobileNetV3Backbone(name, width, pretrained)
    if width != 1.0:
        raise ConfigError(
            f"model.width: got {width} for {name}; only mobilenet_v3_large and "
            "mobilenet_v3_small support widths other than 1.0"
        )
    return ResNetBackbone(name, pretrained)
