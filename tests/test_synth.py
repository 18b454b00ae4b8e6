"""Synthetic data generator: layout, determinism, exact boxes, refusal to overwrite."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from shapely.geometry import Polygon
from typer.testing import CliRunner

from dbnet.cli import app
from dbnet.data import synth
from dbnet.data.synth import generate_dataset, render_image
from dbnet.errors import ConfigError, DBNetError

SET_SIZE = 40
SEED = 7
_LINE = re.compile(r"^(-?\d+,){8}[^,\n]+$")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A written set of SET_SIZE images at the default size."""
    root = tmp_path_factory.mktemp("synth") / "set"
    generate_dataset(root, SET_SIZE, SEED)
    return root


@pytest.fixture(scope="module")
def rendered() -> list[synth.SynthImage]:
    """The same SET_SIZE images in memory, with their ink maps."""
    return [render_image(SEED, index, keep_ink=True) for index in range(1, SET_SIZE + 1)]


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_writes_identical_bytes(tmp_path: Path) -> None:
    generate_dataset(tmp_path / "a", 5, seed=3)
    generate_dataset(tmp_path / "b", 5, seed=3)
    generate_dataset(tmp_path / "longer", 7, seed=3)
    generate_dataset(tmp_path / "other", 5, seed=4)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")

    assert len(a) == 10 and a == b, "the same seed must give byte-identical files"
    longer = _files(tmp_path / "longer")
    assert all(longer[name] == data for name, data in a.items()), "a larger count must extend"
    other = _files(tmp_path / "other")
    assert other["images/img_1.jpg"] != a["images/img_1.jpg"], "another seed, another image"


def test_layout_is_icdar2015(dataset: Path) -> None:
    images = sorted(p.name for p in (dataset / "images").iterdir())
    gts = sorted(p.name for p in (dataset / "gts").iterdir())
    numbers = range(1, SET_SIZE + 1)

    assert images == sorted(f"img_{i}.jpg" for i in numbers)
    assert gts == sorted(f"gt_img_{i}.txt" for i in numbers)
    assert sorted(p.name for p in dataset.iterdir()) == ["gts", "images"]
    assert not list(dataset.parent.glob(".*")), "the staging folder must be gone"

    image = cv2.imread(str(dataset / "images" / "img_1.jpg"))
    assert image is not None and image.shape == (480, 640, 3), "default size is 640x480"


def test_gt_lines_are_eight_integers_and_a_transcription(dataset: Path) -> None:
    dont_care = empty = care = 0
    for gt in sorted((dataset / "gts").iterdir()):
        lines = gt.read_text("utf-8").splitlines()
        empty += not lines
        for number, line in enumerate(lines, start=1):
            assert _LINE.match(line), f"{gt.name}:{number}: {line!r}"
            text = line.split(",", 8)[8]
            dont_care += text == "###"
            care += text != "###"

    assert care >= 5 * SET_SIZE, f"expected several legible words an image, got {care}"
    assert dont_care > 0, "some tiny or blurred words must be marked ###"
    assert empty > 0, "some images must have no text"
    assert dont_care < care / 2, f"### words should be a minority: {dont_care} of {care}"


def test_readers_accept_the_set(dataset: Path) -> None:
    io = pytest.importorskip("dbnet.data.io")
    pairs = io.find_pairs(dataset, strict=True)
    assert len(pairs) == SET_SIZE

    for image_path, gt_path in pairs:
        assert image_path.name == gt_path.name[3:-4] + ".jpg"
        instances = io.read_gt(gt_path, strict=True)
        lines = gt_path.read_text("utf-8").splitlines()
        assert len(instances) == len(lines), f"{gt_path.name}: every line is an instance"
        for instance, line in zip(instances, lines, strict=True):
            assert instance.points.shape == (4, 2)
            assert instance.ignore == line.endswith(",###")
    assert io.read_image(pairs[0][0]).shape == (480, 640, 3)


def test_files_match_the_rendered_images(dataset: Path, rendered: list) -> None:
    for index, sample in enumerate(rendered, start=1):
        text = (dataset / "gts" / f"gt_img_{index}.txt").read_text("utf-8")
        assert text == synth.format_gt(sample.words), f"gt_img_{index}.txt"


def _signed_area(points: np.ndarray) -> float:
    """Shoelace area; positive for clockwise order on screen (y down)."""
    x, y = points[:, 0].astype(float), points[:, 1].astype(float)
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def test_polygons_inside_clockwise_and_apart(rendered: list) -> None:
    for index, sample in enumerate(rendered, start=1):
        height, width = sample.image.shape[:2]
        polygons = []
        for word in sample.words:
            points = word.points
            assert points.shape == (4, 2) and points.dtype == np.int32
            assert (points >= 0).all() and (points[:, 0] <= width - 1).all(), f"image {index}"
            assert (points[:, 1] <= height - 1).all(), f"image {index}: {points.tolist()}"
            assert _signed_area(points) > 0, f"image {index}: not clockwise {points.tolist()}"
            # The first point starts the top edge, read left to right.
            assert points[1, 0] - points[0, 0] >= -2, f"image {index}: {points.tolist()}"
            polygons.append(Polygon(points))

        for i, a in enumerate(polygons):
            for b in polygons[i + 1 :]:
                assert not a.intersects(b), f"image {index}: words overlap"


