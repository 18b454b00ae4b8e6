"""The ICDAR 2015 detection metric (Incidental Scene Text, Task 1: IoU protocol), with shapely.

The protocol, as the competition's evaluation script computes it, per image:

1. Ground-truth regions whose transcription is ``###`` are don't-care.
2. A detection with more than ``dont_care_threshold`` of its own area inside one don't-care
   region (intersection / detection area) is itself don't-care: it is neither a true nor a
   false positive.
3. Greedy one-to-one matching in file order: for each gt index, for each detection index,
   match when both are still unmatched, neither is don't-care and IoU > ``iou_threshold``.

Precision, recall and hmean are computed from counts summed over the whole set (matched /
care detections, matched / care gt), never as means of per-image values. A set without care
gt has recall 0, a set without care detections precision 0, and hmean is 0 when both are 0.
The per-image values returned by `DetectionMetric.update` follow the script's own per-image
conventions (no care gt: recall 1, precision 1 without care detections, else 0).

Departures from the script, none of which changes a score the script can compute:
    * Coordinates are used as given. The script truncates them to integers, but its result
      format only admits integers, so both agree on every file it accepts.
    * Polygons of any number of points are accepted; vertex order (either direction, any
      starting point) does not change the result, where the script refuses anticlockwise
      quadrilaterals.
    * Degenerate polygons never raise. A self-crossing polygon is repaired with
      ``shapely.make_valid`` (a bow-tie becomes its two triangles, the area an even-odd fill
      covers). A polygon with fewer than 3 points, a non-finite coordinate, a coordinate
      beyond 1e9 px or no area has an empty or zero-area shape: as a detection it is never
      matched and never don't-care, so it counts as a false positive (the strictest honest
      reading, and what the script does with a zero-area quadrilateral); as a care gt it is
      a miss.
    * A result line that is not a list of at least 6 numbers is skipped and logged with its
      file and line (the script refuses the whole submission); ``strict`` raises instead.
"""

from __future__ import annotations

import logging
import re
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import shapely
from shapely.errors import GEOSException

from dbnet.data.io import Problem, read_gt
from dbnet.errors import AnnotationError, DBNetError

logger = logging.getLogger(__name__)

_EMPTY = shapely.Polygon()
# Coordinates beyond this many pixels come from a corrupt line (areas could overflow): such
# a polygon is treated as degenerate.
_MAX_COORDINATE = 1e9
_GT_NAME = re.compile(r"^gt_(?P<stem>.+)\.txt$")
_RES_NAME = re.compile(r"^res_(?P<stem>.+)\.txt$")


