"""Model-mode evaluation: `evaluate_checkpoint`, `dbnet eval --checkpoint` and the shared loop."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
import yaml
from tiny_models import fitted_model, scene
from typer.testing import CliRunner

from dbnet.cli import app
from dbnet.config import config_to_dict
from dbnet.data.dataset import DetectionDataset
from dbnet.engine.checkpoint import save_checkpoint
from dbnet.engine.evaluate import (
    DEFAULT_SWEEP,
    SUBMISSION_ZIP,
    detections_at_thresholds,
    evaluate_model,
    iter_probabilities,
    predict_dataset,
)
from dbnet.postprocess import boxes_from_prob

runner = CliRunner()

METRIC_KEYS = ("precision", "recall", "hmean", "matched", "gt_care", "det_care", "images")
# (height, width) of the test images: bands of ~40 rows hold one dark bar each.
SIZES_A = [(120, 180), (160, 200), (90, 160)]
SIZES_B = [(130, 170), (80, 120)]
FIXED_BOX_THRESH = 0.5


def write_scenes(root: Path, sizes: list[tuple[int, int]], seed: int) -> Path:
    """A dataset of `scene` images whose gt boxes are their dark bars.

    The first image also has a ``###`` box over its first bar and a care box where there is
    nothing to find, so that recall is below 1 and don't-care matching is exercised.
    """
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "gts").mkdir()
    for number, (height, width) in enumerate(sizes, start=1):
        image, mask = scene(rng, height, width)
        count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=4)
        assert count - 1 == max(1, height // 40), "one bar per band"
        lines = []
        for x, y, w, h, _ in stats[1:]:
            x1, y1 = x + w - 1, y + h - 1
            text = "###" if number == 1 and not lines else "word"
            lines.append(f"{x},{y},{x1},{y},{x1},{y1},{x},{y1},{text}")
        if number == 1:
            lines.append(
                f"{width - 12},{height - 8},{width - 2},{height - 8},{width - 2},"
                f"{height - 2},{width - 12},{height - 2},missed"
            )
        cv2.imwrite(str(root / "images" / f"img_{number}.png"), image[:, :, ::-1])
        (root / "gts" / f"gt_img_{number}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A fitted model saved as <run>/checkpoints/best.pt with data.val_dir set to set A."""
    folder = tmp_path_factory.mktemp("evaluate")
    set_a = write_scenes(folder / "set_a", SIZES_A, seed=3)
    set_b = write_scenes(folder / "set_b", SIZES_B, seed=4)

    model, config = fitted_model(eval_size=128)
    config.postprocess.box_thresh = FIXED_BOX_THRESH
    config.postprocess.unclip_ratio = 0.3  # the fitted map covers whole bars, not kernels
    config.data.val_dir = str(set_a)
    config.train.device = "cpu"
    run = folder / "run"
    checkpoint = run / "checkpoints" / "best.pt"
    checkpoint.parent.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config)))
    save_checkpoint(checkpoint, {"model": model.state_dict(), "config": config_to_dict(config)})
    return {
        "model": model,
        "config": config,
        "checkpoint": checkpoint,
        "run": run,
        "set_a": set_a,
        "set_b": set_b,
    }


def run_eval(*args: str, expect: int = 0) -> Any:
    result = runner.invoke(app, ["eval", *args])
    assert result.exit_code == expect, result.output
    return result


def eval_json(*args: str) -> dict[str, Any]:
    return json.loads(run_eval(*args, "--json").stdout)


