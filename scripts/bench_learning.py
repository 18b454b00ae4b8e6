"""Benchmarks learning: trains for a wall-time budget and scores the test set once.

1. The training folder (``data.train_dir``) is split, with a fixed seed, into a fitting
   part and a calibration part (``--calib-fraction`` of the images, 10 %), two folders of
   symbolic links under the work folder.
2. The trainer runs on the fitting part for ``--minutes`` of wall time, with the poly
   schedule measured in time (``schedule.length: minutes``), so the learning rate reaches
   0 when the budget is spent whatever the speed of the machine. It validates on the
   calibration part every ``--minutes / --curve-points`` minutes at the configuration's
   post-processing: the learning curve (that time is part of the budget). With ``--steps``
   instead, the schedule and the run last that many steps: a comparison of settings that
   does not depend on the load of the machine.
3. The final weights run once over the calibration part; ``postprocess.thresh``,
   ``box_thresh`` and ``unclip_ratio`` are chosen there, by hmean, over a grid.
4. The test set (``data.val_dir`` of the configuration) runs once; it is scored with the
   chosen values (the result) and, for reference, with the configuration's own values.
   Nothing is chosen on it.

The figures are printed and written to ``bench.json`` in the work folder, beside the run
folder (``runs/``) and the split (``split/``). CPU threads: torch's default (set
OMP_NUM_THREADS) unless ``--threads`` is given; the load average is printed, since other
jobs on the machine slow training down and so lower the figures.

Usage:
    python scripts/bench_learning.py --config configs/mqhs_cpu.yaml --minutes 20 \\
        --work-dir /tmp/mq_bench
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dbnet.config import Config, PostprocessConfig, load_config
from dbnet.data.dataset import DetectionDataset
from dbnet.data.io import find_pairs
from dbnet.engine.evaluate import (
    EvalImage,
    as_written,
    detections_at_thresholds,
    iter_probabilities,
)
from dbnet.engine.predict import load_model, resolve_device
from dbnet.engine.train import train
from dbnet.metrics import DetectionMetric

# NOTE: grids of the calibration sweep. unclip_ratio scales the offset of the unclip mode:
# DB's area * ratio / perimeter in "ratio" mode (1.5 in DB), the exact inverse of the
# training shrink in "inverse" mode (1.0 exact).
THRESH_GRID = (0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55)
BOX_THRESH_GRID = tuple(round(0.3 + 0.05 * i, 2) for i in range(11))
UNCLIP_GRIDS = {
    "ratio": (1.2, 1.4, 1.6, 1.8, 2.0, 2.2),
    "inverse": (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2),
}
METRIC_KEYS = ("precision", "recall", "hmean", "matched", "gt_care", "det_care")
RESULT_FILE = "bench.json"


@dataclass
class Split:
    """The two parts of the training folder.

    Attributes:
        fit: Folder of the images trained on (``images/`` + ``gts/`` of symbolic links).
        calib: Folder of the images the post-processing is chosen on.
        fit_count: Images in `fit`.
        calib_count: Images in `calib`.
    """

    fit: Path
    calib: Path
    fit_count: int
    calib_count: int


def split_training_set(train_dir: Path, out_dir: Path, fraction: float, seed: int) -> Split:
    """Splits a dataset folder into fitting and calibration folders of symbolic links.

    The images of each part keep their file names (the gt files theirs), so the pairing of
    the original folder holds.

    Args:
        train_dir: An ICDAR 2015 layout folder.
        out_dir: Where ``fit/`` and ``calib/`` are created (must not exist yet).
        fraction: Share of the images held out for calibration, in (0, 1).
        seed: Seed of the random choice.

    Raises:
        ValueError: A fraction outside (0, 1), or too few images for two non-empty parts.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"--calib-fraction must be in (0, 1), got {fraction}")
    pairs = find_pairs(train_dir)
    count = max(1, round(fraction * len(pairs)))
    if count >= len(pairs):
        raise ValueError(f"{train_dir}: {len(pairs)} images are too few to hold {count} out")

    order = np.random.default_rng(seed).permutation(len(pairs))
    held = set(order[:count].tolist())
    parts = {"fit": out_dir / "fit", "calib": out_dir / "calib"}
    for folder in parts.values():
        (folder / "images").mkdir(parents=True)
        (folder / "gts").mkdir()
    for index, (image, gt) in enumerate(pairs):
        folder = parts["calib" if index in held else "fit"]
        (folder / "images" / image.name).symlink_to(image.resolve())
        (folder / "gts" / gt.name).symlink_to(gt.resolve())
    return Split(parts["fit"], parts["calib"], len(pairs) - count, count)


