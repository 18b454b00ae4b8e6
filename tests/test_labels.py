"""Shrink and threshold maps: known values, a reference implementation, bad polygons, cases."""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import pyclipper
import pytest
import shapely

from dbnet.data.labels import LabelMaps, clean_polygon, make_label_maps

# NumPy warnings (overflow, invalid value, division by zero) fail the tests: no hidden NaN.
pytestmark = pytest.mark.filterwarnings("error")

MAPS = ("shrink_map", "shrink_mask", "threshold_map", "threshold_mask")
REASONS = {"dont_care", "degenerate", "self_intersecting", "too_small", "empty_offset"}
# The border is exact up to float32 rounding and the 1/256 px coordinate snap: a 0.03
# tolerance (enough for an approximate distance) would hide a one-row shift when D is large.
TOLERANCE = 2e-3


def rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float32)


def rotated_rect(cx: float, cy: float, w: float, h: float, degrees: float) -> np.ndarray:
    box = cv2.boxPoints(((cx, cy), (w, h), degrees))  # (4, 2)
    return box.astype(np.float32)


def curved(cx: float, cy: float, radius: float, height: float, points: int) -> np.ndarray:
    """An arc-shaped text band of `points` vertices (upper edge left to right, then lower)."""
    angles = np.linspace(np.pi * 1.15, np.pi * 1.85, points // 2)
    outer = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], 1)
    inner_radius = radius - height
    inner = np.stack([cx + inner_radius * np.cos(angles), cy + inner_radius * np.sin(angles)], 1)
    return np.concatenate([outer, inner[::-1]]).astype(np.float32)


def strict_maps(*args, **kwargs) -> LabelMaps:
    """make_label_maps with every floating-point problem and every warning raised."""
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        return make_label_maps(*args, **kwargs)


def assert_sound(
    maps: LabelMaps, height: int, width: int, lo: float = 0.3, hi: float = 0.7
) -> None:
    for name in MAPS:
        value = getattr(maps, name)
        assert value.shape == (height, width), f"{name} shape {value.shape}"
        assert value.dtype == np.float32, f"{name} dtype {value.dtype}"
        assert np.isfinite(value).all(), f"{name} holds NaN or Inf"
    for name in ("shrink_map", "shrink_mask", "threshold_mask"):
        assert set(np.unique(getattr(maps, name))) <= {0.0, 1.0}, f"{name} not binary"
    assert maps.threshold_map.min() >= np.float32(lo) and maps.threshold_map.max() <= hi
    assert all(reason in REASONS for _, reason in maps.ignored), maps.ignored


def offset_distance(points: np.ndarray, ratio: float = 0.4) -> float:
    polygon = shapely.Polygon(points)
    return polygon.area * (1 - ratio**2) / polygon.length


# ---- a straightforward reference -------------------------------------------------------


