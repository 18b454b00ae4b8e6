"""Learning: a few hundred steps on a handful of synthetic images must find their words.

The trainer runs end to end (synthetic data, augmentation, labels, loss, optimiser, final
evaluation of best.pt), seeded and deterministic on one thread. The detections of the
trained model on its own training images are compared with those of the same network
untrained: a bug that stops learning anywhere in the chain (targets, loss, post-processing,
metric) fails the test, where a loss that merely falls would not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dbnet.config import config_from_dict
from dbnet.data.dataset import DetectionDataset
from dbnet.data.synth import generate_dataset
from dbnet.engine.evaluate import evaluate_model
from dbnet.engine.train import read_final_eval, train
from dbnet.model.dbnet import build_model

IMAGES = 8
SEED = 5
# NOTE: from scratch, the probability map starts to separate words after 200 to 400 steps
# (depending on the seed); 500 steps reached hmean 0.67 to 0.84 over seeds 0 to 6.
STEPS = 500


def _values(tmp_path: Path, data_dir: Path) -> dict[str, Any]:
    """The quickstart's recipe, shrunk: a narrow MobileNetV3-Small, 128-pixel crops, mild
    augmentation and no warmup."""
    return {
        "data": {
            "train_dir": str(data_dir),
            "val_dir": str(tmp_path / "no_val"),
            "test_dir": str(data_dir),
            "crop_size": 128,
            "scale_range": [0.8, 1.25],
            "rotate_degrees": 0.0,
            "eval_size": 256,
        },
        "model": {
            "backbone": "mobilenet_v3_small",
            "width": 0.5,
            "inner_channels": 64,
            "channels_last": True,
        },
        "optim": {"name": "adam", "lr": 0.003, "weight_decay": 0.0},
        "schedule": {"name": "poly", "warmup_steps": 0},
        "train": {
            "output_dir": str(tmp_path / "runs"),
            "run_name": "learning",
            "max_steps": STEPS,
            "batch_size": 4,
            "num_workers": 0,
            "device": "cpu",
            "seed": 0,
            "deterministic": True,
            "log_every": 100,
            "image_every": 0,
            "val_every_epochs": 0,
            "final_eval": True,
        },
        "postprocess": {"thresh": 0.3, "box_thresh": 0.4},
    }


@pytest.fixture(scope="module")
def words(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """IMAGES synthetic 256x192 images with legible words."""
    root = tmp_path_factory.mktemp("learning") / "set"
    summary = generate_dataset(root, IMAGES, SEED, size=(256, 192))
    assert summary.words - summary.dont_care >= 2 * IMAGES, "the set needs legible words"
    return root


def test_training_finds_the_words_an_untrained_model_misses(tmp_path: Path, words: Path) -> None:
    config = config_from_dict(_values(tmp_path, words))

    torch.manual_seed(config.train.seed)
    untrained = build_model(config.model).eval()
    dataset = DetectionDataset(words, config.data, train=False)
    before = evaluate_model(untrained, dataset, config, torch.device("cpu"))

    run_dir = train(config)
    after = read_final_eval(run_dir)

    assert after is not None and after["split"] == "test" and after["images"] == IMAGES
    assert after["step"] == STEPS, "without validation the final weights are scored"
    summary = (
        f"untrained hmean {before['hmean']:.3f}, trained {after['hmean']:.3f} "
        f"(precision {after['precision']:.3f}, recall {after['recall']:.3f}, "
        f"{after['matched']} of {after['gt_care']} words)"
    )
    assert after["hmean"] >= 0.5, summary
    assert after["hmean"] > before["hmean"] + 0.3, summary