def bench_config(
    config: Config,
    split: Split,
    budget: float,
    curve_points: int,
    out: Path,
    in_steps: bool = False,
) -> Config:
    """The training configuration: the fitting part, a schedule the length of the budget,
    validation on the calibration part `curve_points` times.

    Args:
        config: The configuration to benchmark.
        split: The fitting and calibration parts of its training folder.
        budget: Minutes of training, or steps when `in_steps`.
        curve_points: Validations along the run (0: none).
        out: The trainer's output folder.
        in_steps: The budget is a number of steps.
    """
    config = dataclasses.replace(config)
    config.data = dataclasses.replace(
        config.data, train_dir=str(split.fit), val_dir=str(split.calib)
    )
    every = budget / curve_points if curve_points > 0 else 0.0
    config.schedule = dataclasses.replace(
        config.schedule, length="steps" if in_steps else "minutes"
    )
    config.train = dataclasses.replace(
        config.train,
        output_dir=str(out),
        max_minutes=0.0 if in_steps else budget,
        max_steps=int(budget) if in_steps else 0,
        epochs=10**6,  # the budget ends the run
        val_every_epochs=0,
        val_every_steps=max(1, round(every)) if in_steps and every else 0,
        val_every_minutes=0.0 if in_steps else every,
        final_eval=False,
    )
    return config


def probability_maps(model: torch.nn.Module, folder: Path, config: Config) -> list[EvalImage]:
    """The model's probability maps of every image of a folder (the model runs once)."""
    dataset = DetectionDataset(folder, config.data, train=False)
    device = resolve_device(config.train.device)
    return list(iter_probabilities(model.to(device), dataset, config, device))


def score(
    images: Sequence[EvalImage],
    postprocess: PostprocessConfig,
    box_thresholds: Sequence[float],
    iou: float,
) -> list[dict[str, Any]]:
    """ICDAR 2015 scores of the maps at each box_thresh (the other settings fixed)."""
    metrics = [DetectionMetric(iou_threshold=iou) for _ in box_thresholds]
    for image in images:
        found = detections_at_thresholds(image.prob, image.size, postprocess, box_thresholds)
        for metric, detections in zip(metrics, found, strict=True):
            metric.update(image.polygons, image.ignore, as_written(detections))
    return [
        {"box_thresh": t, **{key: metric.compute()[key] for key in METRIC_KEYS}}
        for t, metric in zip(box_thresholds, metrics, strict=True)
    ]


def calibrate(
    images: Sequence[EvalImage],
    postprocess: PostprocessConfig,
    grid: dict[str, Sequence[float]],
    iou: float,
) -> tuple[PostprocessConfig, dict[str, Any]]:
    """Chooses thresh, box_thresh and unclip_ratio of highest hmean on `images`.

    Ties go to the first point of the grid (thresh, then unclip_ratio, then box_thresh
    ascending).

    Returns:
        The post-processing with the chosen values, and the scores there.
    """
    best: tuple[float, PostprocessConfig, dict[str, Any]] | None = None
    for thresh, unclip in itertools.product(grid["thresh"], grid["unclip_ratio"]):
        candidate = dataclasses.replace(postprocess, thresh=thresh, unclip_ratio=unclip)
        for row in score(images, candidate, grid["box_thresh"], iou):
            if best is None or row["hmean"] > best[0]:
                chosen = dataclasses.replace(candidate, box_thresh=row["box_thresh"])
                best = (row["hmean"], chosen, row)
    assert best is not None
    return best[1], best[2]


