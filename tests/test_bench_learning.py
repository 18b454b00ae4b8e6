"""scripts/bench_learning.py on tiny generated data: the split, the figures it prints, and
post-processing chosen on the calibration part, never on the test set."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from tiny_runs import make_dataset, tiny_values, write_config


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_learning", ROOT / "scripts" / "bench_learning.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_the_split_is_disjoint_and_covers_the_training_folder(tmp_path, bench) -> None:
    train_dir = make_dataset(tmp_path / "train", count=10)
    split = bench.split_training_set(train_dir, tmp_path / "split", fraction=0.2, seed=0)

    fit = {path.name for path in (split.fit / "images").iterdir()}
    calib = {path.name for path in (split.calib / "images").iterdir()}
    assert (split.fit_count, split.calib_count) == (8, 2) and len(calib) == 2
    assert not fit & calib, "no image is both trained and calibrated on"
    assert fit | calib == {path.name for path in (train_dir / "images").iterdir()}
    assert {path.name for path in (split.calib / "gts").iterdir()} == {
        f"gt_{Path(name).stem}.txt" for name in calib
    }
    with pytest.raises(ValueError, match="calib-fraction"):
        bench.split_training_set(train_dir, tmp_path / "other", fraction=1.0, seed=0)


def test_a_short_benchmark_calibrates_on_held_out_training_images(
    tmp_path, bench, capsys, monkeypatch
) -> None:
    train_dir = make_dataset(tmp_path / "train", count=12)
    test_dir = make_dataset(tmp_path / "test", count=3, seed=1)
    values = tiny_values(tmp_path, train_dir, test_dir)
    config = write_config(tmp_path / "tiny.yaml", values)

    # Record the images every calibration sweep sees.
    calibrated: list[Path] = []
    original = bench.calibrate

    def recording(images, *args, **kwargs):
        calibrated.extend(image.path for image in images)
        return original(images, *args, **kwargs)

    monkeypatch.setattr(bench, "calibrate", recording)
    work = tmp_path / "work"
    argv = ["--config", str(config), "--minutes", "0.05", "--work-dir", str(work)]
    result = bench.main(
        [*argv, "--curve-points", "2", "--threads", "1", "--calib-fraction", "0.25"]
    )

    output = capsys.readouterr().out
    for expected in ("images seen", "curve (calibration part", "calibration, chosen", "TEST ("):
        assert expected in output, output
    assert result["steps"] >= 1 and result["images_seen"] == 2 * result["steps"]
    assert result["curve"][-1]["step"] == result["steps"], "the curve ends at the final weights"

    # Thresholds come from the 3 calibration images, which are training images not trained on.
    calib_dir = Path(result["split"]["calib"])
    assert len(calibrated) == 3 and all(path.parent.parent == calib_dir for path in calibrated)
    trained = {path.name for path in (Path(result["split"]["fit"]) / "images").iterdir()}
    assert not trained & {path.name for path in calibrated}
    test_images = {str(path) for path in (test_dir / "images").iterdir()}
    assert set(result["test"]["images"]) == test_images
    assert not test_images & {str(path) for path in calibrated}, "nothing chosen on the test set"

    # The test set is scored with the chosen values.
    chosen, applied = result["calibration"]["chosen"], result["test"]["calibrated"]
    for key in ("thresh", "box_thresh", "unclip_ratio"):
        assert applied[key] == chosen[key], key
    assert (work / "bench.json").is_file()
