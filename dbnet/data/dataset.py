"""The torch Dataset wiring reading -> transforms -> label maps, and the batch collate.

Every random choice of a sample comes from a numpy Generator seeded with (seed, epoch,
index), so a run gives the same samples whatever the number of workers and their order.

Unreadable samples are never swapped silently: each is logged with its file and reason,
recorded in `DetectionDataset.skipped`, and replaced by the next readable index. Too many of
them (more than `max_bad_fraction` of the set) stop the run with the list of files; with
`strict` the first one does.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dbnet.config import DataConfig
from dbnet.data.io import Instance, Problem, find_pairs, read_gt, read_image
from dbnet.data.labels import LabelMaps, make_label_maps
from dbnet.data.transforms import augment, resize_for_eval
from dbnet.errors import ConfigError, DBNetError, ImageReadError

logger = logging.getLogger(__name__)

# Ignore reasons that describe the annotation itself rather than the random scale or crop:
# these are warned about once per gt line; the others are only counted.
_ANNOTATION_REASONS = ("degenerate", "self_intersecting")

# How many file names an error message lists before "and N more".
_LISTED_FILES = 10


@dataclass
class TrainSample:
    """A training sample before conversion to tensors (numpy, for pictures and benchmarks).

    Attributes:
        image: (S, S, 3) uint8 RGB crop.
        polygons: (k, 2) float32 polygons in crop pixels.
        ignore: One don't-care flag per polygon (as annotated, before the label code).
        maps: The label maps of the crop.
        path: The image file.
    """

    image: np.ndarray
    polygons: list[np.ndarray]
    ignore: list[bool]
    maps: LabelMaps
    path: Path


@dataclass
class DatasetSummary:
    """What a dataset holds, from its gt files.

    Attributes:
        root: The dataset folder.
        images: Images paired with a gt file.
        instances: Annotated instances.
        usable: Care instances (not ``###``) with a non-zero area.
        dont_care: ``###`` instances.
        problems: Problems met while pairing files and reading gt files.
    """

    root: str
    images: int
    instances: int
    usable: int
    dont_care: int
    problems: int

    def __str__(self) -> str:
        return (
            f"{self.root}: {self.images} images, {self.instances} instances "
            f"({self.usable} usable, {self.dont_care} don't-care)"
        )

    def require_usable(self) -> None:
        """Raises DBNetError when there is nothing to learn from.

        Raises:
            DBNetError: No image, or no usable instance in any image.
        """
        if self.images == 0 or self.usable == 0:
            raise DBNetError(
                f"training set {self.root} has {self.images} images and {self.usable} usable "
                f"text instances ({self.dont_care} of {self.instances} are ### don't-care): "
                "nothing to learn from"
            )


def normalise(
    image: np.ndarray, mean: tuple[float, float, float], std: tuple[float, float, float]
) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32, (x / 255 - mean) / std per channel."""
    height, width = image.shape[:2]
    out = np.empty((3, height, width), np.float32)
    # Channel planes one at a time: much faster than transposing the interleaved image.
    for channel in range(3):
        gain = np.float32(1.0 / (255.0 * std[channel]))
        np.multiply(image[:, :, channel], gain, out=out[channel])
        out[channel] -= np.float32(mean[channel] / std[channel])
    return out


def polygon_area(points: np.ndarray) -> float:
    """Absolute shoelace area of a (k, 2) vertex ring; 0 below three points."""
    if len(points) < 3:
        return 0.0
    x, y = points[:, 0].astype(np.float64), points[:, 1].astype(np.float64)
    return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2


class DetectionDataset(Dataset):
    """Images and gt files of one folder, as training crops with targets or evaluation images.

    Args:
        root: Dataset folder (``images/`` + ``gts/``, or both in one folder).
        config: The data section of the configuration.
        train: Training items (augmented crops with label maps) or evaluation items (resized
            images with the original polygons).
        seed: Base seed of the per-sample random generators.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        DBNetError: No image in ``root`` has a gt file, or `seed` is negative; with
            ``config.strict``, any problem with the files.

    Attributes:
        skipped: (file, reason) of every unreadable sample met by this process.
        ignored: Count of instances the label code ignored, by reason (this process only).
        repaired: Count of crossing quadrilaterals the label code repaired (this process only).
        problems: Problems met pairing files and reading gt files.
    """

    def __init__(self, root: str | Path, config: DataConfig, train: bool, seed: int = 0) -> None:
        if seed < 0:
            raise DBNetError(f"seed must be 0 or more, got {seed}")
        self.root = Path(root)
        self.config = config
        self.train = train
        self.seed = seed
        self.epoch = 0

        self.problems: list[Problem] = []
        self.pairs = find_pairs(self.root, strict=config.strict, problems=self.problems)
        if not self.pairs:
            raise DBNetError(f"{self.root}: no image with a gt file (images/ + gts/ expected)")

        self.skipped: list[tuple[str, str]] = []
        self.ignored: Counter[str] = Counter()
        self.repaired = 0
        self._instances: list[list[Instance] | None] = [None] * len(self.pairs)
        self._bad: dict[int, str] = {}
        self._warned: set[tuple[str, int, str]] = set()

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        """Selects the augmentation of this epoch.

        Call it before creating the DataLoader iterator of the epoch: workers receive a copy
        of the dataset when they start, so persistent workers would keep the old epoch.
        """
        self.epoch = epoch

    def rng(self, index: int) -> np.random.Generator:
        """The random generator of sample `index` in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, index])

    # ---- reading -------------------------------------------------------------------------

    def instances(self, index: int) -> list[Instance]:
        """The gt instances of sample `index`, read once and kept."""
        cached = self._instances[index]
        if cached is None:
            gt_path = self.pairs[index][1]
            cached = read_gt(gt_path, strict=self.config.strict, problems=self.problems)
            self._instances[index] = cached
        return cached

    def summary(self) -> DatasetSummary:
        """Counts images and instances from the gt files (reads every gt file once).

        A gt file that cannot be read makes its sample unreadable (see `skipped`).
        """
        instances = usable = dont_care = 0
        for index in range(len(self)):
            try:
                items = self.instances(index)
            except (DBNetError, OSError) as exc:
                if self.config.strict:
                    raise
                self._record_bad(index, str(self.pairs[index][1]), str(exc))
                continue
            instances += len(items)
            dont_care += sum(item.ignore for item in items)
            usable += sum(not item.ignore and polygon_area(item.points) > 0 for item in items)
        return DatasetSummary(
            root=str(self.root),
            images=len(self),
            instances=instances,
            usable=usable,
            dont_care=dont_care,
            problems=len(self.problems),
        )

    def unreadable_ground_truth(
        self, indices: set[int] | None = None
    ) -> list[tuple[list[np.ndarray], list[bool]]]:
        """Polygons and ignore flags of the samples whose image could not be read.

        Args:
            indices: Only these samples (for a Subset); all when None.

        Returns:
            Per unreadable sample whose gt file reads: (k, 2) float32 polygons in original
            pixels and their ignore flags.
        """
        found = []
        for index in sorted(self._bad):
            if indices is not None and index not in indices:
                continue
            try:
                items = self.instances(index)
            except (DBNetError, OSError):
                continue
            found.append(
                (
                    [item.points.astype(np.float32) for item in items],
                    [item.ignore for item in items],
                )
            )
        return found

    def _record_bad(self, index: int, file: str, reason: str) -> None:
        """Logs and counts an unreadable sample; raises when there are too many."""
        if index in self._bad:
            return
        self._bad[index] = reason
        self.skipped.append((file, reason))
        logger.warning("%s: sample skipped (%s)", file, reason)

        fraction = len(self._bad) / len(self)
        if fraction > self.config.max_bad_fraction:
            listed = ", ".join(file for file, _ in self.skipped[:_LISTED_FILES])
            more = len(self.skipped) - _LISTED_FILES
            tail = f" and {more} more" if more > 0 else ""
            raise DBNetError(
                f"{len(self._bad)} of {len(self)} samples in {self.root} are unreadable, more "
                f"than data.max_bad_fraction={self.config.max_bad_fraction}: {listed}{tail}"
            )

    def _load(self, index: int) -> tuple[int, np.ndarray, list[Instance]]:
        """Image and instances of `index`, or of the next readable index after it.

        Returns:
            The index actually read, its (H, W, 3) uint8 image and its instances.
        """
        for offset in range(len(self)):
            current = (index + offset) % len(self)
            if current in self._bad:
                continue
            image_path = self.pairs[current][0]
            try:
                instances = self.instances(current)
                image = read_image(image_path)
            except (DBNetError, OSError) as exc:
                if self.config.strict:
                    raise
                reason = exc.message if isinstance(exc, ImageReadError) else str(exc)
                self._record_bad(current, str(image_path), reason)
                continue
            if current != index:
                logger.debug("sample %d replaced by sample %d (%s)", index, current, image_path)
            return current, image, instances
        raise DBNetError(f"{self.root}: no sample can be read ({len(self.skipped)} skipped)")

    # ---- items ---------------------------------------------------------------------------

    def train_sample(self, index: int) -> TrainSample:
        """The augmented crop and label maps of sample `index` in the current epoch.

        A sample whose crop or targets cannot be made (a failure of the geometry code on
        some annotation) is recorded like an unreadable image, naming its files, and the
        next readable sample stands in; with ``config.strict`` it raises DBNetError.
        """
        while True:
            current, image, instances = self._load(index)
            try:
                return self._make_train_sample(index, current, image, instances)
            except DBNetError:
                raise
            except Exception as exc:  # one bad annotation must not end a run unnamed
                image_path, gt_path = self.pairs[current]
                reason = (
                    f"cannot make training targets from {gt_path} ({type(exc).__name__}: {exc})"
                )
                if self.config.strict:
                    raise DBNetError(f"{image_path}: {reason}") from exc
                self._record_bad(current, str(image_path), reason)

    def _make_train_sample(
        self, index: int, current: int, image: np.ndarray, instances: list[Instance]
    ) -> TrainSample:
        """Augments sample `current` (standing in for `index`) and builds its label maps."""
        config = self.config
        image_path, gt_path = self.pairs[current]

        polygons = [item.points for item in instances]
        ignore = [item.ignore for item in instances]
        crop = augment(image, polygons, ignore, config, self.rng(index))

        size = config.crop_size
        maps = make_label_maps(
            size,
            size,
            crop.polygons,
            crop.ignore,
            shrink_ratio=config.shrink_ratio,
            thresh_min=config.thresh_min,
            thresh_max=config.thresh_max,
            min_text_size=config.min_text_size,
        )

        # Count what the label code ignored or repaired; warn once about faults of the
        # annotation itself (not about polygons the crop border cut).
        for position, reason in maps.ignored:
            self.ignored[reason] += 1
            if reason in _ANNOTATION_REASONS and not crop.cut[position]:
                line = instances[crop.source[position]].line
                self._warn_once(gt_path, line, f"instance ignored ({reason})")
        for position, _ in maps.repaired:
            self.repaired += 1
            if not crop.cut[position]:
                line = instances[crop.source[position]].line
                self._warn_once(gt_path, line, "crossing quadrilateral repaired by its hull")

        return TrainSample(crop.image, crop.polygons, crop.ignore, maps, image_path)

    def _warn_once(self, gt_path: Path, line: int, message: str) -> None:
        key = (str(gt_path), line, message)
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("%s:%d: %s", gt_path, line, message)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.train:
            return self._train_item(index)
        return self._eval_item(index)

    def _train_item(self, index: int) -> dict[str, Any]:
        sample = self.train_sample(index)
        maps = sample.maps
        return {
            "image": torch.from_numpy(normalise(sample.image, self.config.mean, self.config.std)),
            "shrink_map": torch.from_numpy(maps.shrink_map),  # (S, S)
            "shrink_mask": torch.from_numpy(maps.shrink_mask),
            "threshold_map": torch.from_numpy(maps.threshold_map),
            "threshold_mask": torch.from_numpy(maps.threshold_mask),
            "path": str(sample.path),
        }

    def _eval_item(self, index: int) -> dict[str, Any]:
        current, image, instances = self._load(index)
        resized, _ = resize_for_eval(image, self.config.eval_side, self.config.eval_size)
        return {
            "image": torch.from_numpy(normalise(resized, self.config.mean, self.config.std)),
            "shape": torch.tensor(image.shape[:2], dtype=torch.long),  # original (H, W)
            "path": str(self.pairs[current][0]),
            "polygons": [item.points.astype(np.float32) for item in instances],
            "ignore": [item.ignore for item in instances],
        }


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stacks the tensors of a list of items; other values become lists.

    Raises:
        ConfigError: Images of different sizes (evaluation items batched with batch size > 1).
    """
    keys = batch[0].keys()
    out: dict[str, Any] = {}
    for key in keys:
        values = [item[key] for item in batch]
        if isinstance(values[0], torch.Tensor):
            shapes = {tuple(value.shape) for value in values}
            if len(shapes) > 1:
                raise ConfigError(
                    f"cannot batch {key!r} of different shapes {sorted(shapes)}; evaluation "
                    "images differ in size: use eval.batch_size 1"
                )
            out[key] = torch.stack(values)  # (N, ...)
        else:
            out[key] = values
    return out
