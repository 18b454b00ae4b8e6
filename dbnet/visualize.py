"""Pictures of samples, maps and detections, drawn with OpenCV on numpy arrays.

Every function takes and returns RGB uint8 images and leaves its inputs untouched; the
training loop passes numpy copies of its tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from dbnet.errors import DBNetError

if TYPE_CHECKING:
    from dbnet.data.dataset import DetectionDataset

CARE_COLOUR = (0, 220, 0)
IGNORE_COLOUR = (230, 40, 40)
DETECTION_COLOUR = (255, 200, 0)
# Regions where the shrink mask is 0 (don't-care and ignored text) are tinted with this.
MASKED_COLOUR = np.array([255, 40, 40], dtype=np.float32)


def denormalise(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(3, H, W) float image normalised with mean/std -> (H, W, 3) uint8 RGB."""
    mean_ = np.asarray(mean, dtype=np.float32)[:, None, None]
    std_ = np.asarray(std, dtype=np.float32)[:, None, None]
    pixels = (np.asarray(image, dtype=np.float32) * std_ + mean_) * 255.0
    return np.ascontiguousarray(np.clip(pixels, 0, 255).round().astype(np.uint8).transpose(1, 2, 0))


def colour_map(values: np.ndarray, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """(H, W) float map -> (H, W, 3) uint8 RGB with the viridis colour scale over [low, high]."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float32), nan=low)
    scaled = np.clip((values - low) / max(high - low, 1e-12), 0, 1)
    gray = (scaled * 255).round().astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(gray, cv2.COLORMAP_VIRIDIS), cv2.COLOR_BGR2RGB)


def _int_points(points: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(points, dtype=np.float64)).astype(np.int32).reshape(-1, 1, 2)


def draw_polygons(
    image: np.ndarray,
    polygons: Sequence[np.ndarray],
    ignore: Sequence[bool] | None = None,
    thickness: int = 2,
) -> np.ndarray:
    """Draws care polygons in green and don't-care ones in red on a copy of `image`.

    Args:
        image: (H, W, 3) uint8 RGB.
        polygons: (k, 2) arrays in image pixels.
        ignore: One flag per polygon; None draws every polygon as care text.
        thickness: Line width in pixels.

    Returns:
        A new (H, W, 3) uint8 image.
    """
    canvas = np.ascontiguousarray(image, dtype=np.uint8).copy()
    flags = ignore if ignore is not None else [False] * len(polygons)
    for points, flag in zip(polygons, flags, strict=True):
        if len(points) == 0:
            continue
        colour = IGNORE_COLOUR if flag else CARE_COLOUR
        cv2.polylines(canvas, [_int_points(points)], True, colour, thickness, cv2.LINE_AA)
    return canvas


def draw_detections(
    image: np.ndarray,
    detections: Sequence[Any],
    thickness: int = 2,
    show_scores: bool = True,
) -> np.ndarray:
    """Draws detected polygons (and their scores) on a copy of `image`.

    Args:
        image: (H, W, 3) uint8 RGB.
        detections: (k, 2) arrays, or objects with `points` ((k, 2) array) and `score`.
        thickness: Line width in pixels.
        show_scores: Write each score beside its first vertex.

    Returns:
        A new (H, W, 3) uint8 image.
    """
    canvas = np.ascontiguousarray(image, dtype=np.uint8).copy()
    for detection in detections:
        points = np.asarray(getattr(detection, "points", detection))
        if points.size == 0:
            continue
        cv2.polylines(canvas, [_int_points(points)], True, DETECTION_COLOUR, thickness, cv2.LINE_AA)
        score = getattr(detection, "score", None)
        if show_scores and score is not None:
            x, y = _int_points(points)[0, 0]
            cv2.putText(
                canvas,
                f"{score:.2f}",
                (int(x), max(int(y) - 3, 10)),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.4,
                DETECTION_COLOUR,
                1,
                cv2.LINE_AA,
            )
    return canvas


def _label(tile: np.ndarray, text: str) -> np.ndarray:
    """Writes a caption in the top-left corner of a tile (in place) and returns it."""
    cv2.putText(tile, text, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(tile, text, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return tile


def _fit(tile: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resizes a tile to (height, width) when it differs (nearest, to keep map values)."""
    if tile.shape[:2] == (height, width):
        return tile
    return cv2.resize(tile, (width, height), interpolation=cv2.INTER_NEAREST)


def sample_picture(
    image: np.ndarray,
    polygons: Sequence[np.ndarray],
    ignore: Sequence[bool],
    shrink_map: np.ndarray,
    threshold_map: np.ndarray,
    shrink_mask: np.ndarray | None = None,
    threshold_range: tuple[float, float] = (0.0, 1.0),
) -> np.ndarray:
    """One picture of a training sample: image with polygons | shrink map | threshold map.

    Args:
        image: (H, W, 3) uint8 RGB.
        polygons: (k, 2) polygons in image pixels.
        ignore: Don't-care flag per polygon (drawn in red, care text in green).
        shrink_map: (H, W) float in {0, 1}.
        threshold_map: (H, W) float in [0, 1].
        shrink_mask: (H, W) float in {0, 1}; where 0, the shrink map is tinted red.
        threshold_range: Values drawn darkest and brightest in the threshold map.

    Returns:
        (H, 3 W, 3) uint8 RGB.
    """
    height, width = image.shape[:2]
    drawn = _label(draw_polygons(image, polygons, ignore), "image")

    gray = (np.clip(np.asarray(shrink_map, dtype=np.float32), 0, 1) * 255).astype(np.uint8)
    shrink = cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    if shrink_mask is not None:
        masked = np.asarray(shrink_mask) < 0.5
        shrink[masked] = (0.4 * shrink[masked] + 0.6 * MASKED_COLOUR).astype(np.uint8)
    shrink = _label(_fit(shrink, height, width), "shrink (red: masked)")
    threshold = colour_map(threshold_map, *threshold_range)
    threshold = _label(_fit(threshold, height, width), "threshold")
    return np.concatenate([drawn, shrink, threshold], axis=1)


def training_panel(
    image: np.ndarray,
    target_shrink: np.ndarray,
    prob: np.ndarray,
    thresh: np.ndarray | None = None,
    binary: np.ndarray | None = None,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    max_height: int = 320,
) -> np.ndarray:
    """A row of tiles for TensorBoard: input, target shrink map and the predicted maps.

    Args:
        image: (3, H, W) float normalised with mean/std (a network input), or (H, W, 3) uint8.
        target_shrink: (H, W) target shrink map in {0, 1}.
        prob: (H, W) predicted probability map in [0, 1].
        thresh: (H, W) predicted threshold map in [0, 1], when available.
        binary: (H, W) approximate binary map in [0, 1], when available.
        mean: Normalisation mean of `image`.
        std: Normalisation std of `image`.
        max_height: Tiles are reduced to at most this height.

    Returns:
        (h, n w, 3) uint8 RGB, n = 3 to 5 tiles.
    """
    rgb = np.asarray(image)
    if rgb.ndim == 3 and rgb.shape[0] == 3 and rgb.dtype != np.uint8:
        rgb = denormalise(rgb, mean, std)  # (H, W, 3)
    height, width = rgb.shape[:2]
    scale = min(1.0, max_height / max(height, 1))
    size = (max(1, round(height * scale)), max(1, round(width * scale)))

    tiles = [
        (rgb, "input"),
        (colour_map(target_shrink), "target shrink"),
        (colour_map(prob), "prob"),
    ]
    if thresh is not None:
        tiles.append((colour_map(thresh), "thresh"))
    if binary is not None:
        tiles.append((colour_map(binary), "binary"))

    fitted = []
    for tile, caption in tiles:
        small = tile
        if tile.shape[:2] != size:
            small = cv2.resize(tile, size[::-1], interpolation=cv2.INTER_AREA)
        fitted.append(_label(np.ascontiguousarray(small).copy(), caption))
    return np.concatenate(fitted, axis=1)


def write_image(path: str | Path, image: np.ndarray) -> Path:
    """Writes an RGB uint8 image; the format follows the suffix (.png, .jpg).

    Raises:
        DBNetError: The file cannot be written (unknown suffix, unwritable folder).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        written = cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    except cv2.error as exc:
        raise DBNetError(f"{path}: cannot write image ({exc.msg.strip()})") from None
    if not written:
        raise DBNetError(f"{path}: cannot write image (use a .png or .jpg file name)")
    return path


def save_sample_picture(dataset: DetectionDataset, index: int, out: str | Path) -> Path:
    """Writes the picture of one augmented training sample of a dataset.

    Args:
        dataset: A training dataset (its seed and epoch choose the augmentation).
        index: Sample index, in the natural order of the image names.
        out: The image file to write.

    Returns:
        The written file.

    Raises:
        DBNetError: `index` is out of range, or the file cannot be written.
    """
    if not 0 <= index < len(dataset):
        raise DBNetError(
            f"index {index} is out of range: {dataset.root} has {len(dataset)} samples "
            f"(0 to {len(dataset) - 1})"
        )
    sample = dataset.train_sample(index)
    maps = sample.maps
    picture = sample_picture(
        sample.image,
        sample.polygons,
        sample.ignore,
        maps.shrink_map,
        maps.threshold_map,
        maps.shrink_mask,
        threshold_range=(dataset.config.thresh_min, dataset.config.thresh_max),
    )
    return write_image(out, picture)
