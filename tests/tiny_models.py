"""A tiny DBNet whose probability map lights up on dark regions, and scenes for it
(imported by test_*.py): a random network detects nothing meaningful, this one finds the dark
text-like bars of `scene` images.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from dbnet.config import Config, ModelConfig
from dbnet.data.dataset import normalise
from dbnet.model.dbnet import build_model


def scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A light image with a dark text-like bar in each of its bands of ~40 rows.

    Returns:
        The (H, W, 3) uint8 RGB image and the (H, W) float32 mask of the bars.
    """
    image = np.full((height, width, 3), 225, np.uint8)
    image += rng.integers(0, 20, size=image.shape, dtype=np.uint8)
    mask = np.zeros((height, width), np.float32)
    bands = max(1, height // 40)
    for band in range(bands):
        top, bottom = band * height // bands, (band + 1) * height // bands
        box_h = int(rng.integers((bottom - top) // 3, (bottom - top) * 2 // 3 + 1))
        box_w = int(rng.integers(width // 4, width * 3 // 4 + 1))
        y = int(rng.integers(top, bottom - box_h + 1))
        x = int(rng.integers(0, width - box_w + 1))
        image[y : y + box_h, x : x + box_w] = rng.integers(0, 60)
        mask[y : y + box_h, x : x + box_w] = 1.0
    return image, mask


def fit_to_dark_regions(model: torch.nn.Module, config: Config, gain: float = 16.0) -> None:
    """Rewires a random DBNet's probability branch so that it lights up on dark regions.

    A random network's probabilities are unrelated to the image (a checkerboard from the
    transposed convolutions, or noise around 0.5): no box, or boxes whose edges sit on the
    threshold, which makes a poor agreement test. Here a least-squares fit maps the random
    fused neck features to the dark mask of a few scenes, and the branch computes
    sigmoid(gain * fit): channel 0 of the 3x3 conv carries the fit, the BatchNorms are
    identities plus an offset that keeps the value above the ReLUs, the first transposed
    conv upsamples channel 0 and the last one removes the offset and applies the gain.
    """
    rng = np.random.default_rng(0)
    scenes = [scene(rng, 128, 160) for _ in range(8)]
    images = np.stack([normalise(image, config.data.mean, config.data.std) for image, _ in scenes])
    with torch.inference_mode():
        fused = model.neck(model.backbone(torch.from_numpy(images)))  # (N, C, H/4, W/4)
        columns = torch.nn.functional.unfold(fused, 3, padding=1)  # (N, C * 9, H/4 * W/4)
    size = (fused.shape[3], fused.shape[2])
    target = np.stack([cv2.resize(m, size, interpolation=cv2.INTER_AREA) for _, m in scenes])
    features = columns.numpy().transpose(0, 2, 1).reshape(-1, columns.shape[1])  # (pixels, C * 9)
    design = np.concatenate([features, np.ones((len(features), 1), np.float32)], axis=1)
    solution, *_ = np.linalg.lstsq(design, target.reshape(-1) * 2 - 1, rcond=None)

    conv, bn1, _, up1, bn2, _, up2 = model.head.probability
    offset = 10.0
    with torch.no_grad():
        for layer in (conv, up1, up2):
            layer.weight.zero_()
        weights = torch.from_numpy(solution[:-1].astype(np.float32))
        conv.weight[0] = weights.view(conv.weight.shape[1:])  # (C, 3, 3)
        for bn in (bn1, bn2):
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
            bn.weight.fill_(1.0)
            bn.bias.zero_()
        bn1.bias[0] = float(solution[-1]) + offset
        up1.weight[0, 0] = 1.0
        up1.bias.zero_()
        up2.weight[0, 0] = gain
        up2.bias.fill_(-gain * offset)


def fitted_model(eval_size: int = 128) -> tuple[torch.nn.Module, Config]:
    """A ResNet-18 DBNet (32 inner channels) fitted to dark regions, in eval mode, and its
    configuration (eval short side `eval_size`, box_thresh 0.5)."""
    torch.manual_seed(0)
    config = Config(model=ModelConfig(backbone="resnet18", inner_channels=32))
    config.data.eval_size = eval_size
    config.postprocess.box_thresh = 0.5  # the fitted maps are patchy, their scores ~0.7
    model = build_model(config.model).eval()
    fit_to_dark_regions(model, config)
    return model, config
