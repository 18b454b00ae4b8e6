"""Pictures of samples, training panels and detections."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from dbnet.data.dataset import normalise
from dbnet.errors import DBNetError
from dbnet.visualize import (
    CARE_COLOUR,
    DETECTION_COLOUR,
    IGNORE_COLOUR,
    denormalise,
    draw_detections,
    draw_polygons,
    sample_picture,
    training_panel,
    write_image,
)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _near(pixel: np.ndarray, colour: tuple[int, int, int]) -> bool:
    """Equal up to anti-aliasing."""
    return bool(np.abs(pixel.astype(int) - colour).max() <= 40)


def test_polygons_are_drawn_in_their_colours_on_a_copy() -> None:
    image = np.zeros((40, 60, 3), np.uint8)
    care = np.array([[5, 5], [25, 5], [25, 20], [5, 20]], np.float32)
    dont_care = care + (30, 10)

    drawn = draw_polygons(image, [care, dont_care], [False, True], thickness=1)

    assert image.max() == 0, "the input is left untouched"
    assert _near(drawn[5, 15], CARE_COLOUR)
    assert _near(drawn[15, 45], IGNORE_COLOUR)


@dataclass
class _Detection:
    points: np.ndarray
    score: float


def test_detections_accept_arrays_and_objects() -> None:
    image = np.zeros((50, 80, 3), np.uint8)
    quad = np.array([[10, 20], [60, 20], [60, 40], [10, 40]], np.float32)
    from_array = draw_detections(image, [quad], thickness=1)
    from_object = draw_detections(image, [_Detection(quad, 0.9)], thickness=1, show_scores=False)
    assert _near(from_array[30, 10], DETECTION_COLOUR)
    np.testing.assert_array_equal(from_array, from_object)


def test_sample_picture_puts_three_tiles_side_by_side() -> None:
    image = np.full((64, 48, 3), 128, np.uint8)
    shrink = np.zeros((64, 48), np.float32)
    shrink[30:40, 10:30] = 1
    mask = np.ones((64, 48), np.float32)
    mask[50:, :] = 0
    threshold = np.full((64, 48), 0.3, np.float32)

    picture = sample_picture(image, [], [], shrink, threshold, mask, threshold_range=(0.3, 0.7))

    assert picture.shape == (64, 144, 3) and picture.dtype == np.uint8
    shrink_tile = picture[:, 48:96]
    assert tuple(shrink_tile[35, 20]) == (255, 255, 255), "text is white"
    assert tuple(shrink_tile[45, 20]) == (0, 0, 0), "background is black"
    assert shrink_tile[55, 20, 0] > 2 * shrink_tile[55, 20, 2], "masked area is tinted red"


def test_training_panel_from_a_network_input() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    network_input = normalise(rgb, MEAN, STD)  # (3, H, W)
    maps = np.random.default_rng(1).random((64, 96)).astype(np.float32)

    panel = training_panel(network_input, maps > 0.5, maps, maps, maps, MEAN, STD)
    assert panel.shape == (64, 5 * 96, 3) and panel.dtype == np.uint8

    small = training_panel(rgb, maps, maps, max_height=32)
    assert small.shape == (32, 3 * 48, 3), "three tiles without thresh and binary, reduced"


def test_denormalise_inverts_normalise() -> None:
    rgb = np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(denormalise(normalise(rgb, MEAN, STD), MEAN, STD), rgb)


def test_write_image_round_trips_rgb(tmp_path: Path) -> None:
    image = np.zeros((4, 4, 3), np.uint8)
    image[..., 0] = 255  # red
    path = write_image(tmp_path / "deep" / "red.png", image)
    assert tuple(cv2.imread(str(path))[0, 0]) == (0, 0, 255), "stored as BGR on disk"
    with pytest.raises(DBNetError, match="cannot write"):
        write_image(tmp_path / "picture.unknown", image)
