"""Benchmarks one training step of DBNet: forward, loss, backward and optimiser step.

Random images and random text-like label maps (eight horizontal boxes per image covering
about 15 % of it, 3 % after shrinking, one ignored box on every other image, a threshold
band around each box) are made once; the
step is then timed with ``time.perf_counter`` over ``--steps`` iterations after ``--warmup``
untimed ones. Printed per memory format: images per second, milliseconds per step and the
peak memory (CPU: the process's resident set high-water mark from ``getrusage``, which
includes the Python interpreter and torch itself; CUDA: ``torch.cuda.max_memory_allocated``),
with its rise over the peak after setup (model, optimiser and data built, nothing run).
Each memory format runs in a fresh process so that the peaks do not mix. The load average
of the machine is printed before and after, since other jobs skew CPU figures.

Usage:
    python scripts/bench_train.py --backbone resnet18 --batch 2 --size 640 --threads 2
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import time
from dataclasses import dataclass
from queue import Empty

import torch

from dbnet.config import LossConfig, ModelConfig
from dbnet.loss import DBLoss
from dbnet.model.backbones import BACKBONES
from dbnet.model.dbnet import build_model


@dataclass
class Result:
    """Figures of one run."""

    memory_format: str
    images_per_second: float
    ms_per_step: float
    setup_mb: float
    peak_mb: float
    final_loss: float


def random_label_maps(
    batch: int, size: int, generator: torch.Generator, boxes: int = 8
) -> dict[str, torch.Tensor]:
    """Text-like DB label maps: axis-aligned boxes with a shrunk core and a threshold band.

    Args:
        batch: Number of images.
        size: Side of the square crop in pixels.
        generator: Random source.
        boxes: Boxes per image.

    Returns:
        `shrink_map`, `shrink_mask`, `threshold_map`, `threshold_mask`, each (batch, size, size).
    """
    ys = torch.arange(size, dtype=torch.float32).view(size, 1)  # (S, 1)
    xs = torch.arange(size, dtype=torch.float32).view(1, size)  # (1, S)
    shrink_map = torch.zeros(batch, size, size)
    shrink_mask = torch.ones(batch, size, size)
    threshold_map = torch.full((batch, size, size), 0.3)
    threshold_mask = torch.zeros(batch, size, size)

    for i in range(batch):
        for j in range(boxes):
            u = torch.rand(4, generator=generator)
            h = size * (0.03 + 0.06 * u[0].item())
            w = h * (2.0 + 8.0 * u[1].item())
            x0 = (size - w) * u[2].item()
            y0 = (size - h) * u[3].item()
            x1, y1 = x0 + w, y0 + h

            # Signed distance to the box border (negative inside), as the labels measure it.
            dx = torch.maximum(x0 - xs, xs - x1)  # (1, S)
            dy = torch.maximum(y0 - ys, ys - y1)  # (S, 1)
            outside = torch.hypot(dx.clamp(min=0), dy.clamp(min=0))  # (S, S)
            inside = torch.maximum(dx, dy).clamp(max=0)  # (S, S)
            distance = outside + inside
            offset = 0.4 * h  # shrink and dilation offset

            core = distance <= -offset
            band = distance.abs() <= offset
            if j == 0 and i % 2:  # an ignored ("###") box
                shrink_mask[i][distance <= 0] = 0.0
                continue
            shrink_map[i][core] = 1.0
            value = 0.3 + 0.4 * (1.0 - distance.abs() / offset)
            threshold_map[i] = torch.where(
                band, torch.maximum(threshold_map[i], value), threshold_map[i]
            )
            threshold_mask[i][band] = 1.0

    return {
        "shrink_map": shrink_map,
        "shrink_mask": shrink_mask,
        "threshold_map": threshold_map,
        "threshold_mask": threshold_mask,
    }


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocations on a GPU, the resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def run(args: argparse.Namespace, memory_format: str) -> Result:
    """Builds the model and times the training step in the current process."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    channels_last = memory_format == "channels_last"
    layout = torch.channels_last if channels_last else torch.contiguous_format

    config = ModelConfig(
        backbone=args.backbone,
        width=args.width,
        neck=args.neck,
        inner_channels=args.inner_channels,
        channels_last=channels_last,
    )
    model = build_model(config).to(device).train()
    criterion = DBLoss(LossConfig())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.007, momentum=0.9, weight_decay=1e-4)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=generator)
    images = images.to(device).contiguous(memory_format=layout)
    labels = {
        k: v.to(device) for k, v in random_label_maps(args.batch, args.size, generator).items()
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> float:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = criterion(model(images), labels)["loss"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.item()  # waits for the device, like a training loop that logs

    setup_mb = peak_memory_mb(device)
    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    elapsed = time.perf_counter() - start

    return Result(
        memory_format=memory_format,
        images_per_second=args.batch * args.steps / elapsed,
        ms_per_step=1000.0 * elapsed / args.steps,
        setup_mb=setup_mb,
        peak_mb=peak_memory_mb(device),
        final_loss=loss,
    )


def _child(args: argparse.Namespace, memory_format: str, queue: multiprocessing.Queue) -> None:
    queue.put(run(args, memory_format))


def _wait(process: multiprocessing.Process, queue: multiprocessing.Queue) -> Result:
    """The child's result, or an exit with its code when it dies without one."""
    while True:
        try:
            result = queue.get(timeout=1.0)
        except Empty:
            if not process.is_alive():
                message = f"benchmark process failed with exit code {process.exitcode}"
                raise SystemExit(message) from None
            continue
        process.join()
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet18", choices=BACKBONES)
    parser.add_argument("--width", type=float, default=1.0, help="MobileNetV3 width multiplier")
    parser.add_argument("--neck", default="fpn", choices=["fpn", "asf"])
    parser.add_argument("--inner-channels", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=640, help="square crop side, multiple of 32")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    parser.add_argument(
        "--memory-format",
        default="both",
        choices=["contiguous", "channels_last", "both"],
        help="'both' runs each in its own process",
    )
    args = parser.parse_args()
    if args.size % 32:
        parser.error(f"--size must be a multiple of 32, got {args.size}")

    formats = (
        ["contiguous", "channels_last"] if args.memory_format == "both" else [args.memory_format]
    )
    print(
        f"{args.backbone} width {args.width} neck {args.neck} inner {args.inner_channels}, "
        f"batch {args.batch} x {args.size}x{args.size}, {args.device}, amp {args.amp}, "
        f"{args.threads} threads, {args.steps} timed steps after {args.warmup}"
    )
    print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))

    context = multiprocessing.get_context("spawn")
    for memory_format in formats:
        queue = context.Queue()
        process = context.Process(target=_child, args=(args, memory_format, queue))
        process.start()
        result = _wait(process, queue)
        print(
            f"{result.memory_format:>13}: {result.images_per_second:7.2f} images/s, "
            f"{result.ms_per_step:8.1f} ms/step, peak {result.peak_mb:6.0f} MiB "
            f"({result.peak_mb - result.setup_mb:+.0f} over setup), "
            f"loss {result.final_loss:.3f}"
        )
    print("load average after:  {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
