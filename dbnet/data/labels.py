"""Shrink and threshold maps, the training targets of DB.

Every usable text polygon gives two regions. Its shrunk copy (offset inwards by
``D = A (1 - r^2) / L``, with ``A`` the area, ``L`` the perimeter and ``r`` the shrink
ratio) is the positive region of the probability map. Its dilated copy (offset outwards
by the same ``D``) is the support of the threshold map, whose value falls linearly with
the distance to the nearest polygon edge: ``thresh_max`` on the edge, ``thresh_min`` at
distance ``D`` and beyond. Where dilated regions overlap the map keeps the larger value.

Conventions:

- Pixel ``(row, col)`` is the point ``(x=col, y=row)``; distances are measured from it.
- Regions are rasterised with OpenCV's polygon fill at 1/16 pixel precision: a pixel is
  filled when its centre lies inside the polygon or the outline passes through it.
- Polygons may reach outside the image; they are clipped when drawn.
- Vertex order (clockwise or not) and the starting vertex do not change any map: every
  polygon is brought to one orientation and starting vertex before it is offset.

An instance that cannot give a sound target is ignored: it is zeroed in the shrink mask
(its original polygon, when it can be drawn), gets no shrink target and no threshold
region, and ``LabelMaps.ignored`` records ``(index, reason)``. A bow-tie quadrilateral
(vertices listed in the wrong order, so two edges cross) whose convex hull is a proper
quadrilateral is repaired by that hull instead, and recorded in ``LabelMaps.repaired``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import cv2
import numpy as np
import pyclipper
import shapely

# Reasons an instance is left out of the targets.
DONT_CARE = "dont_care"  # flagged by the annotation (transcription "###")
DEGENERATE = "degenerate"  # non-finite or absurd coordinates, < 3 distinct points, zero area
SELF_INTERSECTING = "self_intersecting"  # edges cross and no safe repair exists
TOO_SMALL = "too_small"  # short side of the minimum-area rectangle under min_text_size
EMPTY_OFFSET = "empty_offset"  # the inward offset left nothing
REPAIRED = "repaired"  # bow-tie quadrilateral replaced by its convex hull

# Coordinates beyond this many pixels from the origin are treated as corrupt annotations.
MAX_COORDINATE = 1e6
# Fixed-point precision shared by pyclipper (integer coordinates) and cv2.fillPoly (shift).
_SHIFT = 4
_SCALE = 1 << _SHIFT
# Round joins are flattened into chords that stray at most one fixed-point step (1/16 px)
# from the true arc (pyclipper's default, 0.25 step, would add needless vertices).
_ARC_TOLERANCE = 1.0
# Input coordinates are snapped to this grid: near-duplicate vertices become duplicates
# and no arithmetic below meets numbers small enough to underflow.
_SNAP = 256.0
# Areas (px^2) at or below this count as zero.
_ZERO_AREA = 1e-6
# Largest (2 x edges, rows, columns) float32 array of the border computation (2 MB): large
# polygons are done in blocks of rows, so their temporary memory stays bounded.
_BLOCK_ELEMENTS = 1 << 19


@dataclass
class LabelMaps:
    """The four DB training targets of one image and what was left out of them.

    Attributes:
        shrink_map: (H, W) float32 in {0, 1}, 1 inside the shrunk polygons.
        shrink_mask: (H, W) float32 in {0, 1}, 0 over ignored instances.
        threshold_map: (H, W) float32 in [thresh_min, thresh_max], thresh_min outside
            the dilated polygons.
        threshold_mask: (H, W) float32 in {0, 1}, 1 inside the dilated polygons.
        ignored: (instance index, reason) of every instance left out of the targets.
        repaired: (instance index, "repaired") of every bow-tie quadrilateral that was
            used after replacing it by its convex hull.
    """

    shrink_map: np.ndarray
    shrink_mask: np.ndarray
    threshold_map: np.ndarray
    threshold_mask: np.ndarray
    ignored: list[tuple[int, str]] = field(default_factory=list)
    repaired: list[tuple[int, str]] = field(default_factory=list)


def make_label_maps(
    height: int,
    width: int,
    polygons: list[np.ndarray],
    ignore: list[bool],
    shrink_ratio: float = 0.4,
    thresh_min: float = 0.3,
    thresh_max: float = 0.7,
    min_text_size: float = 8,
) -> LabelMaps:
    """Build the shrink map, threshold map and their masks for one image.

    Args:
        height: Image height in pixels.
        width: Image width in pixels.
        polygons: One (k, 2) array of x, y pixel coordinates per instance.
        ignore: One don't-care flag per instance.
        shrink_ratio: ``r`` in the offset ``D = A (1 - r^2) / L``, in (0, 1).
        thresh_min: Threshold map value at distance ``D`` from the text and beyond.
        thresh_max: Threshold map value on the polygon edges.
        min_text_size: Instances whose minimum-area rectangle has a shorter side (px)
            are ignored as too small.

    Returns:
        The four maps and the instances that were ignored or repaired.

    Raises:
        ValueError: On arguments outside their allowed ranges, on polygon and flag lists
            of different lengths, or on a polygon that is not a (k, 2) array.
    """
    _check_arguments(height, width, polygons, ignore, shrink_ratio, thresh_min, thresh_max)
    shrink_map = np.zeros((height, width), np.float32)
    shrink_mask = np.ones((height, width), np.float32)
    threshold_map = np.full((height, width), thresh_min, np.float32)
    threshold_mask = np.zeros((height, width), np.float32)
    maps = LabelMaps(shrink_map, shrink_mask, threshold_map, threshold_mask)

    for index, (points, dont_care) in enumerate(zip(polygons, ignore, strict=True)):
        points = _as_points(points, index)
        if dont_care:
            regions, reason = None, DONT_CARE
        else:
            regions, reason = _text_regions(points, shrink_ratio, min_text_size)
        if regions is None:
            maps.ignored.append((index, reason))
            _fill(shrink_mask, points, 0.0)
            continue

        if reason == REPAIRED:
            maps.repaired.append((index, REPAIRED))
        cv2.fillPoly(shrink_map, regions.shrunk, 1.0, shift=_SHIFT)
        cv2.fillPoly(threshold_mask, regions.dilated, 1.0, shift=_SHIFT)
        _draw_border(threshold_map, regions, thresh_min, thresh_max)
    return maps


def clean_polygon(points: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """Check one polygon and bring it to a canonical form.

    Coordinates are snapped to 1/256 px, repeated consecutive vertices dropped, and the
    vertices put clockwise as seen on the image (positive shoelace area with the y axis
    pointing down), starting from the top-most, then left-most, vertex.

    Args:
        points: (k, 2) x, y coordinates.

    Returns:
        ``(polygon, None)`` for a valid polygon, ``(hull, "repaired")`` for a bow-tie
        quadrilateral whose convex hull is a proper quadrilateral, and ``(None, reason)``
        with reason "degenerate" or "self_intersecting" otherwise. Returned polygons are
        (n, 2) float64 with n >= 3.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if not _drawable(points):
        return None, DEGENERATE
    points = np.rint(points * _SNAP) / _SNAP

    # Drop vertices equal to their successor (including a closing copy of the first).
    distinct = (points != _successor(points)).any(axis=1)
    if not distinct.all():
        points = points[distinct]
    if len(points) < 3:
        return None, DEGENERATE
    area = _signed_area(points)
    if abs(area) <= _ZERO_AREA and _collinear(points):
        return None, DEGENERATE  # (a zero area with spread points is a crossing ring)

    # Triangles and convex quadrilaterals (nearly all text boxes) are simple polygons.
    if len(points) == 3 or (len(points) == 4 and _is_convex(points)):
        return _canonical(points, area), None
    polygon = shapely.Polygon(points)
    if shapely.is_valid(polygon):
        return _canonical(points, area), None

    # A quadrilateral with crossing edges is four corners listed in the wrong order when
    # all four are corners of the convex hull; any other invalid ring cannot be guessed.
    if len(points) == 4:
        hull = shapely.get_coordinates(shapely.convex_hull(polygon))[:-1]
        if len(hull) == 4:
            hull_area = _signed_area(hull)
            if abs(hull_area) > _ZERO_AREA:
                return _canonical(hull, hull_area), REPAIRED
    return None, SELF_INTERSECTING


