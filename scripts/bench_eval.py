"""Timings of evaluation: post-processing per image and the ICDAR 2015 metric per test set.

Post-processing runs on probability maps drawn from the ICDAR 2015 test gt (the training
shrink targets of every polygon, blurred, with noise) at the evaluation size; the metric scores the
500 test images' gt against a perturbed copy of it.
The model forward pass (ResNet-18 and MobileNetV3-large, random weights) is timed on the
CPU at the same map size.

Usage:
    python scripts/bench_eval.py [--data DIR] [--images 100] [--min-regions 20]
        [--model-threads 1] [--no-model]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from dbnet.config import ModelConfig, PostprocessConfig
from dbnet.data.io import Instance, read_gt
from dbnet.data.labels import make_label_maps
from dbnet.metrics import DetectionMetric
from dbnet.model.dbnet import build_model
from dbnet.postprocess import boxes_from_prob

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared/data/icdar2015/test"
# NOTE: every ICDAR 2015 image is 1280x720; the evaluation resize gives a 1280x736 map.
IMAGE_SIZE = (720, 1280)


def load_gts(data_dir: Path) -> list[list[Instance]]:
    """The instances of every ``gt_*.txt`` under ``data_dir/gts`` (or ``data_dir``)."""
    gt_dir = data_dir / "gts" if (data_dir / "gts").is_dir() else data_dir
    files = sorted(gt_dir.glob("gt_*.txt"))
    if not files:
        raise SystemExit(f"no gt_*.txt files in {gt_dir}")
    return [read_gt(path) for path in files]


def probability_map(
    instances: list[Instance], map_size: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """A plausible network output: the training shrink targets, blurred, with noise.

    Args:
        instances: The gt of one image, in original pixels; ``###`` regions are drawn too.
        map_size: (H, W) of the map.
        rng: Noise source.

    Returns:
        (H, W) float32 probabilities in [0, 1].
    """
    height, width = map_size
    scale = np.array([width / IMAGE_SIZE[1], height / IMAGE_SIZE[0]])
    polygons = [instance.points.astype(np.float64) * scale for instance in instances]
    prob = make_label_maps(height, width, polygons, [False] * len(polygons)).shrink_map
    prob = cv2.GaussianBlur(prob, (0, 0), 1.5)
    prob += rng.normal(0.0, 0.05, prob.shape).astype(np.float32)
    return np.clip(prob, 0.0, 1.0)


def bench_postprocess(
    gts: list[list[Instance]], count: int, map_size: tuple[int, int], repeat: int, seed: int
) -> dict:
    """Milliseconds per image of `boxes_from_prob`, for each mode and scoring."""
    rng = np.random.default_rng(seed)
    maps = [probability_map(instances, map_size, rng) for instances in gts[:count]]
    regions = float(np.mean([len(instances) for instances in gts[:count]]))

    timings = {}
    for mode in ("quad", "poly"):
        for score_mode in ("fast", "exact"):
            config = PostprocessConfig(mode=mode, score_mode=score_mode)
            best = float("inf")
            for _ in range(repeat):
                start = time.perf_counter()
                found = [len(boxes_from_prob(prob, IMAGE_SIZE, config)) for prob in maps]
                best = min(best, time.perf_counter() - start)
            timings[f"{mode}/{score_mode}"] = (1000 * best / len(maps), float(np.mean(found)))
    return {"images": len(maps), "regions_per_image": regions, "timings": timings}


def perturb(instances: list[Instance], rng: np.random.Generator) -> list[np.ndarray]:
    """Detections made from gt: vertices jittered, 10% dropped, 5% spurious boxes added."""
    detections = []
    for instance in instances:
        if rng.random() < 0.1:
            continue
        detections.append(instance.points + rng.normal(0.0, 2.0, instance.points.shape))
    for _ in range(rng.binomial(len(instances), 0.05)):
        x, y = rng.uniform(0, IMAGE_SIZE[1] - 100), rng.uniform(0, IMAGE_SIZE[0] - 30)
        detections.append(np.array([[x, y], [x + 100, y], [x + 100, y + 30], [x, y + 30]]))
    return detections


def bench_metric(gts: list[list[Instance]], repeat: int, seed: int) -> dict:
    """Seconds to score the whole set with `DetectionMetric`, gt against perturbed gt."""
    rng = np.random.default_rng(seed)
    detections = [perturb(instances, rng) for instances in gts]
    best = float("inf")
    for _ in range(repeat):
        metric = DetectionMetric()
        start = time.perf_counter()
        for instances, dets in zip(gts, detections, strict=True):
            metric.update([i.points for i in instances], [i.ignore for i in instances], dets)
        scores = metric.compute()
        best = min(best, time.perf_counter() - start)
    return {"seconds": best, "scores": scores}


MODEL_BACKBONES = ("resnet18", "mobilenet_v3_large")


def bench_model(backbone: str, map_size: tuple[int, int], threads: int, repeat: int) -> float:
    """Milliseconds per image of a randomly initialised DBNet forward pass on the CPU.

    Eval mode (probability branch only) under `torch.inference_mode`, batch 1, default
    neck and head (FPN, 256 inner channels); best of `repeat` timed calls after one warm-up.
    """
    torch.set_num_threads(threads)
    model = build_model(ModelConfig(backbone=backbone)).eval()
    image = torch.randn(1, 3, *map_size)  # (1, 3, H, W) normalised
    best = float("inf")
    with torch.inference_mode():
        model(image)  # warm-up: allocations and kernel selection
        for _ in range(repeat):
            start = time.perf_counter()
            model(image)
            best = min(best, time.perf_counter() - start)
    return 1000 * best


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="ICDAR 2015 test folder (gts/ inside) or a folder of gt files",
    )
    parser.add_argument(
        "--images", type=int, default=100, help="images used for the post-processing timing"
    )
    parser.add_argument(
        "--min-regions",
        type=int,
        default=0,
        help="time post-processing only on images with at least this many gt regions",
    )
    parser.add_argument(
        "--map-size",
        type=int,
        nargs=2,
        default=(736, 1280),
        metavar=("H", "W"),
        help="probability map size",
    )
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--model-threads", type=int, default=1, help="torch CPU threads of the model timing"
    )
    parser.add_argument("--no-model", action="store_true", help="skip the model timing")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    cv2.setNumThreads(1)
    gts = load_gts(args.data)

    busy = [instances for instances in gts if len(instances) >= args.min_regions]
    post = bench_postprocess(busy, args.images, tuple(args.map_size), args.repeat, args.seed)
    height, width = args.map_size
    print(
        f"post-processing, {post['images']} maps of {width}x{height}, "
        f"{post['regions_per_image']:.1f} gt regions per image (one thread):"
    )
    for name, (ms, found) in post["timings"].items():
        print(f"  {name:<11} {ms:6.2f} ms/image  ({found:.1f} detections per image)")

    metric = bench_metric(gts, args.repeat, args.seed)
    scores = metric["scores"]
    print(
        f"metric, {len(gts)} images (gt vs perturbed gt): {metric['seconds']:.3f} s "
        f"(P {scores['precision']:.3f} R {scores['recall']:.3f} H {scores['hmean']:.3f})"
    )

    if not args.no_model:
        threads = args.model_threads
        print(f"model forward, 1x3x{height}x{width}, eval mode, {threads} torch thread(s):")
        for backbone in MODEL_BACKBONES:
            ms = bench_model(backbone, (height, width), threads, args.repeat)
            print(f"  {backbone:<19} {ms:7.1f} ms/image")


if __name__ == "__main__":
    main()
