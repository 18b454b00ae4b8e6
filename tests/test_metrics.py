"""The ICDAR 2015 metric on hand-built cases with known values, and result files."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import shapely

from dbnet.errors import AnnotationError, DBNetError
from dbnet.metrics import DetectionMetric, evaluate_folders, read_result_file, write_result_file

# NumPy warnings (overflow, invalid value, division by zero) fail the tests: no hidden NaN.
pytestmark = pytest.mark.filterwarnings("error")


def box(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Axis-aligned quadrilateral, clockwise from the top-left (y down)."""
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def score(gts, ignore, dets) -> tuple[dict, dict]:
    metric = DetectionMetric()
    image = metric.update(gts, ignore, dets)
    return image, metric.compute()


def test_perfect_detections() -> None:
    gts = [box(0, 0, 100, 20), box(0, 50, 80, 70)]

    image, total = score(gts, [False, False], list(gts))

    assert image["pairs"] == [(0, 0), (1, 1)]
    assert total["precision"] == total["recall"] == total["hmean"] == 1.0
    assert (total["matched"], total["gt_care"], total["det_care"]) == (2, 2, 2)


def test_no_detections() -> None:
    image, total = score([box(0, 0, 100, 20)], [False], [])

    assert (image["precision"], image["recall"], image["hmean"]) == (0.0, 0.0, 0.0)
    assert (total["precision"], total["recall"], total["hmean"]) == (0.0, 0.0, 0.0)
    assert (total["gt_care"], total["det_care"]) == (1, 0)


def test_detection_inside_a_dont_care_region_is_discarded() -> None:
    gts = [box(0, 0, 100, 20), box(200, 0, 300, 40)]
    dets = [box(0, 0, 100, 20), box(210, 5, 290, 35)]  # the second lies inside the ### region

    image, total = score(gts, [False, True], dets)

    assert image["det_dont_care"] == [1]
    assert (total["matched"], total["gt_care"], total["det_care"]) == (1, 1, 1)
    assert total["hmean"] == 1.0


def test_detection_half_inside_a_dont_care_region_is_kept() -> None:
    # Exactly half of its area inside: the rule is "more than half", so it is a false positive.
    image, total = score([box(0, 0, 100, 20)], [True], [box(50, 0, 150, 20)])

    assert image["det_dont_care"] == []
    assert (total["det_care"], total["matched"], total["precision"]) == (1, 0, 0.0)


def test_detection_over_a_dont_care_region_of_its_own_is_ignored() -> None:
    # All gt is ###: no care gt, and the detection over it is don't-care too.
    image, total = score([box(0, 0, 100, 20)], [True], [box(0, 0, 100, 20)])

    assert (image["gt_care"], image["det_care"]) == (0, 0)
    assert (image["precision"], image["recall"]) == (1.0, 1.0)  # the script's per-image rule
    assert (total["precision"], total["recall"], total["hmean"]) == (0.0, 0.0, 0.0)


def test_duplicate_detection_is_a_false_positive() -> None:
    gt = box(0, 0, 100, 20)

    image, total = score([gt], [False], [gt, gt + 1])

    assert image["pairs"] == [(0, 0)]
    assert (total["precision"], total["recall"]) == (0.5, 1.0)
    assert total["hmean"] == pytest.approx(2 / 3)


def test_detection_split_over_two_halves_matches_nothing() -> None:
    gts = [box(0, 0, 100, 20)]
    dets = [box(0, 0, 48, 20), box(52, 0, 100, 20)]  # IoU 0.48 each

    _, total = score(gts, [False], dets)

    assert (total["matched"], total["det_care"], total["hmean"]) == (0, 2, 0.0)


def test_iou_of_exactly_the_threshold_does_not_match() -> None:
    _, total = score([box(0, 0, 100, 20)], [False], [box(0, 0, 100, 10)])  # IoU 0.5

    assert total["matched"] == 0


def test_greedy_matching_follows_the_script_order() -> None:
    # det 0 fits both gts, det 1 only gt 0. An optimal assignment makes two matches; the
    # protocol goes gt by gt, det by det, so gt 0 takes det 0 and gt 1 is left unmatched.
    gts = [box(0, 0, 100, 20), box(0, 2, 100, 22)]
    dets = [box(0, 1, 100, 21), box(0, -6, 100, 14)]

    image, _ = score(gts, [False, False], dets)

    assert image["pairs"] == [(0, 0)]


