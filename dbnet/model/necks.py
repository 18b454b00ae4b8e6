"""Necks: the FPN of DBNet and the adaptive scale fusion (ASF) of DBNet++.

Both take the four backbone maps at strides 4-32 and return one map at stride 4 with
`inner_channels` channels: four levels of `inner_channels / 4` channels each, concatenated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dbnet.errors import ConfigError

NECKS: tuple[str, ...] = ("fpn", "asf")


class FPN(nn.Module):
    """Feature pyramid: lateral 1x1 convs, top-down sum, 3x3 smoothing, all levels at 1/4.

    Args:
        in_channels: Channels of the backbone maps, finest (stride 4) first.
        inner_channels: Width of the pyramid; each smoothed level has a quarter of it.
    """

    def __init__(self, in_channels: Sequence[int], inner_channels: int = 256) -> None:
        super().__init__()
        if inner_channels % 4:
            raise ConfigError(
                f"model.inner_channels: got {inner_channels}, expected a multiple of 4"
            )
        self.inner_channels = inner_channels
        self.lateral = nn.ModuleList(
            nn.Conv2d(channels, inner_channels, 1, bias=False) for channels in in_channels
        )
        self.smooth = nn.ModuleList(
            nn.Conv2d(inner_channels, inner_channels // 4, 3, padding=1, bias=False)
            for _ in in_channels
        )

    def levels(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Computes the smoothed pyramid levels, all resized to the finest resolution.

        Args:
            features: Backbone maps (N, C_i, H / 2^(i+2), W / 2^(i+2)), finest first.

        Returns:
            Four maps (N, inner_channels / 4, H/4, W/4), finest first.
        """
        laterals = [
            conv(x) for conv, x in zip(self.lateral, features, strict=True)
        ]  # (N, inner, h_i, w_i)

        # Top-down pathway: each level adds the upsampled coarser one.
        merged = [laterals[-1]]
        for lateral in reversed(laterals[:-1]):
            top = F.interpolate(merged[0], size=lateral.shape[-2:], mode="nearest")
            merged.insert(0, lateral + top)

        size = merged[0].shape[-2:]
        outputs = []
        for conv, x in zip(self.smooth, merged, strict=True):
            x = conv(x)  # (N, inner/4, h_i, w_i)
            outputs.append(F.interpolate(x, size=size, mode="nearest"))  # (N, inner/4, H/4, W/4)
        return outputs

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """Fuses the backbone maps.

        Args:
            features: Backbone maps (N, C_i, H / 2^(i+2), W / 2^(i+2)), finest first.

        Returns:
            Fused features (N, inner_channels, H/4, W/4).
        """
        # Coarsest level first, as in DB.
        return torch.cat(self.levels(features)[::-1], dim=1)  # (N, inner, H/4, W/4)


class ScaleAttention(nn.Module):
    """Spatial and channel attention producing one weight map per pyramid level (DBNet++).

    Args:
        in_channels: Channels of the features the weights are computed from.
        num_levels: Number of weight maps to produce.
    """

    def __init__(self, in_channels: int, num_levels: int) -> None:
        super().__init__()
        reduced = max(in_channels // 4, 1)
        self.channel = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, reduced, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(reduced, in_channels, 1, bias=False),
            nn.Sigmoid(),
        )
        self.spatial = nn.Sequential(
            nn.Conv2d(1, 1, 3, padding=1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(1, 1, 1, bias=False),
            nn.Sigmoid(),
        )
        self.level = nn.Sequential(nn.Conv2d(in_channels, num_levels, 1, bias=False), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        """Computes the level weights.

        Args:
            x: Features (N, C, H, W).

        Returns:
            Weights (N, num_levels, H, W) in [0, 1].
        """
        x = x + self.channel(x)  # (N, C, H, W) + (N, C, 1, 1)
        x = x + self.spatial(x.mean(dim=1, keepdim=True))  # (N, C, H, W) + (N, 1, H, W)
        return self.level(x)  # (N, num_levels, H, W)


class ASF(FPN):
    """FPN whose levels are re-weighted per pixel by adaptive scale fusion (DBNet++).

    The concatenated levels go through a 3x3 conv to `inner_channels / 4` channels, then
    `ScaleAttention` gives one weight map per level; each level is multiplied by its map
    before the concatenation.

    Args:
        in_channels: Channels of the backbone maps, finest (stride 4) first.
        inner_channels: Width of the pyramid; each smoothed level has a quarter of it.
    """

    def __init__(self, in_channels: Sequence[int], inner_channels: int = 256) -> None:
        super().__init__(in_channels, inner_channels)
        self.fuse = nn.Conv2d(inner_channels, inner_channels // 4, 3, padding=1)
        self.attention = ScaleAttention(inner_channels // 4, len(in_channels))

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """Fuses the backbone maps with per-level attention.

        Args:
            features: Backbone maps (N, C_i, H / 2^(i+2), W / 2^(i+2)), finest first.

        Returns:
            Fused features (N, inner_channels, H/4, W/4).
        """
        levels = self.levels(features)[::-1]  # coarsest first, each (N, inner/4, H/4, W/4)
        weights = self.attention(self.fuse(torch.cat(levels, dim=1)))  # (N, 4, H/4, W/4)
        weighted = [level * weights[:, i : i + 1] for i, level in enumerate(levels)]
        return torch.cat(weighted, dim=1)  # (N, inner, H/4, W/4)


def build_neck(name: str, in_channels: Sequence[int], inner_channels: int = 256) -> FPN:
    """Builds a neck by name ("fpn" or "asf")."""
    if name == "fpn":
        return FPN(in_channels, inner_channels)
    if name == "asf":
        return ASF(in_channels, inner_channels)
    raise ConfigError(f"model.neck: got {name!r}, allowed: {', '.join(NECKS)}")