class DetectionMetric:
    """Accumulates ICDAR 2015 counts over a set of images.

    Args:
        iou_threshold: A match needs IoU strictly above this.
        dont_care_threshold: A detection is don't-care when the fraction of its area inside
            one don't-care gt region is strictly above this.
    """

    def __init__(self, iou_threshold: float = 0.5, dont_care_threshold: float = 0.5) -> None:
        self.iou_threshold = iou_threshold
        self.dont_care_threshold = dont_care_threshold
        self.reset()

    def reset(self) -> None:
        """Forgets every image seen so far."""
        self.matched = 0
        self.gt_care = 0
        self.det_care = 0
        self.images = 0

    def update(
        self,
        gt_polygons: Sequence[np.ndarray],
        gt_ignore: Sequence[bool],
        det_polygons: Sequence[np.ndarray],
    ) -> dict:
        """Scores one image and adds its counts to the totals.

        Args:
            gt_polygons: (k, 2) polygons in image pixels.
            gt_ignore: One flag per gt polygon, True for don't-care (``###``).
            det_polygons: (k, 2) detected polygons in image pixels, in the order to match.

        Returns:
            Per-image ``matched``, ``gt_care``, ``det_care``, ``precision``, ``recall``,
            ``hmean``, ``pairs`` (matched (gt index, detection index)) and ``det_dont_care``
            (indices of discarded detections).
        """
        if len(gt_polygons) != len(gt_ignore):
            raise ValueError(f"{len(gt_polygons)} gt polygons but {len(gt_ignore)} ignore flags")
        gts = _shapes(gt_polygons)
        dets = _shapes(det_polygons)
        ignore = np.asarray(gt_ignore, dtype=bool).reshape(-1)
        gt_area = shapely.area(gts)
        det_area = shapely.area(dets)

        # Detections mostly inside one don't-care region are discarded.
        det_dont_care = np.zeros(len(dets), dtype=bool)
        dont_care_gt = np.flatnonzero(ignore)
        if len(dont_care_gt) and len(dets):
            rows, cols, inter = _overlaps(gts[dont_care_gt], dets)
            with np.errstate(divide="ignore", invalid="ignore"):
                inside = np.where(det_area[cols] > 0, inter / det_area[cols], 0.0)
            det_dont_care[cols[inside > self.dont_care_threshold]] = True

        # IoU between care gt and kept detections, only for pairs whose boxes overlap.
        care_gt = np.flatnonzero(~ignore)
        kept_det = np.flatnonzero(~det_dont_care)
        pairs: list[tuple[int, int]] = []
        if len(care_gt) and len(kept_det):
            rows, cols, inter = _overlaps(gts[care_gt], dets[kept_det])
            gt_idx, det_idx = care_gt[rows], kept_det[cols]
            union = gt_area[gt_idx] + det_area[det_idx] - inter
            with np.errstate(divide="ignore", invalid="ignore"):
                iou = np.where(union > 0, inter / union, 0.0)
            pairs = self._match(gt_idx, det_idx, iou)

        counts = _rates(len(pairs), len(care_gt), len(kept_det), per_image=True)
        self.matched += len(pairs)
        self.gt_care += len(care_gt)
        self.det_care += len(kept_det)
        self.images += 1
        counts["pairs"] = pairs
        counts["det_dont_care"] = np.flatnonzero(det_dont_care).tolist()
        return counts

    def compute(self) -> dict:
        """Set-level ``precision``, ``recall``, ``hmean`` in [0, 1] and the counts behind them.

        Returns:
            ``precision``, ``recall``, ``hmean``, ``matched``, ``gt_care``, ``det_care`` and
            ``images``.
        """
        result = _rates(self.matched, self.gt_care, self.det_care, per_image=False)
        result["images"] = self.images
        return result

    def _match(
        self, gt_idx: np.ndarray, det_idx: np.ndarray, iou: np.ndarray
    ) -> list[tuple[int, int]]:
        """Greedy one-to-one matching, gt index first, then detection index."""
        above = iou > self.iou_threshold
        gt_idx, det_idx = gt_idx[above], det_idx[above]
        order = np.lexsort((det_idx, gt_idx))
        used_gt: set[int] = set()
        used_det: set[int] = set()
        pairs = []
        for g, d in zip(gt_idx[order].tolist(), det_idx[order].tolist(), strict=True):
            if g not in used_gt and d not in used_det:
                used_gt.add(g)
                used_det.add(d)
                pairs.append((g, d))
        return pairs


def _rates(matched: int, gt_care: int, det_care: int, per_image: bool) -> dict:
    """Precision, recall and hmean from counts, with the script's zero conventions."""
    if per_image and gt_care == 0:
        recall = 1.0
        precision = 0.0 if det_care > 0 else 1.0
    else:
        recall = matched / gt_care if gt_care else 0.0
        precision = matched / det_care if det_care else 0.0
    total = precision + recall
    hmean = 2.0 * precision * recall / total if total > 0 else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "hmean": hmean,
        "matched": matched,
        "gt_care": gt_care,
        "det_care": det_care,
    }


def _shapes(polygons: Sequence[np.ndarray]) -> np.ndarray:
    """Valid shapely geometries, one per polygon; empty for degenerate input.

    Args:
        polygons: (k, 2) point arrays (any k, any numeric dtype).

    Returns:
        (n,) object array of Polygon, MultiPolygon or empty geometries.
    """
    shapes = np.full(len(polygons), _EMPTY, dtype=object)
    by_length: dict[int, list[tuple[int, np.ndarray]]] = {}
    for i, points in enumerate(polygons):
        try:
            coords = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        except (TypeError, ValueError):
            continue
        # NOTE: a NaN fails the comparison, so this also drops non-finite coordinates.
        if len(coords) >= 3 and np.abs(coords).max() <= _MAX_COORDINATE:
            by_length.setdefault(len(coords), []).append((i, coords))

    # One vectorised construction per vertex count (quadrilaterals, mostly).
    for group in by_length.values():
        index = np.array([i for i, _ in group])
        shapes[index] = shapely.polygons(np.stack([c for _, c in group]))  # (g, k, 2) -> (g,)

    # Self-crossing or collapsed rings: keep the polygonal part of the repair.
    for i in np.flatnonzero(~shapely.is_valid(shapes)):
        shapes[i] = _polygonal(shapely.make_valid(shapes[i]))
    return shapes


