"""scripts/prepare_icdar2015.py: the four competition zips to OUT/{train,test}/{images,gts}."""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path
from types import ModuleType

import pytest
from conftest import ROOT

from dbnet.data.io import find_pairs, read_gt


def load_script() -> ModuleType:
    path = ROOT / "scripts" / "prepare_icdar2015.py"
    spec = importlib.util.spec_from_file_location("prepare_icdar2015", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prepare = load_script()


def write_zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as zipped:
        for name, data in members.items():
            zipped.writestr(name, data)


@pytest.fixture
def zips(tmp_path: Path, shared_data: Path) -> Path:
    """The four archives, built from a few real ICDAR 2015 files at the zip root."""
    source = shared_data / "icdar2015"
    if not source.is_dir():
        pytest.skip(f"{source} is absent")
    folder = tmp_path / "downloads"
    folder.mkdir()
    counts = {"train": 3, "test": 2}
    for split, subfolder, file_name in prepare.ARCHIVES:
        names = [f"img_{n}" for n in range(1, counts[split] + 1)]
        if subfolder == "images":
            files = {f"{n}.jpg": source / split / "images" / f"{n}.jpg" for n in names}
        else:
            files = {f"gt_{n}.txt": source / split / "gts" / f"gt_{n}.txt" for n in names}
        write_zip(folder / file_name, {name: path.read_bytes() for name, path in files.items()})
    return folder


def test_layout_and_counts(zips: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "icdar2015"

    code = prepare.main([str(zips), "--out", str(out)])

    assert code == 0
    for split, count in (("train", 3), ("test", 2)):
        assert sorted(p.name for p in (out / split / "images").iterdir()) == [
            f"img_{n}.jpg" for n in range(1, count + 1)
        ]
        pairs = find_pairs(out / split)
        assert len(pairs) == count
        assert all(read_gt(gt) for _, gt in pairs), "every gt file has instances"
    printed = capsys.readouterr().out
    assert "3 images, 3 gt files, 3 pairs" in printed
    assert "2 images, 2 gt files, 2 pairs" in printed


def test_existing_target_is_refused_unless_overwrite(zips: Path, tmp_path: Path) -> None:
    out = tmp_path / "icdar2015"
    assert prepare.main([str(zips), "--out", str(out)]) == 0

    assert prepare.main([str(zips), "--out", str(out)]) == 1
    assert prepare.main([str(zips), "--out", str(out), "--overwrite"]) == 0


@pytest.mark.parametrize(
    "bad_name",
    ["../img_1.jpg", "/tmp/img_1.jpg", "sub/img_1.jpg", "..\\img_1.jpg", "C:img_1.jpg"],
)
def test_members_with_path_components_are_refused(
    zips: Path, tmp_path: Path, bad_name: str, capsys: pytest.CaptureFixture
) -> None:
    archive = zips / "ch4_test_images.zip"
    with zipfile.ZipFile(archive, "a") as zipped:
        zipped.writestr(bad_name, b"\xff\xd8")
    out = tmp_path / "icdar2015"

    code = prepare.main([str(zips), "--out", str(out)])

    assert code == 1
    assert "path component" in capsys.readouterr().err
    assert not out.exists(), "nothing is written when any member is refused"
    assert not (tmp_path / "img_1.jpg").exists()


def test_missing_zip_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = prepare.main([str(tmp_path), "--out", str(tmp_path / "out")])

    assert code == 1
    assert "ch4_training_images.zip" in capsys.readouterr().err


def test_unexpected_member_kind_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "ch4_training_localization_transcription_gt.zip"
    write_zip(archive, {"notes.txt": b"hello"})

    with pytest.raises(prepare.PrepareError, match="notes.txt"):
        prepare.member_names(archive, "gts")
