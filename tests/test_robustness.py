"""The robustness promises, kind by kind: bad annotations, images, sets, maps and detections;
one-line errors from every command; training that never dies silently or loses work;
untrusted files refused.

Every warning is an error here, and maps are computed under ``np.errstate(all="raise")``, so a
hidden NaN, overflow or division by zero fails the test that meets it.
"""

from __future__ import annotations

import errno
import logging
import pickle
import tracemalloc
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from tiny_runs import make_dataset, tiny_config, tiny_values, write_config
from typer.testing import CliRunner, Result

from dbnet.cli import app, user_errors
from dbnet.config import Config, DataConfig, ModelConfig, config_to_dict, load_config
from dbnet.data import dataset as dataset_module
from dbnet.data.check import audit_dataset
from dbnet.data.dataset import DetectionDataset, collate
from dbnet.data.io import Problem, read_gt, read_image
from dbnet.data.labels import make_label_maps
from dbnet.data.transforms import MAX_EVAL_SIDE, augment, eval_size
from dbnet.engine.checkpoint import load_checkpoint, save_checkpoint
from dbnet.engine.train import train
from dbnet.errors import AnnotationError, CheckpointError, ConfigError, DBNetError, ImageReadError
from dbnet.loss import DBLoss
from dbnet.metrics import DetectionMetric, evaluate_folders, read_result_file
from dbnet.model.dbnet import build_model

pytestmark = pytest.mark.filterwarnings("error")

QUAD = "10,10,90,10,90,40,10,40"
MAPS = ("shrink_map", "shrink_mask", "threshold_map", "threshold_mask")
# Case folders holding a training set (19 holds a probability map, tested in test_postprocess).
TRAINABLE_CASES = [
    "01_tiny_subpixel_polygon",
    "03_bowtie_misordered_quad",
    "04_zero_area_polygons",
    "07_all_dont_care",
    "08_negative_image_empty_gt",
    "09_bom_crlf_gt",
    "13_rgba_transparent",
    "16_tiny_image",
]


def cli(*args: object) -> Result:
    return CliRunner().invoke(app, [str(arg) for arg in args])