def _check_arguments(
    height: int,
    width: int,
    polygons: list[np.ndarray],
    ignore: list[bool],
    shrink_ratio: float,
    thresh_min: float,
    thresh_max: float,
) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"image size must be at least 1x1, got height={height} width={width}")
    if len(polygons) != len(ignore):
        raise ValueError(
            f"one ignore flag per polygon is needed, got {len(polygons)} polygons "
            f"and {len(ignore)} flags"
        )
    if not 0.0 < shrink_ratio < 1.0:
        raise ValueError(f"shrink_ratio must be in (0, 1), got {shrink_ratio}")
    if not thresh_min <= thresh_max:
        raise ValueError(
            f"thresh_min must not exceed thresh_max, got {thresh_min} and {thresh_max}"
        )


def _as_points(points: np.ndarray, index: int) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"polygon {index} must be a (k, 2) array, got shape {points.shape}")
    return points


def _drawable(points: np.ndarray) -> bool:
    """True when every coordinate is finite and within MAX_COORDINATE."""
    # NOTE: a NaN makes the comparison False, so one reduction checks both.
    return bool(np.abs(points).max(initial=0.0) <= MAX_COORDINATE)


def _collinear(points: np.ndarray) -> bool:
    """True when all points of a (k, 2) array lie on one line (their hull has no area)."""
    return shapely.convex_hull(shapely.multipoints(points - points[0])).area <= _ZERO_AREA