def test_ink_lies_inside_tight_boxes(rendered: list) -> None:
    contrasts = []
    for index, sample in enumerate(rendered, start=1):
        height, width = sample.image.shape[:2]
        assert sample.ink is not None and sample.background is not None
        assert (sample.ink < len(sample.words)).all(), f"image {index}: ink of no word"
        image_luma = synth._luma(sample.image.astype(np.float32))
        background_luma = synth._luma(sample.background.astype(np.float32))

        for k, word in enumerate(sample.words):
            box = np.zeros((height, width), np.uint8)
            cv2.fillPoly(box, [word.points], 1)
            ink = sample.ink == k
            assert ink.any(), f"image {index}, word {k}: no ink"
            assert not (ink & (box == 0)).any(), f"image {index}, word {k}: ink outside its box"
            if word.ignore:
                continue

            # Tight: the box is not much larger than the smallest rectangle around the ink.
            ys, xs = np.nonzero(ink)
            _, (w, h), _ = cv2.minAreaRect(np.stack([xs, ys], 1).astype(np.float32))
            ratio = cv2.contourArea(word.points.astype(np.float32)) / ((w + 1) * (h + 1))
            assert ratio < 2.0, f"image {index}, word {word.text!r}: box {ratio:.2f}x the ink"
            contrasts.append(float(np.abs(image_luma - background_luma)[ink].mean()))

    # Legible words stand out from what is under them, nearly always.
    contrasts = np.array(contrasts)
    assert (contrasts >= 40).mean() >= 0.9, f"low contrast: {np.percentile(contrasts, 10):.1f}"


def test_words_vary_in_length_size_and_angle(rendered: list) -> None:
    care = [word for sample in rendered for word in sample.words if not word.ignore]
    lengths = np.array([len(word.text) for word in care])
    points = np.array([word.points for word in care], np.float64)  # (n, 4, 2)
    top = points[:, 1] - points[:, 0]
    angles = np.degrees(np.arctan2(-top[:, 1], top[:, 0]))  # counter-clockwise on screen
    heights = np.linalg.norm(points[:, 3] - points[:, 0], axis=1)

    assert lengths.min() <= 2 and lengths.max() >= 9, f"lengths {lengths.min()}..{lengths.max()}"
    assert heights.min() < 14 and heights.max() > 45, f"heights {heights.min()}..{heights.max()}"
    assert (np.abs(angles) < 5).mean() > 0.3, "most words should be nearly level"
    assert ((np.abs(angles) > 10) & (np.abs(angles) <= 30)).any()
    assert (np.abs(angles) > 35).any(), "some words should be steeply rotated"
    assert any(c.isdigit() for word in care for c in word.text)


def test_refuses_a_folder_that_is_not_empty(tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    with pytest.raises(DBNetError, match="not empty"):
        generate_dataset(out, 2, seed=0)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"], "nothing may be changed"
    assert (out / "keep.txt").read_text() == "mine"

    (tmp_path / "file").write_text("x")
    with pytest.raises(DBNetError, match="not a folder"):
        generate_dataset(tmp_path / "file", 2, seed=0)


def test_writes_into_an_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    summary = generate_dataset(tmp_path / "empty", 6, seed=0, size=(160, 120))
    assert summary.images == 6 and summary.out_dir == tmp_path / "empty"
    assert len(list((tmp_path / "empty" / "images").iterdir())) == 6

    lines = [g.read_text().splitlines() for g in (tmp_path / "empty" / "gts").iterdir()]
    assert summary.words == sum(map(len, lines)) > 0
    assert summary.dont_care == sum(line.endswith(",###") for ls in lines for line in ls)
    assert summary.empty_images == sum(not ls for ls in lines)


def test_interrupted_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = synth.render_image

    def failing(seed: int, index: int, *args, **kwargs):
        if index == 3:
            raise KeyboardInterrupt
        return real(seed, index, *args, **kwargs)

    monkeypatch.setattr(synth, "render_image", failing)
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(tmp_path / "out", 5, seed=0)
    assert list(tmp_path.iterdir()) == [], "no partial dataset or staging folder may remain"


@pytest.mark.parametrize(
    ("count", "seed", "size", "message"),
    [(0, 0, (640, 480), "count"), (1, -1, (640, 480), "seed"), (1, 0, (640, 32), "size")],
)
def test_rejects_bad_arguments(tmp_path: Path, count, seed, size, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        generate_dataset(tmp_path / "out", count, seed, size)
    assert not (tmp_path / "out").exists()


def test_cli_writes_a_set(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    args = ["synth", "--out", str(out), "--count", "3", "--seed", "2", "--size", "320x240"]
    result = CliRunner().invoke(app, args)

    assert result.exit_code == 0, result.output
    assert "wrote 3 images" in result.output
    image = cv2.imread(str(out / "images" / "img_3.jpg"))
    assert image is not None and image.shape == (240, 320, 3)
    assert (out / "gts" / "gt_img_3.txt").is_file()


def test_cli_refuses_a_used_folder_and_a_bad_size(tmp_path: Path) -> None:
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x.txt").write_text("x")
    used = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "used"), "--count", "2"])
    assert used.exit_code == 1 and "not empty" in used.output
    assert "Traceback" not in used.output

    bad = ["synth", "--out", str(tmp_path / "new"), "--count", "2", "--size", "640by480"]
    result = CliRunner().invoke(app, bad)
    assert result.exit_code == 2 and "WIDTHxHEIGHT" in result.output
    assert not (tmp_path / "new").exists()