def reference_maps(
    height: int, width: int, polygons: list[np.ndarray], lo: float = 0.3, hi: float = 0.7
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shrink region, threshold map, threshold region of valid polygons, pixel by pixel.

    Regions: pixel centres inside shapely's round buffer by -D / +D. Threshold map: exact
    distance to every edge segment in float64, the minimum, clipped, maximum over polygons.
    """
    ys, xs = np.mgrid[:height, :width].astype(np.float64)
    shrink = np.zeros((height, width), bool)
    dilated = np.zeros((height, width), bool)
    canvas = np.zeros((height, width))
    for points in polygons:
        points = points.astype(np.float64)
        distance = offset_distance(points)
        polygon = shapely.Polygon(points)
        shrink |= shapely.contains_xy(polygon.buffer(-distance), xs, ys)
        dilated |= shapely.contains_xy(polygon.buffer(distance), xs, ys)

        nearest = np.full((height, width), np.inf)
        for a, b in zip(points, np.roll(points, -1, axis=0), strict=True):
            edge = b - a
            t = ((xs - a[0]) * edge[0] + (ys - a[1]) * edge[1]) / (edge @ edge)
            t = np.clip(t, 0.0, 1.0)
            gap = np.hypot(xs - (a[0] + t * edge[0]), ys - (a[1] + t * edge[1]))
            nearest = np.minimum(nearest, gap)
        canvas = np.maximum(canvas, np.clip(1.0 - nearest / distance, 0.0, 1.0))
    return shrink, lo + (hi - lo) * canvas, dilated


def assert_region_matches(
    got: np.ndarray, expected: np.ndarray, polygons: list[np.ndarray], name: str, offset: float
) -> None:
    """Pixels may disagree only within one pixel of the reference region's outline."""
    ys, xs = np.nonzero(got.astype(bool) != expected)
    if len(xs) == 0:
        return
    outlines = shapely.union_all(
        [shapely.Polygon(p).buffer(offset * offset_distance(p)).boundary for p in polygons]
    )
    gaps = shapely.distance(outlines, shapely.points(np.stack([xs, ys], 1)))
    assert gaps.max() <= 1.0, f"{name}: a pixel {gaps.max():.2f} px from the outline differs"


SCENE = [
    rotated_rect(60, 40, 70, 22, 20),  # rotated word
    rotated_rect(70, 48, 40, 16, -35),  # overlaps the first
    curved(120, 150, 70, 20, 10),  # curved text, 10 points
    curved(40, 170, 50, 14, 14),  # curved text, 14 points
    rect(-20, 90, 30, 110),  # partly outside, left
    rect(140, -6, 190, 14),  # partly outside, top and right
    np.array([[100, 60], [150, 60], [150, 100], [125, 80], [100, 100]], np.float32),  # concave
]


def test_maps_match_reference_implementation() -> None:
    height, width = 120, 160
    maps = strict_maps(height, width, SCENE, [False] * len(SCENE))
    shrink, threshold, dilated = reference_maps(height, width, SCENE)

    assert maps.ignored == [] and maps.repaired == []
    assert_sound(maps, height, width)
    diff = np.abs(maps.threshold_map - threshold)
    assert diff.max() < TOLERANCE, f"threshold map differs by up to {diff.max():.4f}"
    assert_region_matches(maps.shrink_map, shrink, SCENE, "shrink map", -1.0)
    assert_region_matches(maps.threshold_mask, dilated, SCENE, "threshold mask", 1.0)
    assert (maps.shrink_mask == 1).all()


def test_random_quads_match_reference() -> None:
    rng = np.random.default_rng(7)
    height, width = 96, 128
    polygons = [
        rotated_rect(*rng.uniform(0, 128, 2), *rng.uniform(10, 60, 2), rng.uniform(-90, 90))
        for _ in range(12)
    ]
    maps = strict_maps(height, width, polygons, [False] * len(polygons))
    kept = [p for i, p in enumerate(polygons) if i not in dict(maps.ignored)]
    shrink, threshold, dilated = reference_maps(height, width, kept)

    assert len(kept) >= 10, maps.ignored
    diff = np.abs(maps.threshold_map - threshold)
    assert diff.max() < TOLERANCE, f"threshold map differs by up to {diff.max():.4f}"
    assert_region_matches(maps.shrink_map, shrink, kept, "shrink map", -1.0)
    assert_region_matches(maps.threshold_mask, dilated, kept, "threshold mask", 1.0)


def test_large_polygon_matches_reference() -> None:
    # The curved band's border is computed in several blocks of rows.
    big = [rotated_rect(160, 120, 300, 150, 15), curved(160, 330, 250, 60, 14)]
    maps = strict_maps(240, 320, big, [False, False])
    shrink, threshold, dilated = reference_maps(240, 320, big)

    assert maps.ignored == []
    assert np.abs(maps.threshold_map - threshold).max() < TOLERANCE
    assert_region_matches(maps.shrink_map, shrink, big, "shrink map", -1.0)
    assert_region_matches(maps.threshold_mask, dilated, big, "threshold mask", 1.0)


# ---- known values -----------------------------------------------------------------------


def test_rectangle_known_values() -> None:
    # 100 x 40: D = 100 * 40 * (1 - 0.4^2) / 280 = 12 px.
    maps = strict_maps(100, 160, [rect(20, 20, 120, 60)], [False])

    ys, xs = np.nonzero(maps.shrink_map)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (32, 108, 32, 48)  # 76 x 16
    assert maps.shrink_map[32:49, 32:109].all()
    ys, xs = np.nonzero(maps.threshold_mask)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (8, 132, 8, 72)

    row = maps.threshold_map[40]
    assert row[20] == pytest.approx(0.7) and row[120] == pytest.approx(0.7)  # on the edges
    assert row[14] == pytest.approx(0.5) and row[26] == pytest.approx(0.5)  # D/2 off the edge
    assert row[8] == pytest.approx(0.3) and row[32] == pytest.approx(0.3)  # D off the edge
    assert row[70] == pytest.approx(0.3) and row[0] == pytest.approx(0.3)  # far inside/outside
    assert maps.threshold_map[20, 70] == pytest.approx(0.7)  # top edge
    assert (maps.shrink_mask == 1).all() and maps.ignored == []


def test_custom_threshold_range_and_ratio() -> None:
    maps = strict_maps(
        100, 160, [rect(20, 20, 120, 60)], [False], shrink_ratio=0.6, thresh_min=0.1, thresh_max=0.9
    )
    distance = 100 * 40 * (1 - 0.36) / 280  # 9.14 px
    row = maps.threshold_map[40]
    assert row[20] == pytest.approx(0.9)
    assert row[15] == pytest.approx(0.9 - 0.8 * 5 / distance, abs=1e-5)
    assert row[0] == pytest.approx(0.1)
    ys, xs = np.nonzero(maps.shrink_map)
    assert xs.min() == 29 and xs.max() == 111  # the outline at 29.14 and 110.86 crosses them


# ---- invariances ------------------------------------------------------------------------


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shift", [0, 1, 3])
def test_vertex_order_and_start_do_not_change_maps(reverse: bool, shift: int) -> None:
    height, width = 120, 160
    polygons = SCENE[:4] + SCENE[6:]
    base = strict_maps(height, width, polygons, [False] * len(polygons))

    reordered = [np.roll(p[::-1] if reverse else p, shift, axis=0) for p in polygons]
    maps = strict_maps(height, width, reordered, [False] * len(polygons))
    for name in MAPS:
        assert np.array_equal(getattr(maps, name), getattr(base, name)), name


def test_polygon_order_does_not_change_maps() -> None:
    forward = strict_maps(120, 160, SCENE, [False] * len(SCENE))
    backward = strict_maps(120, 160, SCENE[::-1], [False] * len(SCENE))
    for name in MAPS:
        assert np.array_equal(getattr(forward, name), getattr(backward, name)), name


# ---- shapes -----------------------------------------------------------------------------


def test_offset_that_splits_fills_every_piece() -> None:
    # Two 40x40 squares joined by a 4 px bridge: the inward offset drops the bridge.
    dumbbell = np.array(
        [[10, 10], [50, 10], [50, 28], [90, 28], [90, 10], [130, 10],
         [130, 50], [90, 50], [90, 32], [50, 32], [50, 50], [10, 50]],
        np.float32,
    )  # fmt: skip
    maps = strict_maps(60, 140, [dumbbell], [False])

    count, labels = cv2.connectedComponents(maps.shrink_map.astype(np.uint8))
    assert count - 1 == 2, "both squares need a shrink target"
    assert maps.shrink_map[30, 30] == 1 and maps.shrink_map[30, 110] == 1
    assert maps.shrink_map[30, 70] == 0  # the bridge is thinner than 2 D
    assert maps.ignored == []


def test_polygon_partly_or_wholly_outside_the_image() -> None:
    partly = rect(-50, -20, 40, 30)
    beyond = rect(500, 500, 600, 540)
    maps = strict_maps(40, 60, [partly, beyond], [False, False])

    assert_sound(maps, 40, 60)
    assert maps.shrink_map[:10, :20].all()  # the visible part of the shrunk box
    assert maps.threshold_map[10, 40] == pytest.approx(0.7)  # right edge, in the image
    assert maps.ignored == []
    shrink, threshold, _ = reference_maps(40, 60, [partly])
    assert np.abs(maps.threshold_map - threshold).max() < TOLERANCE


@pytest.mark.parametrize("size", [1e5, 1e6])
def test_huge_polygon_covering_the_image(size: float) -> None:
    maps = strict_maps(32, 48, [rect(-size, -size, size, size)], [False])
    assert_sound(maps, 32, 48)
    assert maps.ignored == []
    assert (maps.shrink_map == 1).all() and (maps.threshold_mask == 1).all()
    assert (maps.threshold_map == np.float32(0.3)).all()  # far from every edge


def test_far_vertices_keep_their_precision() -> None:
    # Two vertices 1/256 px apart, 1e5 px away: one float32 value, yet a real edge.
    far = np.array([[-1e5, 10], [-1e5 + 1 / 256, 10], [40, 10], [40, 30], [-1e5, 30]])
    maps = strict_maps(40, 60, [far], [False])

    assert_sound(maps, 40, 60)
    _, threshold, _ = reference_maps(40, 60, [far])
    assert np.abs(maps.threshold_map - threshold).max() < TOLERANCE
    assert maps.threshold_map[10, 20] == pytest.approx(0.7)


@pytest.mark.parametrize("side", [0.02, 0.2, 1.0, 3.0])
def test_tiny_far_polygons_without_min_size(side: float) -> None:
    square = 9e5 + side * np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    maps = strict_maps(
        10, 10, [square, rect(1, 1, 1 + side, 1 + side)], [False] * 2, min_text_size=0
    )
    assert_sound(maps, 10, 10)
    assert {reason for _, reason in maps.ignored} <= {"too_small", "empty_offset"}
    if side >= 1:
        assert maps.ignored == [] and maps.shrink_map.any()


def test_empty_image_gives_zero_targets_and_full_masks() -> None:
    maps = strict_maps(20, 30, [], [])
    assert_sound(maps, 20, 30)
    assert not maps.shrink_map.any() and not maps.threshold_mask.any()
    assert (maps.shrink_mask == 1).all() and (maps.threshold_map == np.float32(0.3)).all()
    assert maps.ignored == [] and maps.repaired == []


# ---- ignored instances ------------------------------------------------------------------

TINY_SLIVER = np.array([[179.67, 330.71], [179.72, 331.93], [177.67, 331.21], [179.28, 331.52]])


@pytest.mark.parametrize(
    ("points", "reason"),
    [
        (np.zeros((0, 2)), "degenerate"),
        (np.array([[10.0, 10.0]]), "degenerate"),
        (np.array([[10.0, 10.0], [50.0, 10.0]]), "degenerate"),
        (np.full((4, 2), 50.0), "degenerate"),
        (np.array([[100, 30], [200, 30], [300, 30], [400, 30]], float), "degenerate"),
        (np.array([[10, 10], [60, 10], [10, 10], [60, 10]], float), "degenerate"),
        (np.array([[10, 10], [60, np.nan], [60, 40], [10, 40]]), "degenerate"),
        (np.array([[10, 10], [np.inf, 10], [60, 40], [10, 40]]), "degenerate"),
        (np.array([[10, 10], [1e30, 10], [60, 40], [10, 40]]), "degenerate"),
        (rect(10, 10, 60, 17.5), "too_small"),
        (rotated_rect(40, 30, 60, 6, 45), "too_small"),  # big bounding box, thin text
        (TINY_SLIVER - (150, 310), "too_small"),
        # A figure of eight (six points): no safe repair.
        (np.array([[10, 10], [40, 40], [70, 10], [70, 40], [40, 10], [10, 40]], float),
         "self_intersecting"),
        # Doubling back along its first edge: crossing, and the hull is a triangle.
        (np.array([[10, 10], [70, 10], [40, 10], [40, 40]], float), "self_intersecting"),
    ],
)  # fmt: skip
def test_bad_polygons_are_ignored_with_their_reason(points: np.ndarray, reason: str) -> None:
    good = rect(5, 45, 75, 58)
    maps = strict_maps(60, 80, [points, good], [False, False])

    assert maps.ignored == [(0, reason)]
    assert maps.repaired == []
    assert_sound(maps, 60, 80)
    alone = strict_maps(60, 80, [good], [False])
    for name in ("shrink_map", "threshold_map", "threshold_mask"):
        assert np.array_equal(getattr(maps, name), getattr(alone, name)), name


def test_ignored_instance_is_zeroed_in_the_mask_only() -> None:
    box = rect(10, 10, 60, 40)
    for ignore, reason in ((True, "dont_care"), (False, "too_small")):
        maps = strict_maps(50, 70, [box], [ignore], min_text_size=100 if not ignore else 8)
        assert maps.ignored == [(0, reason)]
        assert (maps.shrink_mask[10:41, 10:61] == 0).all(), "mask must be 0 over the polygon"
        assert maps.shrink_mask.sum() == 50 * 70 - 31 * 51
        assert not maps.shrink_map.any() and not maps.threshold_mask.any()
        assert (maps.threshold_map == np.float32(0.3)).all()


def test_dont_care_takes_precedence_and_nan_dont_care_is_harmless() -> None:
    nan_box = np.array([[10, 10], [np.nan, 10], [60, 40], [10, 40]])
    line = np.array([[10, 20], [60, 20], [30, 20], [40, 20]], float)
    maps = strict_maps(50, 70, [nan_box, line], [True, True])
    assert maps.ignored == [(0, "dont_care"), (1, "dont_care")]
    assert_sound(maps, 50, 70)
    assert (maps.shrink_mask[21:] == 1).all()  # the NaN box cannot be drawn


def test_empty_offset_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    # In exact arithmetic the inward offset D never empties a polygon (D < inradius);
    # rounding can, for sub-pixel slivers. Force the offset library to return nothing.
    class EmptyInwards(pyclipper.PyclipperOffset):
        def Execute(self, delta: float) -> list:
            return [] if delta < 0 else super().Execute(delta)

    monkeypatch.setattr(pyclipper, "PyclipperOffset", EmptyInwards)
    maps = strict_maps(50, 70, [rect(10, 10, 60, 40)], [False])

    assert maps.ignored == [(0, "empty_offset")]
    assert (maps.shrink_mask[10:41, 10:61] == 0).all()
    assert not maps.shrink_map.any() and not maps.threshold_mask.any()


def test_bowtie_quad_is_repaired_by_its_hull() -> None:
    bowtie = np.array([[100, 100], [300, 100], [100, 150], [300, 150]], np.float32)
    maps = strict_maps(200, 400, [bowtie], [False])
    intended = strict_maps(200, 400, [rect(100, 100, 300, 150)], [False])

    assert maps.repaired == [(0, "repaired")] and maps.ignored == []
    for name in MAPS:
        assert np.array_equal(getattr(maps, name), getattr(intended, name)), name


def test_clean_polygon_canonical_form() -> None:
    points = np.array([[60, 40], [60, 10], [10, 10], [10, 10], [10, 40], [60, 40]], float)
    polygon, reason = clean_polygon(points)
    assert reason is None
    assert polygon.tolist() == [[10, 10], [60, 10], [60, 40], [10, 40]]  # clockwise on screen


# ---- arguments --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"height": 0},
        {"width": -1},
        {"ignore": [False, False]},
        {"shrink_ratio": 1.0},
        {"shrink_ratio": 0.0},
        {"thresh_min": 0.8},
        {"polygons": [np.arange(8.0)]},
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict) -> None:
    arguments = {"height": 10, "width": 10, "polygons": [rect(1, 1, 9, 9)], "ignore": [False]}
    arguments.update(kwargs)
    with pytest.raises(ValueError):
        make_label_maps(**arguments)


