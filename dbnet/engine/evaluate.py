"""A model over an evaluation dataset: probability maps -> detections -> ICDAR 2015 scores.

One per-image loop serves the trainer's validation (`evaluate_model`) and
``dbnet eval --checkpoint`` (`evaluate_checkpoint`). The model runs once per image and each
probability map is post-processed right away, at the configured ``box_thresh`` and, for a
sweep, at every other one; no map is kept.

Detections are scored as they are written: rounded to integer pixels, the ICDAR 2015 result
format. So ``dbnet eval --pred-dir`` on the folder or the zip `evaluate_checkpoint` writes
gives the numbers it returns.

Outputs of `evaluate_checkpoint`, in a folder created for them (an existing folder is never
written into: a new name is taken instead)::

    res_<image stem>.txt   detections at the configured box_thresh, x1,y1,...,x4,y4 a line
    submission.zip         the same files at the archive's root (the competition's format)
    scores.json            what `evaluate_checkpoint` returns
    config.yaml            the resolved configuration
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import re
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from dbnet.config import (
    Config,
    ModelConfig,
    PostprocessConfig,
    config_to_dict,
    load_config,
    parse_override,
    save_config,
)
from dbnet.data.dataset import DetectionDataset, collate
from dbnet.engine.predict import load_model, resolve_device
from dbnet.errors import ConfigError, DBNetError
from dbnet.metrics import DetectionMetric, write_result_file
from dbnet.postprocess import Detection, boxes_from_prob

logger = logging.getLogger(__name__)

# NOTE: the grid of `--sweep` when eval.sweep_box_thresh is empty: 0.30, 0.35, ..., 0.80,
# around DB's 0.6 for ICDAR 2015 and down to the post-processing's binarisation threshold.
DEFAULT_SWEEP = tuple(round(0.30 + 0.05 * i, 2) for i in range(11))
SWEEP_NOTE = (
    "box_thresh chosen on the evaluation set itself: an optimistic estimate, not a test "
    "result; choose it on a validation set and report the fixed-threshold scores"
)
SUBMISSION_ZIP = "submission.zip"
SCORES_FILE = "scores.json"
CONFIG_FILE = "config.yaml"
# The trainer keeps checkpoints in <run folder>/checkpoints/.
_RUN_CHECKPOINTS = "checkpoints"
_AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_METRIC_KEYS = ("precision", "recall", "hmean", "matched", "gt_care", "det_care")


# ---- the per-image loop ------------------------------------------------------------------


@dataclass
class EvalImage:
    """One evaluation image after the model.

    Attributes:
        path: The image file.
        size: Original (height, width).
        prob: (H', W') float32 probabilities in [0, 1] at network resolution.
        polygons: (k, 2) gt polygons in original pixels.
        ignore: One don't-care flag per gt polygon.
    """

    path: Path
    size: tuple[int, int]
    prob: np.ndarray
    polygons: list[np.ndarray]
    ignore: list[bool]


def iter_probabilities(
    model: nn.Module,
    dataset: Dataset,
    config: Config,
    device: torch.device,
    progress: bool = False,
) -> Iterator[EvalImage]:
    """Runs the model once over every image of an evaluation dataset, one map at a time.

    Args:
        model: DBNet on `device`; switched to eval mode.
        dataset: Evaluation items (`DetectionDataset(..., train=False)` or a Subset of one).
        config: ``eval.batch_size``, ``train.amp`` (autocast dtype) and
            ``model.channels_last``.
        device: Where the model runs.
        progress: Show a progress bar (on a terminal only).

    Yields:
        Each image once, in dataset order, with its probability map and ground truth.
    """
    model.eval()
    loader = DataLoader(dataset, batch_size=config.eval.batch_size, collate_fn=collate)
    amp_dtype = _AMP_DTYPES[config.train.amp]
    memory_format = torch.channels_last if config.model.channels_last else torch.contiguous_format
    seen: set[str] = set()

    bar = tqdm(total=len(dataset), desc="eval", unit="img", disable=None if progress else True)
    with bar:
        for batch in loader:
            images = batch["image"].to(device, memory_format=memory_format)  # (N, 3, H', W')
            with (
                torch.inference_mode(),
                torch.autocast(device.type, amp_dtype, enabled=amp_dtype is not None),
            ):
                prob = model(images)["prob"]  # (N, 1, H', W') in [0, 1]
            prob = prob.float().cpu().numpy()
            bar.update(len(batch["path"]))

            for i, path in enumerate(batch["path"]):
                # The dataset stands the next readable image in for an unreadable one:
                # score every image once.
                if path in seen:
                    continue
                seen.add(path)
                height, width = (int(v) for v in batch["shape"][i])
                yield EvalImage(
                    Path(path),
                    (height, width),
                    prob[i, 0],
                    batch["polygons"][i],
                    batch["ignore"][i],
                )


def detections_at_thresholds(
    prob: np.ndarray,
    original_size: tuple[int, int],
    postprocess: PostprocessConfig,
    thresholds: Sequence[float],
) -> list[list[Detection]]:
    """The detections of one probability map at several ``box_thresh`` values.

    NOTE: box_thresh only drops candidates whose score is below it (a candidate is scored
    before the test and nothing after it depends on the threshold), so the detections at t
    are those found at the lowest threshold with a score of at least t, in the same order:
    one post-processing serves the whole sweep.

    Args:
        prob: (H', W') probabilities in [0, 1].
        original_size: (h, w) of the original image.
        postprocess: Every other post-processing setting.
        thresholds: The box_thresh values.

    Returns:
        One list of detections per threshold, in the order of `thresholds`.
    """
    lowest = dataclasses.replace(postprocess, box_thresh=min(thresholds))
    found = boxes_from_prob(prob, original_size, lowest)
    return [[d for d in found if d.score >= t] for t in thresholds]


def as_written(detections: Sequence[Detection]) -> list[np.ndarray]:
    """The polygons of detections as a result file stores them: (k, 2) integer pixels."""
    return [np.rint(np.asarray(d.points, dtype=np.float64)) for d in detections]


@dataclass
class SetScores:
    """Scores of a dataset at the configured box_thresh and along a box_thresh sweep.

    Attributes:
        scores: `DetectionMetric.compute` at ``postprocess.box_thresh``.
        sweep: One row per swept box_thresh, ascending (the configured one included):
            ``box_thresh`` and the metric's precision, recall, hmean and counts. Empty
            without a sweep.
    """

    scores: dict[str, Any]
    sweep: list[dict[str, Any]] = field(default_factory=list)


def score_dataset(
    model: nn.Module,
    dataset: Dataset,
    config: Config,
    device: torch.device,
    sweep: Sequence[float] = (),
    on_image: Callable[[EvalImage, list[Detection]], None] | None = None,
    progress: bool = False,
) -> SetScores:
    """ICDAR 2015 scores of a model on a dataset, one DetectionMetric per box_thresh.

    Args:
        model: DBNet on `device`.
        dataset: Evaluation items.
        config: Post-processing, evaluation, AMP and memory-format settings.
        device: Where the model runs.
        sweep: Further box_thresh values to score; empty for none.
        on_image: Called with each image and its detections at the configured box_thresh
            (for example to write its result file).
        progress: Show a progress bar (on a terminal only).

    Returns:
        The scores at the configured box_thresh, and the sweep.
    """
    fixed = config.postprocess.box_thresh
    thresholds = sorted({fixed, *sweep})
    metrics = [DetectionMetric(iou_threshold=config.eval.iou_threshold) for _ in thresholds]
    fixed_index = thresholds.index(fixed)

    for image in iter_probabilities(model, dataset, config, device, progress):
        found = detections_at_thresholds(image.prob, image.size, config.postprocess, thresholds)
        for metric, detections in zip(metrics, found, strict=True):
            metric.update(image.polygons, image.ignore, as_written(detections))
        if on_image is not None:
            on_image(image, found[fixed_index])

    # An image that could not be read still has its ground truth: it counts as an image
    # without detections, as a missing result file does in the competition's scoring.
    for polygons, ignore in _unreadable_ground_truth(dataset):
        for metric in metrics:
            metric.update(polygons, ignore, [])

    results = [metric.compute() for metric in metrics]
    rows = []
    if sweep:
        rows = [
            {"box_thresh": t, **{key: result[key] for key in _METRIC_KEYS}}
            for t, result in zip(thresholds, results, strict=True)
        ]
    return SetScores(results[fixed_index], rows)


def _unreadable_ground_truth(dataset: Dataset) -> list[tuple[list[np.ndarray], list[bool]]]:
    """The gt of a DetectionDataset's (or a Subset's) samples whose image was unreadable."""
    indices = None
    if isinstance(dataset, Subset):
        indices = {int(i) for i in dataset.indices}
        dataset = dataset.dataset
    collect = getattr(dataset, "unreadable_ground_truth", None)
    return collect(indices) if collect is not None else []


def predict_dataset(
    model: nn.Module, dataset: Dataset, config: Config, device: torch.device
) -> list[dict[str, Any]]:
    """Detections of every image of an evaluation dataset.

    Args:
        model: DBNet; switched to eval mode.
        dataset: Evaluation items (`DetectionDataset(..., train=False)` or a Subset of one).
        config: Post-processing and evaluation settings.
        device: Where the model runs.

    Returns:
        Per image: ``path``, ``detections`` (list of Detection in original pixels),
        ``polygons`` and ``ignore`` (the ground truth).
    """
    return [
        {
            "path": str(image.path),
            "detections": boxes_from_prob(image.prob, image.size, config.postprocess),
            "polygons": image.polygons,
            "ignore": image.ignore,
        }
        for image in iter_probabilities(model, dataset, config, device)
    ]


def evaluate_model(
    model: nn.Module, dataset: Dataset, config: Config, device: torch.device
) -> dict[str, Any]:
    """ICDAR 2015 precision, recall and hmean of `model` on `dataset`.

    Returns:
        ``precision``, ``recall``, ``hmean``, ``matched``, ``gt_care``, ``det_care``,
        ``images``.
    """
    return score_dataset(model, dataset, config, device).scores


# ---- a checkpoint on a test set ----------------------------------------------------------


def evaluation_config(
    stored: Config, config_path: str | Path | None, overrides: Sequence[str] = ()
) -> Config:
    """The configuration of an evaluation: the checkpoint's, updated by a file and overrides.

    The file's values are merged over the stored configuration key by key (a file holding
    only ``data.val_dir`` keeps the stored post-processing), then the overrides apply. The
    model section always stays the checkpoint's: the weights fix the architecture.

    Args:
        stored: The configuration stored in the checkpoint.
        config_path: A YAML file, or None.
        overrides: ``section.key=value`` strings.

    Raises:
        ConfigError: An override of a model setting, or a key or value that is not allowed.
    """
    for text in overrides:
        path, _ = parse_override(text)
        if path[0] == "model":
            raise ConfigError(
                f"override {text!r}: the model comes from the checkpoint; only data, "
                "postprocess, eval and train settings can change at evaluation"
            )
    config = load_config(config_path, list(overrides), base=config_to_dict(stored))

    ignored = _model_differences(config.model, stored.model)
    if ignored:
        logger.warning(
            "%s: model settings ignored, the architecture comes from the checkpoint: %s",
            config_path,
            "; ".join(ignored),
        )
    config.model = stored.model
    return config


def _model_differences(requested: ModelConfig, stored: ModelConfig) -> list[str]:
    """``key value (checkpoint: value)`` for every model setting that differs."""
    differences = []
    for item in dataclasses.fields(ModelConfig):
        if item.name == "pretrained":  # the checkpoint holds every weight
            continue
        mine, theirs = getattr(requested, item.name), getattr(stored, item.name)
        if mine != theirs:
            differences.append(f"{item.name} {mine!r} (checkpoint: {theirs!r})")
    return differences


def sweep_thresholds(config: Config, sweep: bool) -> list[float]:
    """The box_thresh values to sweep: ``eval.sweep_box_thresh``, else `DEFAULT_SWEEP` when
    `sweep` is asked for, else none."""
    if config.eval.sweep_box_thresh:
        return sorted(set(config.eval.sweep_box_thresh))
    return list(DEFAULT_SWEEP) if sweep else []


def result_name(image_path: str | Path) -> str:
    """The result file name of an image, ``res_<stem>.txt``.

    Raises:
        DBNetError: The name would hold a folder part on some system (``/``, ``\\``, a
            drive), so the file could land outside the output folder or the zip's root.
    """
    stem = Path(image_path).stem
    name = f"res_{stem}.txt"
    flat = PurePosixPath(name).name == name and PureWindowsPath(name).name == name
    if not flat or ":" in name:
        raise DBNetError(
            f"{image_path}: the image name has a path component ('/', '\\' or ':'), its "
            f"result file {name!r} would leave the output folder; rename the image"
        )
    return name


def default_output_dir(checkpoint: Path, data_dir: Path) -> Path:
    """``<run folder>/eval-<data folder name>-<timestamp>``.

    The run folder is the parent of the checkpoint's ``checkpoints/`` folder; a checkpoint
    elsewhere has its own folder instead.
    """
    folder = checkpoint.resolve().parent
    if folder.name == _RUN_CHECKPOINTS:
        folder = folder.parent
    data_name = re.sub(r"[^A-Za-z0-9._-]+", "_", data_dir.resolve().name).strip("._") or "data"
    return folder / f"eval-{data_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def create_output_dir(path: str | Path) -> Path:
    """Creates `path`, or ``<path>-2``, ``<path>-3``, ... when it exists: a folder that
    exists is never written into."""
    path = Path(path).resolve()
    for number in itertools.count(1):
        candidate = path if number == 1 else path.with_name(f"{path.name}-{number}")
        try:
            candidate.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            continue
        if candidate != path:
            logger.warning("%s exists: writing to %s instead", path, candidate)
        return candidate
    raise AssertionError("unreachable")


def write_submission(path: Path, files: Sequence[Path]) -> Path:
    """Zips result files at the archive's root, without folders (the competition's format)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for file in files:
            archive.write(file, arcname=file.name)
    return path


