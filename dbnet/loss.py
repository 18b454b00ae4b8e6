"""The DB loss: balanced BCE on the probability map, masked L1 on the threshold map and
dice on the approximate binary map.

Every term is computed in float32 from the model's logits with autocast disabled, so a
bf16 or fp16 forward pass cannot overflow or underflow it, and every term stays finite, with
finite gradients, on batches without a positive pixel, without a negative pixel, or fully
masked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dbnet.config import LossConfig
from dbnet.errors import ConfigError

_OUTPUT_KEYS = ("prob_logits", "thresh", "binary_logits")
_BATCH_KEYS = ("shrink_map", "shrink_mask", "threshold_map", "threshold_mask")


def balanced_bce(
    logits: Tensor,
    target: Tensor,
    mask: Tensor,
    negative_ratio: float = 3.0,
    min_negative_fraction: float = 0.0,
    eps: float = 1e-6,
) -> Tensor:
    """Binary cross-entropy over positives and the hardest negatives (online hard mining).

    With P positive and Q negative pixels under the mask (counted over the whole batch), the
    K = min(Q, max(negative_ratio * P, min_negative_fraction * (P + Q))) negatives of highest
    loss are kept and the loss is (sum over positives + sum over the K) / (P + K + eps).

    The floor `min_negative_fraction` is what a text-free batch learns from: with P = 0 DB's
    K is 0 and such a batch teaches nothing, while here its hardest negatives (false
    positives) are still pushed down. When positives are at least a fraction
    min_negative_fraction / (negative_ratio + min_negative_fraction) of the valid pixels
    (0.33 % with the defaults) the floor has no effect and the loss is exactly DB's.

    Args:
        logits: Probability logits (N, H, W), float32.
        target: Ground truth (N, H, W) in {0, 1}.
        mask: Valid pixels (N, H, W) in {0, 1}.
        negative_ratio: Negatives kept per positive.
        min_negative_fraction: Negatives kept at least, as a fraction of the valid pixels.
        eps: Keeps the division finite when nothing is selected.

    Returns:
        The scalar loss.
    """
    positive = target * mask  # (N, H, W)
    negative = (1.0 - target) * mask  # (N, H, W)
    positive_count = int(positive.sum(dtype=torch.float64).item())  # exact beyond 2^24 pixels
    negative_count = int(negative.sum(dtype=torch.float64).item())
    wanted = max(
        negative_ratio * positive_count,
        min_negative_fraction * (positive_count + negative_count),
    )
    k = min(negative_count, int(wanted))

    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")  # (N, H, W)
    positive_loss = (loss * positive).sum()
    hardest = torch.topk((loss * negative).flatten(), k, sorted=False).values  # (k,)
    return (positive_loss + hardest.sum()) / (positive_count + k + eps)


def masked_l1(prediction: Tensor, target: Tensor, mask: Tensor, eps: float = 1e-6) -> Tensor:
    """Mean absolute error over the masked pixels (0 when the mask is empty).

    Args:
        prediction: Predicted map (N, H, W).
        target: Ground-truth map (N, H, W).
        mask: Valid pixels (N, H, W) in {0, 1}.
        eps: Keeps the division finite for an empty mask.

    Returns:
        The scalar loss.
    """
    return ((prediction - target).abs() * mask).sum() / (mask.sum() + eps)


def dice_loss(prediction: Tensor, target: Tensor, mask: Tensor, eps: float = 1e-6) -> Tensor:
    """1 - Dice coefficient between a soft prediction and the target, over masked pixels.

    The Dice coefficient of an empty target is undefined; it is taken as 0 loss. DB's
    formula gives a constant 1 there, with zero gradient either way, so only the logged
    value differs: a perfect prediction of a text-free batch scores 0.

    Args:
        prediction: Predicted probabilities (N, H, W) in [0, 1].
        target: Ground truth (N, H, W) in {0, 1}.
        mask: Valid pixels (N, H, W) in {0, 1}.
        eps: Keeps the division finite.

    Returns:
        The scalar loss.
    """
    intersection = (prediction * target * mask).sum()
    target_sum = (target * mask).sum()
    union = (prediction * mask).sum() + target_sum
    loss = 1.0 - 2.0 * intersection / (union + eps)
    return torch.where(target_sum > 0, loss, torch.zeros_like(loss))


class DBLoss(nn.Module):
    """Weighted sum of the three DB terms.

    Args:
        config: Term weights, the hard negative ratio and floor, and eps.
    """

    def __init__(self, config: LossConfig) -> None:
        super().__init__()
        for name in ("shrink_weight", "threshold_weight", "binary_weight"):
            if getattr(config, name) < 0:
                raise ConfigError(f"loss.{name}: got {getattr(config, name)}, expected >= 0")
        if config.negative_ratio <= 0:
            raise ConfigError(f"loss.negative_ratio: got {config.negative_ratio}, expected > 0")
        if not 0 <= config.min_negative_fraction <= 1:
            raise ConfigError(
                f"loss.min_negative_fraction: got {config.min_negative_fraction}, "
                "expected in [0, 1]"
            )
        if config.eps <= 0:
            raise ConfigError(f"loss.eps: got {config.eps}, expected > 0")
        self.config = config

    def forward(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Computes the loss terms.

        Args:
            outputs: Training outputs of DBNet; uses `prob_logits`, `thresh` and
                `binary_logits`, each (N, 1, H, W).
            batch: Label maps `shrink_map`, `shrink_mask`, `threshold_map` and
                `threshold_mask`, each (N, H, W).

        Returns:
            `loss` (the sum), `loss_shrink`, `loss_threshold` and `loss_binary`, each a
            weighted float32 scalar.

        Raises:
            KeyError: A map is missing (eval-mode outputs have no threshold map).
            ValueError: Maps of different shapes.
        """
        cfg = self.config
        maps = {key: outputs[key] for key in _OUTPUT_KEYS}
        labels = {key: batch[key] for key in _BATCH_KEYS}
        shape = labels["shrink_map"].shape
        for key, value in {**maps, **labels}.items():
            value_shape = value.shape[:1] + value.shape[2:] if key in maps else value.shape
            if value_shape != shape or (key in maps and value.shape[1] != 1):
                raise ValueError(
                    f"DBLoss: {key} has shape {tuple(value.shape)}, expected (N, 1, H, W) "
                    f"outputs and (N, H, W) labels with N, H, W = {tuple(shape)}"
                )

        with torch.autocast(device_type=labels["shrink_map"].device.type, enabled=False):
            prob_logits = maps["prob_logits"].float()[:, 0]  # (N, H, W) logits
            thresh = maps["thresh"].float()[:, 0]  # (N, H, W) in [0, 1]
            binary = maps["binary_logits"].float()[:, 0].sigmoid()  # (N, H, W) in [0, 1]
            shrink_map, shrink_mask, threshold_map, threshold_mask = (
                labels[key].float() for key in _BATCH_KEYS
            )

            shrink = balanced_bce(
                prob_logits,
                shrink_map,
                shrink_mask,
                cfg.negative_ratio,
                cfg.min_negative_fraction,
                cfg.eps,
            )
            threshold = masked_l1(thresh, threshold_map, threshold_mask, cfg.eps)
            binary_term = dice_loss(binary, shrink_map, shrink_mask, cfg.eps)

            terms = {
                "loss_shrink": cfg.shrink_weight * shrink,
                "loss_threshold": cfg.threshold_weight * threshold,
                "loss_binary": cfg.binary_weight * binary_term,
            }
        return {"loss": sum(terms.values()), **terms}