@pytest.mark.parametrize("side", ["gt", "det", "both"])
def test_vertex_order_does_not_matter(side: str) -> None:
    gts = [box(0, 0, 100, 20), box(0, 50, 80, 70)]
    dets = [box(3, 1, 100, 22), box(0, 40, 80, 70)]
    _, expected = score(gts, [False, False], dets)

    def shuffle(polys: list[np.ndarray]) -> list[np.ndarray]:
        return [np.roll(polys[0][::-1], 1, axis=0), np.roll(polys[1], 2, axis=0)]

    if side in ("gt", "both"):
        gts = shuffle(gts)
    if side in ("det", "both"):
        dets = shuffle(dets)
    _, total = score(gts, [False, False], dets)

    assert total == expected


@pytest.mark.parametrize(
    "det",
    [
        np.array([[10.0, 10.0]] * 4),  # one point four times
        np.array([[0.0, 0.0], [50.0, 10.0], [100.0, 20.0], [25.0, 5.0]]),  # collinear
        np.array([[0.0, 0.0], [100.0, 20.0]]),  # two points
        np.zeros((0, 2)),  # no point
        np.array([0.0, 1.0, 2.0, 3.0, 4.0]),  # an odd count of numbers
        np.array([[0.0, 0.0], [np.nan, 0.0], [100.0, 20.0], [0.0, 20.0]]),
        np.array([[0.0, 0.0], [np.inf, 0.0], [100.0, 20.0], [0.0, 20.0]]),
    ],
    ids=["point", "collinear", "two-points", "empty", "odd", "nan", "inf"],
)
def test_degenerate_detection_is_a_false_positive(det: np.ndarray) -> None:
    gts = [box(0, 0, 100, 20)]

    _, total = score(gts, [False], [det, box(0, 0, 100, 20)])

    assert (total["matched"], total["det_care"]) == (1, 2)
    assert total["precision"] == 0.5


def test_self_crossing_detection_is_repaired() -> None:
    # A bow-tie over the gt (corners in the wrong order) covers two triangles, half the box.
    bowtie = np.array([[0, 0], [100, 0], [0, 20], [100, 20]], dtype=np.float64)
    near = np.array([[0, 0], [100, 0], [100, 20], [0, 19], [0, 21]], dtype=np.float64)

    _, total = score([box(0, 0, 100, 20)], [False], [bowtie])
    _, spike = score([box(0, 0, 100, 20)], [False], [near])

    assert (total["matched"], total["det_care"]) == (0, 1)  # IoU exactly 0.5
    assert spike["matched"] == 1


def test_degenerate_gt_is_a_miss() -> None:
    gts = [np.array([[5.0, 5.0]] * 4), box(0, 0, 100, 20)]

    _, total = score(gts, [False, False], [box(0, 0, 100, 20)])

    assert (total["matched"], total["gt_care"], total["recall"]) == (1, 2, 0.5)


def test_image_without_gt() -> None:
    metric = DetectionMetric()

    empty = metric.update([], [], [])
    spurious = metric.update([], [], [box(0, 0, 10, 10)])
    total = metric.compute()

    assert (empty["precision"], empty["recall"]) == (1.0, 1.0)
    assert (spurious["precision"], spurious["recall"]) == (0.0, 1.0)
    assert (total["gt_care"], total["det_care"], total["precision"]) == (0, 1, 0.0)


def test_totals_are_summed_over_the_set_not_averaged() -> None:
    metric = DetectionMetric()
    first = metric.update([box(0, 0, 100, 20)], [False], [box(0, 0, 100, 20)])
    many = [box(0, 30 * i, 100, 30 * i + 20) for i in range(4)]
    second = metric.update(many, [False] * 4, [many[0]])

    total = metric.compute()

    assert (first["recall"], second["recall"]) == (1.0, 0.25)  # per-image mean: 0.625
    assert total["recall"] == pytest.approx(2 / 5)
    assert total["precision"] == 1.0 and total["images"] == 2