def evaluate_checkpoint(
    checkpoint: str | Path,
    config_path: str | Path | None = None,
    data_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    sweep: bool = False,
    overrides: Sequence[str] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluates a checkpoint on a test set and writes its result files and submission zip.

    Images are resized by the configuration's eval policy (``data.eval_side``,
    ``data.eval_size``), run once through the model with the configured device and AMP, and
    post-processed at ``postprocess.box_thresh``; with a sweep, at every swept box_thresh too.

    Args:
        checkpoint: A checkpoint written by the trainer; it fixes the architecture.
        config_path: A YAML file merged over the checkpoint's configuration (see
            `evaluation_config`); None keeps the stored one.
        data_dir: The dataset folder; None for ``data.val_dir``.
        out_dir: Where to write; None for `default_output_dir`. Never an existing folder:
            ``-2``, ``-3``, ... are appended until the name is new.
        sweep: Sweep box_thresh over `DEFAULT_SWEEP` when ``eval.sweep_box_thresh`` is empty
            (a non-empty list is always swept).
        overrides: ``section.key=value`` strings, applied last.
        progress: Show a progress bar (on a terminal only).

    Returns:
        ``precision``, ``recall``, ``hmean``, ``matched``, ``gt_care``, ``det_care``,
        ``images`` at the configured box_thresh; ``box_thresh``, ``checkpoint``,
        ``data_dir``, ``out_dir``, ``zip``, ``skipped`` (unreadable samples: file and
        reason); with a sweep, ``sweep``: ``note``, ``results`` (one row per box_thresh) and
        ``best`` (the row of highest hmean).

    Raises:
        CheckpointError: The checkpoint is missing or unreadable.
        ConfigError: A configuration that is not allowed.
        FileNotFoundError: The dataset folder does not exist.
        DBNetError: No image with a gt file, or an image name with a path component.
    """
    checkpoint = Path(checkpoint)
    model, stored = load_model(checkpoint)
    config = evaluation_config(stored, config_path, overrides)
    data_dir = Path(data_dir if data_dir is not None else config.data.val_dir)
    dataset = DetectionDataset(data_dir, config.data, train=False)
    for image_path, _ in dataset.pairs:
        result_name(image_path)
    thresholds = sweep_thresholds(config, sweep)
    device = resolve_device(config.train.device)
    model.to(device)

    if out_dir is None:
        out_dir = default_output_dir(checkpoint, data_dir)
    out = create_output_dir(out_dir)
    written: list[Path] = []

    def write(image: EvalImage, detections: list[Detection]) -> None:
        path = out / result_name(image.path)
        write_result_file(path, [d.points for d in detections])
        written.append(path)

    scores = score_dataset(model, dataset, config, device, thresholds, write, progress)
    zip_path = write_submission(out / SUBMISSION_ZIP, written)
    save_config(config, out / CONFIG_FILE)
    if scores.scores["images"] < len(dataset):
        logger.warning(
            "%d of %d images could not be read and are not scored (see skipped)",
            len(dataset) - scores.scores["images"],
            len(dataset),
        )

    result: dict[str, Any] = {
        **scores.scores,
        "box_thresh": config.postprocess.box_thresh,
        "checkpoint": str(checkpoint),
        "data_dir": str(data_dir),
        "out_dir": str(out),
        "zip": str(zip_path),
        "skipped": [{"file": file, "reason": reason} for file, reason in dataset.skipped],
    }
    if scores.sweep:
        best = max(scores.sweep, key=lambda row: row["hmean"])
        result["sweep"] = {"note": SWEEP_NOTE, "results": scores.sweep, "best": best}
    (out / SCORES_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote %d result files and %s to %s", len(written), SUBMISSION_ZIP, out)
    return result
