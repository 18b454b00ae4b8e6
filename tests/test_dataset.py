"""DetectionDataset items, collate, reproducibility, lenient reading and `dbnet data show`."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dbnet.cli import app
from dbnet.config import DataConfig
from dbnet.data.dataset import DetectionDataset, collate, normalise
from dbnet.errors import DBNetError, ImageReadError

CROP = 64
TRAIN_KEYS = {"image", "shrink_map", "shrink_mask", "threshold_map", "threshold_mask", "path"}
EVAL_KEYS = {"image", "shape", "path", "polygons", "ignore"}


def _config(**changes: object) -> DataConfig:
    values = {"crop_size": CROP, "eval_size": 64, "scale_range": (0.8, 1.2)}
    values.update(changes)
    return DataConfig(**values)  # type: ignore[arg-type]


def _write_sample(root: Path, name: str, shape: tuple[int, int], lines: list[str]) -> None:
    """An image of dark words on a light background, and its gt file."""
    rng = np.random.default_rng(len(name))
    image = np.full((*shape, 3), 230, np.uint8) + rng.integers(0, 20, (*shape, 3), dtype=np.uint8)
    for line in lines:
        points = np.array(line.split(",")[:8], np.float32).reshape(4, 2)
        cv2.fillPoly(image, [points.astype(np.int32)], (20, 20, 20))
    (root / "images").mkdir(exist_ok=True)
    (root / "gts").mkdir(exist_ok=True)
    cv2.imwrite(str(root / "images" / f"{name}.png"), image)
    (root / "gts" / f"gt_{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    """Three small images: two words and a don't-care, one word, no text."""
    _write_sample(
        tmp_path,
        "img_1",
        (48, 80),
        ["4,6,40,6,40,20,4,20,hello", "44,26,76,26,76,40,44,40,world", "4,30,30,30,30,44,4,44,###"],
    )
    _write_sample(tmp_path, "img_2", (60, 50), ["5,10,45,10,45,30,5,30,one"])
    _write_sample(tmp_path, "img_3", (40, 40), [])
    return tmp_path


def _check_train_item(item: dict, config: DataConfig) -> None:
    assert set(item) == TRAIN_KEYS
    image = item["image"]
    assert image.shape == (3, CROP, CROP) and image.dtype == torch.float32, image.shape
    assert torch.isfinite(image).all()
    for key in ("shrink_map", "shrink_mask", "threshold_mask"):
        values = item[key]
        assert values.shape == (CROP, CROP) and values.dtype == torch.float32, key
        assert set(torch.unique(values).tolist()) <= {0.0, 1.0}, f"{key} must be binary"
    threshold = item["threshold_map"]
    assert threshold.shape == (CROP, CROP) and threshold.dtype == torch.float32
    assert threshold.min() >= config.thresh_min - 1e-6
    assert threshold.max() <= config.thresh_max + 1e-6
    assert isinstance(item["path"], str)


def test_train_items(tiny_root: Path) -> None:
    config = _config()
    dataset = DetectionDataset(tiny_root, config, train=True)
    assert len(dataset) == 3
    for index in range(3):
        _check_train_item(dataset[index], config)

    # The crop of img_1 must hold text: the crop aims at care instances.
    assert dataset[0]["shrink_map"].sum() > 0
    # The image without text: empty targets, all-one mask.
    empty = dataset[2]
    assert empty["shrink_map"].sum() == 0 and bool((empty["shrink_mask"] == 1).all())
    assert dataset.ignored["dont_care"] >= 1, "the ### instance is counted"