def assert_one_line_error(result: Result, *expected: str) -> str:
    """Exit code 1 from a handled error, one ``error:`` line naming what is expected."""
    assert isinstance(result.exception, SystemExit), f"unhandled: {result.exception!r}"
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def tiny_model_config() -> Config:
    config = Config(model=ModelConfig(backbone="mobilenet_v3_small", width=0.5, inner_channels=16))
    config.data.crop_size = 64
    config.data.eval_size = 64
    config.data.scale_range = (0.8, 1.2)
    return config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny model saved as the trainer saves it."""
    config = tiny_model_config()
    torch.manual_seed(0)
    model = build_model(config.model)
    path = tmp_path_factory.mktemp("checkpoint") / "model.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": config_to_dict(config)})
    return path


def one_folder_set(root: Path, gts: dict[str, str], size: tuple[int, int] = (50, 100)) -> Path:
    """One light image per gt file content, both in `root`."""
    root.mkdir(parents=True, exist_ok=True)
    for name, content in gts.items():
        Image.new("RGB", (size[1], size[0]), "white").save(root / f"{name}.png")
        (root / f"gt_{name}.txt").write_text(content, encoding="utf-8")
    return root


def assert_finite_maps(maps: object, height: int, width: int) -> None:
    for name in MAPS:
        value = getattr(maps, name)
        assert value.shape == (height, width), f"{name} {value.shape}"
        assert np.isfinite(value).all(), f"{name} holds NaN or Inf"


# ---- 1. annotations ----------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "latin-1"])
@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_gt_encodings_line_endings_and_stray_whitespace(
    tmp_path: Path, encoding: str, newline: str
) -> None:
    lines = [f"  {QUAD} , Straße ", "", " \t ", "1,1,20,1,20,9,1,9,###  ", ""]
    path = tmp_path / "gt_img_1.txt"
    path.write_bytes(newline.join(lines).encode(encoding))
    problems: list[Problem] = []

    instances = read_gt(path, problems=problems)

    assert [(i.text, i.ignore, i.line) for i in instances] == [
        ("Straße", False, 1),
        ("###", True, 4),
    ]
    np.testing.assert_array_equal(instances[0].points, [[10, 10], [90, 10], [90, 40], [10, 40]])
    # Latin-1 is a fallback: it is read, and said so with the file.
    assert [p.severity for p in problems] == (["warning"] if encoding == "latin-1" else [])


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("10,10,90", "odd number of coordinates (3)"),
        ("10,10,90,10,90,x", "odd number of coordinates"),
        ("hello,10,90,10", "field 1 ('hello') is not a number"),
        ("10,10,abc,10,90,40,10,40,x", "field 3 ('abc') is not a number"),
        ("1e39,10,90,10,90,40,10,40,x", "too large for float32"),
    ],
)
def test_malformed_gt_lines_are_skipped_naming_file_and_line(
    tmp_path: Path, line: str, expected: str
) -> None:
    path = tmp_path / "gt_img_1.txt"
    path.write_text(f"{QUAD},ok\n{line}\n", encoding="utf-8")
    problems: list[Problem] = []

    assert len(read_gt(path, problems=problems)) == 1, "the good line is kept"
    assert [(p.file, p.line) for p in problems] == [(str(path), 2)]
    assert expected in problems[0].message and "line skipped" in problems[0].message

    with pytest.raises(AnnotationError) as info:
        read_gt(path, strict=True)
    assert (info.value.file, info.value.line) == (str(path), 2) and expected in str(info.value)


GEOMETRY = {
    # name: (polygon, ignored reason or None for a usable target)
    "outside the image": ([[-50, -50], [-10, -50], [-10, -20], [-50, -20]], None),
    "across the border": ([[-20, 10], [40, 10], [40, 40], [-20, 40]], None),
    "repeated points": ([[10, 10], [10, 10], [10, 10], [10, 10]], "degenerate"),
    "collinear points": ([[0, 0], [10, 10], [20, 20], [30, 30]], "degenerate"),
    "two points": ([[0, 0], [30, 30]], "degenerate"),
    "one point": ([[5, 5]], "degenerate"),
    "corrupt coordinates": ([[1e20, 1e20], [2e20, 1e20], [2e20, 2e20], [1e20, 2e20]], "degenerate"),
    "crossing edges (bow-tie)": ([[10, 10], [60, 10], [10, 40], [60, 40]], None),
    "anticlockwise": ([[10, 40], [60, 40], [60, 10], [10, 10]], None),
    "too thin": ([[10, 10], [60, 10], [60, 13], [10, 13]], "too_small"),
    "self-crossing pentagon": (
        [[0, 0], [40, 0], [0, 30], [40, 30], [20, -10]],
        "self_intersecting",
    ),
}


@pytest.mark.parametrize("name", sorted(GEOMETRY))
def test_every_kind_of_polygon_gives_finite_maps(name: str) -> None:
    points, reason = GEOMETRY[name]
    polygon = np.array(points, np.float32)
    with np.errstate(all="raise"):
        maps = make_label_maps(48, 64, [polygon], [False])
    assert_finite_maps(maps, 48, 64)
    assert dict(maps.ignored).get(0) == reason, maps.ignored


def test_a_polygon_that_splits_when_shrunk_gives_every_piece() -> None:
    # A dumbbell: two 30x30 squares joined by a 4 px neck that the inward offset removes.
    dumbbell = np.array(
        [[0, 0], [30, 0], [30, 13], [50, 13], [50, 0], [80, 0], [80, 30], [50, 30], [50, 17],
         [30, 17], [30, 30], [0, 30]],
        np.float32,
    )  # fmt: skip
    with np.errstate(all="raise"):
        maps = make_label_maps(40, 90, [dumbbell], [False])
    assert_finite_maps(maps, 40, 90)
    pieces, _ = cv2.findContours(
        maps.shrink_map.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE
    )
    assert len(pieces) == 2, "both halves keep a shrink target"


def test_corrupt_coordinates_do_not_break_the_training_crop(tmp_path: Path) -> None:
    root = one_folder_set(
        tmp_path, {"img_1": "1e20,1e20,2e20,1e20,2e20,2e20,1e20,2e20,far\n" + QUAD + ",word\n"}
    )
    config = DataConfig(crop_size=64, scale_range=(2.0, 3.0))
    dataset = DetectionDataset(root, config, train=True)
    for epoch in range(4):
        dataset.set_epoch(epoch)
        with np.errstate(all="raise"):
            item = dataset[0]
        assert all(torch.isfinite(item[key]).all() for key in MAPS)
    assert not dataset.skipped


def test_augment_survives_every_kind_of_polygon() -> None:
    image = np.full((48, 64, 3), 200, np.uint8)
    polygons = [np.array(points, np.float32) for points, _ in GEOMETRY.values()]
    config = DataConfig(crop_size=64, scale_range=(0.5, 3.0), rotate_degrees=30)
    for seed in range(10):
        with np.errstate(all="raise"):
            crop = augment(
                image, polygons, [False] * len(polygons), config, np.random.default_rng(seed)
            )
            maps = make_label_maps(64, 64, crop.polygons, crop.ignore)
        assert crop.image.shape == (64, 64, 3)
        assert_finite_maps(maps, 64, 64)


def test_a_failure_making_targets_names_the_file_and_is_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root = one_folder_set(tmp_path, {"img_1": QUAD + ",a\n", "img_2": QUAD + ",b\n"})
    real = dataset_module.make_label_maps

    def failing(height, width, polygons, ignore, **kwargs):
        if failing.calls == 0:
            failing.calls += 1
            raise ValueError("a geometry library failed")
        return real(height, width, polygons, ignore, **kwargs)

    failing.calls = 0
    monkeypatch.setattr(dataset_module, "make_label_maps", failing)
    dataset = DetectionDataset(root, DataConfig(crop_size=64, max_bad_fraction=0.5), train=True)

    with caplog.at_level(logging.WARNING):
        item = dataset[0]
    assert item["path"].endswith("img_2.png"), "the next sample stands in"
    [(file, reason)] = dataset.skipped
    assert file.endswith("img_1.png") and "gt_img_1.txt" in reason and "ValueError" in reason
    assert "img_1.png" in caplog.text

    failing.calls = 0
    strict = DetectionDataset(root, DataConfig(crop_size=64, strict=True), train=True)
    with pytest.raises(DBNetError, match=r"img_1\.png.*a geometry library failed"):
        strict[0]


@pytest.mark.parametrize("case", TRAINABLE_CASES)
def test_case_batches_give_finite_loss_and_gradients(cases_dir: Path, case: str) -> None:
    config = tiny_model_config()
    dataset = DetectionDataset(cases_dir / case, config.data, train=True)
    with np.errstate(all="raise"):
        batch = collate([dataset[index] for index in range(len(dataset))])
    torch.manual_seed(0)
    model = build_model(config.model).train()

    losses = DBLoss(config.loss)(model(batch["image"]), batch)
    losses["loss"].backward()

    assert all(torch.isfinite(value) for value in losses.values()), losses
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert not dataset.skipped, dataset.skipped


# ---- 1. images ---------------------------------------------------------------------------


def _write_kind(path: Path, kind: str) -> None:
    gray = (np.arange(30 * 40).reshape(30, 40) % 256).astype(np.uint8)
    rgb = np.stack([gray, gray[::-1], 255 - gray], axis=2)
    if kind == "gray":
        Image.fromarray(gray).save(path)
    elif kind == "gray+alpha":
        Image.fromarray(np.stack([gray, gray], axis=2), "LA").save(path)
    elif kind == "rgba":
        Image.fromarray(np.dstack([rgb, gray])).save(path)
    elif kind == "palette+transparency":
        Image.fromarray(rgb).convert("P").save(path, transparency=0)
    elif kind == "1-bit":
        Image.fromarray(gray > 128).save(path)
    elif kind == "cmyk":
        Image.fromarray(rgb).convert("CMYK").save(path)
    elif kind in ("16-bit gray", "16-bit rgb", "16-bit rgba"):
        wide = gray.astype(np.uint16) * 257
        channels = {"16-bit gray": [wide], "16-bit rgb": [wide] * 3, "16-bit rgba": [wide] * 4}
        cv2.imwrite(str(path), np.squeeze(np.stack(channels[kind], axis=2)))
    elif kind == "float tiff":
        cv2.imwrite(str(path), gray.astype(np.float32) / 255)
    elif kind == "multi-frame":
        frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
        frames[0].save(path, save_all=True, append_images=frames[1:])
    elif kind == "exif rotated":
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90: the stored 40x30 image stands 30 wide, 40 high
        Image.fromarray(rgb).save(path, exif=exif)


IMAGE_KINDS = {
    "gray": "png",
    "gray+alpha": "png",
    "rgba": "png",
    "palette+transparency": "gif",
    "1-bit": "png",
    "cmyk": "jpg",
    "16-bit gray": "png",
    "16-bit rgb": "png",
    "16-bit rgba": "png",
    "float tiff": "tiff",
    "multi-frame": "tiff",
    "exif rotated": "jpg",
}


@pytest.mark.parametrize("kind", sorted(IMAGE_KINDS))
def test_every_kind_of_image_reads_as_rgb8(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"img.{IMAGE_KINDS[kind]}"
    _write_kind(path, kind)

    image = read_image(path)

    expected = (40, 30, 3) if kind == "exif rotated" else (30, 40, 3)
    assert image.shape == expected and image.dtype == np.uint8, (image.shape, image.dtype)
    assert image.flags.writeable and image.flags.c_contiguous
    assert image.max() > image.min(), "the content survived the conversion"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", r"empty file \(0 bytes\)"),
        (b"this is a text file", "cannot decode image"),
        (None, "cannot decode image"),  # the first half of a real JPEG
    ],
    ids=["zero-byte", "not an image", "truncated"],
)
def test_unreadable_images_name_the_file(
    tmp_path: Path, content: bytes | None, expected: str
) -> None:
    path = tmp_path / "img_1.jpg"
    if content is None:
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(path)
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=expected) as info:
        read_image(path)
    assert info.value.file == str(path)


def test_reading_a_large_image_needs_little_more_than_its_pixels(tmp_path: Path) -> None:
    path = tmp_path / "large.png"
    cv2.imwrite(str(path), np.full((2000, 3000, 3), 180, np.uint8))
    pixels = 2000 * 3000 * 3

    tracemalloc.start()
    try:
        image = read_image(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # Converted in strips: beyond the result, a few MB whatever the size (one more copy of
    # the whole image, or two, without them).
    assert image.shape == (2000, 3000, 3)
    assert peak - pixels < 12 * 2**20, f"{(peak - pixels) / 2**20:.0f} MB beyond the pixels"


@pytest.mark.parametrize(
    ("height", "width", "side", "size"),
    [(8000, 10000, "short", 736), (8000, 10000, "long", 1280), (1, 100000, "short", 736)],
)
def test_eval_size_of_huge_or_extreme_images_stays_bounded(
    height: int, width: int, side: str, size: int
) -> None:
    new_h, new_w = eval_size(height, width, side, size)
    assert new_h % 32 == 0 and new_w % 32 == 0 and min(new_h, new_w) >= 32
    assert max(new_h, new_w) <= max(MAX_EVAL_SIDE, size)


# ---- 1. sets -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["07_all_dont_care", "08_negative_image_empty_gt"])
def test_training_refuses_a_set_without_usable_instances(
    tmp_path: Path, cases_dir: Path, case: str
) -> None:
    config_path = write_config(tmp_path / "c.yaml", tiny_values(tmp_path, cases_dir / case))
    images = len(list((cases_dir / case).glob("img_*")))

    result = cli("train", "--config", config_path)

    assert_one_line_error(result, f"{images} images", "0 usable")
    assert not (tmp_path / "runs").exists(), "a refused run leaves no folder"


def test_unpaired_files_are_counted_and_strict_refuses_them(tmp_path: Path) -> None:
    root = one_folder_set(tmp_path / "set", {"img_1": QUAD + ",a\n"})
    Image.new("RGB", (20, 20)).save(root / "img_2.png")  # no gt
    (root / "gt_img_3.txt").write_text(QUAD + ",b\n", encoding="utf-8")  # no image

    report = audit_dataset(root)
    assert report.images == 1
    assert sorted(Path(p.file).name for p in report.errors) == ["gt_img_3.txt", "img_2.png"]
    assert cli("data", "check", root).exit_code == 0
    assert cli("data", "check", root, "--strict").exit_code == 1

    values = tiny_values(tmp_path, root)
    values["train"]["batch_size"] = 1
    values["data"]["strict"] = True
    result = cli("train", "--config", write_config(tmp_path / "c.yaml", values))
    assert_one_line_error(result, "img_2.png")


@pytest.mark.parametrize("kind", ["empty folder", "missing folder"])
def test_empty_and_missing_sets(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "set"
    if kind == "empty folder":
        root.mkdir()
    values = tiny_values(tmp_path, root)
    result = cli("train", "--config", write_config(tmp_path / "c.yaml", values))
    assert_one_line_error(result, str(root))


# ---- 1. maps and detections --------------------------------------------------------------


def test_result_files_with_garbage_lines_are_read_leniently(tmp_path: Path) -> None:
    gts, results = tmp_path / "gts", tmp_path / "res"
    gts.mkdir()
    results.mkdir()
    (gts / "gt_img_1.txt").write_text(f"{QUAD},word\n", encoding="utf-8")
    (results / "res_img_1.txt").write_text(f"garbage\n{QUAD},0.9\n1,2,3,4\n\n", encoding="utf-8")
    problems: list[Problem] = []

    polygons = read_result_file(results / "res_img_1.txt", problems=problems)

    assert len(polygons) == 1
    assert [(Path(p.file).name, p.line) for p in problems] == [
        ("res_img_1.txt", 1),
        ("res_img_1.txt", 3),
    ]
    scores = evaluate_folders(gts, results)
    assert (scores["matched"], scores["skipped_lines"]) == (1, 2)
    with pytest.raises(AnnotationError, match="res_img_1.txt:1"):
        evaluate_folders(gts, results, strict=True)

    result = cli("eval", "--gt-dir", gts, "--pred-dir", results, "--json")
    assert result.exit_code == 0, result.output


def test_absurd_and_degenerate_result_polygons_score_without_warnings() -> None:
    gt = [np.array([[10, 10], [90, 10], [90, 40], [10, 40]], np.float64)]
    detections = [
        np.array([[1e308, 1e308], [-1e308, 1e308], [-1e308, -1e308], [1e308, -1e308]]),
        np.array([[np.nan, 1], [2, 3], [4, 5], [6, 7]]),
        np.array([[5, 5], [5, 5], [5, 5], [5, 5]]),
        np.array([[0, 0], [10, 10], [20, 20], [30, 30]]),
        np.array([[10, 10], [90, 40], [90, 10], [10, 40]]),  # bow-tie
        gt[0].copy(),
    ]
    metric = DetectionMetric()
    with np.errstate(all="raise"):
        counts = metric.update(gt, [False], detections)
    assert counts["matched"] == 1 and counts["det_care"] == len(detections)


# ---- 1. one-line errors from the CLI -----------------------------------------------------


def _write_bad_config(path: Path, kind: str) -> None:
    if kind == "typo'd key":
        path.write_text("data:\n  crop_sise: 64\n", encoding="utf-8")
    elif kind == "wrong type":
        path.write_text("train:\n  batch_size: two\n", encoding="utf-8")
    elif kind == "malformed YAML":
        path.write_text("train: [1, 2\n", encoding="utf-8")
    elif kind == "binary file":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "latin-1 text":
        path.write_bytes("train:\n  run_name: caf\xe9\n".encode("latin-1"))
    elif kind == "a list":
        path.write_text("- 1\n- 2\n", encoding="utf-8")


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("typo'd key", "did you mean data.crop_size"),
        ("wrong type", "train.batch_size: got 'two', expected an integer"),
        ("malformed YAML", "line 2, column 1"),
        ("binary file", "not a YAML text file"),
        ("latin-1 text", "not UTF-8"),
        ("a list", "expected a mapping of sections"),
    ],
)
def test_bad_configs_are_one_line(tmp_path: Path, kind: str, expected: str) -> None:
    path = tmp_path / "c.yaml"
    _write_bad_config(path, kind)

    for command in (
        ["train", "--config", path],
        ["data", "show", tmp_path, "-o", "x.png", "--config", path],
    ):
        error = assert_one_line_error(cli(*command), expected)
        assert str(path) in error, "the file is named"


def test_a_yaml_tag_that_would_run_code_is_refused(tmp_path: Path) -> None:
    created = tmp_path / "created"
    path = tmp_path / "c.yaml"
    path.write_text(f"train: !!python/object/apply:os.system ['touch {created}']\n", "utf-8")
    with pytest.raises(ConfigError, match="could not determine a constructor"):
        load_config(path)
    assert not created.exists()


@pytest.mark.parametrize("option", ["--shrink-ratio=1.5", "--shrink-ratio=0", "--min-text-size=-1"])
def test_data_check_refuses_option_values_out_of_range(cases_dir: Path, option: str) -> None:
    name = {"--shrink-ratio": "shrink ratio", "--min-text-size": "minimum text size"}
    expected = name[option.split("=")[0]]
    assert_one_line_error(cli("data", "check", cases_dir / "09_bom_crlf_gt", option), expected)


def _bad_checkpoint(path: Path, kind: str, good: Path) -> None:
    if kind == "text file":
        path.write_text("weights\n", encoding="utf-8")
    elif kind == "empty file":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[:2000])
    elif kind == "plain pickle":
        path.write_bytes(pickle.dumps({"model": {}, "config": {}}))
    elif kind == "weights not tensors":
        state = load_checkpoint(good)
        torch.save({**state, "model": ["not", "weights"]}, path)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("text file", "not a readable checkpoint"),
        ("empty file", "the file is empty"),
        ("truncated", "not a readable checkpoint"),
        ("plain pickle", "nothing was unpickled"),
        ("weights not tensors", "not a mapping of names to tensors"),
    ],
)
def test_bad_checkpoints_are_one_line_in_every_command(
    tmp_path: Path, checkpoint: Path, kind: str, expected: str
) -> None:
    path = tmp_path / "bad.pt"
    _bad_checkpoint(path, kind, checkpoint)
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 40), "white").save(images / "a.png")

    commands = [
        ["eval", "--checkpoint", path, "--data", images, "--out", tmp_path / "eval"],
        ["predict", images, "--checkpoint", path, "--out", tmp_path / "pred"],
        ["export", "--checkpoint", path, "--out", tmp_path / "m.onnx"],
        ["train", "--resume", path],
    ]
    for command in commands:
        error = assert_one_line_error(cli(*command), expected)
        assert str(path) in error


def test_a_checkpoint_of_another_architecture_is_refused_at_resume(
    tmp_path: Path, checkpoint: Path
) -> None:
    values = tiny_values(tmp_path, make_dataset(tmp_path / "data", count=2, size=64))
    values["model"]["backbone"] = "resnet18"
    values["model"]["width"] = 1.0
    config_path = write_config(tmp_path / "c.yaml", values)
    result = cli("train", "--config", config_path, "--resume", checkpoint)
    assert_one_line_error(result, "another architecture", "'mobilenet_v3_small'", "'resnet18'")


def test_a_checkpoint_with_a_garbled_training_state_is_refused_at_resume(
    tmp_path: Path, checkpoint: Path
) -> None:
    path = tmp_path / "garbled.pt"
    save_checkpoint(path, {**load_checkpoint(checkpoint), "optimizer": "?", "epoch": "x"})
    values = tiny_values(tmp_path, make_dataset(tmp_path / "data", count=2, size=64))
    values["model"].update(width=0.5, inner_channels=16)
    result = cli("train", "--config", write_config(tmp_path / "c.yaml", values), "--resume", path)
    assert_one_line_error(result, str(path), "cannot resume")


def test_a_file_that_is_not_onnx_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "model.onnx"
    fake.write_text("not a model", encoding="utf-8")
    result = cli("predict", tmp_path, "--onnx", fake, "--out", tmp_path / "out")
    assert_one_line_error(result, str(fake), "cannot load the ONNX model")


def test_wrong_option_values(tmp_path: Path, checkpoint: Path) -> None:
    assert_one_line_error(
        cli("export", "--checkpoint", checkpoint, "--out", tmp_path / "m.onnx", "--opset", "99"),
        "opset: got 99",
    )
    assert not (tmp_path / "m.onnx").exists()
    assert_one_line_error(
        cli("predict", tmp_path, "--checkpoint", checkpoint, "-o", tmp_path, "--device", "tpu"),
        "device: got 'tpu'",
    )
    assert_one_line_error(
        cli("synth", "--out", tmp_path / "s", "--count", "1", "--size", "100000x100000"),
        "from 64 to 8192",
    )
    assert_one_line_error(
        cli(
            "predict",
            tmp_path,
            "--checkpoint",
            checkpoint,
            "-o",
            tmp_path,
            "--set",
            "postprocess.box_thresh=7",
        ),
        "postprocess.box_thresh: got 7.0",
    )


def test_outputs_in_a_place_that_cannot_be_written(tmp_path: Path, checkpoint: Path) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("", encoding="utf-8")
    assert_one_line_error(
        cli("export", "--checkpoint", checkpoint, "--out", a_file / "m.onnx"), str(a_file)
    )
    assert_one_line_error(
        cli("synth", "--out", a_file / "set", "--count", "1", "--size", "64x64"), str(a_file)
    )


def test_a_read_only_folder_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests may run as root, for whom permissions do not apply: the refusal is simulated.
    def read_only(self: Path, *args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    values = tiny_values(tmp_path, make_dataset(tmp_path / "data", count=2, size=64))
    config_path = write_config(tmp_path / "c.yaml", values)
    monkeypatch.setattr(Path, "mkdir", read_only)
    result = cli("train", "--config", config_path)
    assert_one_line_error(result, "Read-only file system", str(tmp_path / "runs"))


def test_errors_without_a_path_are_not_hidden() -> None:
    with pytest.raises(OSError, match="no file involved"), user_errors():
        raise OSError("no file involved")


# ---- 2. training never dies silently ----------------------------------------------------


def test_a_data_error_mid_run_keeps_the_steps_done(tmp_path: Path) -> None:
    train_dir = make_dataset(tmp_path / "data", count=4, size=64)
    (train_dir / "images" / "img_4.jpg").write_bytes(b"broken")
    config = tiny_config(
        tmp_path, train_dir, overrides=["data.max_bad_fraction=0.0", "train.epochs=3"]
    )

    with pytest.raises(DBNetError, match="img_4.jpg"):
        train(config)

    [run_dir] = (tmp_path / "runs").iterdir()
    assert (run_dir / "checkpoints" / "last.pt").is_file(), "the steps done are saved"


def test_a_broken_validation_set_stops_the_run_keeping_its_steps(tmp_path: Path) -> None:
    train_dir = make_dataset(tmp_path / "train", count=2, size=64)
    val_dir = make_dataset(tmp_path / "val", count=2, size=64, seed=1)
    (val_dir / "images" / "img_2.jpg").write_bytes(b"broken")
    overrides = ["train.val_every_steps=2", "train.max_steps=4", "train.epochs=10"]

    with pytest.raises(DBNetError, match="img_2.jpg"):
        train(tiny_config(tmp_path, train_dir, val_dir, overrides=overrides))

    [run_dir] = (tmp_path / "runs").iterdir()
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 2


# ---- 4. untrusted files ------------------------------------------------------------------


def test_zip_members_and_names_with_path_components_are_refused(tmp_path: Path) -> None:
    (tmp_path / "gts").mkdir()
    (tmp_path / "gts" / "gt_img_1.txt").write_text(f"{QUAD},word\n", encoding="utf-8")
    for member in (
        "../res_img_1.txt",
        "/tmp/res_img_1.txt",
        "sub/res_img_1.txt",
        "..\\res_img_1.txt",
    ):
        archive = tmp_path / "res.zip"
        with zipfile.ZipFile(archive, "w") as out:
            out.writestr(member, f"{QUAD}\n")
        with pytest.raises(DBNetError, match="has a folder part"):
            evaluate_folders(tmp_path / "gts", archive)


class _CreatesAFile:
    """Unpickling this object would create a file: what a malicious weights file does."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (str(self.path), "w"))


def test_a_crafted_pretrained_file_is_refused_in_one_line(tmp_path: Path) -> None:
    created = tmp_path / "created_by_unpickling"
    path = tmp_path / "backbone.pth"
    torch.save({"conv.weight": torch.zeros(1), "x": _CreatesAFile(created)}, path)
    config = ModelConfig(backbone="mobilenet_v3_small", inner_channels=16, pretrained=str(path))

    with pytest.raises(CheckpointError) as info:
        build_model(config)

    message = str(info.value)
    assert not created.exists(), "loading ran code from the file"
    assert "\n" not in message and "not unpickled" in message, message
    assert "weights_only" not in message, "no advice to load an untrusted file unsafely"