@pytest.fixture(scope="module")
def evaluated(setup: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`dbnet eval --checkpoint CKPT --out DIR --json` on set A (the stored val_dir)."""
    out = tmp_path_factory.mktemp("out") / "eval"
    return eval_json("--checkpoint", str(setup["checkpoint"]), "--out", str(out))


def scores_of(result: dict[str, Any]) -> dict[str, Any]:
    return {key: result[key] for key in METRIC_KEYS}


# ---- scores and outputs ------------------------------------------------------------------


def test_json_has_the_scores_and_where_they_went(evaluated: dict[str, Any]) -> None:
    for key in (*METRIC_KEYS, "out_dir", "zip", "box_thresh", "skipped"):
        assert key in evaluated, f"missing {key}: {sorted(evaluated)}"
    assert "sweep" not in evaluated, "no sweep unless asked for"
    for key in ("precision", "recall", "hmean"):
        assert 0.0 <= evaluated[key] <= 1.0, f"{key} {evaluated[key]}"
    assert evaluated["images"] == len(SIZES_A)
    assert evaluated["box_thresh"] == FIXED_BOX_THRESH
    assert evaluated["matched"] > 0, "the fitted model should find bars: a meaningful test"
    assert evaluated["recall"] < 1.0, "the box over nothing is missed"
    assert evaluated["gt_care"] == sum(max(1, h // 40) for h, _ in SIZES_A), "### not counted"
    assert evaluated["skipped"] == []


def test_result_files_give_the_same_scores_with_pred_dir(
    setup: dict[str, Any], evaluated: dict[str, Any]
) -> None:
    out = Path(evaluated["out_dir"])
    names = sorted(p.name for p in out.glob("res_*.txt"))
    assert names == [f"res_img_{i}.txt" for i in range(1, len(SIZES_A) + 1)], names

    for pred in (out, out / SUBMISSION_ZIP):
        files = eval_json("--gt-dir", str(setup["set_a"] / "gts"), "--pred-dir", str(pred))
        assert scores_of(files) == scores_of(evaluated), f"{pred}: {files} vs {evaluated}"


def test_zip_holds_only_result_files_at_its_root(evaluated: dict[str, Any]) -> None:
    out = Path(evaluated["out_dir"])
    with zipfile.ZipFile(evaluated["zip"]) as archive:
        names = sorted(archive.namelist())
        assert names == sorted(p.name for p in out.glob("res_*.txt")), names
        assert all("/" not in n and "\\" not in n for n in names), names
        for name in names:
            assert archive.read(name) == (out / name).read_bytes(), name


def test_scores_json_and_config_are_written(evaluated: dict[str, Any]) -> None:
    out = Path(evaluated["out_dir"])
    assert json.loads((out / "scores.json").read_text()) == evaluated
    stored = yaml.safe_load((out / "config.yaml").read_text())
    assert stored["postprocess"]["box_thresh"] == FIXED_BOX_THRESH


def test_table_output(setup: dict[str, Any], tmp_path: Path) -> None:
    result = run_eval("--checkpoint", str(setup["checkpoint"]), "--out", str(tmp_path / "o"))

    assert "Precision" in result.stdout and "Hmean" in result.stdout, result.stdout
    assert "box_thresh 0.5" in result.stdout and SUBMISSION_ZIP in result.stdout
    assert "sweep" not in result.stdout


def test_the_trainer_validation_gives_the_same_numbers(
    setup: dict[str, Any], evaluated: dict[str, Any]
) -> None:
    config = setup["config"]
    dataset = DetectionDataset(setup["set_a"], config.data, train=False)
    device = torch.device("cpu")

    scores = evaluate_model(setup["model"], dataset, config, device)
    assert scores_of(scores) == scores_of(evaluated), f"{scores} vs {evaluated}"

    predictions = predict_dataset(setup["model"], dataset, config, device)
    assert [Path(p["path"]).name for p in predictions] == [p.name for p, _ in dataset.pairs]
    detections = sum(len(p["detections"]) for p in predictions)
    assert detections >= evaluated["det_care"] > 0, "det_care excludes only don't-care hits"


# ---- the box_thresh sweep ----------------------------------------------------------------


def test_sweep_is_reported_apart_and_contains_the_fixed_result(
    setup: dict[str, Any], evaluated: dict[str, Any], tmp_path: Path
) -> None:
    swept = eval_json("--checkpoint", str(setup["checkpoint"]), "--out", str(tmp_path), "--sweep")

    assert scores_of(swept) == scores_of(evaluated), "the sweep leaves the fixed result alone"
    sweep = swept["sweep"]
    assert "optimistic" in sweep["note"]
    thresholds = [row["box_thresh"] for row in sweep["results"]]
    assert thresholds == sorted({*DEFAULT_SWEEP, FIXED_BOX_THRESH}), thresholds
    assert thresholds[0] == 0.3 and thresholds[-1] == 0.8

    (fixed,) = [row for row in sweep["results"] if row["box_thresh"] == FIXED_BOX_THRESH]
    for key in METRIC_KEYS[:-1]:
        assert fixed[key] == evaluated[key], f"{key}: {fixed[key]} vs {evaluated[key]}"
    det_care = [row["det_care"] for row in sweep["results"]]
    assert det_care == sorted(det_care, reverse=True), (
        f"fewer boxes at higher thresholds {det_care}"
    )
    assert det_care[0] > det_care[-1], "the sweep should change something"
    assert sweep["best"]["hmean"] == max(row["hmean"] for row in sweep["results"])


def test_sweep_table_warns_and_config_list_is_used(setup: dict[str, Any], tmp_path: Path) -> None:
    args = ["--checkpoint", str(setup["checkpoint"]), "--out", str(tmp_path / "o")]
    result = run_eval(*args, "--set", "eval.sweep_box_thresh=[0.4, 0.7]")

    assert "sweep" in result.stdout and "optimistic" in result.stdout, result.stdout
    scores = json.loads((tmp_path / "o" / "scores.json").read_text())
    assert [row["box_thresh"] for row in scores["sweep"]["results"]] == [0.4, 0.5, 0.7]


def test_one_postprocessing_serves_every_threshold(setup: dict[str, Any]) -> None:
    config = setup["config"]
    dataset = DetectionDataset(setup["set_a"], config.data, train=False)
    thresholds = [0.3, 0.45, 0.5, 0.62, 0.8]
    compared = 0
    for image in iter_probabilities(setup["model"], dataset, config, torch.device("cpu")):
        swept = detections_at_thresholds(image.prob, image.size, config.postprocess, thresholds)
        for threshold, got in zip(thresholds, swept, strict=True):
            config.postprocess.box_thresh = threshold
            expected = boxes_from_prob(image.prob, image.size, config.postprocess)
            assert len(got) == len(expected), f"{image.path.name} at {threshold}"
            for a, b in zip(got, expected, strict=True):
                assert np.array_equal(a.points, b.points) and a.score == b.score
            compared += len(expected)
    config.postprocess.box_thresh = FIXED_BOX_THRESH
    assert compared > 0


# ---- configuration, data and output folders ----------------------------------------------


def test_data_overrides_the_stored_val_dir_and_default_out_is_in_the_run(
    setup: dict[str, Any],
) -> None:
    result = eval_json("--checkpoint", str(setup["checkpoint"]), "--data", str(setup["set_b"]))

    assert result["images"] == len(SIZES_B)
    out = Path(result["out_dir"])
    assert out.parent == setup["run"].resolve(), out
    assert out.name.startswith("eval-set_b-"), out.name
    assert sorted(p.name for p in out.glob("res_*.txt")) == ["res_img_1.txt", "res_img_2.txt"]


def test_config_file_is_merged_over_the_stored_one(setup: dict[str, Any], tmp_path: Path) -> None:
    config = tmp_path / "eval.yaml"
    config.write_text("postprocess:\n  box_thresh: 0.99\nmodel:\n  backbone: resnet50\n")

    result = eval_json(
        "--checkpoint", str(setup["checkpoint"]), "--config", str(config), "--out", str(tmp_path)
    )

    assert result["images"] == len(SIZES_A), "data.val_dir still comes from the checkpoint"
    assert result["det_care"] == 0 and result["box_thresh"] == 0.99
    stored = yaml.safe_load((Path(result["out_dir"]) / "config.yaml").read_text())
    assert stored["model"]["backbone"] == "resnet18", "the architecture is the checkpoint's"


def test_model_overrides_are_refused(setup: dict[str, Any], tmp_path: Path) -> None:
    result = run_eval(
        "--checkpoint",
        str(setup["checkpoint"]),
        "--out",
        str(tmp_path / "o"),
        "--set",
        "model.backbone=resnet50",
        expect=1,
    )
    assert "model comes from the checkpoint" in result.stderr, result.stderr
    assert not (tmp_path / "o").exists()


def test_existing_output_folder_is_never_written_into(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "res_img_1.txt").write_text("keep me\n")

    result = eval_json("--checkpoint", str(setup["checkpoint"]), "--out", str(out))

    assert Path(result["out_dir"]) == (tmp_path / "out-2").resolve()
    assert (out / "res_img_1.txt").read_text() == "keep me\n"
    assert sorted(p.name for p in out.iterdir()) == ["res_img_1.txt"]


def test_missing_checkpoint_is_one_line_and_exit_1(tmp_path: Path) -> None:
    result = run_eval("--checkpoint", str(tmp_path / "none.pt"), expect=1)

    assert "none.pt" in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_image_names_with_a_path_component_are_refused(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    data = write_scenes(tmp_path / "data", [(80, 120)], seed=5)
    (data / "images" / "img_1.png").rename(data / "images" / "x\\..\\..\\img_1.png")
    (data / "gts" / "gt_img_1.txt").rename(data / "gts" / "gt_x\\..\\..\\img_1.txt")
    out = tmp_path / "out"

    args = ["--checkpoint", str(setup["checkpoint"]), "--data", str(data), "--out", str(out)]
    result = run_eval(*args, expect=1)

    assert "path component" in result.stderr, result.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_an_unreadable_image_counts_its_ground_truth_as_missed(
    setup: dict[str, Any], tmp_path: Path
) -> None:
    data = write_scenes(tmp_path / "set", SIZES_A, seed=3)
    whole = eval_json(
        "--checkpoint",
        str(setup["checkpoint"]),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "whole"),
    )
    (data / "images" / "img_2.png").write_bytes(b"not an image")

    broken = eval_json(
        "--checkpoint",
        str(setup["checkpoint"]),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "broken"),
        "--set",
        "data.max_bad_fraction=0.5",
    )

    assert [item["file"] for item in broken["skipped"]] == [str(data / "images" / "img_2.png")]
    assert broken["gt_care"] == whole["gt_care"], "the unreadable image's gt must still count"
    assert broken["matched"] < whole["matched"]
    assert broken["recall"] < whole["recall"]
