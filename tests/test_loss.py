"""Tests of the DB loss: known values, empty batches, mixed precision, and training signal."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from dbnet.config import LossConfig, ModelConfig
from dbnet.errors import ConfigError
from dbnet.loss import DBLoss, balanced_bce, dice_loss, masked_l1
from dbnet.model.dbnet import build_model

DB_EXACT = LossConfig(min_negative_fraction=0.0)


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def _outputs(prob_logits: Tensor, thresh: Tensor, k: float = 50.0) -> dict[str, Tensor]:
    """DBNet-like training outputs (N, 1, H, W) from maps (N, H, W)."""
    prob_logits = prob_logits[:, None].clone().requires_grad_(True)
    thresh = thresh[:, None].clone().requires_grad_(True)
    binary_logits = k * (prob_logits.sigmoid() - thresh)
    return {"prob_logits": prob_logits, "thresh": thresh, "binary_logits": binary_logits}


def _labels(shrink_map: Tensor, shrink_mask: Tensor | None = None) -> dict[str, Tensor]:
    """Label maps (N, H, W): threshold 0.7 on a one-pixel band around the text, 0.3 elsewhere."""
    shrink_mask = torch.ones_like(shrink_map) if shrink_mask is None else shrink_mask
    band = F.max_pool2d(shrink_map[:, None], 3, stride=1, padding=1)[:, 0]
    return {
        "shrink_map": shrink_map,
        "shrink_mask": shrink_mask,
        "threshold_map": 0.3 + 0.4 * band,
        "threshold_mask": band,
    }


def _text_batch(n: int = 2, size: int = 16) -> dict[str, Tensor]:
    shrink = torch.zeros(n, size, size)
    shrink[:, size // 4 : size // 2, size // 8 : size - size // 8] = 1.0
    return _labels(shrink)


def test_perfect_prediction_gives_near_zero_terms() -> None:
    batch = _text_batch()
    sign = 2.0 * batch["shrink_map"] - 1.0  # +1 on text, -1 elsewhere
    outputs = {
        "prob_logits": 30.0 * sign[:, None],
        "thresh": batch["threshold_map"][:, None].clone(),
        "binary_logits": 30.0 * sign[:, None],
    }

    losses = DBLoss(LossConfig())(outputs, batch)

    for key, value in losses.items():
        assert value.item() < 1e-5, f"{key} = {value.item()}"


def test_balanced_bce_on_a_2x2_map_by_hand() -> None:
    # One positive, three negatives: with ratio 3 all three negatives are kept.
    logits = torch.tensor([[[0.0, 2.0], [-1.0, 1.0]]])
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    expected = (_softplus(0.0) + _softplus(2.0) + _softplus(-1.0) + _softplus(1.0)) / 4

    loss = balanced_bce(logits, target, torch.ones_like(target), negative_ratio=3.0)

    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_balanced_bce_keeps_only_the_hardest_negatives() -> None:
    # One positive and five negatives, ratio 2: the two negatives of highest loss are kept.
    logits = torch.tensor([[[1.0, 3.0, -2.0], [0.5, -1.0, 2.0]]])
    target = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    expected = (_softplus(-1.0) + _softplus(3.0) + _softplus(2.0)) / 3

    loss = balanced_bce(logits, target, torch.ones_like(target), negative_ratio=2.0)

    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_balanced_bce_ignores_masked_pixels() -> None:
    logits = torch.tensor([[[0.0, 5.0], [-1.0, 1.0]]])
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])  # the worst negative is masked out
    expected = (_softplus(0.0) + _softplus(-1.0) + _softplus(1.0)) / 3

    loss = balanced_bce(logits, target, mask, negative_ratio=3.0)

    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_text_free_batch_still_mines_negatives() -> None:
    # 100 negatives, no positive: a floor of 10 % keeps the 10 hardest; DB's rule keeps none.
    logits = torch.linspace(-5.0, 5.0, 100).reshape(1, 10, 10)
    target = torch.zeros_like(logits)
    mask = torch.ones_like(logits)
    hardest = torch.linspace(-5.0, 5.0, 100)[-10:]
    expected = F.softplus(hardest).mean().item()

    floor = balanced_bce(logits, target, mask, min_negative_fraction=0.1)
    db = balanced_bce(logits.clone().requires_grad_(True), target, mask)

    assert floor.item() == pytest.approx(expected, rel=1e-5)
    assert db.item() == 0.0


def test_floor_leaves_db_unchanged_when_text_is_present() -> None:
    torch.manual_seed(0)
    batch = _text_batch()
    logits = torch.randn_like(batch["shrink_map"])
    args = (logits, batch["shrink_map"], batch["shrink_mask"])
    torch.testing.assert_close(balanced_bce(*args, min_negative_fraction=0.01), balanced_bce(*args))


def test_masked_l1_by_hand() -> None:
    prediction = torch.tensor([[[0.5, 0.2], [0.9, 0.0]]])
    target = torch.tensor([[[0.3, 0.3], [0.7, 0.7]]])
    mask = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])
    expected = (0.2 + 0.1 + 0.7) / 3

    assert masked_l1(prediction, target, mask).item() == pytest.approx(expected, rel=1e-5)
    assert masked_l1(prediction, target, torch.zeros_like(mask)).item() == 0.0


def test_dice_by_hand() -> None:
    prediction = torch.tensor([[[0.5, 0.5], [0.0, 1.0]]])
    target = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    ones = torch.ones_like(target)
    # intersection 1.5, union 2 + 2 = 4
    assert dice_loss(prediction, target, ones).item() == pytest.approx(1 - 3 / 4, rel=1e-5)

    mask = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    # intersection 1.5, union 1.5 + 2 = 3.5
    assert dice_loss(prediction, target, mask).item() == pytest.approx(1 - 3 / 3.5, rel=1e-5)

    # No target pixel: taken as a match, whatever the prediction.
    assert dice_loss(prediction, torch.zeros_like(target), ones).item() == 0.0


def test_dbloss_weights_and_terms_by_hand() -> None:
    shrink = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    batch = {
        "shrink_map": shrink,
        "shrink_mask": torch.ones_like(shrink),
        "threshold_map": torch.full_like(shrink, 0.5),
        "threshold_mask": torch.tensor([[[1.0, 1.0], [0.0, 0.0]]]),
    }
    outputs = {
        "prob_logits": torch.zeros(1, 1, 2, 2),  # every probability 0.5
        "thresh": torch.full((1, 1, 2, 2), 0.3),
        "binary_logits": torch.zeros(1, 1, 2, 2),  # every binary value 0.5
    }
    config = LossConfig(shrink_weight=2.0, threshold_weight=3.0, binary_weight=4.0)

    losses = DBLoss(config)(outputs, batch)

    assert losses["loss_shrink"].item() == pytest.approx(2.0 * math.log(2.0), rel=1e-5)
    assert losses["loss_threshold"].item() == pytest.approx(3.0 * 0.2, rel=1e-5)
    # intersection 0.5, union 2 + 1 = 3
    assert losses["loss_binary"].item() == pytest.approx(4.0 * (1 - 1 / 3), rel=1e-5)
    total = losses["loss_shrink"] + losses["loss_threshold"] + losses["loss_binary"]
    torch.testing.assert_close(losses["loss"], total)


def test_negative_ratio_is_configurable() -> None:
    torch.manual_seed(0)
    batch = _text_batch()
    outputs = _outputs(torch.randn(2, 16, 16), torch.rand(2, 16, 16))
    one = DBLoss(LossConfig(negative_ratio=1.0, min_negative_fraction=0.0))(outputs, batch)
    many = DBLoss(LossConfig(negative_ratio=10.0, min_negative_fraction=0.0))(outputs, batch)
    assert one["loss_shrink"].item() != pytest.approx(many["loss_shrink"].item())
    assert one["loss_threshold"].item() == pytest.approx(many["loss_threshold"].item())


def _empty_case(name: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    torch.manual_seed(0)
    shape = (2, 8, 8)
    if name == "no_positive":
        batch = _labels(torch.zeros(shape))
    elif name == "no_negative":
        batch = _labels(torch.ones(shape))
    else:  # all_masked
        batch = {key: torch.zeros(shape) for key in _labels(torch.zeros(shape))}
        batch["shrink_map"][:, 2:5, 2:5] = 1.0
    return _outputs(torch.randn(shape), torch.rand(shape)), batch


@pytest.mark.parametrize("case", ["no_positive", "no_negative", "all_masked"])
def test_empty_batches_give_finite_loss_and_gradients(case: str) -> None:
    outputs, batch = _empty_case(case)

    losses = DBLoss(LossConfig())(outputs, batch)
    losses["loss"].backward()

    for key, value in losses.items():
        assert torch.isfinite(value), f"{case}: {key} = {value.item()}"
    for key in ("prob_logits", "thresh"):
        grad = outputs[key].grad
        assert grad is not None and torch.isfinite(grad).all(), f"{case}: {key} gradient"
    if case == "all_masked":
        assert losses["loss"].item() == 0.0
    if case == "no_positive":
        # The text-free batch still pushes its probabilities down.
        assert losses["loss_shrink"].item() > 0
        assert outputs["prob_logits"].grad.sum() > 0


def test_no_positive_with_db_rule_is_zero_and_finite() -> None:
    outputs, batch = _empty_case("no_positive")
    losses = DBLoss(DB_EXACT)(outputs, batch)
    losses["loss"].backward()
    assert losses["loss_shrink"].item() == 0.0
    assert torch.isfinite(outputs["prob_logits"].grad).all()


def test_bf16_autocast_matches_float32() -> None:
    torch.manual_seed(0)
    batch = _text_batch(size=32)
    logits, thresh = 3.0 * torch.randn(2, 32, 32), torch.rand(2, 32, 32)
    reference = DBLoss(LossConfig())(_outputs(logits, thresh), batch)

    low_outputs = {k: v.to(torch.bfloat16) for k, v in _outputs(logits, thresh).items()}
    low_batch = {k: v.to(torch.bfloat16) for k, v in batch.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = DBLoss(LossConfig())(low_outputs, low_batch)

    # The same bf16 inputs computed in float32: only the rounding of the inputs differs.
    exact = DBLoss(LossConfig())(
        {k: v.float() for k, v in low_outputs.items()}, {k: v.float() for k, v in low_batch.items()}
    )
    for key, value in mixed.items():
        assert value.dtype == torch.float32, f"{key} is {value.dtype}"
        assert torch.isfinite(value)
        assert value.item() == pytest.approx(exact[key].item(), rel=1e-5), key
        assert value.item() == pytest.approx(reference[key].item(), rel=0.02, abs=1e-3), key


def test_bf16_autocast_model_forward_and_backward() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="mobilenet_v3_small", inner_channels=32))
    batch = _text_batch(n=2, size=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(torch.randn(2, 3, 64, 64))
        losses = DBLoss(LossConfig())(outputs, batch)
    losses["loss"].backward()

    assert losses["loss"].dtype == torch.float32 and torch.isfinite(losses["loss"])
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_a_few_steps_lower_the_loss() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="mobilenet_v3_small", inner_channels=32))
    criterion = DBLoss(LossConfig())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.randn(2, 3, 64, 64)
    batch = _text_batch(n=2, size=64)

    history = []
    for _ in range(8):
        loss = criterion(model(images), batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())

    assert history[-1] < 0.8 * history[0], f"loss went {history}"


def test_missing_and_misshapen_maps() -> None:
    batch = _text_batch()
    outputs = _outputs(torch.zeros(2, 16, 16), torch.zeros(2, 16, 16))
    with pytest.raises(KeyError):
        DBLoss(LossConfig())({"prob": outputs["prob_logits"]}, batch)
    with pytest.raises(ValueError, match="shrink_mask"):
        DBLoss(LossConfig())(outputs, {**batch, "shrink_mask": torch.ones(2, 8, 8)})


@pytest.mark.parametrize(
    "values",
    [
        {"shrink_weight": -1.0},
        {"negative_ratio": 0.0},
        {"min_negative_fraction": 2.0},
        {"eps": 0.0},
    ],
)
def test_invalid_loss_config(values: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match=next(iter(values))):
        DBLoss(LossConfig(**values))