def test_thresholds_are_configurable() -> None:
    metric = DetectionMetric(iou_threshold=0.3, dont_care_threshold=0.9)

    image = metric.update(
        [box(0, 0, 100, 20), box(200, 0, 300, 20)],
        [False, True],
        [box(0, 0, 60, 20), box(200, 0, 320, 20)],
    )

    assert image["pairs"] == [(0, 0)]  # IoU 0.6
    assert image["det_dont_care"] == []  # 100 / 120 inside, under 0.9


def naive_icdar(gts, ignore, dets, iou_thr=0.5, dc_thr=0.5) -> tuple[int, int, int]:
    """The protocol's loops written out directly: (matched, gt care, det care)."""
    gp = [shapely.Polygon(g) for g in gts]
    dp = [shapely.Polygon(d) for d in dets]
    dont_care_det = set()
    for j, d in enumerate(dp):
        for i, g in enumerate(gp):
            if ignore[i] and d.area > 0 and d.intersection(g).area / d.area > dc_thr:
                dont_care_det.add(j)
                break
    gt_used, det_used, matched = set(), set(), 0
    for i, g in enumerate(gp):
        for j, d in enumerate(dp):
            if i in gt_used or j in det_used or ignore[i] or j in dont_care_det:
                continue
            inter = g.intersection(d).area
            union = g.area + d.area - inter
            if union > 0 and inter / union > iou_thr:
                gt_used.add(i)
                det_used.add(j)
                matched += 1
    return matched, len(gp) - sum(ignore), len(dp) - len(dont_care_det)


def test_agrees_with_the_protocol_written_as_loops() -> None:
    rng = np.random.default_rng(0)
    metric = DetectionMetric()
    expected = np.zeros(3, dtype=int)
    for _ in range(60):
        n_gt, n_det = rng.integers(0, 6, size=2)
        gts = [_random_quad(rng) for _ in range(n_gt)]
        ignore = [bool(v) for v in rng.random(n_gt) < 0.3]
        dets = [g + rng.normal(0, 4, g.shape) for g in gts if rng.random() < 0.7]
        dets += [_random_quad(rng) for _ in range(n_det)]
        dets = [np.round(d) for d in dets if shapely.Polygon(np.round(d)).is_valid]
        image = metric.update(gts, ignore, dets)
        naive = naive_icdar(gts, ignore, dets)
        assert (image["matched"], image["gt_care"], image["det_care"]) == naive
        expected += naive
    total = metric.compute()
    assert (total["matched"], total["gt_care"], total["det_care"]) == tuple(expected)
    assert total["matched"] > 20, "the random cases must exercise matching"


def _random_quad(rng: np.random.Generator) -> np.ndarray:
    cx, cy = rng.uniform(20, 180, size=2)
    w, h = rng.uniform(10, 60), rng.uniform(5, 20)
    angle = rng.uniform(0, np.pi)
    corners = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return np.round(corners @ rotation.T + [cx, cy])


# ---- result files -------------------------------------------------------------------------


def test_read_result_file_formats(tmp_path: Path) -> None:
    path = tmp_path / "res_img_1.txt"
    lines = [
        "1,2,3,4,5,6,7,8",
        " 1 , 2 , 3 , 4 , 5 , 6 , 7 , 8 , 0.93 ",
        "",
        "0,0,10,0,20,5,10,10,0,10",  # a 5-point polygon
        "0.5,1.5,10.25,1,10,9,0,9,0.5",
    ]
    path.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8"))

    polygons = read_result_file(path)

    assert [p.shape for p in polygons] == [(4, 2), (4, 2), (5, 2), (4, 2)]
    np.testing.assert_array_equal(polygons[1], [[1, 2], [3, 4], [5, 6], [7, 8]])
    assert polygons[3][0, 1] == 1.5


@pytest.mark.parametrize(
    ("content", "line"),
    [("1,2,3,4,5,6,7,8\n1,2,3,4\n", 2), ("1,2,3,4,5,6,7,8,###\n", 1), ("a,b,c,d,e,f\n", 1)],
)
def test_read_result_file_refuses_malformed_lines_when_strict(
    tmp_path: Path, content: str, line: int
) -> None:
    path = tmp_path / "res_img_1.txt"
    path.write_text(content, encoding="utf-8")

    with pytest.raises(AnnotationError) as info:
        read_result_file(path, strict=True)

    assert info.value.line == line and info.value.file == str(path)