def _successor(points: np.ndarray) -> np.ndarray:
    """The (k, ...) array shifted by one: row i holds row i + 1, the last holds the first."""
    return np.concatenate((points[1:], points[:1]))


def _signed_area(points: np.ndarray) -> float:
    """Shoelace area of a (k, 2) ring, positive when clockwise on the image (y down)."""
    points = points - points[0]  # relative coordinates: no cancellation far from 0
    following = _successor(points)
    cross = points[:, 0] * following[:, 1] - points[:, 1] * following[:, 0]
    return 0.5 * float(cross.sum())


def _is_convex(points: np.ndarray) -> bool:
    """True for a convex (4, 2) ring; with four vertices, turns of one sign mean simple too."""
    return bool(cv2.isContourConvex(points.astype(np.float32)))


def _canonical(points: np.ndarray, area: float) -> np.ndarray:
    """The same (k, 2) ring, clockwise on the image, from its top-most then left-most vertex."""
    if area < 0:
        points = points[::-1]
    first = int(np.lexsort((points[:, 0], points[:, 1]))[0])
    return np.concatenate((points[first:], points[:first]))


class _Regions(NamedTuple):
    """What one usable instance draws."""

    polygon: np.ndarray  # (k, 2) float64 clean polygon, pixels
    shrunk: list[np.ndarray]  # (m, 2) int32 paths at 1/16 px; a shrink may split in pieces
    dilated: list[np.ndarray]  # (m, 2) int32 paths at 1/16 px; a dilation may hold holes
    distance: float  # the offset D, pixels


def _text_regions(
    points: np.ndarray, shrink_ratio: float, min_text_size: float
) -> tuple[_Regions | None, str | None]:
    """The shrunk and dilated regions of one instance, or why it is ignored.

    Returns:
        ``(regions, None)``, ``(regions, "repaired")`` for a repaired bow-tie, or
        ``(None, reason)`` when the instance must be ignored.
    """
    polygon, reason = clean_polygon(points)
    if polygon is None:
        return None, reason
    contour = polygon.astype(np.float32)
    (_, _), (side_a, side_b), _ = cv2.minAreaRect(contour)
    if min(side_a, side_b) < min_text_size:
        return None, TOO_SMALL

    # NOTE: the offset D = A (1 - r^2) / L is the DB paper's (Liao et al., AAAI 2020,
    # "Label generation"); round joins on a closed polygon as in its reference code.
    area, perimeter = cv2.contourArea(contour), cv2.arcLength(contour, True)
    distance = area * (1.0 - shrink_ratio**2) / perimeter if perimeter > 0 else 0.0
    if distance * _SCALE < 1.0:
        return None, TOO_SMALL  # an offset under the fixed-point step is not representable

    offset = pyclipper.PyclipperOffset()
    offset.ArcTolerance = _ARC_TOLERANCE
    fixed = np.rint(polygon * _SCALE).astype(np.int64)
    offset.AddPath(fixed, pyclipper.JT_ROUND, pyclipper.ET_CLOSEDPOLYGON)
    shrunk = offset.Execute(-distance * _SCALE)
    if not shrunk:
        return None, EMPTY_OFFSET
    dilated = offset.Execute(distance * _SCALE)

    def as_paths(paths: list) -> list[np.ndarray]:
        return [np.array(path, dtype=np.int32) for path in paths]

    return _Regions(polygon, as_paths(shrunk), as_paths(dilated), distance), reason


def _fill(image: np.ndarray, points: np.ndarray, value: float) -> None:
    """Fill one float (k, 2) polygon in place, unless it cannot be drawn (empty, NaN, huge)."""
    if len(points) and _drawable(points):
        path = np.rint(points * _SCALE).astype(np.int32)
        cv2.fillPoly(image, [path], value, shift=_SHIFT)