# ---- the shared bad-input cases ---------------------------------------------------------


def read_case(folder: Path) -> list[tuple[str, int, int, list[np.ndarray], list[bool]]]:
    """(gt name, height, width, polygons, ignore flags) of every image of a case folder."""
    samples = []
    for gt in sorted(folder.glob("gt_*.txt")):
        image = next(folder.glob(f"{gt.stem[3:]}.*"))
        height, width = cv2.imread(str(image), cv2.IMREAD_UNCHANGED).shape[:2]
        polygons, ignore = [], []
        for line in gt.read_text(encoding="utf-8-sig").splitlines():
            if line.strip():
                fields = line.strip().split(",", 8)
                polygons.append(np.array(fields[:8], np.float32).reshape(4, 2))
                ignore.append(fields[8] == "###")
        samples.append((gt.name, height, width, polygons, ignore))
    return samples


def test_case_tiny_subpixel_polygon(cases_dir: Path) -> None:
    ((_, height, width, polygons, ignore),) = read_case(cases_dir / "01_tiny_subpixel_polygon")
    maps = strict_maps(height, width, polygons, ignore)

    assert_sound(maps, height, width)
    assert [index for index, _ in maps.ignored] == [1, 2]
    assert {reason for _, reason in maps.ignored} <= {"too_small", "empty_offset"}
    ys, xs = np.nonzero(maps.shrink_map)
    assert xs.min() > 200 and xs.max() < 520 and ys.min() > 200 and ys.max() < 260
    assert maps.shrink_map[230, 360] == 1
    assert maps.shrink_mask[701, 903] == 0 and maps.shrink_mask[331, 179] == 0


