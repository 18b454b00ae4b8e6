"""Training augmentation and evaluation resizing, applied to the image and its polygons together.

Training follows the DB recipe: random scale, rotation and horizontal flip, then a square crop
whose borders avoid cutting care text. The four steps are composed into one affine matrix and
only the output window is warped, so the cost does not grow with the scale factor.

Coordinates are OpenCV's: pixel centres sit on integer coordinates, and a point `p` of the
source maps to `M @ [x, y, 1]` in the output, exactly as `cv2.warpAffine` moves the pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import shapely
from shapely.geometry import Polygon, box

from dbnet.config import DataConfig
from dbnet.data.labels import MAX_COORDINATE

# NOTE: DB's random crop tries a bounded number of windows before giving up; with one try per
# candidate text instance (below), 50 is enough for the densest ICDAR 2015 images.
MAX_CROP_TRIES = 50

# Evaluation images are never resized beyond this many pixels on their long side, so that an
# extreme aspect ratio (a 1x2000 strip at short side 736) cannot exhaust memory.
MAX_EVAL_SIDE = 4096


@dataclass
class Augmented:
    """A training sample after augmentation.

    Attributes:
        image: (S, S, 3) uint8 RGB crop.
        polygons: (k, 2) float32 arrays in crop pixels, clipped to the crop.
        ignore: One flag per polygon, carried over from its source instance.
        source: Index of the input instance each polygon comes from (a polygon cut in two by
            the crop border gives two polygons with the same source).
        cut: True for a polygon the crop border cut (its vertices are no longer the source's).
        matrix: (2, 3) float64 affine matrix from source pixels to crop pixels.
    """

    image: np.ndarray
    polygons: list[np.ndarray]
    ignore: list[bool]
    source: list[int]
    cut: list[bool]
    matrix: np.ndarray


def apply_affine(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Maps (k, 2) points through a (2, 3) affine matrix; returns (k, 2) float32."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return (points @ matrix[:, :2].T + matrix[:, 2]).astype(np.float32)


def fill_colour(mean: tuple[float, float, float]) -> tuple[int, int, int]:
    """The uint8 RGB colour that normalises to zero, used for padding and rotated corners."""
    red, green, blue = (int(round(255 * m)) for m in mean)
    return red, green, blue


# ---- geometry of the random affine ------------------------------------------------------


def random_linear(
    scale_range: tuple[float, float],
    rotate_degrees: float,
    flip: bool,
    rng: np.random.Generator,
) -> np.ndarray:
    """Draws scale, rotation and flip; returns their (2, 2) linear part."""
    scale = rng.uniform(*scale_range)
    angle = math.radians(rng.uniform(-rotate_degrees, rotate_degrees))
    mirror = -1.0 if flip and rng.random() < 0.5 else 1.0

    cos, sin = math.cos(angle), math.sin(angle)
    rotation = np.array([[cos, -sin], [sin, cos]])
    return rotation @ np.diag([mirror * scale, scale])


def _extent_matrix(height: int, width: int, linear: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Places the transformed image with its bounding box at the origin.

    Returns:
        The (2, 3) matrix from source pixel centres to "extent" coordinates, where the
        transformed image area spans [0, extent_w] x [0, extent_h], and the two extents.
    """
    centre = np.array([(width - 1) / 2, (height - 1) / 2])
    # The image area of pixel centres 0..W-1 reaches half a pixel beyond them.
    corners = np.array(
        [[-0.5, -0.5], [width - 0.5, -0.5], [width - 0.5, height - 0.5], [-0.5, height - 0.5]]
    )
    moved = (corners - centre) @ linear.T  # (4, 2)
    low = moved.min(axis=0)
    extent_w, extent_h = moved.max(axis=0) - low

    matrix = np.zeros((2, 3))
    matrix[:, :2] = linear
    matrix[:, 2] = -linear @ centre - low
    return matrix, float(extent_w), float(extent_h)


def _free_origins(spans: np.ndarray, length: float, size: int) -> tuple[int, np.ndarray]:
    """Integer window origins along one axis and which of them keep both borders off text.

    Args:
        spans: (n, 2) low/high coordinates of the care text along the axis.
        length: Extent of the transformed image along the axis.
        size: Window size.

    Returns:
        The smallest origin `lo` and a boolean mask over origins lo, lo+1, ...: True where
        neither border of the window [o, o + size] falls inside a text span.
    """
    if length <= size:
        # The window covers the whole axis wherever it sits: no border can cut text.
        lo = math.ceil(length) - size
        return lo, np.ones(-lo + 1, dtype=bool)

    count = int(math.floor(length - size)) + 1
    positions = count + size  # the borders o and o + size of every origin o < count
    # Block every integer from floor(low) to ceil(high), a one-pixel margin around text,
    # by +1 / -1 steps summed along the axis.
    steps = np.zeros(positions + 1, dtype=np.int32)
    starts = np.clip(np.floor(spans[:, 0]).astype(int), 0, positions)
    stops = np.clip(np.ceil(spans[:, 1]).astype(int) + 1, 0, positions)
    np.add.at(steps, starts, 1)
    np.add.at(steps, stops, -1)
    blocked = np.cumsum(steps[:positions]) > 0
    free = ~blocked[:count] & ~blocked[size:]
    return 0, free


def _pick(lo: int, mask: np.ndarray, first: int, last: int, rng: np.random.Generator) -> int | None:
    """A random origin o in [first, last] with mask[o - lo] set, or None."""
    first, last = max(first, lo), min(last, lo + len(mask) - 1)
    if first > last:
        return None
    choices = np.flatnonzero(mask[first - lo : last - lo + 1])
    if len(choices) == 0:
        return None
    return first + int(choices[rng.integers(len(choices))])


def choose_crop(
    boxes: np.ndarray,
    extent: tuple[float, float],
    size: int,
    rng: np.random.Generator,
    max_tries: int = MAX_CROP_TRIES,
) -> tuple[int, int]:
    """Chooses a size x size window that holds care text and whose borders cut none.

    As in DB's random crop, the window borders are drawn from the text-free intervals of the
    care text's projections on both axes. Each try aims at one care instance (in random
    order) and keeps only windows that contain it whole. When no try succeeds (text larger
    than the window, or borders blocked everywhere), the window only overlaps one care
    instance, with text-free borders when possible; without care text, any window is taken.

    Args:
        boxes: (n, 4) care-text bounding boxes x_min, y_min, x_max, y_max in extent coordinates.
        extent: (width, height) of the transformed image.
        size: Window side in pixels.
        rng: Random generator.
        max_tries: Number of instances to aim at before falling back.

    Returns:
        The window origin (x0, y0) in extent coordinates; it may be negative when the image is
        smaller than the window (the rest is padding).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x_lo, x_free = _free_origins(boxes[:, [0, 2]], extent[0], size)
    y_lo, y_free = _free_origins(boxes[:, [1, 3]], extent[1], size)

    fits = np.flatnonzero((boxes[:, 2] - boxes[:, 0] <= size) & (boxes[:, 3] - boxes[:, 1] <= size))
    for index in rng.permutation(fits)[:max_tries]:
        x_min, y_min, x_max, y_max = boxes[index]
        x0 = _pick(x_lo, x_free, math.ceil(x_max - size), math.floor(x_min), rng)
        y0 = _pick(y_lo, y_free, math.ceil(y_max - size), math.floor(y_min), rng)
        if x0 is not None and y0 is not None:
            return x0, y0

    # Fallback: a window overlapping one care instance (text-free borders when possible),
    # or any window when there is no care text.
    anywhere = [np.ones_like(x_free), np.ones_like(y_free)]
    if len(boxes):
        x_min, y_min, x_max, y_max = boxes[rng.integers(len(boxes))]
        ranges = [
            (math.ceil(x_min - size), math.floor(x_max)),
            (math.ceil(y_min - size), math.floor(y_max)),
        ]
    else:
        ranges = [(x_lo, x_lo + len(x_free) - 1), (y_lo, y_lo + len(y_free) - 1)]
    origins = []
    for (lo, free), every, (first, last) in zip(
        ((x_lo, x_free), (y_lo, y_free)), anywhere, ranges, strict=True
    ):
        choice = _pick(lo, free, first, last, rng)
        if choice is None:
            choice = _pick(lo, every, first, last, rng)
        if choice is None:  # the box lies beyond the extent: rounding at the very edge
            choice = lo + int(rng.integers(len(free)))
        origins.append(choice)
    return origins[0], origins[1]


# ---- image warping and polygon clipping ------------------------------------------------


def warp_image(
    image: np.ndarray,
    matrix: np.ndarray,
    size: tuple[int, int],
    fill: tuple[int, int, int] = (0, 0, 0),
    interpolation: int = cv2.INTER_LINEAR,
) -> np.ndarray:
    """Warps only the output window of `image` through `matrix`.

    Args:
        image: (H, W, C) or (H, W) source.
        matrix: (2, 3) affine matrix from source pixels to output pixels.
        size: Output (width, height).
        fill: Colour outside the source.
        interpolation: OpenCV interpolation flag.

    Returns:
        The (height, width[, C]) output with the dtype of `image`.
    """
    height, width = image.shape[:2]
    scale = math.sqrt(abs(np.linalg.det(matrix[:, :2])))
    factor = int(1.0 / scale) if scale > 0 else 1
    if factor >= 2 and interpolation != cv2.INTER_NEAREST:
        # Shrink by a whole factor first (a box filter, OpenCV's fast path), so the warp
        # never samples below half resolution; a partial block at the border is dropped.
        small_w, small_h = width // factor, height // factor
        if small_w >= 1 and small_h >= 1:
            blocks = image[: small_h * factor, : small_w * factor]
            image = cv2.resize(blocks, (small_w, small_h), interpolation=cv2.INTER_AREA)
            # Pixel centre p of the reduced image averages source pixels around (p + 0.5) k - 0.5.
            k = float(factor)
            back = np.array([[k, 0, 0.5 * k - 0.5], [0, k, 0.5 * k - 0.5], [0, 0, 1]])
            matrix = matrix @ back

    border = fill if image.ndim == 3 else fill[0]
    return cv2.warpAffine(
        image,
        matrix,
        size,
        flags=interpolation,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=border,
    )


def _polygon_parts(geometry: shapely.Geometry) -> list[Polygon]:
    """The polygons with area inside any (possibly nested) shapely geometry."""
    if isinstance(geometry, Polygon):
        return [geometry] if geometry.area > 0 else []
    parts: list[Polygon] = []
    for part in getattr(geometry, "geoms", []):
        parts.extend(_polygon_parts(part))
    return parts


def _polygon_pieces(points: np.ndarray, window: Polygon) -> list[np.ndarray]:
    """Parts of a polygon inside the window, each (k, 2) float32; [] when nothing with area."""
    polygon = Polygon(points)
    if not polygon.is_valid:
        polygon = shapely.make_valid(polygon)
    clipped = polygon.intersection(window)
    return [
        np.asarray(part.exterior.coords, dtype=np.float32)[:-1] for part in _polygon_parts(clipped)
    ]


def clip_polygons(
    polygons: list[np.ndarray], ignore: list[bool], size: tuple[int, int]
) -> tuple[list[np.ndarray], list[bool], list[int], list[bool]]:
    """Clips polygons to the output window [0, width - 1] x [0, height - 1].

    Polygons entirely inside pass unchanged (their vertex order and any defect stay for the
    label maps to judge); polygons entirely outside are dropped; the others are intersected
    with the window, every piece with area is kept as its own instance, and an instance left
    with no area is dropped.

    Returns:
        The polygons, their ignore flags, the index of the source polygon of each, and
        whether each was cut by the window border.
    """
    width, height = size
    window = box(0, 0, width - 1, height - 1)
    kept: list[np.ndarray] = []
    flags: list[bool] = []
    source: list[int] = []
    cut: list[bool] = []

    for index, (points, flag) in enumerate(zip(polygons, ignore, strict=True)):
        if len(points) == 0:
            continue
        low, high = points.min(axis=0), points.max(axis=0)
        inside = low[0] >= 0 and low[1] >= 0 and high[0] <= width - 1 and high[1] <= height - 1
        outside = high[0] < 0 or high[1] < 0 or low[0] > width - 1 or low[1] > height - 1
        if inside:
            pieces = [points]
        elif outside or len(points) < 3:
            pieces = []
        else:
            pieces = _polygon_pieces(points, window)
        kept.extend(pieces)
        flags.extend([flag] * len(pieces))
        source.extend([index] * len(pieces))
        cut.extend([not inside] * len(pieces))
    return kept, flags, source, cut


# ---- colour ------------------------------------------------------------------------------


def color_jitter(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Random brightness, contrast and saturation, each by a factor in [1 - s, 1 + s].

    Args:
        image: (H, W, 3) uint8 RGB.
        strength: Jitter strength s in [0, 1).
        rng: Random generator.

    Returns:
        A new (H, W, 3) uint8 image.
    """
    brightness, contrast, saturation = 1 + rng.uniform(-strength, strength, size=3)
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    mean = float(gray.mean())

    # Brightness then contrast around the brightened mean: one lookup table.
    gain = brightness * contrast
    offset = (1 - contrast) * brightness * mean
    table = np.clip(np.arange(256) * gain + offset, 0, 255).astype(np.uint8)
    image = cv2.LUT(image, table)

    # Saturation: blend with the gray image (addWeighted saturates to [0, 255]).
    gray = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(image, saturation, gray, 1 - saturation, 0)


# ---- the training and evaluation transforms ---------------------------------------------


def augment(
    image: np.ndarray,
    polygons: list[np.ndarray],
    ignore: list[bool],
    config: DataConfig,
    rng: np.random.Generator,
    fill: tuple[int, int, int] | None = None,
) -> Augmented:
    """Random scale, rotation, flip and text-preserving crop, as one warp.

    Args:
        image: (H, W, 3) uint8 RGB.
        polygons: (k, 2) float arrays in image pixels.
        ignore: One don't-care flag per polygon; only care text steers the crop.
        config: scale_range (relative to the image or, with scale_reference "eval", to its
            evaluation size), rotate_degrees, flip, crop_size and color_jitter are used.
        rng: Random generator; the same state gives the same sample.
        fill: Padding colour; defaults to the mean colour of `config.mean`.

    Returns:
        The crop (crop_size x crop_size) with its clipped polygons.
    """
    size = config.crop_size
    height, width = image.shape[:2]
    fill = fill_colour(config.mean) if fill is None else fill

    # Scale, rotation and flip, placed so the transformed image starts at the origin.
    low, high = config.scale_range
    if config.scale_reference == "eval":
        new_height, new_width = eval_size(height, width, config.eval_side, config.eval_size)
        factor = math.sqrt(new_height / height * new_width / width)
        low, high = low * factor, high * factor
    linear = random_linear((low, high), config.rotate_degrees, config.flip, rng)
    to_extent, extent_w, extent_h = _extent_matrix(height, width, linear)

    # Crop window chosen from the transformed care polygons. Corrupt coordinates (beyond
    # MAX_COORDINATE, which the label code ignores as degenerate) would overflow the
    # transform: such a polygon becomes empty, which the clipping below drops.
    moved = [
        apply_affine(points, to_extent)
        if np.abs(points).max(initial=0.0) <= MAX_COORDINATE
        else np.zeros((0, 2), np.float32)
        for points in polygons
    ]
    care = [p for p, flag in zip(moved, ignore, strict=True) if not flag and len(p) >= 3]
    boxes = np.array([[*p.min(axis=0), *p.max(axis=0)] for p in care]).reshape(-1, 4)
    x0, y0 = choose_crop(boxes, (extent_w, extent_h), size, rng)

    # Output pixel centre j sits at extent coordinate origin + j + 0.5.
    matrix = to_extent.copy()
    matrix[:, 2] -= (x0 + 0.5, y0 + 0.5)
    shift = np.array([x0 + 0.5, y0 + 0.5], dtype=np.float32)
    moved = [points - shift for points in moved]

    crop = warp_image(image, matrix, (size, size), fill)
    if config.color_jitter > 0:
        crop = color_jitter(crop, config.color_jitter, rng)

    kept, flags, source, cut = clip_polygons(moved, list(ignore), (size, size))
    return Augmented(crop, kept, flags, source, cut, matrix)


def eval_size(height: int, width: int, side: str, size: int) -> tuple[int, int]:
    """Evaluation size of an image: aspect kept, `side` ("short" or "long") to `size`.

    Both sides are rounded to multiples of 32, at least 32, and the long side stays within
    MAX_EVAL_SIDE.

    Returns:
        (new_height, new_width).
    """
    if side not in ("short", "long"):
        raise ValueError(f"eval side must be 'short' or 'long', got {side!r}")
    height, width = max(1, int(height)), max(1, int(width))
    reference = min(height, width) if side == "short" else max(height, width)
    scale = size / reference
    scale = min(scale, max(MAX_EVAL_SIDE, size) / max(height, width))

    def to_grid(length: int) -> int:
        return max(32, int(round(length * scale / 32)) * 32)

    return to_grid(height), to_grid(width)


def resize_for_eval(
    image: np.ndarray, side: str, size: int
) -> tuple[np.ndarray, tuple[float, float]]:
    """Resizes an image for validation or inference.

    Args:
        image: (H, W, 3) uint8 RGB, any size from 1x1.
        side: "short" or "long": which side is brought to `size`.
        size: Target length of that side before rounding to a multiple of 32.

    Returns:
        The (H', W', 3) resized image, H' and W' multiples of 32, and the factors (fx, fy)
        that map it back: x_original = x * fx, y_original = y * fy.
    """
    height, width = image.shape[:2]
    new_h, new_w = eval_size(height, width, side, size)
    shrinking = new_h * new_w < height * width
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    return resized, (width / new_w, height / new_h)