def read_curve(run_dir: Path, batch_size: int, started: float) -> list[dict[str, Any]]:
    """The validations of the run: minutes since `started`, step, images seen, P, R, H."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    if "val/hmean" not in events.Tags()["scalars"]:
        return []
    columns = {
        key: {e.step: e for e in events.Scalars(f"val/{key}")}
        for key in ("precision", "recall", "hmean")
    }
    return [
        {
            "minutes": (event.wall_time - started) / 60,
            "step": step,
            "images": step * batch_size,
            **{key: columns[key][step].value for key in columns},
        }
        for step, event in sorted(columns["hmean"].items())
    ]


def _figures(scores: dict[str, Any]) -> str:
    return (
        f"P {scores['precision']:.4f} R {scores['recall']:.4f} H {scores['hmean']:.4f} "
        f"({scores['matched']} of {scores['gt_care']} gt matched, {scores['det_care']} det)"
    )


def _post_values(post: PostprocessConfig) -> dict[str, Any]:
    keys = ("thresh", "box_thresh", "unclip_ratio", "unclip_mode")
    return {key: getattr(post, key) for key in keys}


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(value) for value in text.split(",") if value.strip())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="YAML configuration")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, help="training wall time")
    budget.add_argument("--steps", type=int, help="training steps instead of a time budget")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="configuration overrides"
    )
    parser.add_argument("--work-dir", type=Path, help="new folder for the outputs (default: /tmp)")
    parser.add_argument("--calib-fraction", type=float, default=0.1)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument(
        "--curve-points", type=int, default=5, help="validations on the calibration part"
    )
    parser.add_argument("--threads", type=int, help="torch and OpenCV threads")
    parser.add_argument("--thresh", type=_floats, default=THRESH_GRID, help="grid, a,b,c")
    parser.add_argument("--box-thresh", type=_floats, default=BOX_THRESH_GRID, help="grid")
    parser.add_argument("--unclip", type=_floats, help="grid (default: per unclip mode)")
    args = parser.parse_args(argv)
    budget = args.minutes if args.minutes is not None else args.steps
    if budget <= 0:
        parser.error(f"the budget (--minutes or --steps) must be above 0, got {budget}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    config = load_config(args.config, args.set)
    test_dir = Path(config.data.val_dir)
    if not test_dir.is_dir():
        raise SystemExit(f"data.val_dir (the test set) {test_dir} does not exist")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_learning-"))
    work.mkdir(parents=True, exist_ok=args.work_dir is None)

    train_dir = Path(config.data.train_dir)
    split = split_training_set(train_dir, work / "split", args.calib_fraction, args.split_seed)
    in_steps = args.steps is not None
    budget = args.steps if in_steps else args.minutes
    config = bench_config(config, split, budget, args.curve_points, work / "runs", in_steps)
    print(
        f"{args.config}: {config.model.backbone} width {config.model.width} inner "
        f"{config.model.inner_channels}, crop {config.data.crop_size} batch "
        f"{config.train.batch_size}, {config.optim.name} lr {config.optim.lr}; "
        f"{torch.get_num_threads()} thread(s), load average "
        "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    )
    print(
        f"split of {train_dir}: {split.fit_count} images to train on, "
        f"{split.calib_count} to calibrate on (seed {args.split_seed}); test set {test_dir}"
    )

    # Train on the fitting part for the budget.
    started = time.time()
    run_dir = train(config)
    checkpoint = run_dir / "checkpoints" / "last.pt"
    model, _ = load_model(checkpoint)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    steps, seconds = int(state["step"]), float(state["elapsed_seconds"])
    images_seen = steps * config.train.batch_size
    curve = read_curve(run_dir, config.train.batch_size, started)
    print(
        f"trained {seconds / 60:.2f} min: {steps} steps, {images_seen} images seen "
        f"({images_seen / split.fit_count:.1f} epochs), {images_seen / seconds:.2f} images/s; "
        "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    )

    # Choose the post-processing on the calibration part.
    grid = {
        "thresh": args.thresh,
        "box_thresh": args.box_thresh,
        "unclip_ratio": args.unclip or UNCLIP_GRIDS[config.postprocess.unclip_mode],
    }
    iou = config.eval.iou_threshold
    calib_maps = probability_maps(model, split.calib, config)
    calib_fixed = score(calib_maps, config.postprocess, [config.postprocess.box_thresh], iou)[0]
    chosen, calib_best = calibrate(calib_maps, config.postprocess, grid, iou)
    curve.append({"minutes": seconds / 60, "step": steps, "images": images_seen, **calib_fixed})

    print("curve (calibration part, configured post-processing):")
    for point in curve:
        print(
            f"  {point['minutes']:6.2f} min  step {point['step']:6d}  {point['images']:7d} "
            f"images  P {point['precision']:.4f} R {point['recall']:.4f} H {point['hmean']:.4f}"
        )
    configured = _post_values(config.postprocess)
    print(f"calibration ({len(calib_maps)} images) at configured {configured}:")
    print(f"  {_figures(calib_fixed)}")
    print(f"calibration, chosen {_post_values(chosen)}:")
    print(f"  {_figures(calib_best)}")

    # The test set, once.
    test_maps = probability_maps(model, test_dir, config)
    test = score(test_maps, chosen, [chosen.box_thresh], iou)[0]
    test_fixed = score(test_maps, config.postprocess, [config.postprocess.box_thresh], iou)[0]
    print(f"test ({len(test_maps)} images) at configured post-processing: {_figures(test_fixed)}")
    print(f"TEST ({len(test_maps)} images) at calibrated post-processing: {_figures(test)}")

    result = {
        "config": str(args.config),
        "minutes": args.minutes,
        "budget_steps": args.steps,
        "trained_seconds": seconds,
        "steps": steps,
        "images_seen": images_seen,
        "run_dir": str(run_dir),
        "split": {
            "fit": str(split.fit),
            "calib": str(split.calib),
            "fit_images": split.fit_count,
            "calib_images": [str(image.path) for image in calib_maps],
        },
        "curve": curve,
        "calibration": {
            "grid": {key: list(values) for key, values in grid.items()},
            "configured": {**_post_values(config.postprocess), **calib_fixed},
            "chosen": {**_post_values(chosen), **calib_best},
        },
        "test": {
            "dir": str(test_dir),
            "images": [str(image.path) for image in test_maps],
            "calibrated": {**_post_values(chosen), **test},
            "configured": {**_post_values(config.postprocess), **test_fixed},
        },
    }
    (work / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"written {work / RESULT_FILE}")
    return result


if __name__ == "__main__":
    main()