def test_case_bowtie_misordered_quad(cases_dir: Path) -> None:
    ((_, height, width, polygons, ignore),) = read_case(cases_dir / "03_bowtie_misordered_quad")
    maps = strict_maps(height, width, polygons, ignore)

    assert_sound(maps, height, width)
    assert maps.repaired == [(0, "repaired")] and maps.ignored == []
    assert maps.shrink_map[125, 200] == 1 and maps.shrink_map[225, 450] == 1
    fixed = strict_maps(height, width, [rect(100, 100, 300, 150), polygons[1]], [False, False])
    assert np.array_equal(maps.shrink_map, fixed.shrink_map)


def test_case_zero_area_polygons(cases_dir: Path) -> None:
    ((_, height, width, polygons, ignore),) = read_case(cases_dir / "04_zero_area_polygons")
    maps = strict_maps(height, width, polygons, ignore)

    assert_sound(maps, height, width)
    assert maps.ignored == [(0, "degenerate"), (1, "degenerate")]
    assert maps.shrink_map[125, 200] == 1
    assert maps.shrink_map[:, :95].sum() == 0 and maps.shrink_map[160:].sum() == 0


def test_case_all_dont_care(cases_dir: Path) -> None:
    ((_, height, width, polygons, ignore),) = read_case(cases_dir / "07_all_dont_care")
    maps = strict_maps(height, width, polygons, ignore)

    assert_sound(maps, height, width)
    assert maps.ignored == [(0, "dont_care"), (1, "dont_care"), (2, "dont_care")]
    assert not maps.shrink_map.any() and not maps.threshold_mask.any()
    for points in polygons:
        (x0, y0), (x1, y1) = points.min(axis=0).astype(int), points.max(axis=0).astype(int)
        assert (maps.shrink_mask[y0 : y1 + 1, x0 : x1 + 1] == 0).all()
    assert maps.shrink_mask[0, 0] == 1 and maps.shrink_mask[-1, -1] == 1


