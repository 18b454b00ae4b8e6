"""Reading gt files and images: every accepted format, every refusal, the shared cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dbnet.data.io import (
    Problem,
    find_pairs,
    image_size,
    load_sample,
    read_gt,
    read_image,
)
from dbnet.errors import AnnotationError, ImageReadError

# NumPy warnings (overflow, invalid value, division by zero) fail the tests: no hidden NaN.
pytestmark = pytest.mark.filterwarnings("error")

QUAD = "10,20,110,20,110,60,10,60"


def write_gt(tmp_path: Path, content: str | bytes, name: str = "gt_img_1.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def parsed(path: Path, **kwargs) -> list[tuple[list[list[float]], str, bool, int]]:
    return [(i.points.tolist(), i.text, i.ignore, i.line) for i in read_gt(path, **kwargs)]


# ---- gt files: accepted variations -------------------------------------------------------


def test_bom_crlf_trailing_spaces_case_matches_expected(cases_dir: Path) -> None:
    folder = cases_dir / "09_bom_crlf_gt"
    expected = json.loads((folder / "expected_parsed.json").read_text(encoding="utf-8"))
    problems: list[Problem] = []

    instances = read_gt(folder / "gt_img_9.txt", problems=problems)

    got = [{"points": i.points.tolist(), "text": i.text, "ignore": i.ignore} for i in instances]
    assert got == expected
    assert problems == []
    assert all(i.points.dtype == np.float32 and i.points.shape == (4, 2) for i in instances)


@pytest.mark.parametrize("name", ["gt_img_8.txt", "gt_img_81.txt"])
def test_empty_and_blank_gt_files_have_no_instances(cases_dir: Path, name: str) -> None:
    problems: list[Problem] = []
    assert read_gt(cases_dir / "08_negative_image_empty_gt" / name, problems=problems) == []
    assert problems == []


def test_bom_crlf_blank_lines_and_stray_whitespace(tmp_path: Path) -> None:
    content = f"\ufeff {QUAD} , word \r\n\r\n   \r\n{QUAD},second\r\n\r\n"
    path = write_gt(tmp_path, content)

    result = parsed(path)

    quad = [[10, 20], [110, 20], [110, 60], [10, 60]]
    assert result == [(quad, "word", False, 1), (quad, "second", False, 4)]


def test_lone_cr_line_endings(tmp_path: Path) -> None:
    path = write_gt(tmp_path, f"{QUAD},a\r{QUAD},b\r")
    assert [text for _, text, _, _ in parsed(path)] == ["a", "b"]


def test_float_and_signed_coordinates(tmp_path: Path) -> None:
    path = write_gt(tmp_path, "10.5,20.25,110,2e1,110.0,60,-1.5,+60,word\n")
    ((points, text, _, _),) = parsed(path)
    assert points == [[10.5, 20.25], [110, 20], [110, 60], [-1.5, 60]]
    assert text == "word"


def test_transcription_with_commas_is_kept_whole(tmp_path: Path) -> None:
    path = write_gt(tmp_path, f"{QUAD},Main, St,  5\n")
    ((points, text, _, _),) = parsed(path)
    assert len(points) == 4
    assert text == "Main, St,  5"


@pytest.mark.parametrize("text", ["100,000", "36,000,000", "2015", "-70", "1.50"])
def test_numeric_transcription_of_a_quad(tmp_path: Path, text: str) -> None:
    path = write_gt(tmp_path, f"{QUAD},{text}\n")
    ((points, got, _, _),) = parsed(path)
    assert len(points) == 4, "a numeric transcription must not become extra points"
    assert got == text


@pytest.mark.parametrize(
    ("text", "ignore"),
    [("###", True), (" ### ", True), ("###x", False), ("x###", False), ("#", False)],
)
def test_only_exactly_three_hashes_is_dont_care(tmp_path: Path, text: str, ignore: bool) -> None:
    path = write_gt(tmp_path, f"{QUAD},{text}\n")
    (instance,) = read_gt(path)
    assert instance.ignore is ignore
    assert instance.text == text.strip()


def test_n_point_polygons(tmp_path: Path) -> None:
    ten = ",".join(str(v) for v in range(20))
    path = write_gt(tmp_path, f"{ten},curved, word\n{QUAD},quad\n")

    first, second = read_gt(path)

    assert first.points.shape == (10, 2)
    assert first.points[-1].tolist() == [18, 19]
    assert first.text == "curved, word"
    assert second.points.shape == (4, 2)


def test_numeric_transcription_in_a_polygon_file(tmp_path: Path) -> None:
    ten = ",".join(str(v) for v in range(20))
    path = write_gt(tmp_path, f"{ten},word\n{ten},2015\n")

    _, numeric = read_gt(path)

    assert numeric.points.shape == (10, 2)
    assert numeric.text == "2015"


@pytest.mark.parametrize(("line", "k"), [("1,2,3,4,5,6,tri", 3), ("5,5,dot", 1)])
def test_short_polygons_are_read_for_the_labels_to_judge(tmp_path: Path, line: str, k: int) -> None:
    path = write_gt(tmp_path, line + "\n")
    (instance,) = read_gt(path, strict=True)
    assert instance.points.shape == (k, 2)


def test_totaltext_sample_loads_curved_polygons(shared_data: Path) -> None:
    pairs = find_pairs(shared_data / "totaltext_sample")
    assert len(pairs) == 1

    sample = load_sample(*pairs[0])

    assert [i.points.shape for i in sample.instances] == [(10, 2), (10, 2)]
    assert [i.text for i in sample.instances] == ["kel", "naughty"]
    assert sample.image.shape == (960, 1280, 3)


def test_latin1_fallback_is_recorded(tmp_path: Path) -> None:
    path = write_gt(tmp_path, f"{QUAD},ok\n{QUAD},caf\xe9\n".encode("latin-1"))
    problems: list[Problem] = []

    instances = read_gt(path, problems=problems)

    assert [i.text for i in instances] == ["ok", "café"]
    (problem,) = problems
    assert (problem.file, problem.line, problem.severity) == (str(path), 2, "warning")
    assert "Latin-1" in problem.message


def test_utf16_with_bom(tmp_path: Path) -> None:
    path = write_gt(tmp_path, f"{QUAD},wörd\r\n".encode("utf-16"))
    assert [i.text for i in read_gt(path)] == ["wörd"]


# ---- gt files: malformed lines -----------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("10,20,30,40,50,word", "odd number of coordinates (5)"),
        ("10,20,30,x,50,60,70,80,word", "field 4 ('x') is not a number"),
        ("word,10,20", "field 1 ('word') is not a number"),
        ("nan,1,2,3,4,5,6,7,word", "field 1 ('nan') is not a number"),
        ("1e39,1,2,3,4,5,6,7,word", "too large"),
    ],
)
def test_malformed_line_is_skipped_and_recorded(tmp_path: Path, line: str, expected: str) -> None:
    path = write_gt(tmp_path, f"{QUAD},good\n{line}\n{QUAD},after\n")
    problems: list[Problem] = []

    instances = read_gt(path, problems=problems)

    assert [i.text for i in instances] == ["good", "after"]
    assert [i.line for i in instances] == [1, 3]
    (problem,) = problems
    assert (problem.file, problem.line, problem.severity) == (str(path), 2, "error")
    assert expected in problem.message


def test_malformed_line_raises_when_strict(tmp_path: Path) -> None:
    path = write_gt(tmp_path, f"{QUAD},good\n10,20,30,40,50,word\n")

    with pytest.raises(AnnotationError) as info:
        read_gt(path, strict=True)

    assert info.value.file == str(path)
    assert info.value.line == 2
    assert "odd number of coordinates" in str(info.value)
    assert f"{path}:2" in str(info.value)


def test_missing_gt_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "gt_img_404.txt"
    with pytest.raises(FileNotFoundError, match="gt_img_404.txt"):
        read_gt(missing)


# ---- images ------------------------------------------------------------------------------


def test_rgba_with_transparent_colour_is_composited_onto_white(cases_dir: Path) -> None:
    folder = cases_dir / "13_rgba_transparent"
    (instance,) = read_gt(folder / "gt_img_13.txt")

    image = read_image(folder / "img_13.png")

    assert image.shape == (120, 400, 3) and image.dtype == np.uint8
    x0, y0 = instance.points.min(axis=0).astype(int)
    x1, y1 = instance.points.max(axis=0).astype(int)
    inside = image[y0:y1, x0:x1]
    outside = np.ones(image.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    assert inside.min() < 50, "the glyphs must be dark"
    assert image[outside].mean() > 240, "the transparent background must be white"


@pytest.mark.parametrize("name", ["img_16.png", "img_161.png"])
def test_tiny_images(cases_dir: Path, name: str) -> None:
    folder = cases_dir / "16_tiny_image"
    with Image.open(folder / name) as original:
        width, height = original.size

    image = read_image(folder / name)

    assert image.shape == (height, width, 3)
    assert image_size(folder / name, verify=True) == (height, width)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    stored = np.zeros((20, 40, 3), np.uint8)  # stored landscape: left red, right blue
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)

    image = read_image(path)

    assert image.shape == (40, 20, 3), "orientation 6 turns a 40x20 image into 20x40"
    assert image_size(path) == (40, 20)
    top, bottom = image[5, 10].astype(int), image[35, 10].astype(int)
    assert top[0] > 200 and top[2] < 60, f"the red half must be on top, got {top}"
    assert bottom[2] > 200 and bottom[0] < 60, f"the blue half must be below, got {bottom}"


def test_16_bit_grayscale_keeps_the_high_byte(tmp_path: Path) -> None:
    values = np.arange(256, dtype=np.uint16).reshape(16, 16)
    path = tmp_path / "deep.png"
    Image.fromarray((values << 8) | 0x7F).save(path)

    image = read_image(path)

    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[:, :, 0], values)
    np.testing.assert_array_equal(image[:, :, 2], values)


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    values = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    path = tmp_path / "gray.png"
    Image.fromarray(values, mode="L").save(path)

    image = read_image(path)

    assert image.shape == (8, 8, 3)
    for channel in range(3):
        np.testing.assert_array_equal(image[:, :, channel], values)


def test_gray_with_alpha_is_composited_onto_white(tmp_path: Path) -> None:
    la = np.zeros((2, 3, 2), np.uint8)
    la[..., 1] = [[0, 255, 128], [0, 255, 128]]  # clear, opaque black, half
    path = tmp_path / "la.png"
    Image.fromarray(la, mode="LA").save(path)

    image = read_image(path)

    assert image.shape == (2, 3, 3)
    assert image[0, :, 0].tolist() == [255, 0, 127]


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    palette_image = Image.new("P", (4, 2))
    palette_image.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    palette_image.putdata([0, 1, 0, 1, 1, 1, 0, 0])
    plain, clear = tmp_path / "plain.png", tmp_path / "clear.png"
    palette_image.save(plain)
    palette_image.save(clear, transparency=0)

    assert read_image(plain)[0, :2].tolist() == [[0, 0, 0], [200, 10, 10]]
    assert read_image(clear)[0, :2].tolist() == [[255, 255, 255], [200, 10, 10]]


def test_output_is_writable_rgb(tmp_path: Path) -> None:
    path = tmp_path / "rgb.png"
    Image.new("RGB", (5, 3), (1, 2, 3)).save(path)

    image = read_image(path)

    assert image.flags.writeable and image.flags.c_contiguous
    assert image[0, 0].tolist() == [1, 2, 3]


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated_image_raises_naming_the_file(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    whole = tmp_path / f"whole{suffix}"
    Image.fromarray(noise).save(whole)
    broken = tmp_path / f"broken{suffix}"
    broken.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])

    with pytest.raises(ImageReadError, match=f"broken{suffix}"):
        read_image(broken)
    with pytest.raises(ImageReadError, match=f"broken{suffix}"):
        image_size(broken, verify=True)


@pytest.mark.parametrize(
    ("content", "message"), [(b"not an image", "cannot decode"), (None, "no such")]
)
def test_unreadable_or_missing_image(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "img_1.jpg"
    if content is not None:
        path.write_bytes(content)

    with pytest.raises(ImageReadError, match=message) as info:
        read_image(path)

    assert info.value.file == str(path)


# ---- datasets ----------------------------------------------------------------------------


def make_dataset(root: Path, names: list[str], split_folders: bool) -> None:
    image_dir = root / "images" if split_folders else root
    gt_dir = root / "gts" if split_folders else root
    image_dir.mkdir(parents=True, exist_ok=True)
    gt_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (32, 16)).save(image_dir / f"{name}.png")
        (gt_dir / f"gt_{name}.txt").write_text(f"{QUAD},{name}\n", encoding="utf-8")


@pytest.mark.parametrize("split_folders", [True, False])
def test_find_pairs_in_both_layouts_in_natural_order(tmp_path: Path, split_folders: bool) -> None:
    make_dataset(tmp_path, ["img_10", "img_2", "img_1"], split_folders)
    (tmp_path / "README.txt").write_text("not a gt file")

    pairs = find_pairs(tmp_path)

    assert [image.stem for image, _ in pairs] == ["img_1", "img_2", "img_10"]
    assert all(gt.name == f"gt_{image.stem}.txt" for image, gt in pairs)
    sample = load_sample(*pairs[0])
    assert sample.image.shape == (16, 32, 3)
    assert sample.instances[0].text == "img_1"
    assert sample.gt_path == pairs[0][1]


def test_unpaired_files_are_problems(tmp_path: Path) -> None:
    make_dataset(tmp_path, ["img_1"], split_folders=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "img_2.png")
    (tmp_path / "gts" / "gt_img_3.txt").write_text(f"{QUAD},x\n")
    problems: list[Problem] = []

    pairs = find_pairs(tmp_path, problems=problems)

    assert [image.name for image, _ in pairs] == ["img_1.png"]
    files = sorted(Path(p.file).name for p in problems)
    assert files == ["gt_img_3.txt", "img_2.png"]
    assert all(p.line is None and p.severity == "error" for p in problems)

    with pytest.raises(AnnotationError, match="img_2.png"):
        find_pairs(tmp_path, strict=True)


def test_two_images_with_one_gt_name(tmp_path: Path) -> None:
    make_dataset(tmp_path, ["img_1"], split_folders=False)
    Image.new("RGB", (8, 8)).save(tmp_path / "img_1.jpg")
    problems: list[Problem] = []

    pairs = find_pairs(tmp_path, problems=problems)

    assert len(pairs) == 1
    (problem,) = problems
    assert "already uses gt_img_1.txt" in problem.message


def test_find_pairs_on_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        find_pairs(tmp_path / "nowhere")


def test_load_sample_without_gt(tmp_path: Path) -> None:
    path = tmp_path / "img.png"
    Image.new("RGB", (3, 2)).save(path)

    sample = load_sample(path)

    assert sample.instances == [] and sample.gt_path is None
    assert sample.image.shape == (2, 3, 3)
