"""Benchmarks target generation on real ICDAR 2015 annotations.

Label maps: the polygons of each image are scaled to the benchmark size (640x360 by
default; the images themselves are not decoded) and ``make_label_maps`` is timed with
``time.perf_counter``, once per image and round, after one untimed warm-up call. The
figure printed is milliseconds per image, mean and median over every timed call.

Training pipeline: ``DetectionDataset(train=True)`` items (decode the JPEG, augment to a
crop, label maps, normalised tensors) are timed one after the other in this process, as
one DataLoader worker (num_workers=0) with a single OpenCV and torch thread sees them. The
figure printed is images per second, with the share of the label maps and of the image
decoding (each timed again, separately, on the same inputs).

Usage:
    python scripts/bench_labels.py [--data ../shared/data/icdar2015/train] [--images 200]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from dbnet.config import DataConfig
from dbnet.data.dataset import DetectionDataset
from dbnet.data.io import find_pairs, image_size, read_gt, read_image
from dbnet.data.labels import make_label_maps


@dataclass
class Annotation:
    """The polygons of one image, already scaled to the benchmark size."""

    polygons: list[np.ndarray]  # each (k, 2) float32 pixels
    ignore: list[bool]


def load_annotations(data: Path, count: int, height: int, width: int) -> list[Annotation]:
    """Reads the first ``count`` gt files of a dataset, scaled to height x width.

    Args:
        data: Dataset folder (``images/`` and ``gts/``, or one folder).
        count: Number of images; 0 or less for all.
        height: Target height in pixels.
        width: Target width in pixels.

    Returns:
        One annotation per image, in the dataset's natural order.
    """
    pairs = find_pairs(data)
    if count > 0:
        pairs = pairs[:count]

    annotations = []
    for image_path, gt_path in pairs:
        original_height, original_width = image_size(image_path)
        scale = np.array([width / original_width, height / original_height], np.float32)
        instances = read_gt(gt_path)
        annotations.append(
            Annotation(
                polygons=[instance.points * scale for instance in instances],
                ignore=[instance.ignore for instance in instances],
            )
        )
    return annotations


def time_label_maps(
    annotations: list[Annotation], height: int, width: int, rounds: int
) -> list[float]:
    """Milliseconds of one ``make_label_maps`` call, for every image and round."""
    first = annotations[0]
    make_label_maps(height, width, first.polygons, first.ignore)  # warm-up

    timings = []
    for _ in range(rounds):
        for annotation in annotations:
            start = time.perf_counter()
            make_label_maps(height, width, annotation.polygons, annotation.ignore)
            timings.append((time.perf_counter() - start) * 1000.0)
    return timings


def describe(name: str, timings: list[float], unit: str) -> str:
    """One line: the mean and median of ``timings``."""
    return (
        f"{name}: mean {statistics.fmean(timings):.3f} {unit}, "
        f"median {statistics.median(timings):.3f} {unit} over {len(timings)} calls"
    )


@dataclass
class PipelineTimings:
    """Seconds per training item: the whole item, and two of its parts timed again alone."""

    total: list[float]
    decode: list[float]
    labels: list[float]


def time_pipeline(data: Path, count: int, config: DataConfig) -> PipelineTimings:
    """Times training items of a dataset one after the other, as a single worker does.

    Args:
        data: Dataset folder.
        count: Number of images; 0 or less for all.
        config: Data configuration (crop size, augmentation, label parameters).

    Returns:
        Per image: the whole item, then the image decoding and the label maps of the same
        item timed again on their own.
    """
    dataset = DetectionDataset(data, config, train=True)
    indices = range(len(dataset) if count <= 0 else min(count, len(dataset)))
    dataset[0]  # warm-up

    timings = PipelineTimings([], [], [])
    size = config.crop_size
    for index in indices:
        start = time.perf_counter()
        dataset[index]
        timings.total.append(time.perf_counter() - start)

        start = time.perf_counter()
        read_image(dataset.pairs[index][0])
        timings.decode.append(time.perf_counter() - start)

        sample = dataset.train_sample(index)  # the same crop again (same seed, epoch, index)
        start = time.perf_counter()
        make_label_maps(
            size,
            size,
            sample.polygons,
            sample.ignore,
            shrink_ratio=config.shrink_ratio,
            thresh_min=config.thresh_min,
            thresh_max=config.thresh_max,
            min_text_size=config.min_text_size,
        )
        timings.labels.append(time.perf_counter() - start)
    return timings


def describe_pipeline(timings: PipelineTimings, crop: int) -> str:
    """Images per second of the whole pipeline, and the share of decoding and label maps."""
    total = sum(timings.total)
    return (
        f"training pipeline ({crop}x{crop} crops, one worker): "
        f"{len(timings.total) / total:.1f} images/s, {1000 * total / len(timings.total):.1f} "
        f"ms per image; label maps {100 * sum(timings.labels) / total:.0f}%, "
        f"image decoding {100 * sum(timings.decode) / total:.0f}%"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=Path("../shared/data/icdar2015/train"),
        help="dataset folder in ICDAR 2015 layout",
    )
    parser.add_argument("--images", type=int, default=200, help="images to use (0: all)")
    parser.add_argument("--rounds", type=int, default=5, help="timed passes over the images")
    parser.add_argument("--width", type=int, default=640, help="benchmark width in pixels")
    parser.add_argument("--height", type=int, default=360, help="benchmark height in pixels")
    parser.add_argument(
        "--pipeline-images", type=int, default=200, help="images for the pipeline (-1: skip it)"
    )
    parser.add_argument("--crop", type=int, default=640, help="training crop size in pixels")
    parser.add_argument(
        "--color-jitter", type=float, default=0.0, help="colour jitter strength in the pipeline"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cv2.setNumThreads(1)

    annotations = load_annotations(args.data, args.images, args.height, args.width)
    if not annotations:
        raise SystemExit(f"no (image, gt) pairs in {args.data}")
    instances = sum(len(annotation.polygons) for annotation in annotations)
    print(
        f"{len(annotations)} images, {instances / len(annotations):.1f} polygons per image, "
        f"maps at {args.width}x{args.height}"
    )

    timings = time_label_maps(annotations, args.height, args.width, args.rounds)
    print(describe("label maps", timings, "ms per image"))

    if args.pipeline_images >= 0:
        torch.set_num_threads(1)
        config = DataConfig(crop_size=args.crop, color_jitter=args.color_jitter)
        pipeline = time_pipeline(args.data, args.pipeline_images, config)
        print(describe_pipeline(pipeline, args.crop))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
