"""`dbnet eval` through Typer's CliRunner."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from conftest import DATA
from typer.testing import CliRunner

from dbnet.cli import app

runner = CliRunner()


def write_set(root: Path) -> tuple[Path, Path]:
    gts, res = root / "gts", root / "res"
    gts.mkdir()
    res.mkdir()
    (gts / "gt_img_1.txt").write_text(
        "0,0,100,0,100,20,0,20,hello\n0,40,60,40,60,60,0,60,world\n", encoding="utf-8"
    )
    (res / "res_img_1.txt").write_text("0,0,100,0,100,20,0,20,0.9\n", encoding="utf-8")
    return gts, res


def test_json_output(tmp_path: Path) -> None:
    gts, res = write_set(tmp_path)

    result = runner.invoke(app, ["eval", "--gt-dir", str(gts), "--pred-dir", str(res), "--json"])

    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert (scores["precision"], scores["recall"]) == (1.0, 0.5)
    assert scores["hmean"] == pytest.approx(2 / 3)
    assert (scores["matched"], scores["gt_care"], scores["det_care"]) == (1, 2, 1)


def test_table_output(tmp_path: Path) -> None:
    gts, res = write_set(tmp_path)

    result = runner.invoke(app, ["eval", "--gt-dir", str(gts), "--pred-dir", str(res)])

    assert result.exit_code == 0, result.output
    assert "Precision" in result.stdout and "Hmean" in result.stdout
    assert "1.0000" in result.stdout and "0.5000" in result.stdout and "0.6667" in result.stdout


def test_user_mistake_is_one_line_and_exit_1(tmp_path: Path) -> None:
    gts, res = write_set(tmp_path)
    (res / "res_img_7.txt").write_text("0,0,1,0,1,1,0,1\n", encoding="utf-8")

    result = runner.invoke(app, ["eval", "--gt-dir", str(gts), "--pred-dir", str(res)])

    assert result.exit_code == 1
    assert "res_img_7.txt" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--gt-dir", "."],
        ["--gt-dir", ".", "--pred-dir", ".", "--checkpoint", "pyproject.toml"],
        ["--data", "."],
        ["--sweep"],
        ["--gt-dir", ".", "--pred-dir", ".", "--out", "x"],
    ],
    ids=[
        "nothing",
        "gt-only",
        "both-modes",
        "data-without-checkpoint",
        "sweep-without-checkpoint",
        "out-with-result-files",
    ],
)
def test_options_of_the_two_modes_do_not_mix(args: list[str]) -> None:
    result = runner.invoke(app, ["eval", *args])

    assert result.exit_code == 2, result.output


def test_checkpoint_mode_calls_the_engine(tmp_path: Path, monkeypatch) -> None:
    checkpoint, config = tmp_path / "model.pt", tmp_path / "config.yaml"
    checkpoint.write_bytes(b"")
    config.write_text("{}\n", encoding="utf-8")
    calls = []

    def evaluate_checkpoint(**kwargs) -> dict:
        calls.append(kwargs)
        scores = {"precision": 0.8, "recall": 0.6, "hmean": 0.6857}
        return {**scores, "matched": 3, "gt_care": 5, "det_care": 4}

    engine = types.ModuleType("dbnet.engine.evaluate")
    engine.evaluate_checkpoint = evaluate_checkpoint
    monkeypatch.setitem(sys.modules, "dbnet.engine.evaluate", engine)

    args = [
        "eval",
        "--checkpoint",
        str(checkpoint),
        "--config",
        str(config),
        "--data",
        str(tmp_path),
    ]
    result = runner.invoke(app, [*args, "--json"])

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["hmean"] == 0.6857
    assert calls == [
        {
            "checkpoint": checkpoint,
            "config_path": config,
            "data_dir": tmp_path,
            "out_dir": None,
            "sweep": False,
            "overrides": [],
        }
    ]


@pytest.mark.parametrize("with_dont_care", [True, False])
def test_icdar2015_gt_scored_against_itself(tmp_path: Path, with_dont_care: bool) -> None:
    gt_dir = DATA / "icdar2015" / "test" / "gts"
    if not gt_dir.is_dir():
        pytest.skip(f"{gt_dir} is absent")
    res_dir = tmp_path / "res"
    res_dir.mkdir()
    for gt in gt_dir.glob("gt_*.txt"):
        lines = gt.read_text(encoding="utf-8-sig").splitlines()
        kept = [line for line in lines if with_dont_care or not line.rstrip().endswith(",###")]
        coords = [",".join(line.split(",")[:8]) for line in kept if line.strip()]
        (res_dir / f"res_{gt.name[3:]}").write_text("\n".join(coords) + "\n", encoding="utf-8")

    result = runner.invoke(
        app, ["eval", "--gt-dir", str(gt_dir), "--pred-dir", str(res_dir), "--json"]
    )

    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert (scores["precision"], scores["recall"], scores["hmean"]) == (1.0, 1.0, 1.0)
    assert scores["gt_care"] == scores["matched"] == scores["det_care"] == 2077
    assert scores["images"] == 500
