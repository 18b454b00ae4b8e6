"""Tiny datasets and configurations for the training tests (imported by test_*.py).

Images are light noisy backgrounds with a few dark rectangles made of stroke-like bars, and
ICDAR 2015 gt files beside them: enough for a tiny model to lower its loss in a few steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from dbnet.config import Config, apply_overrides, config_from_dict


def make_dataset(
    root: Path, count: int = 4, size: int = 96, seed: int = 0, dont_care: bool = False
) -> Path:
    """Writes `count` images with their gt files under `root/images` and `root/gts`."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "gts").mkdir(parents=True, exist_ok=True)
    for number in range(1, count + 1):
        image = rng.integers(190, 250, size=(size, size, 3)).astype(np.uint8)
        lines = []
        for row in range(2):
            height = int(rng.integers(14, 22))
            width = int(rng.integers(30, size - 20))
            x0 = int(rng.integers(4, size - width - 4))
            y0 = 8 + row * (size // 2) + int(rng.integers(0, size // 2 - height - 10))
            # Dark vertical bars inside the box, like glyph strokes.
            for x in range(x0, x0 + width, 5):
                image[y0 : y0 + height, x : x + 3] = rng.integers(0, 60, size=3)
            x1, y1 = x0 + width, y0 + height
            text = "###" if dont_care else f"word{row}"
            lines.append(f"{x0},{y0},{x1},{y0},{x1},{y1},{x0},{y1},{text}")
        Image.fromarray(image).save(root / "images" / f"img_{number}.jpg", quality=95)
        (root / "gts" / f"gt_img_{number}.txt").write_text("\n".join(lines) + "\n")
    return root


def tiny_values(tmp_path: Path, train_dir: Path, val_dir: Path | None = None) -> dict[str, Any]:
    """Nested plain values of a configuration that trains in well under a second a step."""
    return {
        "data": {
            "train_dir": str(train_dir),
            "val_dir": str(val_dir if val_dir is not None else tmp_path / "no_val"),
            "crop_size": 64,
            "scale_range": [0.8, 1.2],
            "rotate_degrees": 5.0,
            "eval_size": 96,
        },
        "model": {"backbone": "mobilenet_v3_small", "width": 0.5, "inner_channels": 32},
        "optim": {"name": "adam", "lr": 0.002, "weight_decay": 0.0},
        "train": {
            "output_dir": str(tmp_path / "runs"),
            "run_name": "tiny",
            "epochs": 3,
            "batch_size": 2,
            "num_workers": 0,
            "device": "cpu",
            "deterministic": True,
            "log_every": 1,
            "image_every": 0,
            "val_every_epochs": 0,
            "final_eval": False,
        },
    }


def tiny_config(
    tmp_path: Path, train_dir: Path, val_dir: Path | None = None, overrides: list[str] = ()
) -> Config:
    """`tiny_values` with `section.key=value` overrides, as a validated Config."""
    values = apply_overrides(tiny_values(tmp_path, train_dir, val_dir), list(overrides))
    return config_from_dict(values)


def write_config(path: Path, config_values: dict[str, Any]) -> Path:
    """Writes nested plain values as a YAML configuration file."""
    path.write_text(yaml.safe_dump(config_values, sort_keys=False), encoding="utf-8")
    return path
