"""The dataset audit behind ``dbnet data check``: what training would see, before it starts.

Every image is paired with its gt file, the image is decoded (JPEGs at 1/8 scale, enough
to find a truncated file), every gt line is parsed, and every instance goes through the
same geometry checks as the training targets (:func:`dbnet.data.labels.make_label_maps`),
so the ignored-instance counts here are the ones training will meet.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dbnet.data.io import Problem, find_pairs, image_size, read_gt
from dbnet.data.io import logger as io_logger
from dbnet.data.labels import make_label_maps
from dbnet.errors import ConfigError, ImageReadError

logger = logging.getLogger(__name__)

# What each reason of the label code means, for people reading the report.
REASONS = {
    "dont_care": "don't-care (###)",
    "degenerate": "degenerate polygon (fewer than 3 distinct points or zero area)",
    "self_intersecting": "self-intersecting polygon that cannot be repaired",
    "too_small": "shorter side under the minimum text size (--min-text-size)",
    "empty_offset": "nothing left after shrinking",
}


@dataclass
class AuditReport:
    """What a dataset holds and what is wrong with it.

    Attributes:
        root: The dataset folder.
        images: Images paired with a gt file that decode.
        instances: Instances read from the gt files of those images.
        care: Instances not marked don't-care (``###``).
        usable: Care instances that give a training target (pass the geometry checks).
        ignored: Reason -> count of instances left out of the targets, don't-care included.
        repaired: Crossed (bow-tie) quadrilaterals used after replacing them by their hull.
        empty_images: Images without any instance (text-free negatives).
        errors: Data that is dropped: unpaired files, unreadable images, malformed lines.
        warnings: Data read with a fallback, and instances ignored for their geometry.
        strict: Whether any error makes the set unusable.
    """

    root: Path
    images: int = 0
    instances: int = 0
    care: int = 0
    usable: int = 0
    ignored: Counter[str] = field(default_factory=Counter)
    repaired: int = 0
    empty_images: int = 0
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    strict: bool = False

    @property
    def failures(self) -> list[str]:
        """Why the set cannot be trained on; empty when it can."""
        failures = []
        if self.images == 0:
            failures.append(f"no readable image with a gt file in {self.root}")
        elif self.usable == 0:
            failures.append(
                f"no usable text instance: {self.images} images, {self.instances} instances, "
                f"{self.care} not marked ###, none passing the geometry checks"
            )
        if self.strict and self.errors:
            failures.append(f"{len(self.errors)} errors (strict)")
        return failures

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {
            "root": str(self.root),
            "images": self.images,
            "instances": self.instances,
            "care": self.care,
            "usable": self.usable,
            "ignored": dict(sorted(self.ignored.items())),
            "repaired": self.repaired,
            "empty_images": self.empty_images,
            "errors": [problem.to_dict() for problem in self.errors],
            "warnings": [problem.to_dict() for problem in self.warnings],
            "ok": not self.failures,
            "failures": self.failures,
        }


def audit_dataset(
    root: str | Path,
    strict: bool = False,
    min_text_size: float = 8,
    shrink_ratio: float = 0.4,
    verify_images: bool = True,
) -> AuditReport:
    """Reads a whole dataset the way training will and reports what it found.

    Nothing is raised for bad data: every problem is collected in the report.

    Args:
        root: The dataset folder (``images/`` + ``gts/``, or both in one folder).
        strict: Count any error as making the set unusable (see ``AuditReport.failures``).
        min_text_size: Instances with a shorter side (px) are reported as too small.
        shrink_ratio: Shrink ratio of the targets, for the "empty_offset" check.
        verify_images: Decode every image to find truncated files; otherwise read headers.

    Returns:
        The report.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        NotADirectoryError: ``root`` is not a folder.
        ConfigError: A shrink ratio outside (0, 1) or a negative minimum text size.
    """
    if not 0.0 < shrink_ratio < 1.0:
        raise ConfigError(f"shrink ratio: got {shrink_ratio}, expected a value in (0, 1)")
    if not min_text_size >= 0:
        raise ConfigError(f"minimum text size: got {min_text_size}, expected 0 or more")
    report = AuditReport(root=Path(root), strict=strict)
    problems: list[Problem] = []
    with _quiet(io_logger):  # every problem goes into the report, not also into the log
        pairs = find_pairs(root, problems=problems)
        for image_path, gt_path in pairs:
            _audit_pair(
                report, image_path, gt_path, problems, min_text_size, shrink_ratio, verify_images
            )

    for problem in problems:
        (report.errors if problem.severity == "error" else report.warnings).append(problem)
    logger.debug("audited %s: %d images, %d instances", root, report.images, report.instances)
    return report


def _audit_pair(
    report: AuditReport,
    image_path: Path,
    gt_path: Path,
    problems: list[Problem],
    min_text_size: float,
    shrink_ratio: float,
    verify_images: bool,
) -> None:
    """Counts one image and its gt file into the report; appends what is wrong to ``problems``."""
    try:
        height, width = image_size(image_path, verify=verify_images)
    except ImageReadError as exc:
        problems.append(Problem(exc.file, None, f"{exc.message} (image skipped)"))
        return
    instances = read_gt(gt_path, problems=problems)
    report.images += 1
    report.instances += len(instances)
    report.empty_images += not instances
    if not instances:
        return

    # The geometry checks of the training targets, at the image's own size.
    maps = make_label_maps(
        height,
        width,
        [instance.points for instance in instances],
        [instance.ignore for instance in instances],
        shrink_ratio=shrink_ratio,
        min_text_size=min_text_size,
    )
    reasons = dict(maps.ignored)
    repaired = {index for index, _ in maps.repaired}
    report.care += sum(not instance.ignore for instance in instances)
    report.usable += len(instances) - len(reasons)
    report.ignored.update(reasons.values())
    report.repaired += len(maps.repaired)

    for index, instance in enumerate(instances):
        reason = reasons.get(index)
        where = (str(gt_path), instance.line)
        if reason is not None and reason != "dont_care":
            message = f"instance ignored: {REASONS.get(reason, reason)}"
            problems.append(Problem(*where, message, severity="warning"))
        elif index in repaired:
            message = "crossed quadrilateral (vertices out of order) repaired by its hull"
            problems.append(Problem(*where, message, severity="warning"))
        if reason is None and _outside(instance.points, height, width):
            message = f"instance lies entirely outside the {width}x{height} image"
            problems.append(Problem(*where, message, severity="warning"))


def _outside(points: np.ndarray, height: int, width: int) -> bool:
    """True when a (k, 2) polygon's bounding box misses the image."""
    x0, y0 = points.min(axis=0)
    x1, y1 = points.max(axis=0)
    return bool(x1 < 0 or y1 < 0 or x0 > width or y0 > height)


@contextlib.contextmanager
def _quiet(quieted: logging.Logger) -> Iterator[None]:
    """Raises a logger's level to ERROR for the duration of the block."""
    previous = quieted.level
    quieted.setLevel(logging.ERROR)
    try:
        yield
    finally:
        quieted.setLevel(previous)