def test_write_then_read_result_file(tmp_path: Path) -> None:
    path = tmp_path / "res_img_1.txt"
    polygons = [box(0.4, 1.6, 100.2, 20.5), np.array([[0, 0], [10, 0], [12, 5], [10, 10], [0, 10]])]

    write_result_file(path, polygons, scores=[0.9, 0.75])

    assert path.read_text(encoding="utf-8").splitlines()[0] == "0,2,100,2,100,20,0,20,0.9000"
    back = read_result_file(path)
    np.testing.assert_array_equal(back[1], polygons[1])


def _write_set(gt_dir: Path, res_dir: Path | None) -> None:
    gt_dir.mkdir()
    (gt_dir / "gt_img_1.txt").write_text(
        "0,0,100,0,100,20,0,20,hello\n200,0,300,0,300,40,200,40,###\n", encoding="utf-8"
    )
    (gt_dir / "gt_img_2.txt").write_text("0,0,50,0,50,50,0,50,world\n", encoding="utf-8")
    if res_dir is not None:
        res_dir.mkdir()
        (res_dir / "res_img_1.txt").write_text(
            "0,0,100,0,100,20,0,20\n210,5,290,5,290,35,210,35\n400,0,450,0,450,20,400,20\n",
            encoding="utf-8",
        )


def test_evaluate_folders(tmp_path: Path) -> None:
    _write_set(tmp_path / "gts", tmp_path / "res")
    (tmp_path / "res" / "notes.md").write_text("ignored", encoding="utf-8")

    result = evaluate_folders(tmp_path / "gts", tmp_path / "res")

    # img_1: one match, one det over ###, one false positive; img_2: no result file.
    assert (result["matched"], result["gt_care"], result["det_care"]) == (1, 2, 2)
    assert (result["precision"], result["recall"]) == (0.5, 0.5)
    assert (result["images"], result["missing_results"]) == (2, 1)
    assert evaluate_folders(tmp_path, tmp_path / "res") == result, "a dataset root with gts/"


def test_evaluate_folders_refuses_results_without_gt(tmp_path: Path) -> None:
    _write_set(tmp_path / "gts", tmp_path / "res")
    (tmp_path / "res" / "res_img_9.txt").write_text("0,0,1,0,1,1,0,1\n", encoding="utf-8")

    with pytest.raises(DBNetError, match="res_img_9.txt"):
        evaluate_folders(tmp_path / "gts", tmp_path / "res")


def test_evaluate_folders_refuses_empty_folders(tmp_path: Path) -> None:
    _write_set(tmp_path / "gts", None)
    (tmp_path / "res").mkdir()

    with pytest.raises(DBNetError, match="no res_"):
        evaluate_folders(tmp_path / "gts", tmp_path / "res")
    with pytest.raises(DBNetError, match="no gt_"):
        evaluate_folders(tmp_path / "res", tmp_path / "gts")
    with pytest.raises(DBNetError, match="no such"):
        evaluate_folders(tmp_path / "absent", tmp_path / "res")


def test_evaluate_zip_archives(tmp_path: Path) -> None:
    _write_set(tmp_path / "gts", tmp_path / "res")
    for name in ("gts", "res"):
        with zipfile.ZipFile(tmp_path / f"{name}.zip", "w") as archive:
            for path in (tmp_path / name).iterdir():
                archive.write(path, path.name)

    from_zip = evaluate_folders(tmp_path / "gts.zip", tmp_path / "res.zip")

    assert from_zip == evaluate_folders(tmp_path / "gts", tmp_path / "res")


@pytest.mark.parametrize("member", ["../res_img_1.txt", "sub/res_img_1.txt", "/res_img_1.txt"])
def test_zip_members_with_a_folder_part_are_refused(tmp_path: Path, member: str) -> None:
    _write_set(tmp_path / "gts", None)
    with zipfile.ZipFile(tmp_path / "res.zip", "w") as archive:
        archive.writestr(member, "0,0,100,0,100,20,0,20\n")

    with pytest.raises(DBNetError, match="folder part"):
        evaluate_folders(tmp_path / "gts", tmp_path / "res.zip")
    assert not (tmp_path / "res_img_1.txt").exists()