def _draw_border(
    canvas: np.ndarray, regions: _Regions, thresh_min: float, thresh_max: float
) -> None:
    """Raise the threshold map inside the dilated polygon's bounding box, in place.

    Args:
        canvas: (H, W) float32 threshold map.
        regions: The instance's polygon, dilated paths and offset D.
        thresh_min: Value at distance D and beyond.
        thresh_max: Value on the edges.
    """
    height, width = canvas.shape
    dilated = regions.dilated
    corners = dilated[0] if len(dilated) == 1 else np.concatenate(dilated)  # (m, 2) fixed point
    left, top, box_width, box_height = cv2.boundingRect(corners)
    x0, y0 = max(left >> _SHIFT, 0), max(top >> _SHIFT, 0)
    x1 = min(-(-(left + box_width - 1) >> _SHIFT), width - 1)  # ceiling of the last pixel
    y1 = min(-(-(top + box_height - 1) >> _SHIFT), height - 1)
    if x0 > x1 or y0 > y1:
        return  # entirely outside the image

    # Box coordinates keep float32 precise; blocks of rows bound the temporary memory.
    lines, half = _edge_lines(regions.polygon - (x0, y0))
    xs = np.arange(x1 - x0 + 1, dtype=np.float32)
    ys = np.arange(y1 - y0 + 1, dtype=np.float32)
    rows = max(1, _BLOCK_ELEMENTS // (lines.shape[1] * len(xs)))
    slope = np.float32((thresh_max - thresh_min) / regions.distance)
    for start in range(0, len(ys), rows):
        stop = min(start + rows, len(ys))
        value = _edge_distance(lines, half, xs, ys[start:stop])  # (stop - start, w) px
        value *= -slope
        value += np.float32(thresh_max)  # thresh_max on an edge, falling with the distance
        np.maximum(value, np.float32(thresh_min), out=value)
        box = canvas[y0 + start : y0 + stop, x0 : x1 + 1]
        np.maximum(box, value, out=box)


def _edge_lines(polygon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two linear functions of (x, y) per edge of a closed polygon, and its half length.

    For edge i, "along" is the signed distance from the edge's midpoint in the edge's
    direction and "across" the signed distance perpendicular to it; each is
    ``x * cx + y * cy - offset``. Edges are few, so this is scalar set-up per edge.

    Args:
        polygon: (k, 2) float64 vertices without repeated consecutive points, so that
            every edge has a length (in float64, where that holds).

    Returns:
        ``lines`` (3, 2k, 1, 1) float32 holding cx, cy, offset, with the k "along"
        functions first and the k "across" ones after; ``half`` (k, 1, 1) float32.
    """
    points = polygon.tolist()
    along, across, half = [], [], []
    for (ax, ay), (bx, by) in zip(points, points[1:] + points[:1], strict=True):
        length = math.hypot(bx - ax, by - ay)
        ux, uy = (bx - ax) / length, (by - ay) / length
        mx, my = (ax + bx) / 2, (ay + by) / 2
        along.append((ux, uy, mx * ux + my * uy))
        across.append((uy, -ux, mx * uy - my * ux))
        half.append(length / 2)
    lines = np.array(along + across, np.float32).T  # (3, 2k)
    return lines[:, :, None, None], np.array(half, np.float32)[:, None, None]


def _edge_distance(
    lines: np.ndarray, half: np.ndarray, xs: np.ndarray, ys: np.ndarray
) -> np.ndarray:
    """Exact distance from every grid point to the nearest edge of a closed polygon.

    The distance to edge i is ``hypot(across, max(|along| - half_length, 0))``; every
    edge and grid point go in one broadcast.

    Args:
        lines: (3, 2k, 1, 1) along/across functions from ``_edge_lines``.
        half: (k, 1, 1) half edge lengths.
        xs: (w,) float32 x coordinates of the grid columns.
        ys: (h,) float32 y coordinates of the grid rows.

    Returns:
        (h, w) float32 distances in pixels.
    """
    cx, cy, offset = lines  # each (2k, 1, 1)
    edges = len(half)
    with np.errstate(under="ignore"):  # squares of tiny values may flush to zero
        frame = xs * cx + (ys[:, None] * cy - offset)  # (2k, h, w): along, then across
        outside = frame[:edges]  # along -> how far beyond the segment's ends
        np.abs(outside, out=outside)
        outside -= half
        np.maximum(outside, 0.0, out=outside)
        np.square(frame, out=frame)
        outside += frame[edges:]
        return np.sqrt(outside.min(axis=0))  # (h, w)
