"""Inference: the Predictor with both backends, ONNX agreement and the `predict` command."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely
from tiny_models import fitted_model, scene
from typer.testing import CliRunner

from dbnet.cli import app
from dbnet.config import config_to_dict
from dbnet.engine.checkpoint import save_checkpoint
from dbnet.engine.predict import PREDICTIONS_FILE, Predictor, TorchBackend, find_images
from dbnet.errors import DBNetError
from dbnet.export import export_onnx
from dbnet.metrics import read_result_file
from dbnet.postprocess import Detection

runner = CliRunner()

# (height, width) of the test images: multiples of 32 or not, wide, tall and square.
IMAGE_SIZES = [(120, 180), (75, 210), (230, 90), (64, 64)]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A structured model saved as a checkpoint and exported to ONNX."""
    model, config = fitted_model(eval_size=128)

    folder = tmp_path_factory.mktemp("model")
    checkpoint = folder / "model.pt"
    save_checkpoint(checkpoint, {"model": model.state_dict(), "config": config_to_dict(config)})
    onnx_file = export_onnx(model, config, folder / "model.onnx").path
    return checkpoint, onnx_file


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of scenes of several sizes, PNG and JPEG."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    for i, (height, width) in enumerate(IMAGE_SIZES):
        image, _ = scene(rng, height, width)
        suffix = ".jpg" if i == 1 else ".png"
        cv2.imwrite(str(folder / f"img_{i}{suffix}"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return folder


@pytest.fixture(scope="module")
def predictors(model_files: tuple[Path, Path]) -> tuple[Predictor, Predictor]:
    checkpoint, onnx_file = model_files
    return (
        Predictor.from_checkpoint(checkpoint, device="cpu"),
        Predictor.from_onnx(onnx_file, device="cpu", threads=1),
    )


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    pa, pb = shapely.Polygon(a), shapely.Polygon(b)
    return float(pa.intersection(pb).area / max(pa.union(pb).area, 1e-9))


def _from_json(entry: dict) -> list[Detection]:
    pairs = zip(entry["polygons"], entry["scores"], strict=True)
    return [Detection(np.array(points, np.float32), score) for points, score in pairs]


def _assert_same_detections(ours: list[Detection], theirs: list[Detection], where: str) -> None:
    assert len(ours) == len(theirs), f"{where}: {len(ours)} vs {len(theirs)} detections"
    for a, b in zip(ours, theirs, strict=True):
        assert a.points.shape == b.points.shape, where
        assert _iou(a.points, b.points) > 0.99, f"{where}: IoU {_iou(a.points, b.points)}"
        assert np.abs(a.points - b.points).max() <= 0.5, f"{where}: {a.points} vs {b.points}"
        assert abs(a.score - b.score) < 1e-3, f"{where}: scores {a.score} vs {b.score}"


# ---- the predictor -----------------------------------------------------------------------


def test_preprocess_resizes_to_multiples_of_32(predictors: tuple[Predictor, Predictor]) -> None:
    predictor = predictors[0]
    for height, width in [(1, 1), (75, 210), (230, 90)]:
        batch = predictor.preprocess(np.zeros((height, width, 3), np.uint8))
        assert batch.dtype == np.float32 and batch.shape[:2] == (1, 3), batch.shape
        assert batch.shape[2] % 32 == 0 and batch.shape[3] % 32 == 0, batch.shape
        assert min(batch.shape[2:]) == 128 or (height, width) == (1, 1), batch.shape


def test_structured_model_finds_the_dark_rectangles(
    predictors: tuple[Predictor, Predictor],
) -> None:
    image, mask = scene(np.random.default_rng(5), 160, 240)
    detections = predictors[0].predict(image)
    assert len(detections) >= 2, "the fitted model should detect several bars"

    covered = np.zeros(mask.shape, np.uint8)
    for detection in detections:
        inside = cv2.fillPoly(
            np.zeros_like(covered), [detection.points.round().astype(np.int32)], 1
        )
        assert mask[inside > 0].mean() > 0.2, f"a detection off the dark bars: {detection.points}"
        covered |= inside
    assert mask[covered > 0].sum() > 0.5 * mask.sum(), "most of the bars should be detected"


def test_onnx_probability_maps_agree(predictors: tuple[Predictor, Predictor], images: Path) -> None:
    torch_predictor, onnx_predictor = predictors
    for path in find_images([images]):
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        expected = torch_predictor.probability(image)
        got = onnx_predictor.probability(image)
        assert got.shape == expected.shape, path.name
        assert np.abs(got - expected).max() < 1e-4, f"{path.name}: {np.abs(got - expected).max()}"
        assert expected.min() < 0.05 and expected.max() > 0.95, "the map should be structured"


def test_onnx_detections_agree(predictors: tuple[Predictor, Predictor], images: Path) -> None:
    torch_predictor, onnx_predictor = predictors
    total = 0
    for path in find_images([images]):
        _, expected = torch_predictor.predict_file(path)
        _, got = onnx_predictor.predict_file(path)
        assert (got.height, got.width) == (expected.height, expected.width), path.name
        _assert_same_detections(expected.detections, got.detections, path.name)
        total += len(expected.detections)
    assert total >= 4, f"only {total} detections over {len(IMAGE_SIZES)} images"


def test_overrides_reach_the_postprocessing(model_files: tuple[Path, Path]) -> None:
    checkpoint, onnx_file = model_files
    image, _ = scene(np.random.default_rng(5), 160, 240)
    for predictor in (
        Predictor.from_checkpoint(checkpoint, "cpu", ["postprocess.box_thresh=1.0"]),
        Predictor.from_onnx(onnx_file, "cpu", ["postprocess.box_thresh=1.0"], threads=1),
    ):
        assert predictor.config.postprocess.box_thresh == 1.0
        assert predictor.predict(image) == [], "no mean probability reaches 1.0"


def test_torch_backend_batches(model_files: tuple[Path, Path]) -> None:
    predictor = Predictor.from_checkpoint(model_files[0], "cpu")
    assert isinstance(predictor.backend, TorchBackend)
    prob = predictor.backend(np.zeros((2, 3, 64, 96), np.float32))
    assert prob.shape == (2, 1, 64, 96) and prob.dtype == np.float32, prob.shape


def test_tiny_images_give_no_box_or_boxes_inside(
    predictors: tuple[Predictor, Predictor], cases_dir: Path
) -> None:
    files = find_images([cases_dir / "16_tiny_image"])
    assert len(files) == 2, files
    for predictor in predictors:
        for path in files:
            _, prediction = predictor.predict_file(path)
            for detection in prediction.detections:
                points = detection.points
                assert np.isfinite(points).all(), path.name
                assert (points >= 0).all(), f"{path.name}: {points}"
                assert (points[:, 0] <= prediction.width - 1).all(), f"{path.name}: {points}"
                assert (points[:, 1] <= prediction.height - 1).all(), f"{path.name}: {points}"


# ---- files and the command ---------------------------------------------------------------


def _run_predict(model_args: list[str], inputs: list[Path], out: Path, *extra: str):
    args = ["predict", *model_args, *map(str, inputs), "--out", str(out), "--device", "cpu"]
    return runner.invoke(app, [*args, *extra])


def test_predict_command_writes_pictures_results_and_json(
    model_files: tuple[Path, Path], images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = _run_predict(["--checkpoint", str(model_files[0])], [images], out, "--scores")
    assert result.exit_code == 0, result.output

    document = json.loads((out / PREDICTIONS_FILE).read_text())
    entries = {Path(entry["file"]).stem: entry for entry in document["images"]}
    assert sorted(entries) == [f"img_{i}" for i in range(len(IMAGE_SIZES))]
    assert document["failed"] == []
    for i, (height, width) in enumerate(IMAGE_SIZES):
        entry = entries[f"img_{i}"]
        assert (entry["height"], entry["width"]) == (height, width)
        assert len(entry["polygons"]) == len(entry["scores"])

        picture = cv2.imread(str(out / f"img_{i}.jpg"))
        assert picture is not None and picture.shape[:2] == (height, width)

        result_file = out / f"res_img_{i}.txt"
        polygons = read_result_file(result_file)
        assert len(polygons) == len(entry["polygons"]), result_file.read_text()
        for line in result_file.read_text().splitlines():
            assert len(line.split(",")) == 9, f"8 integers and a score: {line!r}"
        for polygon, listed in zip(polygons, entry["polygons"], strict=True):
            assert np.abs(polygon - np.array(listed)).max() <= 0.5
    assert sum(len(e["polygons"]) for e in entries.values()) >= 4


def test_predict_onnx_equals_predict_checkpoint(
    model_files: tuple[Path, Path], images: Path, tmp_path: Path
) -> None:
    checkpoint, onnx_file = model_files
    outputs = []
    for name, args in (
        ("torch", ["--checkpoint", str(checkpoint)]),
        ("onnx", ["--onnx", str(onnx_file)]),
    ):
        result = _run_predict(args, [images], tmp_path / name, "--no-draw")
        assert result.exit_code == 0, result.output
        assert not list((tmp_path / name).glob("*.jpg")), "--no-draw writes no picture"
        outputs.append(json.loads((tmp_path / name / PREDICTIONS_FILE).read_text()))

    expected, got = (document["images"] for document in outputs)
    assert [e["file"] for e in expected] == [g["file"] for g in got]
    for e, g in zip(expected, got, strict=True):
        _assert_same_detections(_from_json(e), _from_json(g), e["file"])


def test_predict_skips_unreadable_images_and_exits_1(
    model_files: tuple[Path, Path], images: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "out"
    result = _run_predict(
        ["--checkpoint", str(model_files[0])], [broken, images / "img_0.png"], out
    )

    assert result.exit_code == 1, result.output
    assert "broken.jpg" in result.output
    document = json.loads((out / PREDICTIONS_FILE).read_text())
    assert [Path(e["file"]).name for e in document["images"]] == ["img_0.png"]
    assert [Path(f["file"]).name for f in document["failed"]] == ["broken.jpg"]
    assert (out / "res_img_0.txt").is_file() and not (out / "res_broken.txt").exists()


def test_predict_refuses_outputs_that_collide(
    model_files: tuple[Path, Path], images: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "img_0.jpg").write_bytes((images / "img_1.jpg").read_bytes())
    result = _run_predict(["--checkpoint", str(model_files[0])], [images, other], tmp_path / "out")
    assert result.exit_code == 1 and "img_0" in result.output, result.output

    # Predicting into the folder of the inputs would overwrite img_1.jpg with its picture.
    result = _run_predict(["--checkpoint", str(model_files[0])], [images], images)
    assert result.exit_code == 1 and "input image" in result.output, result.output


def test_predict_needs_exactly_one_model(model_files: tuple[Path, Path], images: Path) -> None:
    checkpoint, onnx_file = model_files
    both = ["--checkpoint", str(checkpoint), "--onnx", str(onnx_file)]
    assert _run_predict(both, [images], images / "out").exit_code == 2
    assert _run_predict([], [images], images / "out").exit_code == 2


def test_find_images_expands_folders(images: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "a.PNG").write_bytes(b"")
    assert [p.name for p in find_images([images])] == [
        "img_0.png",
        "img_1.jpg",
        "img_2.png",
        "img_3.png",
    ]
    assert [p.name for p in find_images([tmp_path])] == ["a.PNG"]
    with pytest.raises(FileNotFoundError):
        find_images([tmp_path / "missing.png"])
    (tmp_path / "a.PNG").unlink()
    with pytest.raises(DBNetError, match="no image files"):
        find_images([tmp_path])
