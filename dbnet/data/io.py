"""Reading images and ICDAR 2015 style ground-truth files.

A dataset is a folder in one of two layouts:

- ``images/img_N.jpg`` beside ``gts/gt_img_N.txt``;
- one folder holding both ``img_N.jpg`` and ``gt_img_N.txt``.

A gt file holds one text instance a line: ``x1,y1,x2,y2,x3,y3,x4,y4,transcription``, or an
N-point polygon ``x1,y1,...,xn,yn,transcription``. A transcription of exactly ``###`` marks a
don't-care region. Images are decoded with Pillow, always to (H, W, 3) uint8 RGB.

Readers are lenient by default: a malformed line is skipped, logged and recorded as a
:class:`Problem` in the ``problems`` list the caller passes; with ``strict=True`` it raises
:class:`~dbnet.errors.AnnotationError` instead.
"""

from __future__ import annotations

import errno
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from dbnet.errors import AnnotationError, ImageReadError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")
DONT_CARE = "###"

# A coordinate: integer or decimal, optional sign and exponent. Deliberately narrower than
# float(), which would also accept transcriptions such as "nan", "inf" or "1_000".
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_QUAD_FIELDS = 8
_EXPECTED = "expected x1,y1,...,x4,y4,transcription or x1,y1,...,xn,yn,transcription"

# EXIF orientations that swap width and height (transpose, rotate 90, transverse, rotate 270).
_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
# Images are converted to RGB this many pixels at a time (see _to_rgb8).
_STRIP_PIXELS = 1 << 20


@dataclass(frozen=True)
class Problem:
    """Something wrong found while reading a dataset.

    Attributes:
        file: The file at fault.
        line: 1-based line in the file, or None when the whole file is concerned.
        message: What was found and what was expected.
        severity: "error" when data was dropped or is unusable, "warning" when it was read
            with a fallback.
    """

    file: str
    line: int | None
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.message}"

    def to_dict(self) -> dict[str, str | int | None]:
        """The problem as a JSON-ready dict with keys file, line, message, severity."""
        return {
            "file": self.file,
            "line": self.line,
            "message": self.message,
            "severity": self.severity,
        }


@dataclass
class Instance:
    """One annotated text region.

    Attributes:
        points: (k, 2) float32 x, y in image pixels, k >= 1 as read (validity is decided by
            the label code, not here).
        text: The transcription, surrounding whitespace stripped.
        ignore: True when the transcription is exactly ``###`` (a don't-care region).
        line: 1-based line in the gt file.
    """

    points: np.ndarray
    text: str
    ignore: bool
    line: int


@dataclass
class Sample:
    """An image with its instances.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        instances: Instances in gt-file order.
        image_path: The image file.
        gt_path: The gt file, or None for an image read without annotations.
    """

    image: np.ndarray
    instances: list[Instance]
    image_path: Path
    gt_path: Path | None


# ---- images ------------------------------------------------------------------------------