def test_image_is_normalised_with_mean_and_std() -> None:
    image = np.full((2, 3, 3), (124, 116, 104), np.uint8)  # about the ImageNet mean colour
    out = normalise(image, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert out.shape == (3, 2, 3) and out.dtype == np.float32
    assert np.abs(out).max() < 0.02
    white = normalise(np.full((1, 1, 3), 255, np.uint8), (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    np.testing.assert_allclose(white[:, 0, 0], [2.0, 1.0, 0.5], rtol=1e-6)


def test_eval_items_keep_original_polygons(tiny_root: Path) -> None:
    dataset = DetectionDataset(tiny_root, _config(), train=False)
    item = dataset[0]
    assert set(item) == EVAL_KEYS
    _, height, width = item["image"].shape
    assert height % 32 == 0 and width % 32 == 0
    assert item["shape"].tolist() == [48, 80] and item["shape"].dtype == torch.long
    assert item["ignore"] == [False, False, True]
    np.testing.assert_array_equal(item["polygons"][1], [[44, 26], [76, 26], [76, 40], [44, 40]])
    assert item["polygons"][0].dtype == np.float32


def test_collate_stacks_tensors_and_keeps_lists(tiny_root: Path) -> None:
    train = DetectionDataset(tiny_root, _config(), train=True)
    batch = collate([train[0], train[1]])
    assert batch["image"].shape == (2, 3, CROP, CROP)
    assert batch["threshold_mask"].shape == (2, CROP, CROP)
    assert isinstance(batch["path"], list) and len(batch["path"]) == 2

    evaluation = DetectionDataset(tiny_root, _config(), train=False)
    one = collate([evaluation[0]])
    assert one["image"].shape[0] == 1 and one["shape"].shape == (1, 2)
    assert isinstance(one["polygons"], list) and len(one["polygons"][0]) == 3
    with pytest.raises(ValueError, match="batch_size 1"):
        collate([evaluation[0], evaluation[1]])  # 48x80 and 60x50 resize differently


def test_samples_are_reproducible(tiny_root: Path) -> None:
    config = _config(color_jitter=0.2)
    first = DetectionDataset(tiny_root, config, train=True, seed=5)
    second = DetectionDataset(tiny_root, config, train=True, seed=5)
    # Another order of access (as with several workers) gives the same items.
    a = [first[index] for index in (0, 1, 2)]
    b = [second[index] for index in (2, 1, 0)][::-1]
    for x, y in zip(a, b, strict=True):
        for key in TRAIN_KEYS - {"path"}:
            assert torch.equal(x[key], y[key]), key

    first.set_epoch(1)
    assert not torch.equal(first[0]["image"], a[0]["image"]), "another epoch, another crop"
    other = DetectionDataset(tiny_root, config, train=True, seed=6)
    assert not torch.equal(other[0]["image"], a[0]["image"]), "another seed, another crop"


def test_unreadable_image_is_replaced_by_the_next_and_counted(
    tiny_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tiny_root / "images" / "img_2.png").write_bytes(b"not an image")
    dataset = DetectionDataset(tiny_root, _config(max_bad_fraction=0.5), train=True)

    with caplog.at_level(logging.WARNING):
        item = dataset[1]
    assert item["path"].endswith("img_3.png"), "replaced by the next index, deterministically"
    assert len(dataset.skipped) == 1 and dataset.skipped[0][0].endswith("img_2.png")
    assert "img_2.png" in caplog.text, "the skip is logged with the file name"
    dataset[1]
    assert len(dataset.skipped) == 1, "a file is counted once"


def test_too_many_unreadable_images_stop_with_their_names(tiny_root: Path) -> None:
    (tiny_root / "images" / "img_1.png").write_bytes(b"")
    dataset = DetectionDataset(tiny_root, _config(max_bad_fraction=0.1), train=True)
    with pytest.raises(DBNetError, match=r"1 of 3 samples .*img_1\.png"):
        dataset[0]


def test_strict_raises_at_the_first_unreadable_image(tiny_root: Path) -> None:
    (tiny_root / "images" / "img_3.png").write_bytes(b"\x89PNG broken")
    dataset = DetectionDataset(tiny_root, _config(strict=True), train=False)
    with pytest.raises(ImageReadError, match="img_3.png"):
        dataset[2]


def test_summary_counts_usable_instances(tiny_root: Path) -> None:
    summary = DetectionDataset(tiny_root, _config(), train=True).summary()
    assert (summary.images, summary.instances, summary.usable, summary.dont_care) == (3, 4, 3, 1)
    summary.require_usable()


def test_all_dont_care_set_is_refused(cases_dir: Path) -> None:
    dataset = DetectionDataset(cases_dir / "07_all_dont_care", _config(), train=True)
    summary = dataset.summary()
    assert summary.usable == 0 and summary.instances == 3
    with pytest.raises(DBNetError, match="1 images and 0 usable"):
        summary.require_usable()


@pytest.mark.parametrize("case", ["16_tiny_image", "08_negative_image_empty_gt"])
def test_bad_input_cases_give_sound_items(cases_dir: Path, case: str) -> None:
    config = _config()
    train = DetectionDataset(cases_dir / case, config, train=True)
    evaluation = DetectionDataset(cases_dir / case, config, train=False)
    assert len(train) == 2

    for index in range(len(train)):
        item = train[index]
        _check_train_item(item, config)
        if case.startswith("08") or index == 0:
            # Empty gt files, and the 1x1 image whose 1 px box is too small: no target.
            assert item["shrink_map"].sum() == 0, f"{case}[{index}]: no shrink target expected"

        item = evaluation[index]
        _, height, width = item["image"].shape
        assert height >= 32 and width >= 32 and height % 32 == 0 and width % 32 == 0
        assert torch.isfinite(item["image"]).all()
    assert not train.skipped and not evaluation.skipped


def test_negative_images_have_all_one_masks(cases_dir: Path) -> None:
    dataset = DetectionDataset(cases_dir / "08_negative_image_empty_gt", _config(), train=True)
    for index in range(len(dataset)):
        assert bool((dataset[index]["shrink_mask"] == 1).all())


def test_empty_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DBNetError, match="no image"):
        DetectionDataset(tmp_path, _config(), train=True)


# ---- dbnet data show ----------------------------------------------------------------------


def test_data_show_writes_a_picture(tiny_root: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"data:\n  crop_size: {CROP}\n", encoding="utf-8")
    out = tmp_path / "show" / "sample.png"

    result = CliRunner().invoke(
        app,
        ["data", "show", str(tiny_root), "--index", "1", "--out", str(out), "--seed", "3"]
        + ["--config", str(config)],
    )

    assert result.exit_code == 0, result.output
    picture = cv2.imread(str(out))
    assert picture is not None and picture.shape == (CROP, 3 * CROP, 3)


def test_data_show_refuses_an_index_out_of_range(tiny_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "sample.png"
    result = CliRunner().invoke(
        app, ["data", "show", str(tiny_root), "--index", "7", "--out", str(out)]
    )
    assert result.exit_code == 1
    assert "out of range" in result.output and "3 samples" in result.output
    assert not out.exists()
