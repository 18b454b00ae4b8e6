"""The DB head: probability and threshold maps, and their differentiable binarisation."""

from __future__ import annotations

from torch import Tensor, nn


def _map_branch(in_channels: int) -> nn.Sequential:
    """3x3 conv, then two 2x2 transposed convs from stride 4 to full resolution, 1 channel out."""
    mid = in_channels // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, mid, 3, padding=1, bias=False),
        nn.BatchNorm2d(mid),
        nn.ReLU(inplace=True),
        nn.ConvTranspose2d(mid, mid, 2, stride=2),
        nn.BatchNorm2d(mid),
        nn.ReLU(inplace=True),
        nn.ConvTranspose2d(mid, 1, 2, stride=2),
    )


class DBHead(nn.Module):
    """Predicts the probability map P, the threshold map T and B = sigmoid(k (P - T)).

    Args:
        in_channels: Channels of the fused neck features.
        k: Amplification factor of the approximate binarisation (50 in the DB paper).
    """

    def __init__(self, in_channels: int, k: float = 50.0) -> None:
        super().__init__()
        self.k = k
        self.probability = _map_branch(in_channels)
        self.threshold = _map_branch(in_channels)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Computes the maps; the threshold branch runs in training mode only.

        Args:
            x: Fused features (N, C, H/4, W/4).

        Returns:
            In training mode `prob_logits`, `prob`, `thresh`, `binary_logits` and `binary`,
            each (N, 1, H, W); probabilities and thresholds in [0, 1]. In eval mode `prob` only.
        """
        prob_logits = self.probability(x)  # (N, 1, H, W) logits
        prob = prob_logits.sigmoid()  # (N, 1, H, W) in [0, 1]
        if not self.training:
            return {"prob": prob}

        thresh = self.threshold(x).sigmoid()  # (N, 1, H, W) in [0, 1]
        binary_logits = self.k * (prob - thresh)  # (N, 1, H, W) in [-k, k]
        return {
            "prob_logits": prob_logits,
            "prob": prob,
            "thresh": thresh,
            "binary_logits": binary_logits,
            "binary": binary_logits.sigmoid(),
        }