def read_image(path: str | Path) -> np.ndarray:
    """Decodes an image file to RGB, whatever its mode, bit depth or orientation.

    The EXIF orientation is applied; grayscale and palette images are expanded to three
    channels; 16-bit data keeps its 8 most significant bits; an alpha channel (or a palette
    or colour-key transparency) is composited onto white.

    Args:
        path: The image file.

    Returns:
        (H, W, 3) uint8 RGB, C-contiguous and writable.

    Raises:
        ImageReadError: The file is missing, truncated, corrupt or not an image.
    """
    path = _existing_image(path)
    try:
        with Image.open(path) as image:
            image.load()
            if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:  # exif_transpose copies
                image = ImageOps.exif_transpose(image)
            return _to_rgb8(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(path, f"cannot decode image ({exc})") from exc


def image_size(path: str | Path, verify: bool = False) -> tuple[int, int]:
    """The size an image will have once read, from its header.

    Args:
        path: The image file.
        verify: Also decode the pixel data to find truncated or corrupt files. JPEGs are
            decoded at 1/8 scale, which still reads the whole compressed stream.

    Returns:
        (height, width) after the EXIF orientation is applied.

    Raises:
        ImageReadError: The file is missing, not an image or, with ``verify``, does not decode.
    """
    path = _existing_image(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(_EXIF_ORIENTATION) in _SWAPPING_ORIENTATIONS:
                width, height = height, width
            if verify:
                image.draft(None, (1, 1))  # JPEG only: smallest DCT scale; no-op otherwise
                image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(path, f"cannot decode image ({exc})") from exc

    return height, width


def _existing_image(path: str | Path) -> Path:
    """`path` as a Path; ImageReadError when it is not a file or an empty one."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "no such image file")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes), not an image")
    return path


def _to_rgb8(image: Image.Image) -> np.ndarray:
    """A decoded Pillow image of any mode as (H, W, 3) uint8 RGB.

    Converted in strips of rows, so that a large image (10000 x 8000) needs little memory
    beyond its decoded form and the result.
    """
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        gray = _gray_to_uint8(np.asarray(image), sixteen_bit=image.mode.startswith("I;16"))
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))

    width, height = image.size
    out = np.empty((height, width, 3), np.uint8)
    rows = max(1, _STRIP_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        bottom = min(top + rows, height)
        out[top:bottom] = _strip_to_rgb8(image.crop((0, top, width, bottom)))
    return out


def _strip_to_rgb8(image: Image.Image) -> np.ndarray:
    """(h, W, 3) uint8 RGB of a Pillow image in any mode but the 32-bit and 16-bit gray ones."""
    if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint16)  # (h, W, 4)
        rgb, alpha = rgba[:, :, :3], rgba[:, :, 3:]
        # Over white: c * a + 255 * (1 - a), in integers with rounding.
        composited = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
        return np.ascontiguousarray(composited.astype(np.uint8))

    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)  # (h, W, 3)


def _gray_to_uint8(values: np.ndarray, sixteen_bit: bool) -> np.ndarray:
    """Single-channel integer or float data as uint8, scaled by the range of its type.

    Args:
        values: (H, W) uint16, int32 or float32.
        sixteen_bit: The data is declared 16-bit: keep the high byte whatever the values.
    """
    if sixteen_bit:
        return (values.astype(np.uint16) >> 8).astype(np.uint8)

    # Modes "I" and "F" do not state a bit depth: infer the range from the largest value.
    is_float = values.dtype.kind == "f"
    values = np.nan_to_num(values.astype(np.float64))
    peak = float(values.max()) if values.size else 0.0
    if is_float and peak <= 1.0:
        values = values * 255.0
    elif peak > 65535:
        values = values * (255.0 / peak)  # wider than 16 bits: stretch to the data's own peak
    elif peak > 255:
        values = values / 256.0
    return np.clip(np.floor(values), 0, 255).astype(np.uint8)


# ---- ground truth ------------------------------------------------------------------------


def read_gt(
    path: str | Path, strict: bool = False, problems: list[Problem] | None = None
) -> list[Instance]:
    """Reads an ICDAR 2015 style gt file: quads or N-point polygons, one instance a line.

    Accepted: UTF-8 with or without a byte-order mark (UTF-16 with one; anything else is
    read as Latin-1 with a warning), LF, CRLF or CR line endings, blank lines, whitespace
    around fields, integer or decimal coordinates, transcriptions containing commas.

    Where the coordinates end: a line's leading numeric fields are coordinates, taken in
    an even count, and the rest is the transcription, so ``...,y4,Main, St`` is a quad and
    ``x1,y1,...,x10,y10,kel`` a 10-point polygon. A line of only numbers has a numeric
    transcription, which cannot be told from coordinates: it is a quad (everything after
    the 8th comma is the transcription, e.g. ``...,y4,100,000``), unless the file holds
    polygons of more than 4 points, in which case the last field (two when the count is
    even) is the transcription. A line with fewer than 8 leading numbers is a polygon of
    that many points when the count is even and no number follows; otherwise malformed.

    Args:
        path: The gt file.
        strict: Raise on the first malformed line instead of skipping it.
        problems: When given, every skipped line and encoding fallback is appended to it.

    Returns:
        The instances in file order; an empty or blank file gives an empty list.

    Raises:
        FileNotFoundError: The file does not exist.
        AnnotationError: With ``strict``, a line that is malformed (file, line, expected).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "no such gt file", str(path))
    content = _decode(path, path.read_bytes(), problems)

    # Lines end in LF, CRLF or CR; byte-order marks left inside (concatenated files) go.
    content = content.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    lines = content.split("\n")

    # Split every non-blank line into fields and count its leading numbers.
    rows = [(number, _split(line)) for number, line in enumerate(lines, start=1) if line.strip()]
    polygon_file = any(_is_long_polygon(fields, run) for _, (fields, run) in rows)

    instances = []
    for number, (fields, run) in rows:
        try:
            points, text = _parse_fields(fields, run, polygon_file)
        except ValueError as exc:
            message = f"{exc}; {_EXPECTED}"
            if strict:
                raise AnnotationError(path, number, message) from None
            _record(Problem(str(path), number, f"{message} (line skipped)"), problems)
            continue
        instances.append(Instance(points=points, text=text, ignore=text == DONT_CARE, line=number))
    return instances


def _decode(path: Path, data: bytes, problems: list[Problem] | None) -> str:
    """The text of a gt file: UTF-8 (BOM optional), UTF-16 with a BOM, else Latin-1."""
    try:
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            return data.decode("utf-16")
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        message = f"not UTF-8 (byte 0x{data[exc.start]:02x}); read as Latin-1"
        _record(Problem(str(path), line, message, severity="warning"), problems)
        return data.decode("latin-1")


def _is_number(field: str) -> bool:
    return _NUMBER.fullmatch(field.strip()) is not None


def _split(line: str) -> tuple[list[str], int]:
    """A line's comma-separated fields and the count of leading numeric fields."""
    fields = line.split(",")
    run = 0
    while run < len(fields) and _is_number(fields[run]):
        run += 1
    return fields, run


def _is_long_polygon(fields: list[str], run: int) -> bool:
    """A line that is unambiguously a polygon of more than 4 points followed by text."""
    return run >= _QUAD_FIELDS + 2 and run < len(fields)


def _parse_fields(fields: list[str], run: int, polygon_file: bool) -> tuple[np.ndarray, str]:
    """Coordinates and transcription of one line.

    Args:
        fields: The line split on commas.
        run: How many leading fields are numbers.
        polygon_file: The file holds polygons of more than 4 points.

    Returns:
        (k, 2) float32 points and the stripped transcription.

    Raises:
        ValueError: What is wrong with the line.
    """
    has_text = run < len(fields)

    if run < _QUAD_FIELDS:
        if run == 0:
            raise ValueError(f"field 1 ({fields[0].strip()!r}) is not a number")
        if has_text and any(_is_number(field) for field in fields[run:]):
            raise ValueError(f"field {run + 1} ({fields[run].strip()!r}) is not a number")
        if run % 2:
            raise ValueError(f"odd number of coordinates ({run})")
        count = run
    elif has_text:
        count = run - run % 2
    elif polygon_file:
        count = max(_QUAD_FIELDS, run - 1 if run % 2 else run - 2)
    else:
        count = _QUAD_FIELDS

    values = np.array([float(field) for field in fields[:count]], dtype=np.float64)
    if not (np.abs(values) <= np.finfo(np.float32).max).all():
        raise ValueError("a coordinate is too large for float32")
    points = values.astype(np.float32)
    text = ",".join(fields[count:]).strip()
    return points.reshape(-1, 2), text


def _record(problem: Problem, problems: list[Problem] | None) -> None:
    logger.warning("%s", problem)
    if problems is not None:
        problems.append(problem)


# ---- datasets ----------------------------------------------------------------------------


def dataset_dirs(root: str | Path) -> tuple[Path, Path]:
    """The image folder and gt folder of a dataset root.

    Args:
        root: A folder holding ``images/`` and ``gts/``, or images and gt files together.

    Returns:
        (image folder, gt folder); the same folder twice for the one-folder layout.
    """
    root = Path(root)
    if (root / "images").is_dir():
        return root / "images", root / "gts"
    return root, root


def gt_name(image_path: str | Path) -> str:
    """The gt file name of an image: ``img_1.jpg`` -> ``gt_img_1.txt``."""
    return f"gt_{Path(image_path).stem}.txt"


def find_pairs(
    root: str | Path, strict: bool = False, problems: list[Problem] | None = None
) -> list[tuple[Path, Path]]:
    """Pairs every image of a dataset with its gt file.

    Both layouts are accepted (see the module docstring). Images without a gt file, gt
    files without an image and two images sharing one gt name are problems: skipped and
    recorded, or raised with ``strict``.

    Args:
        root: The dataset folder.
        strict: Raise on the first problem instead of skipping.
        problems: When given, every problem is appended to it.

    Returns:
        (image, gt) pairs in natural order of the image names (img_2 before img_10).

    Raises:
        FileNotFoundError: ``root`` does not exist.
        NotADirectoryError: ``root`` is not a folder.
        AnnotationError: With ``strict``, the first unpaired or duplicated file.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(errno.ENOENT, "no such dataset folder", str(root))
    if not root.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "dataset is not a folder", str(root))
    image_dir, gt_dir = dataset_dirs(root)

    images = sorted(
        (path for path in image_dir.iterdir() if _is_image_file(path)), key=_natural_key
    )
    gts = {}
    if gt_dir.is_dir():
        gts = {path.name: path for path in gt_dir.iterdir() if _is_gt_file(path)}

    def problem(file: Path, message: str) -> None:
        if strict:
            raise AnnotationError(file, None, message)
        _record(Problem(str(file), None, message), problems)

    # Each image takes the gt file named after it.
    pairs: list[tuple[Path, Path]] = []
    taken: dict[str, Path] = {}
    for image in images:
        name = gt_name(image)
        if name in taken:
            problem(image, f"{taken[name].name} already uses {name} (image skipped)")
        elif name not in gts:
            problem(image, f"no gt file {gt_dir / name} (image skipped)")
        else:
            taken[name] = image
            pairs.append((image, gts[name]))

    for name in sorted(set(gts) - set(taken), key=_natural_key):
        problem(gts[name], f"no image {name[3:-4]}.* in {image_dir} for this gt file")
    return pairs


def load_sample(
    image_path: str | Path,
    gt_path: str | Path | None = None,
    strict: bool = False,
    problems: list[Problem] | None = None,
) -> Sample:
    """Reads an image and, when given, its gt file.

    Args:
        image_path: The image file.
        gt_path: Its gt file, or None for an image without annotations.
        strict: Raise on a malformed gt line instead of skipping it.
        problems: When given, gt problems are appended to it.

    Returns:
        The sample; its instance coordinates are in the pixels of the upright image.

    Raises:
        ImageReadError: The image cannot be decoded.
        FileNotFoundError: ``gt_path`` does not exist.
        AnnotationError: With ``strict``, a malformed gt line.
    """
    image = read_image(image_path)
    instances = [] if gt_path is None else read_gt(gt_path, strict=strict, problems=problems)
    return Sample(
        image=image,
        instances=instances,
        image_path=Path(image_path),
        gt_path=None if gt_path is None else Path(gt_path),
    )


def _is_image_file(path: Path) -> bool:
    return (
        path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()
    )


def _is_gt_file(path: Path) -> bool:
    return path.name.startswith("gt_") and path.suffix.lower() == ".txt" and path.is_file()


def _natural_key(name: str | Path) -> list[int | str]:
    """Sort key putting img_2 before img_10."""
    parts = re.split(r"(\d+)", Path(name).name)
    return [int(part) if part.isdigit() else part.lower() for part in parts]