def _polygonal(geometry: shapely.Geometry) -> shapely.Geometry:
    """The polygonal part of a geometry (lines and points of a repair dropped)."""
    if isinstance(geometry, (shapely.Polygon, shapely.MultiPolygon)):
        return geometry
    parts = [g for g in shapely.get_parts(geometry) if isinstance(g, shapely.Polygon)]
    return shapely.MultiPolygon(parts) if parts else _EMPTY


def _overlaps(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intersection areas between geometries of `a` and `b` whose bounding boxes touch.

    Args:
        a: (n,) geometries.
        b: (m,) geometries.

    Returns:
        Row indices into `a`, column indices into `b`, and the intersection areas, for the
        pairs whose bounding boxes overlap (other pairs have no intersection).
    """
    box_a = shapely.bounds(a)  # (n, 4) xmin, ymin, xmax, ymax; NaN for empty geometries
    box_b = shapely.bounds(b)  # (m, 4)
    with np.errstate(invalid="ignore"):
        touch = (
            (box_a[:, None, 0] <= box_b[None, :, 2])
            & (box_b[None, :, 0] <= box_a[:, None, 2])
            & (box_a[:, None, 1] <= box_b[None, :, 3])
            & (box_b[None, :, 1] <= box_a[:, None, 3])
        )  # (n, m)
    rows, cols = np.nonzero(touch)
    return rows, cols, _intersection_areas(a[rows], b[cols])


def _intersection_areas(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise intersection areas, falling back pair by pair on a GEOS failure."""
    try:
        return shapely.area(shapely.intersection(a, b))
    except GEOSException:
        areas = np.zeros(len(a))
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            try:
                areas[i] = shapely.intersection(x, y, grid_size=1e-6).area
            except GEOSException:
                logger.warning("polygon intersection failed, counted as 0: %s and %s", x, y)
        return areas


# ---- result files -------------------------------------------------------------------------


def read_result_file(
    path: str | Path, strict: bool = False, problems: list[Problem] | None = None
) -> list[np.ndarray]:
    """Reads a ``res_<image>.txt`` detection file.

    Each non-blank line is ``x1,y1,...,xk,yk[,score]`` with k >= 3: an even count of numbers
    is a polygon, an odd count a polygon followed by its score (so ``x1,...,y4,score`` is a
    scored quadrilateral). The scores are read and not used: the protocol matches in file
    order. A byte-order mark, CRLF line endings and spaces around numbers are accepted.
    Any other line is skipped and logged with its file and line (raised with ``strict``).

    Args:
        path: The result file.
        strict: Raise on the first malformed line instead of skipping it.
        problems: When given, every skipped line is appended to it.

    Returns:
        (k, 2) float64 polygons, in file order.

    Raises:
        AnnotationError: With ``strict``, a line that is not a list of at least 6 numbers.
    """
    path = Path(path)
    return _parse_results(path.read_bytes(), str(path), strict, problems)


def write_result_file(
    path: str | Path, polygons: Sequence[np.ndarray], scores: Sequence[float] | None = None
) -> None:
    """Writes detections in the ICDAR 2015 result format, coordinates rounded to integers.

    Args:
        path: The ``res_<image>.txt`` file to write.
        polygons: (k, 2) polygons in image pixels.
        scores: When given, one score per polygon, written as a last field.
    """
    lines = []
    for i, points in enumerate(polygons):
        coords = np.rint(np.asarray(points, dtype=np.float64).reshape(-1)).astype(np.int64)
        fields = [str(v) for v in coords.tolist()]
        if scores is not None:
            fields.append(f"{float(scores[i]):.4f}")
        lines.append(",".join(fields))
    Path(path).write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _parse_results(
    data: bytes, source: str, strict: bool = False, problems: list[Problem] | None = None
) -> list[np.ndarray]:
    """Polygons of a result file's content; `source` names the file in messages."""
    text = data.decode("utf-8", errors="replace").lstrip("\ufeff")
    polygons = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values = [float(field) for field in line.split(",")]
        except ValueError:
            values = None
            message = f"expected x1,y1,...,xk,yk[,score] numbers, got {line.strip()[:80]!r}"
        else:
            message = f"expected at least 3 points (6 numbers), got {len(values)}"
        if values is None or len(values) < 6:
            if strict:
                raise AnnotationError(source, number, message)
            problem = Problem(source, number, f"{message} (line skipped)")
            logger.warning("%s", problem)
            if problems is not None:
                problems.append(problem)
            continue
        if len(values) % 2:
            values = values[:-1]
        polygons.append(np.array(values, dtype=np.float64).reshape(-1, 2))
    return polygons


# ---- folders ------------------------------------------------------------------------------


def evaluate_folders(
    gt_dir: str | Path,
    pred_dir: str | Path,
    iou_threshold: float = 0.5,
    dont_care_threshold: float = 0.5,
    strict: bool = False,
) -> dict:
    """Scores a folder (or zip archive) of result files against one of gt files.

    ``res_<stem>.txt`` is paired with ``gt_<stem>.txt``. A gt file without a result file is
    an image with no detection; a result file without a gt file is an error, as in the
    competition's script. Names with a folder part (zip members such as ``../gt_1.txt``)
    are refused; other files are ignored.

    Args:
        gt_dir: Folder or ``.zip`` holding ``gt_<stem>.txt`` files, or a dataset folder with
            them in ``gts/``.
        pred_dir: Folder or ``.zip`` holding ``res_<stem>.txt`` files.
        iou_threshold: See `DetectionMetric`.
        dont_care_threshold: See `DetectionMetric`.
        strict: Raise on a malformed gt or result line instead of skipping it.

    Returns:
        `DetectionMetric.compute` values plus ``missing_results`` (gt files without a result
        file) and ``skipped_lines`` (malformed gt and result lines left out, each logged).

    Raises:
        DBNetError: Missing folders, no gt files, no result files, or result files without gt.
        AnnotationError: With ``strict``, a gt or result line that cannot be read.
    """
    metric = DetectionMetric(iou_threshold, dont_care_threshold)
    if (Path(gt_dir) / "gts").is_dir():
        gt_dir = Path(gt_dir) / "gts"
    with _text_files(gt_dir) as gt_files, _text_files(pred_dir) as res_files:
        gts = _by_stem(gt_files, _GT_NAME)
        results = _by_stem(res_files, _RES_NAME)
        if not gts:
            raise DBNetError(f"{gt_dir}: no gt_<name>.txt files")
        if not results:
            raise DBNetError(f"{pred_dir}: no res_<name>.txt files")
        orphans = sorted(set(results) - set(gts))
        if orphans:
            shown = ", ".join(f"res_{s}.txt" for s in orphans[:3])
            raise DBNetError(
                f"{pred_dir}: {len(orphans)} result files have no gt_<name>.txt in {gt_dir} "
                f"(e.g. {shown})"
            )

        missing = 0
        problems: list[Problem] = []
        for stem in sorted(gts):
            instances = read_gt(gts[stem], strict=strict, problems=problems)
            if stem in results:
                detections = read_result_file(results[stem], strict=strict, problems=problems)
            else:
                detections = []
                missing += 1
            metric.update(
                [inst.points for inst in instances],
                [inst.ignore for inst in instances],
                detections,
            )

    if missing:
        logger.info("%d of %d images have no result file: no detections", missing, len(gts))
    if problems:
        logger.warning("%d malformed gt or result lines were skipped", len(problems))
    result = metric.compute()
    result["missing_results"] = missing
    result["skipped_lines"] = len(problems)
    return result


def _by_stem(files: dict[str, Path], pattern: re.Pattern[str]) -> dict[str, Path]:
    """Files whose name matches `pattern`, keyed by the stem it captures."""
    found = {}
    for name, path in files.items():
        match = pattern.match(name)
        if match:
            found[match.group("stem")] = path
    return found


@contextmanager
def _text_files(source: str | Path) -> Iterator[dict[str, Path]]:
    """``.txt`` files of a folder, or of a zip archive extracted to a temporary folder.

    Yields:
        File name -> readable path.
    """
    source = Path(source)
    if source.is_dir():
        yield {p.name: p for p in source.iterdir() if p.suffix == ".txt" and p.is_file()}
        return
    if not source.exists():
        raise DBNetError(f"{source}: no such folder or zip archive")
    if not zipfile.is_zipfile(source):
        raise DBNetError(f"{source}: expected a folder or a zip archive")

    with zipfile.ZipFile(source) as archive, tempfile.TemporaryDirectory() as tmp:
        files = {}
        for member in archive.infolist():
            if member.is_dir():
                continue
            _check_flat_name(member.filename, source)
            if member.filename.endswith(".txt"):
                target = Path(tmp) / member.filename
                target.write_bytes(archive.read(member))
                files[member.filename] = target
        yield files


def _check_flat_name(name: str, source: Path) -> None:
    """Refuses a file name with a folder part (``../x``, ``/x``, ``a/x``, ``C:x``)."""
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    flat = (
        len(posix.parts) == 1
        and len(windows.parts) == 1
        and not windows.drive
        and name not in (".", "..")
    )
    if not flat:
        raise DBNetError(
            f"{source}: member {name!r} has a folder part; expected gt_<name>.txt or "
            "res_<name>.txt at the top level"
        )