def test_case_negative_image_empty_gt(cases_dir: Path) -> None:
    samples = read_case(cases_dir / "08_negative_image_empty_gt")
    assert len(samples) == 2
    for name, height, width, polygons, ignore in samples:
        assert polygons == [], name
        maps = strict_maps(height, width, polygons, ignore)
        assert_sound(maps, height, width)
        assert not maps.shrink_map.any() and not maps.threshold_mask.any(), name
        assert (maps.shrink_mask == 1).all(), name


def test_case_tiny_image(cases_dir: Path) -> None:
    samples = {name: rest for name, *rest in read_case(cases_dir / "16_tiny_image")}

    height, width, polygons, ignore = samples["gt_img_16.txt"]
    assert (height, width) == (1, 1)
    maps = strict_maps(height, width, polygons, ignore)
    assert_sound(maps, 1, 1)
    assert maps.ignored == [(0, "too_small")] and maps.shrink_mask[0, 0] == 0

    height, width, polygons, ignore = samples["gt_img_161.txt"]
    maps = strict_maps(height, width, polygons, ignore)
    assert_sound(maps, height, width)
    assert maps.ignored == [] and maps.shrink_map[8, 12] == 1
    padded = strict_maps(640, 640, polygons, ignore)  # the training crop pads small images
    assert np.array_equal(padded.shrink_map[:height, :width], maps.shrink_map)
