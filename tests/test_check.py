"""The dataset audit and `dbnet data check`: counts, problems with file and line, exit codes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from dbnet.cli import app
from dbnet.data.check import audit_dataset

QUAD = "10,10,90,10,90,40,10,40"

runner = CliRunner()


def check(*args: str | Path) -> tuple[int, str, str]:
    result = runner.invoke(app, ["data", "check", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def make_set(root: Path, gts: dict[str, str]) -> Path:
    """A one-folder dataset: one 100x50 image per gt file content."""
    root.mkdir(parents=True, exist_ok=True)
    for name, content in gts.items():
        Image.new("RGB", (100, 50), "white").save(root / f"{name}.png")
        (root / f"gt_{name}.txt").write_text(content, encoding="utf-8")
    return root


# ---- real data ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("split", "images", "instances", "care"),
    [("train", 1000, 11886, 4468), ("test", 500, 5230, 2077)],
)
def test_icdar2015_counts(
    shared_data: Path, split: str, images: int, instances: int, care: int
) -> None:
    root = shared_data / "icdar2015" / split
    if not root.is_dir():
        pytest.skip(f"{root} is absent")

    code, out, _ = check(root, "--json")

    report = json.loads(out)
    assert code == 0
    assert (report["images"], report["instances"], report["care"]) == (images, instances, care)
    assert report["ignored"]["dont_care"] == instances - care
    assert report["errors"] == []


# ---- the bad-input cases -----------------------------------------------------------------

# folder -> (exit code, "file:line" locations the summary must name)
CASES = {
    "01_tiny_subpixel_polygon": (0, ["gt_img_1.txt:2", "gt_img_1.txt:3"]),
    "03_bowtie_misordered_quad": (0, ["gt_img_3.txt:1"]),
    "04_zero_area_polygons": (0, ["gt_img_4.txt:1", "gt_img_4.txt:2"]),
    "07_all_dont_care": (1, []),
    "08_negative_image_empty_gt": (1, []),
    "09_bom_crlf_gt": (0, []),
    "13_rgba_transparent": (0, []),
    "16_tiny_image": (0, ["gt_img_16.txt:1"]),
    "19_postprocess_degenerate_probmap": (0, ["prob_19.png"]),
}


@pytest.mark.parametrize("folder", sorted(CASES))
def test_cases_report_problems_with_file_and_line(cases_dir: Path, folder: str) -> None:
    expected_code, locations = CASES[folder]

    code, out, err = check(cases_dir / folder)

    assert code == expected_code, out + err
    assert out.startswith("dataset"), "a readable summary comes first"
    for location in locations:
        assert location in out, f"{location} missing from:\n{out}"
    if expected_code:
        assert "unusable" in err


def test_bowtie_case_names_the_crossing_quad(cases_dir: Path) -> None:
    report = audit_dataset(cases_dir / "03_bowtie_misordered_quad")

    # Repaired or ignored, the crossing quad on line 1 is named; the valid one is used.
    assert [problem.line for problem in report.warnings] == [1]
    assert report.usable + report.repaired >= 1


def test_all_dont_care_is_unusable(cases_dir: Path) -> None:
    code, out, err = check(cases_dir / "07_all_dont_care", "--json")

    report = json.loads(out)
    assert code == 1
    assert (report["images"], report["instances"], report["care"]) == (1, 3, 0)
    assert report["ignored"] == {"dont_care": 3}
    assert "no usable text instance" in err


def test_negative_images_are_counted(cases_dir: Path) -> None:
    report = audit_dataset(cases_dir / "08_negative_image_empty_gt")

    assert (report.images, report.empty_images, report.instances) == (2, 2, 0)
    assert report.errors == []


def test_image_without_gt_fails_only_when_strict(cases_dir: Path) -> None:
    folder = cases_dir / "19_postprocess_degenerate_probmap"

    assert check(folder)[0] == 0
    code, out, err = check(folder, "--strict", "--json")

    assert code == 1
    (error,) = json.loads(out)["errors"]
    assert error["file"].endswith("prob_19.png") and error["line"] is None
    assert "strict" in err


# ---- generated sets ----------------------------------------------------------------------


def test_malformed_line_is_an_error_with_file_and_line(tmp_path: Path) -> None:
    root = make_set(tmp_path / "set", {"img_1": f"{QUAD},ok\n1,2,3,x,5,6,7,8,bad\n"})

    code, out, _ = check(root, "--json")

    report = json.loads(out)
    assert code == 0, "one bad line does not make the set unusable"
    assert (report["images"], report["instances"], report["care"]) == (1, 1, 1)
    (error,) = report["errors"]
    assert error["file"] == str(root / "gt_img_1.txt")
    assert error["line"] == 2
    assert "field 4 ('x') is not a number" in error["message"]
    assert check(root, "--strict")[0] == 1


def test_unreadable_image_and_orphan_gt_are_errors(tmp_path: Path) -> None:
    root = make_set(tmp_path / "set", {"img_1": f"{QUAD},ok\n", "img_2": f"{QUAD},lost\n"})
    whole = (root / "img_2.png").read_bytes()
    (root / "img_2.png").write_bytes(whole[: len(whole) // 2])
    (root / "gt_img_3.txt").write_text(f"{QUAD},orphan\n")

    report = audit_dataset(root)

    assert (report.images, report.instances) == (1, 1)
    files = sorted(Path(problem.file).name for problem in report.errors)
    assert files == ["gt_img_3.txt", "img_2.png"]
    assert report.failures == []


def test_headers_only_misses_truncation(tmp_path: Path) -> None:
    root = make_set(tmp_path / "set", {"img_1": f"{QUAD},ok\n"})
    image = Image.effect_noise((64, 64), 50).convert("RGB")
    image.save(root / "img_1.jpg")  # replace the png by a noisy, then truncated, jpeg
    (root / "img_1.png").unlink()
    data = (root / "img_1.jpg").read_bytes()
    (root / "img_1.jpg").write_bytes(data[: len(data) // 2])

    assert audit_dataset(root, verify_images=True).images == 0
    assert audit_dataset(root, verify_images=False).images == 1


def test_geometry_reasons_come_from_the_label_code(tmp_path: Path) -> None:
    lines = [
        f"{QUAD},ok",
        "20,20,20,20,20,20,20,20,point",  # degenerate
        "10,10,14,10,14,13,10,13,tiny",  # too small
        f"{QUAD},###",
    ]
    root = make_set(tmp_path / "set", {"img_1": "\n".join(lines) + "\n"})

    report = audit_dataset(root)

    assert dict(report.ignored) == {"degenerate": 1, "too_small": 1, "dont_care": 1}
    assert (report.instances, report.care, report.usable) == (4, 3, 1)
    assert [(problem.line, problem.severity) for problem in report.warnings] == [
        (2, "warning"),
        (3, "warning"),
    ]
    assert audit_dataset(root, min_text_size=2).ignored["too_small"] == 0


def test_json_has_the_documented_keys(tmp_path: Path) -> None:
    root = make_set(tmp_path / "set", {"img_1": f"{QUAD},ok\n"})

    code, out, _ = check(root, "--json")

    report = json.loads(out)
    assert code == 0
    assert {"images", "instances", "care", "ignored", "errors"} <= set(report)
    assert report["ok"] is True


def test_empty_folder_is_unusable(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()

    code, _, err = check(tmp_path / "empty")

    assert code == 1
    assert "no readable image" in err


def test_missing_folder_is_refused(tmp_path: Path) -> None:
    code, _, _ = check(tmp_path / "nowhere")
    assert code != 0


def test_audit_does_not_log_each_problem_twice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_set(tmp_path / "set", {"img_1": f"{QUAD},ok\n1,2,3,bad\n"})

    with caplog.at_level(logging.WARNING):
        report = audit_dataset(root)

    assert len(report.errors) == 1
    assert not [r for r in caplog.records if r.name == "dbnet.data.io"]
    assert logging.getLogger("dbnet.data.io").level == logging.NOTSET, "level restored"
