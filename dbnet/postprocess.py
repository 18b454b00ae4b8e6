"""Probability map to text polygons: the DB post-processing (numpy, OpenCV, pyclipper).

The probability map is binarised, each connected region's contour becomes a candidate,
candidates are scored and filtered, then expanded back by the unclip offset that undoes
the shrinking of the training targets, and finally mapped to the original image.

Conventions:
    * Pixel coordinates: a contour point ``(x, y)`` is the centre of pixel column ``x``, row
      ``y`` of the map, and maps to ``(x * w / W, y * h / H)`` in an original image of size
      ``(h, w)`` (the DB convention, no half-pixel shift).
    * Clipping: output coordinates lie in ``[0, w - 1] x [0, h - 1]``, the centres of the
      image's first and last pixels, so every vertex rounds to a valid pixel index (and the
      ICDAR 2015 bound check, ``0 <= x <= w``, holds).
    * Quadrilaterals: 4 points, clockwise in image coordinates (y down), starting from the
      top-left point, defined as in DB: of the two points with the smallest x (ties: smaller
      y first) the one with the smaller y. For a rectangle the two leftmost corners are
      always adjacent, so the order is DB's ``[top-left, top-right, bottom-right,
      bottom-left]``. A box whose clipping leaves no area is dropped.
    * Polygons (``mode="poly"``): the expanded contour, clipped, then simplified with
      ``cv2.approxPolyDP``; clockwise from the top-left point as defined above.
    * Bad maps never raise: NaN counts as 0, values are clipped to [0, 1] where they are
      averaged, empty and 1x1 maps give no detection, lines and single pixels are dropped
      by ``min_size``.

Steps (``quad`` mode, as in DB): contour -> minimum-area rectangle -> short side below
``min_size`` dropped -> score below ``box_thresh`` dropped -> rectangle expanded by
``distance = area * unclip_ratio / perimeter`` (round joins) -> minimum-area rectangle of the
expansion -> short side below ``min_size + 2`` dropped. ``poly`` mode expands the (lightly
simplified) contour instead of its rectangle. Scores: ``score_mode="fast"`` is the mean
probability inside the contour's minimum-area rectangle (DB), ``"exact"`` inside the contour.

The unclip ratio 1.5 undoes the training shrink (ratio 0.4) exactly only for compact shapes:
on the shrink target of a 5:1 word it restores about two thirds of the box (IoU about 0.65).
Network maps are wider than their targets, which is what DB tuned the ratio on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import pyclipper

from dbnet.config import PostprocessConfig

logger = logging.getLogger(__name__)

# NOTE: pyclipper works on integers; coordinates are scaled by this factor (1/64 px resolution).
_CLIPPER_SCALE = 64.0
# NOTE: maximal deviation of the round joins from a true arc, in map pixels (Clipper's default).
_ARC_TOLERANCE = 0.25
# NOTE: approxPolyDP epsilon in "poly" mode (before and after unclipping): this fraction of
# the perimeter, at most _POLY_MAX_EPSILON map pixels. The cap keeps thin words, whose
# kernels are a few pixels thick, from collapsing; the fraction keeps small ones intact.
_POLY_EPSILON = 0.005
_POLY_MAX_EPSILON = 1.0
# NOTE: DB drops expanded boxes whose short side is under min_size + 2 (its boxes_from_bitmap).
_EXPANDED_MARGIN = 2.0


@dataclass
class Detection:
    """One detected text region.

    Attributes:
        points: (k, 2) float32 polygon in original image pixels; in quad mode k == 4, clockwise
            from the top-left point.
        score: Mean probability inside the candidate, in [0, 1].
    """

    points: np.ndarray
    score: float


def boxes_from_prob(
    prob: np.ndarray, original_size: tuple[int, int], config: PostprocessConfig
) -> list[Detection]:
    """Extracts text regions from one probability map.

    Args:
        prob: (H, W) probabilities in [0, 1] at network resolution (leading axes of size 1
            are accepted and dropped). Any float dtype and memory layout; NaN counts as 0.
        original_size: (h, w) of the original image the coordinates are mapped to.
        config: Thresholds, unclip ratio, output mode and scoring mode.

    Returns:
        Detections in original image pixels, in contour order.

    Raises:
        ValueError: When `prob` is not two-dimensional or `original_size` is not positive.
    """
    prob = _as_map(prob)
    height, width = int(original_size[0]), int(original_size[1])
    if height <= 0 or width <= 0:
        raise ValueError(f"original_size must be positive (h, w), got {original_size!r}")
    if prob.size == 0:
        return []

    # Binarise: NaN compares False, so it counts as background.
    bitmap = (prob > config.thresh).astype(np.uint8)  # (H, W) in {0, 1}
    contours, _ = cv2.findContours(bitmap, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    contours = _limit_candidates(contours, config.max_candidates)

    map_h, map_w = prob.shape
    scale = np.array([width / map_w, height / map_h], dtype=np.float64)
    upper = np.array([width - 1, height - 1], dtype=np.float64)

    detections = []
    for contour in contours:
        found = _candidate(prob, contour.reshape(-1, 2), config)
        if found is None:
            continue
        points, score = found

        # To original pixels, inside the image; polygons lose the vertices clipping made
        # redundant.
        points = np.clip(points * scale, 0.0, upper)
        if config.mode == "poly":
            points = _simplify(points, _POLY_MAX_EPSILON * float(scale.mean()))
        points = None if points is None else _orient(points)
        if points is None:
            continue
        detections.append(Detection(points=points.astype(np.float32), score=score))
    return detections


def boxes_from_probs(
    probs: np.ndarray | Sequence[np.ndarray],
    original_sizes: Sequence[tuple[int, int]],
    config: PostprocessConfig,
) -> list[list[Detection]]:
    """Runs `boxes_from_prob` over a batch.

    Args:
        probs: (N, H, W) or (N, 1, H, W) probabilities, or a sequence of (H, W) maps.
        original_sizes: N pairs (h, w).
        config: Post-processing settings.

    Returns:
        One list of detections per image.
    """
    if len(probs) != len(original_sizes):
        raise ValueError(f"got {len(probs)} maps but {len(original_sizes)} original sizes")
    return [boxes_from_prob(p, s, config) for p, s in zip(probs, original_sizes, strict=True)]


def _as_map(prob: np.ndarray) -> np.ndarray:
    """A C-contiguous float32 (H, W) view or copy of `prob`."""
    prob = np.asarray(prob)
    while prob.ndim > 2 and prob.shape[0] == 1:
        prob = prob[0]
    if prob.ndim != 2:
        raise ValueError(f"expected a probability map of shape (H, W), got {prob.shape}")
    return np.ascontiguousarray(prob, dtype=np.float32)


def _limit_candidates(contours: Sequence[np.ndarray], limit: int) -> Sequence[np.ndarray]:
    """Keeps at most `limit` contours, the largest ones when there are more."""
    if len(contours) <= limit:
        return contours
    areas = np.array([cv2.contourArea(c) for c in contours])
    keep = np.sort(np.argsort(-areas, kind="stable")[: max(limit, 0)])
    logger.debug("%d candidates, keeping the %d largest", len(contours), limit)
    return [contours[i] for i in keep]


def _candidate(
    prob: np.ndarray, contour: np.ndarray, config: PostprocessConfig
) -> tuple[np.ndarray, float] | None:
    """Scores, filters and expands one contour.

    Args:
        prob: (H, W) float32 probability map.
        contour: (n, 2) int32 contour points, map pixels.
        config: Post-processing settings.

    Returns:
        The expanded polygon, (k, 2) float64 map pixels (a rectangle in quad mode, not yet
        simplified in poly mode), and its score; None when dropped.
    """
    rect = cv2.minAreaRect(contour)
    if min(rect[1]) < config.min_size:
        return None
    box = cv2.boxPoints(rect).astype(np.float64)  # (4, 2)

    region = box if config.score_mode == "fast" else contour
    score = _mean_inside(prob, region)
    if score < config.box_thresh:
        return None

    if config.mode == "quad":
        expanded = _unclip(box, config)
        if expanded is None:
            return None
        rect = cv2.minAreaRect(expanded.astype(np.float32))
        if min(rect[1]) < config.min_size + _EXPANDED_MARGIN:
            return None
        return cv2.boxPoints(rect).astype(np.float64), score

    polygon = _simplify(contour.astype(np.float64), _POLY_MAX_EPSILON)
    if polygon is None:
        polygon = box
    expanded = _unclip(polygon, config)
    if expanded is None:
        return None
    if min(cv2.minAreaRect(expanded.astype(np.float32))[1]) < config.min_size + _EXPANDED_MARGIN:
        return None
    return expanded, score


def _mean_inside(prob: np.ndarray, polygon: np.ndarray) -> float:
    """Mean probability over the pixels of `polygon`, computed inside its bounding box only.

    Args:
        prob: (H, W) float32 probability map.
        polygon: (k, 2) map pixels.

    Returns:
        The mean in [0, 1]; 0 when the polygon covers no pixel.
    """
    map_h, map_w = prob.shape
    x0, y0 = np.clip(np.floor(polygon.min(axis=0)).astype(int), 0, [map_w - 1, map_h - 1])
    x1, y1 = np.clip(np.ceil(polygon.max(axis=0)).astype(int), 0, [map_w - 1, map_h - 1])
    roi = prob[y0 : y1 + 1, x0 : x1 + 1]  # (h', w')
    if not np.isfinite(roi).all():
        roi = np.nan_to_num(roi, nan=0.0, posinf=1.0, neginf=0.0)
    roi = np.clip(roi, 0.0, 1.0)

    mask = np.zeros(roi.shape, dtype=np.uint8)
    shifted = np.round(polygon - [x0, y0]).astype(np.int32)
    cv2.fillPoly(mask, [shifted], 1)
    if not mask.any():
        return 0.0
    return float(cv2.mean(roi, mask)[0])


def _unclip(polygon: np.ndarray, config: PostprocessConfig) -> np.ndarray | None:
    """Expands `polygon` by the unclip offset (see `unclip_distance`).

    Args:
        polygon: (k, 2) map pixels.
        config: Unclip mode, ratio and the training shrink ratio.

    Returns:
        (m, 2) float64 outer boundary of the expansion; None when degenerate or empty.
    """
    closed = np.vstack([polygon, polygon[:1]])
    perimeter = float(np.hypot(*np.diff(closed, axis=0).T).sum())
    area = abs(float(cv2.contourArea(polygon.astype(np.float32))))
    distance = unclip_distance(area, perimeter, config)
    if distance is None:
        return None

    offset = pyclipper.PyclipperOffset(arc_tolerance=_ARC_TOLERANCE * _CLIPPER_SCALE)
    path = np.round(polygon * _CLIPPER_SCALE).astype(np.int64).tolist()
    offset.AddPath(path, pyclipper.JT_ROUND, pyclipper.ET_CLOSEDPOLYGON)
    solution = offset.Execute(distance * _CLIPPER_SCALE)
    if not solution:
        return None

    # A positive offset gives one outer ring, plus holes for rings: keep the largest ring.
    outer = max(solution, key=lambda ring: abs(pyclipper.Area(ring)))
    if len(outer) < 3:
        return None
    return np.asarray(outer, dtype=np.float64) / _CLIPPER_SCALE


def unclip_distance(area: float, perimeter: float, config: PostprocessConfig) -> float | None:
    """The outward offset of a kernel of `area` and `perimeter`, in map pixels.

    ``"ratio"`` mode is DB's ``area * unclip_ratio / perimeter``. ``"inverse"`` mode solves
    for the offset ``D`` that the training shrink would have applied to the original box:
    with ``c = 1 - r**2``, an original rectangle of area ``A' + L' D + 4 D**2`` and perimeter
    ``L' + 8 D`` was shrunk by ``D = c A / L``, which gives the quadratic
    ``(8 - 4c) D**2 + (1 - c) L' D - c A' = 0``; ``unclip_ratio`` scales its root.

    Returns:
        The offset, or None for a degenerate kernel (no area or no perimeter).
    """
    if not (perimeter > 0 and area > 0 and np.isfinite(area) and np.isfinite(perimeter)):
        return None
    if config.unclip_mode == "ratio":
        distance = area * config.unclip_ratio / perimeter
    else:
        c = 1.0 - config.shrink_ratio**2
        a, b = 8.0 - 4.0 * c, (1.0 - c) * perimeter
        distance = config.unclip_ratio * (-b + np.sqrt(b * b + 4.0 * a * c * area)) / (2.0 * a)
    return float(distance) if np.isfinite(distance) and distance > 0 else None


def _simplify(polygon: np.ndarray, max_epsilon: float) -> np.ndarray | None:
    """Simplifies a closed polygon with approxPolyDP; None when fewer than 3 points remain.

    Args:
        polygon: (k, 2) vertices.
        max_epsilon: Upper bound of the approximation accuracy, in the polygon's units.

    Returns:
        (m, 2) float64 vertices, m <= k, or None.
    """
    curve = polygon.astype(np.float32).reshape(-1, 1, 2)
    epsilon = min(_POLY_EPSILON * cv2.arcLength(curve, True), max_epsilon)
    simplified = cv2.approxPolyDP(curve, epsilon, True).reshape(-1, 2)
    if len(simplified) < 3:
        return None
    return simplified.astype(np.float64)


def _orient(points: np.ndarray) -> np.ndarray | None:
    """Orders a polygon clockwise (y down) from its top-left point.

    The top-left point is, of the two points with the smallest x (ties: smaller y), the one
    with the smaller y.

    Args:
        points: (k, 2) vertices in cyclic order, either direction.

    Returns:
        (k, 2) vertices; None when the polygon has no area (for example after clipping).
    """
    x, y = points[:, 0], points[:, 1]
    # Shoelace with y down: positive means clockwise on screen.
    twice_area = float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))
    if not np.isfinite(twice_area) or abs(twice_area) < 1e-6:
        return None
    if twice_area < 0:
        points = points[::-1]
        x, y = points[:, 0], points[:, 1]

    leftmost = np.lexsort((y, x))[:2]
    start = int(leftmost[np.argmin(y[leftmost])])
    return np.roll(points, -start, axis=0)
