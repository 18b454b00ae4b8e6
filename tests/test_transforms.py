"""Training augmentation and evaluation resizing: the image and its polygons stay together."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import shapely
from shapely.geometry import Polygon, box

from dbnet.config import DataConfig
from dbnet.data.transforms import (
    apply_affine,
    augment,
    choose_crop,
    clip_polygons,
    color_jitter,
    eval_size,
    resize_for_eval,
)

# NumPy warnings (overflow, invalid value, division by zero) fail the tests: no hidden NaN.
pytestmark = pytest.mark.filterwarnings("error")


def _mask(height: int, width: int, polygons: list[np.ndarray]) -> np.ndarray:
    """(H, W) bool raster of polygons, vertices rounded to pixel centres."""
    canvas = np.zeros((height, width), np.uint8)
    for points in polygons:
        cv2.fillPoly(canvas, [np.round(points).astype(np.int32)], 1)
    return canvas > 0


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


QUAD = np.array([[60, 50], [250, 75], [240, 160], [70, 140]], np.float32)


@pytest.mark.parametrize("scale_range", [(0.2, 0.45), (0.5, 0.9), (1.0, 1.0), (1.2, 3.0)])
@pytest.mark.parametrize("seed", range(6))
def test_polygon_follows_the_image(scale_range: tuple[float, float], seed: int) -> None:
    # The image is the polygon's own mask: after augmentation the bright pixels must be
    # exactly where the transformed polygon is drawn.
    config = DataConfig(crop_size=224, scale_range=scale_range, rotate_degrees=10.0)
    image = np.repeat(_mask(200, 320, [QUAD])[:, :, None] * np.uint8(255), 3, axis=2)

    out = augment(image, [QUAD], [False], config, np.random.default_rng(seed), fill=(0, 0, 0))

    warped = out.image[:, :, 0] > 127
    drawn = _mask(224, 224, out.polygons)
    assert warped.sum() > 500, "the crop must hold the text (the only care instance)"
    assert _iou(warped, drawn) > 0.93, f"image and polygon disagree, IoU {_iou(warped, drawn):.3f}"


def test_matrix_maps_the_polygon() -> None:
    config = DataConfig(crop_size=256, scale_range=(0.7, 2.0))
    image = np.zeros((200, 320, 3), np.uint8)
    out = augment(image, [QUAD], [False], config, np.random.default_rng(3))
    assert not out.cut[0], "the quad fits in the crop and must not be cut"
    np.testing.assert_allclose(out.polygons[0], apply_affine(QUAD, out.matrix), atol=1e-3)


@pytest.mark.parametrize(("reference", "expected"), [("native", 1.0), ("eval", 0.5)])
def test_scale_can_be_relative_to_the_evaluation_size(reference: str, expected: float) -> None:
    # A 640x384 image evaluated at short side 192 (both multiples of 32) is seen at half size.
    config = DataConfig(
        crop_size=320,
        scale_range=(1.0, 1.0),
        scale_reference=reference,
        rotate_degrees=0.0,
        flip=False,
        eval_side="short",
        eval_size=192,
    )
    image = np.zeros((384, 640, 3), np.uint8)
    quad = np.array([[100, 100], [300, 100], [300, 140], [100, 140]], np.float32)
    out = augment(image, [quad], [False], config, np.random.default_rng(0))

    size = out.polygons[0].max(axis=0) - out.polygons[0].min(axis=0)
    assert size == pytest.approx(expected * np.array([200, 40]), abs=0.01), size


@pytest.mark.parametrize("shape", [(1, 1), (16, 24), (100, 700), (720, 1280), (2000, 50)])
def test_crop_is_exactly_crop_size(shape: tuple[int, int]) -> None:
    config = DataConfig(crop_size=128)
    image = np.full((*shape, 3), 90, np.uint8)
    polygons = [np.array([[0, 0], [shape[1] - 1, 0], [shape[1] - 1, shape[0] - 1]], np.float32)]
    for seed in range(3):
        out = augment(image, polygons, [False], config, np.random.default_rng(seed))
        assert out.image.shape == (128, 128, 3), f"{shape}: got {out.image.shape}"
        assert out.image.dtype == np.uint8
        for points in out.polygons:
            assert points.min() >= 0 and points.max() <= 127, "polygons are clipped to the crop"


def test_small_image_is_padded_with_the_fill_colour() -> None:
    config = DataConfig(crop_size=64, scale_range=(1.0, 1.0), rotate_degrees=0.0, flip=False)
    image = np.full((20, 30, 3), 200, np.uint8)
    polygon = np.array([[2, 2], [27, 2], [27, 17], [2, 17]], np.float32)

    out = augment(image, [polygon], [False], config, np.random.default_rng(0), fill=(7, 8, 9))

    content = (out.image == 200).all(axis=2)
    padding = (out.image == (7, 8, 9)).all(axis=2)
    assert content.sum() == 20 * 30, "the whole image is kept, at scale 1"
    assert padding.sum() == 64 * 64 - 20 * 30, "everything else is padding"
    # The polygon moved with the image: its top-left corner is 2 px into the content.
    rows, cols = np.nonzero(content)
    np.testing.assert_allclose(out.polygons[0][0], (cols.min() + 2, rows.min() + 2), atol=1e-4)


def test_default_fill_is_the_mean_colour() -> None:
    config = DataConfig(crop_size=64, scale_range=(1.0, 1.0))
    out = augment(np.zeros((8, 8, 3), np.uint8), [], [], config, np.random.default_rng(0))
    expected = np.round(np.array(config.mean) * 255)
    np.testing.assert_array_equal(out.image[-1, -1], expected)


def test_same_generator_state_gives_the_same_sample() -> None:
    config = DataConfig(crop_size=96, color_jitter=0.3)
    image = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    first = augment(image, [QUAD * 0.5], [False], config, np.random.default_rng(11))
    second = augment(image, [QUAD * 0.5], [False], config, np.random.default_rng(11))
    other = augment(image, [QUAD * 0.5], [False], config, np.random.default_rng(12))
    np.testing.assert_array_equal(first.image, second.image)
    np.testing.assert_array_equal(first.polygons[0], second.polygons[0])
    assert not np.array_equal(first.image, other.image), "another seed gives another sample"


def test_flip_mirrors_the_image() -> None:
    config = DataConfig(crop_size=64, scale_range=(1.0, 1.0), rotate_degrees=0.0, flip=True)
    image = np.zeros((64, 64, 3), np.uint8)
    image[:, :8] = 255  # a bright band on the left
    polygon = np.array([[1, 1], [6, 1], [6, 60], [1, 60]], np.float32)

    sides = set()
    for seed in range(12):
        out = augment(image, [polygon], [False], config, np.random.default_rng(seed))
        left = bool(out.image[32, 3, 0] > 127)
        sides.add(left)
        assert (out.polygons[0][:, 0].mean() < 32) == left, "the polygon follows the band"
    assert sides == {True, False}, "both flipped and unflipped samples occur"


# ---- crop window --------------------------------------------------------------------------


def test_crop_borders_avoid_care_text() -> None:
    # Three words on a long strip; a 100 px window can hold any one of them whole.
    boxes = np.array([[10, 10, 60, 30], [150, 40, 230, 60], [300, 20, 340, 50]], np.float64)
    for seed in range(40):
        x0, y0 = choose_crop(boxes, (400.0, 80.0), 100, np.random.default_rng(seed))
        window = box(x0, y0, x0 + 100, y0 + 100)
        inside = 0
        for x_min, y_min, x_max, y_max in boxes:
            word = box(x_min, y_min, x_max, y_max)
            overlap = word.intersection(window).area
            assert overlap in (0.0, word.area), f"seed {seed}: window {x0, y0} cuts a word"
            inside += overlap == word.area
        assert inside >= 1, f"seed {seed}: the window holds no word"


def test_crop_without_text_is_anywhere_inside() -> None:
    origins = {
        choose_crop(np.zeros((0, 4)), (500.0, 300.0), 100, np.random.default_rng(s))
        for s in range(20)
    }
    assert len(origins) > 10, "windows are random"
    assert all(0 <= x <= 400 and 0 <= y <= 200 for x, y in origins)


def test_crop_of_text_larger_than_the_window_overlaps_it() -> None:
    boxes = np.array([[100, 100, 900, 300]], np.float64)
    for seed in range(10):
        x0, y0 = choose_crop(boxes, (1000.0, 1000.0), 128, np.random.default_rng(seed))
        assert box(x0, y0, x0 + 128, y0 + 128).intersects(box(*boxes[0])), "text in the crop"


# ---- clipping -----------------------------------------------------------------------------


def test_clip_keeps_inside_drops_outside_and_cuts_across() -> None:
    inside = np.array([[10, 10], [40, 10], [40, 30], [10, 30]], np.float32)
    outside = inside + 500
    across = np.array([[80, 10], [130, 10], [130, 30], [80, 30]], np.float32)

    kept, flags, source, cut = clip_polygons(
        [inside, outside, across], [False, True, True], (100, 50)
    )

    assert source == [0, 2], "the polygon outside is dropped"
    assert kept[0] is inside and cut == [False, True]
    assert flags == [False, True], "flags follow their instance"
    expected = Polygon(across).intersection(box(0, 0, 99, 49)).area
    assert Polygon(kept[1]).area == pytest.approx(expected)
    assert kept[1][:, 0].max() <= 99


def test_clip_keeps_every_piece_of_a_split_polygon() -> None:
    # A U shape upside down: its two arms reach into the window, its base lies above it.
    arms = np.array(
        [[10, 20], [30, 20], [30, -10], [60, -10], [60, 20], [80, 20], [80, -40], [10, -40]],
        np.float32,
    )
    kept, _, source, cut = clip_polygons([arms], [False], (100, 100))
    assert source == [0, 0] and cut == [True, True], "both arms are kept"
    assert sum(Polygon(piece).area for piece in kept) == pytest.approx(2 * 20 * 20)


def test_clip_survives_a_crossing_bow_tie() -> None:
    bow_tie = np.array([[-20, 0], [40, 0], [-20, 30], [40, 30]], np.float32)
    kept, _, _, _ = clip_polygons([bow_tie], [False], (64, 64))
    expected = shapely.make_valid(Polygon(bow_tie)).intersection(box(0, 0, 63, 63)).area
    assert len(kept) == 2, "the two triangles of the bow tie, cut by the left border"
    assert sum(Polygon(piece).area for piece in kept) == pytest.approx(expected)


def test_degenerate_polygon_across_the_border_is_dropped() -> None:
    line = np.array([[-10, 5], [20, 5], [30, 5], [-5, 5]], np.float32)
    kept, _, _, _ = clip_polygons([line], [False], (64, 64))
    assert kept == [], "a polygon without area is dropped once clipped"


# ---- colour -------------------------------------------------------------------------------


def test_color_jitter_changes_colours_only() -> None:
    image = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    jittered = color_jitter(image, 0.4, np.random.default_rng(1))
    assert jittered.shape == image.shape and jittered.dtype == np.uint8
    assert not np.array_equal(jittered, image)
    np.testing.assert_array_equal(color_jitter(image, 0.0, np.random.default_rng(1)), image)


# ---- evaluation resize --------------------------------------------------------------------

SIZES = [(1, 1), (16, 24), (24, 16), (31, 33), (720, 1280), (1280, 720), (999, 1), (1, 5000)]


@pytest.mark.parametrize("side", ["short", "long"])
@pytest.mark.parametrize("shape", SIZES)
def test_eval_resize_gives_multiples_of_32(shape: tuple[int, int], side: str) -> None:
    image = np.full((*shape, 3), 128, np.uint8)
    resized, (fx, fy) = resize_for_eval(image, side, 736)

    height, width = resized.shape[:2]
    assert height % 32 == 0 and width % 32 == 0, f"{shape} -> {resized.shape}"
    assert height >= 32 and width >= 32
    assert (height, width) == eval_size(*shape, side, 736)
    assert fx * width == pytest.approx(shape[1]) and fy * height == pytest.approx(shape[0])


def test_eval_resize_keeps_aspect_and_sets_the_side() -> None:
    assert eval_size(720, 1280, "short", 736) == (736, 1312)
    assert eval_size(720, 1280, "long", 736) == (416, 736)
    assert eval_size(1, 5000, "short", 736)[1] <= 4096, "extreme strips are bounded"
    with pytest.raises(ValueError, match="short"):
        eval_size(10, 10, "middle", 736)
