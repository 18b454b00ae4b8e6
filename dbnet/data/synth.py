"""Synthetic scene-text images with exact word boxes, written in ICDAR 2015 layout.

An image is a cluttered background (gradients, clouds, stripes, checks, bricks, shapes,
lines, dots, bars and plates, none of them text) with groups of words drawn on top. Each
word is rendered on its own canvas, with a font built into OpenCV or the scalable font that
ships with Pillow; its box is the rectangle around the rendered ink in that canvas, plus a
small margin, mapped into the image by the same affine transform as the ink. The ground
truth is therefore exact and tight to the glyphs. Tiny and strongly blurred words are
marked ``###`` (don't care); some images hold no text at all.

OpenCV 4 draws its font ids with the Hershey stroke fonts; OpenCV 5 draws the same ids with
its embedded sans-serif font in several weights, so the look of the text (and the files)
depends on the OpenCV version.

Image ``i`` depends only on ``(seed, i)``: with the same library versions, the same seed
writes byte-identical files, and a larger count extends a smaller one.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont, features
from tqdm import tqdm

from dbnet.errors import ConfigError, DBNetError

logger = logging.getLogger(__name__)

DONT_CARE = "###"
MIN_SIZE = 64  # smallest accepted image side, in pixels
MAX_SIZE = 8192  # largest accepted image side: one image is rendered whole in memory

# Cap heights in image pixels: legible words, and the tiny ones marked don't care.
CARE_HEIGHT = (10.0, 60.0)
TINY_HEIGHT = (4.0, 8.0)

_EMPTY_IMAGE_P = 0.07  # images without any word
_TINY_GROUP_P = 0.07
_BLURRED_GROUP_P = 0.04
_PLATE_P = 0.3  # legible groups on a sign plate
_PLACEMENT_ATTEMPTS = 12
# A plate-less legible group moves when the luma under it varies more than this (standard
# deviation), or when more than _BUSY_FRACTION of it is _BUSY_STEP levels off the median:
# texture is fine, a shape edge cutting through the letters is not.
_BUSY_LUMA_STD = 30.0
_BUSY_STEP = 45.0
_BUSY_FRACTION = 0.03

_HERSHEY_FACES = (
    cv2.FONT_HERSHEY_SIMPLEX,
    cv2.FONT_HERSHEY_PLAIN,
    cv2.FONT_HERSHEY_DUPLEX,
    cv2.FONT_HERSHEY_COMPLEX,
    cv2.FONT_HERSHEY_TRIPLEX,
    cv2.FONT_HERSHEY_COMPLEX_SMALL,
    cv2.FONT_HERSHEY_SCRIPT_SIMPLEX,
    cv2.FONT_HERSHEY_SCRIPT_COMPLEX,
)
# The two script faces are cursive in OpenCV 4: legible, but rarer in scenes.
_HERSHEY_P = (0.2, 0.1, 0.17, 0.17, 0.16, 0.1, 0.05, 0.05)
_PIL_P = 0.4  # groups drawn with Pillow's font when it is scalable

_WORD_LIST = """
the of and to in is for on with at by from open sale exit stop park only no entry hotel bank
cafe coffee bar pizza food market shop store street road avenue station taxi bus train police
fire hospital pharmacy school city center north south east west new old big best free hot
fresh daily welcome push pull enter closed today menu price tea milk bread water beer wine
fish meat fruit rice noodles books music cinema gallery office floor room hall gate door lift
parking toilet ladies men women kids service information ticket tickets airport bakery salon
garden house home london paris tokyo river lake hill view plaza tower bridge museum library
special offer discount limited arrivals fashion shoes beauty mobile phone repair laundry
dental clinic studio design print photo express delivery order online call now here there
this that your our all day night week month year time speed limit slow danger caution
warning keep clear left right ahead turn way one two three five first last main central
grand royal golden star moon sun blue red green black white
"""
_SYLLABLE_LIST = """
ka ko ri ta mo lan ber ton el ar is on un ex pro con tra ven sol mar dor lin qua zen fi ga ne
ru sta pel vin tor nes lo mi sa ve do ha ja pu gre bli cra
"""
_WORDS = tuple(_WORD_LIST.split())
_SYLLABLES = tuple(_SYLLABLE_LIST.split())
_LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")
_CAPITALS = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_DIGITS = tuple("0123456789")

GroupKind = Literal["care", "tiny", "blurred"]


@dataclass(frozen=True)
class SynthWord:
    """One word of a synthetic image, as written in its gt file.

    Attributes:
        points: (4, 2) int32 x, y image pixels, clockwise from the word's top-left corner.
        text: The transcription, or ``###`` for a don't-care word.
        ignore: True for a don't-care (tiny or blurred) word.
    """

    points: np.ndarray
    text: str
    ignore: bool


@dataclass
class SynthImage:
    """A rendered image and its words.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        words: The words in drawing order.
        jpeg_quality: Quality the image is written with.
        ink: (H, W) int16 index into ``words`` of the word whose ink covers each pixel, -1
            elsewhere; ink is taken before the whole-image blur and noise. None unless asked.
        background: (H, W, 3) uint8 RGB, the image without its words (plates included) and
            before the whole-image effects. None unless asked.
    """

    image: np.ndarray
    words: list[SynthWord]
    jpeg_quality: int
    ink: np.ndarray | None = None
    background: np.ndarray | None = None


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`generate_dataset` wrote.

    Attributes:
        out_dir: The dataset folder (``images/`` and ``gts/`` inside).
        images: Number of images.
        words: Number of words, don't-care ones included.
        dont_care: Number of ``###`` words.
        empty_images: Number of images without any word.
        seconds: Wall time spent.
    """

    out_dir: Path
    images: int
    words: int
    dont_care: int
    empty_images: int
    seconds: float


# ---- dataset -----------------------------------------------------------------------------


def generate_dataset(
    out_dir: str | Path, count: int, seed: int, size: tuple[int, int] = (640, 480)
) -> SynthSummary:
    """Writes ``count`` synthetic images and their gt files in ICDAR 2015 layout.

    Files are ``out_dir/images/img_N.jpg`` and ``out_dir/gts/gt_img_N.txt`` for N from 1 to
    ``count``. They are written to a hidden folder beside ``out_dir`` that is renamed when
    complete, so an interrupted run leaves no partial dataset. Existing data is never
    touched: an ``out_dir`` that is not empty is refused.

    Args:
        out_dir: The folder to create. It may exist if it is empty.
        count: Number of images, at least 1.
        seed: Non-negative random seed; the same seed gives byte-identical files.
        size: (width, height) of every image, each from ``MIN_SIZE`` to ``MAX_SIZE``.

    Returns:
        Counts of what was written.

    Raises:
        ConfigError: ``count``, ``seed`` or ``size`` is out of range.
        DBNetError: ``out_dir`` is a file, or a folder that is not empty.
    """
    out_dir = Path(out_dir)
    _check_arguments(count, seed, size)
    if out_dir.exists() and not out_dir.is_dir():
        raise DBNetError(f"{out_dir}: exists and is not a folder; choose a new output folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise DBNetError(
            f"{out_dir}: folder is not empty; synthetic data is only written to a new or "
            "empty folder (nothing was changed)"
        )

    logger.info("writing %d synthetic %dx%d images (seed %d) to %s", count, *size, seed, out_dir)
    start = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        words, dont_care, empty = _write_images(staging, count, seed, size)
        if out_dir.is_dir():
            out_dir.rmdir()  # checked empty above
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    summary = SynthSummary(out_dir, count, words, dont_care, empty, time.perf_counter() - start)
    logger.debug(
        "wrote %d synthetic images (%d words, %d don't care, %d empty) to %s in %.1f s",
        count, words, dont_care, empty, out_dir, summary.seconds,
    )  # fmt: skip
    return summary


def _check_arguments(count: int, seed: int, size: tuple[int, int]) -> None:
    if count < 1:
        raise ConfigError(f"synthetic image count must be at least 1, got {count}")
    if seed < 0:
        raise ConfigError(f"synthetic data seed must be a non-negative integer, got {seed}")
    if len(size) != 2 or min(size) < MIN_SIZE or max(size) > MAX_SIZE:
        raise ConfigError(
            f"synthetic image size must be (width, height), both from {MIN_SIZE} to "
            f"{MAX_SIZE}, got {tuple(size)}"
        )


def _write_images(root: Path, count: int, seed: int, size: tuple[int, int]) -> tuple[int, int, int]:
    """Renders and writes every image; returns (words, don't-care words, empty images)."""
    (root / "images").mkdir()
    (root / "gts").mkdir()
    words = dont_care = empty = 0
    for index in tqdm(range(1, count + 1), desc="synth", unit="img", leave=False, disable=None):
        sample = render_image(seed, index, size)
        bgr = cv2.cvtColor(sample.image, cv2.COLOR_RGB2BGR)
        ok, jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, sample.jpeg_quality])
        if not ok:
            raise DBNetError(f"OpenCV could not encode synthetic image {index} as JPEG")
        (root / "images" / f"img_{index}.jpg").write_bytes(jpeg.tobytes())
        (root / "gts" / f"gt_img_{index}.txt").write_text(format_gt(sample.words), "utf-8")

        words += len(sample.words)
        dont_care += sum(word.ignore for word in sample.words)
        empty += not sample.words
    return words, dont_care, empty


def format_gt(words: list[SynthWord]) -> str:
    """The gt file text: a ``x1,y1,...,x4,y4,transcription`` line a word, "" for none."""
    lines = (
        ",".join(map(str, word.points.reshape(-1).tolist())) + f",{word.text}\n" for word in words
    )
    return "".join(lines)


# ---- one image ---------------------------------------------------------------------------


def render_image(
    seed: int, index: int, size: tuple[int, int] = (640, 480), keep_ink: bool = False
) -> SynthImage:
    """Renders image ``index`` of the synthetic dataset made with ``seed``.

    Args:
        seed: Non-negative dataset seed.
        index: Non-negative image number (written datasets start at 1).
        size: (width, height).
        keep_ink: Also return the per-word ink map and the background, to check the gt.

    Returns:
        The image and its words.
    """
    _check_arguments(1, seed, size)
    if index < 0:
        raise ConfigError(f"synthetic image index must be non-negative, got {index}")
    width, height = size
    rng = np.random.default_rng([seed, index])

    image = _background(rng, height, width)
    _draw_clutter(rng, image, int(rng.integers(4, 18)))
    canvas = _Canvas(image, keep_ink)
    if rng.random() >= _EMPTY_IMAGE_P:
        _draw_words(rng, canvas)

    image = _camera_effects(rng, canvas.image)
    quality = int(rng.integers(75, 96))
    return SynthImage(image, canvas.words, quality, canvas.ink, canvas.background)


class _Canvas:
    """The image being drawn, with what is needed to keep words apart and to check them."""

    def __init__(self, image: np.ndarray, keep_ink: bool) -> None:
        height, width = image.shape[:2]
        self.image = image  # (H, W, 3) uint8 RGB
        self.taken = np.zeros((height, width), np.uint8)  # 1 under placed words and plates
        self.words: list[SynthWord] = []
        self.ink = np.full((height, width), -1, np.int16) if keep_ink else None
        self.background = image.copy() if keep_ink else None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.image.shape[1], self.image.shape[0]


# ---- text --------------------------------------------------------------------------------


def _sample_text(rng: np.random.Generator) -> str:
    """A word, pseudo-word, letter string, number or code, of 1 to ~12 characters."""
    kind = rng.choice(5, p=[0.42, 0.2, 0.1, 0.16, 0.12])
    if kind == 3:
        return _sample_number(rng)
    if kind == 4:  # a code such as "KX-205"
        letters = "".join(rng.choice(_CAPITALS, size=int(rng.integers(1, 4))))
        digits = "".join(rng.choice(_DIGITS, size=int(rng.integers(1, 5))))
        return letters + ("-" if rng.random() < 0.3 else "") + digits

    if kind == 0:
        text = str(rng.choice(_WORDS))
    elif kind == 1:
        text = "".join(rng.choice(_SYLLABLES, size=int(rng.integers(1, 5))))
    else:
        text = "".join(rng.choice(_LETTERS, size=int(rng.integers(1, 11))))

    case = rng.random()
    if case < 0.3:
        return text.upper()
    if case < 0.6:
        return text.capitalize()
    if case < 0.65:
        return text + str(rng.choice(["!", ".", ":", "?"]))
    return text


def _sample_number(rng: np.random.Generator) -> str:
    """A price, percentage, phone number, year or plain number."""
    form = rng.integers(6)
    if form == 0:
        return f"{rng.integers(1, 100)}.{rng.integers(0, 100):02d}"
    if form == 1:
        return f"${rng.integers(1, 1000)}"
    if form == 2:
        return f"{rng.integers(5, 100)}%"
    if form == 3:
        return f"{rng.integers(100, 1000)}-{rng.integers(0, 10000):04d}"
    if form == 4:
        return str(rng.integers(1950, 2031))
    return "".join(rng.choice(_DIGITS, size=int(rng.integers(1, 7))))


# ---- one word in its own frame -----------------------------------------------------------


@dataclass(frozen=True)
class _Style:
    """How the words of a group are drawn."""

    pil: bool  # Pillow's scalable font, else the Hershey face below
    face: int
    height: float  # cap height, pixels
    weight: float  # stroke thickness as a fraction of the cap height
    italic: bool
    blur: float  # Gaussian sigma applied to the ink, pixels
    outline: int  # outline width, pixels; 0 for none
    shadow: int  # shadow offset, pixels; 0 for none


@dataclass
class _Glyphs:
    """A word rendered in its own frame (canvas pixels, y down).

    The layers are (h, w) float32 alpha in [0, 1], cropped to where any is non-zero; the
    crop starts at ``offset`` in the full canvas. ``box`` (4, 2) float32 is in full-canvas
    pixels, clockwise from the top-left, around ``ink``: the (h, w) bool pixels of the
    layers' union above a quarter of its peak.
    """

    text: str
    fill: np.ndarray
    outline: np.ndarray | None
    shadow: np.ndarray | None
    ink: np.ndarray
    offset: np.ndarray
    box: np.ndarray


@functools.lru_cache(maxsize=1)
def _pil_scalable() -> bool:
    """Pillow renders its default font at any size (FreeType present, Pillow >= 10.1)."""
    if not features.check("freetype2"):
        logger.warning("Pillow lacks FreeType: synthetic words use the Hershey fonts only")
        return False
    try:
        return isinstance(ImageFont.load_default(size=20), ImageFont.FreeTypeFont)
    except TypeError:
        logger.warning("Pillow < 10.1 has no scalable font: synthetic words use Hershey only")
        return False


@functools.lru_cache(maxsize=256)
def _pil_font(pixels: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=pixels)


@functools.lru_cache(maxsize=1)
def _pil_cap_ratio() -> float:
    """Cap height of Pillow's default font as a fraction of its size."""
    _, top, _, bottom = _pil_font(100).getbbox("H")
    return (bottom - top) / 100.0


@functools.lru_cache(maxsize=16)
def _hershey_cap(face: int) -> float:
    """Cap height of a Hershey face at scale 1 and thickness 1, pixels."""
    (_, height), _ = cv2.getTextSize("H", face, 1.0, 1)
    return float(height)


def _render_glyphs(text: str, style: _Style, margin: float) -> _Glyphs:
    """Draws ``text`` on its own canvas and fits the box to its ink.

    Every word of one style has its baseline on the same canvas row, so words of a group
    line up when their canvases are only moved sideways.

    Args:
        text: The word.
        style: Font, size and effects.
        margin: Added to the ink on every side, pixels.
    """
    thickness = max(1, round(style.weight * style.height))
    pad = int(0.8 * style.height + 3 * style.blur + style.outline + style.shadow + thickness) + 4

    # Fill: (h, w) uint8, white ink on black.
    if style.pil:
        font = _pil_font(max(4, round(style.height / _pil_cap_ratio())))
        stroke = thickness // 3 if style.weight > 0.11 else 0
        ascent, descent = font.getmetrics()
        left, _, right, _ = font.getbbox(text, stroke_width=stroke, anchor="ls")
        image = Image.new("L", (right - left + 2 * pad, ascent + descent + 2 * (stroke + pad)))
        ImageDraw.Draw(image).text(
            (pad - left, pad + stroke + ascent), text, fill=255, font=font, anchor="ls",
            stroke_width=stroke, stroke_fill=255,
        )  # fmt: skip
        fill = np.asarray(image, dtype=np.uint8)
        if style.italic:
            fill = _slant(fill, 0.2)
    else:
        face = style.face | (cv2.FONT_ITALIC if style.italic else 0)
        scale = style.height / _hershey_cap(style.face)
        (w, h), descent = cv2.getTextSize(text, face, scale, thickness)
        fill = np.zeros((h + descent + 2 * pad, w + 2 * pad), np.uint8)
        cv2.putText(fill, text, (pad, pad + h), face, scale, 255, thickness, cv2.LINE_AA)

    # Outline and shadow derive from the fill; blur applies to all of them.
    fill = fill.astype(np.float32) * np.float32(1 / 255)
    outline = shadow = None
    if style.outline:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * style.outline + 1,) * 2)
        outline = cv2.dilate(fill, kernel)
    if style.shadow:
        source = fill if outline is None else outline
        shadow = np.zeros_like(source)
        shadow[style.shadow :, style.shadow :] = source[: -style.shadow, : -style.shadow]
    if style.blur > 0:
        fill, outline, shadow = (
            None if layer is None else cv2.GaussianBlur(layer, (0, 0), style.blur)
            for layer in (fill, outline, shadow)
        )

    union = fill
    for layer in (outline, shadow):
        if layer is not None:
            union = np.maximum(union, layer)

    # Crop every layer to where the union is visible, keeping the offset into the canvas.
    rows = np.flatnonzero((union > 1 / 255).any(axis=1))
    cols = np.flatnonzero((union > 1 / 255).any(axis=0))
    crop = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    offset = np.array([cols[0], rows[0]], np.float32)
    fill, union = fill[crop], union[crop]
    outline = None if outline is None else outline[crop]
    shadow = None if shadow is None else shadow[crop]

    # The box: ink pixels span [i - 0.5, i + 0.5], then the margin.
    ink = union >= 0.25 * float(union.max())
    cols = np.flatnonzero(ink.any(axis=0))
    rows = np.flatnonzero(ink.any(axis=1))
    lo = np.array([cols[0], rows[0]], np.float32) + offset - 0.5 - margin
    hi = np.array([cols[-1], rows[-1]], np.float32) + offset + 0.5 + margin
    return _Glyphs(text, fill, outline, shadow, ink, offset, _rectangle(lo, hi))


def _slant(mask: np.ndarray, slant: float) -> np.ndarray:
    """Shears an (h, w) mask right by ``slant`` pixels per pixel of height above the bottom."""
    h, w = mask.shape
    matrix = np.float32([[1, -slant, slant * h], [0, 1, 0]])
    return cv2.warpAffine(mask, matrix, (w + math.ceil(slant * h), h), flags=cv2.INTER_LINEAR)


def _rectangle(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Corners (4, 2) float32 of an axis-aligned rectangle, clockwise from the top-left."""
    return np.array([[lo[0], lo[1]], [hi[0], lo[1]], [hi[0], hi[1]], [lo[0], hi[1]]], np.float32)


def _grow(rectangle: np.ndarray, amount: float) -> np.ndarray:
    """An axis-aligned rectangle (4, 2) grown by ``amount`` on every side."""
    return _rectangle(rectangle[0] - amount, rectangle[2] + amount)


# ---- groups of words ---------------------------------------------------------------------


@dataclass
class _Group:
    """Words drawn in one style, on one or more rows, optionally on a plate.

    Boxes and the plate are (4, 2) float32 in the group frame, centred on the group.
    """

    kind: GroupKind
    style: _Style
    glyphs: list[_Glyphs]
    boxes: list[np.ndarray]
    plate: np.ndarray | None
    gap: float  # smallest distance to anything placed before, pixels


def _draw_words(rng: np.random.Generator, canvas: _Canvas) -> None:
    """Places groups of words where they fit without touching anything placed before."""
    typical = math.exp(rng.uniform(math.log(14.0), math.log(45.0)))  # this image's text size
    for _ in range(int(rng.integers(2, 12))):
        group = _sample_group(rng, typical)
        for _ in range(_PLACEMENT_ATTEMPTS):
            angle = _sample_angle(rng)
            center = _sample_center(rng, group, angle, canvas.size)
            if center is not None and _fits(canvas, group, angle, center):
                _draw_group(rng, canvas, group, angle, center)
                break


def _sample_group(rng: np.random.Generator, typical: float) -> _Group:
    """A group's kind, style and words, laid out in rows in the group frame."""
    u = rng.random()
    if u < _TINY_GROUP_P:
        kind: GroupKind = "tiny"
        height = float(rng.uniform(*TINY_HEIGHT))
    elif u < _TINY_GROUP_P + _BLURRED_GROUP_P:
        kind, height = "blurred", float(rng.uniform(12.0, 40.0))
    else:
        kind = "care"
        height = float(np.clip(typical * math.exp(rng.normal(0.0, 0.35)), *CARE_HEIGHT))
    style = _sample_style(rng, height, kind)

    count = int(rng.integers(2, 5)) if rng.random() < 0.3 else 1
    per_row = count if rng.random() < 0.6 else int(rng.integers(1, count + 1))
    margin = 1.0 + 0.04 * height
    glyphs = [_render_glyphs(_sample_text(rng), style, margin) for _ in range(count)]

    # Rows: words side by side one space apart on a shared baseline, rows left-aligned.
    space = height * float(rng.uniform(0.6, 1.1))
    leading = 0.45 * height + max(float(g.box[2, 1]) for g in glyphs)
    leading -= min(float(g.box[0, 1]) for g in glyphs)
    boxes, x, y = [], 0.0, 0.0
    for i, g in enumerate(glyphs):
        if i and i % per_row == 0:
            x, y = 0.0, y + leading
        boxes.append(g.box + np.float32([x - g.box[0, 0], y]))
        x += float(g.box[1, 0] - g.box[0, 0]) + space

    corners = np.concatenate(boxes)  # (4n, 2)
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    middle = (lo + hi) / 2
    boxes = [box - middle for box in boxes]
    plate = None
    if kind == "care" and rng.random() < _PLATE_P:
        pad = height * float(rng.uniform(0.25, 0.6))
        plate = _rectangle(lo - middle - pad, hi - middle + pad)
    return _Group(kind, style, glyphs, boxes, plate, gap=max(3.0, 0.3 * height))


def _sample_style(rng: np.random.Generator, height: float, kind: GroupKind) -> _Style:
    """A font and effects; blur makes "blurred" groups illegible and care ones a bit soft."""
    pil = _pil_scalable() and rng.random() < _PIL_P
    face = int(rng.choice(_HERSHEY_FACES, p=_HERSHEY_P))
    weight = float(rng.uniform(0.05, 0.16))
    italic = bool(rng.random() < 0.15)
    blur = 0.0
    if kind == "blurred":
        blur = height * float(rng.uniform(0.2, 0.35))
    elif kind == "care" and rng.random() < 0.15:
        blur = height * float(rng.uniform(0.01, 0.05))
    big = kind == "care" and height >= 16
    outline = max(1, round(height * 0.06)) if big and rng.random() < 0.12 else 0
    shadow = max(1, round(height * 0.06)) if big and rng.random() < 0.1 else 0
    return _Style(pil, face, height, weight, italic, blur, outline, shadow)


def _sample_angle(rng: np.random.Generator) -> float:
    """Degrees, counter-clockwise: mostly level, often up to 30, sometimes up to 90."""
    u = rng.random()
    if u < 0.5:
        return float(np.clip(rng.normal(0.0, 1.5), -4.0, 4.0))
    if u < 0.88:
        return float(rng.uniform(-30.0, 30.0))
    return float(rng.uniform(30.0, 90.0) * rng.choice([-1.0, 1.0]))


def _rotation(degrees: float) -> np.ndarray:
    """(2, 2) float32 rotation, counter-clockwise on screen (y down) for positive angles."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return np.array([[c, s], [-s, c]], np.float32)


def _sample_center(
    rng: np.random.Generator, group: _Group, angle: float, size: tuple[int, int]
) -> np.ndarray | None:
    """A group centre (2,) that keeps every word box inside the image, or None if too big."""
    turned = np.concatenate(group.boxes) @ _rotation(angle).T  # (4n, 2)
    extent = np.abs(turned).max(axis=0)  # half-size around the centre
    room = np.array([size[0] - 1, size[1] - 1], np.float32) - 2 * extent
    if (room < 0).any():
        return None
    return extent + rng.random(2).astype(np.float32) * room


def _to_image(points: np.ndarray, angle: float, center: np.ndarray) -> np.ndarray:
    """Group-frame points (k, 2) -> image pixels (k, 2) float32."""
    return points @ _rotation(angle).T + center


def _fits(canvas: _Canvas, group: _Group, angle: float, center: np.ndarray) -> bool:
    """Whether a group can go there: nothing placed within its gap, a readable background.

    A plate-less legible group also needs a background calm enough to read it on.
    """
    footprint = [_grow(box, group.gap) for box in group.boxes]
    if group.plate is not None:
        footprint.append(_grow(group.plate, group.gap))
    footprint = [_to_image(quad, angle, center) for quad in footprint]

    width, height = canvas.size
    points = np.concatenate(footprint)
    x0, y0 = np.maximum(np.floor(points.min(axis=0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(points.max(axis=0)).astype(int) + 1, (width, height))
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    for quad in footprint:  # one call each: a single call fills overlaps even-odd
        cv2.fillPoly(mask, [np.rint(quad - (x0, y0)).astype(np.int32)], 1)
    if np.any(mask & canvas.taken[y0:y1, x0:x1]):
        return False

    if group.plate is not None or group.kind != "care":
        return True
    luma = _luma(canvas.image[y0:y1, x0:x1].astype(np.float32))
    for quad in footprint:  # word by word: a long neighbour must not hide a shape's edge
        word = np.zeros_like(mask)
        cv2.fillPoly(word, [np.rint(quad - (x0, y0)).astype(np.int32)], 1)
        under = luma[word > 0]
        off = np.abs(under - np.median(under)) > _BUSY_STEP
        if float(under.std()) > _BUSY_LUMA_STD or float(off.mean()) > _BUSY_FRACTION:
            return False
    return True


@dataclass
class _Placed:
    """A word's canvas -> image transform, for the image window (x0, y0, x1, y1) it covers."""

    matrix: np.ndarray  # (2, 3) float32, crop pixels -> window pixels
    window: tuple[int, int, int, int]

    def warp(self, layer: np.ndarray) -> np.ndarray:
        """A (h, w) crop layer moved into the window: (y1 - y0, x1 - x0), same dtype."""
        x0, y0, x1, y1 = self.window
        return cv2.warpAffine(layer, self.matrix, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR)


def _place(
    glyphs: _Glyphs, box: np.ndarray, angle: float, center: np.ndarray, size: tuple[int, int]
) -> _Placed:
    """The transform taking a word's crop to its box in the image, and the window it spans."""
    rotation = _rotation(angle)
    shift = box[0] - glyphs.box[0] + glyphs.offset  # crop -> group frame is a translation
    matrix = np.hstack([rotation, (rotation @ shift + center)[:, None]]).astype(np.float32)

    h, w = glyphs.fill.shape
    corners = np.float32([[0, 0], [w, 0], [w, h], [0, h]]) - 0.5
    spread = corners @ matrix[:, :2].T + matrix[:, 2]
    x0, y0 = np.maximum(np.floor(spread.min(axis=0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(spread.max(axis=0)).astype(int) + 1, size)
    matrix[:, 2] -= (x0, y0)
    return _Placed(matrix, (int(x0), int(y0), int(x1), int(y1)))


def _draw_group(
    rng: np.random.Generator, canvas: _Canvas, group: _Group, angle: float, center: np.ndarray
) -> None:
    """Draws a placed group and records its words: plate, then shadow, outline and fill."""
    placed = [
        _place(g, box, angle, center, canvas.size)
        for g, box in zip(group.glyphs, group.boxes, strict=True)
    ]
    fills = [p.warp(g.fill) for g, p in zip(group.glyphs, placed, strict=True)]

    if group.plate is not None:
        plate = np.rint(_to_image(group.plate, angle, center)).astype(np.int32)
        _draw_plate(rng, canvas, plate)
        cv2.fillPoly(canvas.taken, [plate], 1)

    # One colour scheme for the group, against the median luma under its letters.
    under = [
        _luma(canvas.image[y0:y1, x0:x1].astype(np.float32))[fill > 0.5]
        for fill, (x0, y0, x1, y1) in zip(fills, (p.window for p in placed), strict=True)
    ]
    under = np.concatenate(under)
    colors = _text_colors(rng, float(np.median(under)) if under.size else 128.0, group.kind)

    for g, box, p, fill in zip(group.glyphs, group.boxes, placed, fills, strict=True):
        x0, y0, x1, y1 = p.window
        region = canvas.image[y0:y1, x0:x1].astype(np.float32)
        for layer, (color, opacity) in (
            (g.shadow, colors["shadow"]),
            (g.outline, colors["outline"]),
            (g.fill, colors["fill"]),
        ):
            if layer is not None:
                alpha = fill if layer is g.fill else p.warp(layer)
                region = _blend(region, alpha, color, opacity)
        canvas.image[y0:y1, x0:x1] = (region + 0.5).astype(np.uint8)  # blends stay in [0, 255]

        quad = np.rint(_to_image(box, angle, center)).astype(np.int32)
        if canvas.ink is not None:
            covered = p.warp(g.ink.astype(np.uint8) * np.uint8(255)) >= 128
            canvas.ink[y0:y1, x0:x1][covered] = len(canvas.words)
        cv2.fillPoly(canvas.taken, [quad], 1)
        ignore = group.kind != "care"
        canvas.words.append(SynthWord(quad, DONT_CARE if ignore else g.text, ignore))


def _blend(region: np.ndarray, alpha: np.ndarray, color: np.ndarray, opacity: float) -> np.ndarray:
    """Paints ``color`` over an (h, w, 3) float32 region with (h, w) alpha in [0, 1]."""
    a = alpha[:, :, None] * np.float32(opacity)
    return region + (color - region) * a


def _luma(rgb: np.ndarray) -> np.ndarray:
    """Luma in [0, 255] of (..., 3) RGB."""
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _text_colors(
    rng: np.random.Generator, background: float, kind: GroupKind
) -> dict[str, tuple[np.ndarray, float]]:
    """(colour (3,) float32, opacity) of the fill, outline and shadow layers.

    Legible words differ from the median background luma under them by at least 90 levels
    (70 for one group in ten), don't-care words by at least 40.
    """
    contrast = 40.0 if kind != "care" else (70.0 if rng.random() < 0.1 else 90.0)
    # Take the side with room: dark text on a light ground, light text on a dark one.
    if background >= 128.0:
        target = float(rng.uniform(0.0, background - contrast))
    else:
        target = float(rng.uniform(background + contrast, 255.0))
    return {
        "fill": (_color_with_luma(rng, target), float(rng.uniform(0.9, 1.0))),
        "outline": (_color_with_luma(rng, 255.0 if target < 128.0 else 0.0), 1.0),
        "shadow": (np.zeros(3, np.float32), float(rng.uniform(0.4, 0.7))),
    }


def _color_with_luma(rng: np.random.Generator, target: float) -> np.ndarray:
    """A random colour (3,) float32 mixed toward black or white until its luma is ``target``."""
    color = rng.uniform(0.0, 255.0, 3).astype(np.float32)
    if rng.random() < 0.4:  # grey
        color[:] = color.mean()
    luma = float(_luma(color))
    if luma > target:
        return color * np.float32(target / max(luma, 1e-3))
    return 255.0 - (255.0 - color) * np.float32((255.0 - target) / max(255.0 - luma, 1e-3))


def _draw_plate(rng: np.random.Generator, canvas: _Canvas, quad: np.ndarray) -> None:
    """A flat sign plate (the rotated (4, 2) int32 ``quad``), sometimes with a border."""
    color = _random_color(rng)
    border = (_random_color(rng), int(rng.integers(1, 4))) if rng.random() < 0.3 else None
    targets = [canvas.image] + ([canvas.background] if canvas.background is not None else [])
    for image in targets:
        cv2.fillPoly(image, [quad], color, cv2.LINE_AA)
        if border is not None:
            cv2.polylines(image, [quad], True, border[0], border[1], cv2.LINE_AA)


# ---- background and clutter --------------------------------------------------------------


def _random_color(rng: np.random.Generator) -> tuple[float, float, float]:
    r, g, b = rng.uniform(0.0, 255.0, 3).tolist()
    return r, g, b


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth base (flat, gradient or clouds), sometimes textured: (H, W, 3) uint8."""
    small = (max(2, height // 8), max(2, width // 8))
    c1 = np.array(_random_color(rng), np.float32)
    c2 = np.array(_random_color(rng), np.float32)

    # The base is mixed at 1/8 resolution, t in [0, 1]: (H/8, W/8), then resized.
    yy, xx = np.mgrid[0 : small[0], 0 : small[1]].astype(np.float32)
    yy, xx = yy / small[0], xx / small[1]
    kind = rng.choice(4, p=[0.2, 0.35, 0.15, 0.3])
    if kind == 0:
        t = np.zeros(small, np.float32)
    elif kind == 1:
        a = rng.uniform(0.0, 2 * math.pi)
        t = xx * math.cos(a) + yy * math.sin(a)
    elif kind == 2:
        cy, cx = rng.random(2)
        t = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    else:
        t = _clouds(rng, small)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    base = np.clip(c1 + t[:, :, None] * (c2 - c1), 0, 255).astype(np.uint8)  # (H/8, W/8, 3)
    image = cv2.resize(base, (width, height), interpolation=cv2.INTER_LINEAR)

    texture = rng.random()
    if texture < 0.15:
        image = _add(image, _stripes(rng, height, width))
    elif texture < 0.25:
        cell = int(rng.integers(8, 60))
        checker = (np.arange(height)[:, None] // cell + np.arange(width)[None, :] // cell) % 2
        image = _add(image, checker.astype(np.float32) * np.float32(rng.uniform(-40, 40)))
    elif texture < 0.35:
        _bricks(rng, image)
    return image


def _add(image: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 plus (H, W) float32 on every channel, saturated to [0, 255]."""
    return cv2.add(image, cv2.merge([delta, delta, delta]), dtype=cv2.CV_8U)


def _clouds(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A smooth random field (h, w) float32 from four octaves of resized noise."""
    field = np.zeros(shape, np.float32)
    for octave in range(4):
        cells = 2 ** (octave + 1)
        noise = rng.random((cells, cells), dtype=np.float32)
        field += cv2.resize(noise, shape[::-1], interpolation=cv2.INTER_CUBIC) / (octave + 1)
    return field


def _stripes(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Parallel sinusoidal stripes (H, W) float32 of amplitude 10 to 40 levels."""
    period = rng.uniform(6.0, 50.0)
    a = rng.uniform(0.0, math.pi)
    phase = np.arange(width, dtype=np.float32)[None, :] * np.float32(math.cos(a)) + np.arange(
        height, dtype=np.float32
    )[:, None] * np.float32(math.sin(a))
    return np.sin(phase * np.float32(2 * math.pi / period)) * np.float32(rng.uniform(10, 40))


def _bricks(rng: np.random.Generator, image: np.ndarray) -> None:
    """Mortar lines of a brick or tile wall, drawn in place."""
    height, width = image.shape[:2]
    rows = int(rng.integers(12, 50))
    cols = int(rows * rng.uniform(1.0, 3.0))
    color = _random_color(rng)
    thickness = int(rng.integers(1, 4))
    for r, y in enumerate(range(0, height, rows)):
        cv2.line(image, (0, y), (width, y), color, thickness)
        for x in range((cols // 2) * (r % 2), width, cols):
            cv2.line(image, (x, y), (x, y + rows), color, thickness)


def _draw_clutter(rng: np.random.Generator, image: np.ndarray, count: int) -> None:
    """Draws shapes, lines, dots, bars and empty plates in place: things that are not text."""
    height, width = image.shape[:2]
    diagonal = math.hypot(width, height)
    for _ in range(count):
        kind = int(rng.integers(10))
        color = _random_color(rng)
        thickness = int(rng.integers(1, 7)) if rng.random() < 0.6 else cv2.FILLED
        line = max(1, thickness)
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        extent = int(diagonal * rng.uniform(0.03, 0.3))
        opacity = float(rng.uniform(0.3, 0.7)) if rng.random() < 0.3 else 1.0
        target = image.copy() if opacity < 1.0 else image

        if kind == 0:
            w, h = rng.integers(4, extent + 5, 2).tolist()
            cv2.rectangle(target, (x, y), (x + w, y + h), color, thickness, cv2.LINE_AA)
        elif kind == 1:
            cv2.circle(target, (x, y), max(2, extent // 2), color, thickness, cv2.LINE_AA)
        elif kind == 2:
            axes = (max(2, extent // 2), max(2, int(extent * rng.uniform(0.1, 0.5))))
            tilt, start = rng.uniform(0.0, 180.0), rng.uniform(0.0, 360.0)
            end = start + rng.uniform(90.0, 360.0)
            cv2.ellipse(target, (x, y), axes, tilt, start, end, color, thickness, cv2.LINE_AA)
        elif kind == 3:
            corners = rng.integers(-extent, extent + 1, (int(rng.integers(3, 7)), 2)) + (x, y)
            cv2.fillPoly(target, [corners.astype(np.int32)], color, cv2.LINE_AA)
        elif kind in (4, 5):
            x2, y2 = (rng.integers(-2 * extent, 2 * extent + 1, 2) + (x, y)).tolist()
            cv2.line(target, (x, y), (x2, y2), color, line, cv2.LINE_AA)
        elif kind == 6:
            steps = rng.integers(-extent // 3 - 1, extent // 3 + 2, (int(rng.integers(3, 9)), 2))
            points = (np.cumsum(steps, axis=0) + (x, y)).astype(np.int32)
            cv2.polylines(target, [points], False, color, line, cv2.LINE_AA)
        elif kind == 7:
            _dots(rng, target, (x, y), color)
        elif kind == 8:
            _bars(rng, target, (x, y), color)
        else:  # a plate without text
            size = (float(rng.uniform(20, extent + 30)), float(rng.uniform(10, 60)))
            quad = cv2.boxPoints(((float(x), float(y)), size, float(rng.uniform(-30, 30))))
            cv2.fillPoly(target, [np.rint(quad).astype(np.int32)], color, cv2.LINE_AA)

        if opacity < 1.0:
            cv2.addWeighted(target, opacity, image, 1.0 - opacity, 0.0, dst=image)


def _dots(
    rng: np.random.Generator, image: np.ndarray, origin: tuple[int, int], color: tuple
) -> None:
    """A row or grid of equal dots, in place."""
    radius = int(rng.integers(2, 7))
    step = radius * int(rng.integers(3, 6))
    for r in range(int(rng.integers(1, 5))):
        for c in range(int(rng.integers(3, 12))):
            center = (origin[0] + c * step, origin[1] + r * step)
            cv2.circle(image, center, radius, color, cv2.FILLED, cv2.LINE_AA)


def _bars(
    rng: np.random.Generator, image: np.ndarray, origin: tuple[int, int], color: tuple
) -> None:
    """Vertical bars of random widths (a barcode, a railing), in place."""
    height = int(rng.integers(15, 80))
    x = origin[0]
    for _ in range(int(rng.integers(5, 25))):
        w = int(rng.integers(1, 6))
        cv2.rectangle(image, (x, origin[1]), (x + w - 1, origin[1] + height), color, cv2.FILLED)
        x += w + int(rng.integers(2, 8))


def _camera_effects(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Whole-image blur, uneven lighting and sensor noise: (H, W, 3) uint8 -> same."""
    height, width = image.shape[:2]
    if rng.random() < 0.3:
        image = cv2.GaussianBlur(image, (0, 0), float(rng.uniform(0.4, 1.0)))
    if rng.random() < 0.3:
        light = _clouds(rng, (max(2, height // 16), max(2, width // 16)))
        light = cv2.resize(light / light.max(), (width, height), interpolation=cv2.INTER_LINEAR)
        gain = 1.0 - np.float32(rng.uniform(0.1, 0.25)) * light  # (H, W) in [0.75, 1]
        image = cv2.multiply(image, cv2.merge([gain, gain, gain]), dtype=cv2.CV_8U)
    if rng.random() < 0.6:
        noise = rng.standard_normal((height, width), dtype=np.float32)
        image = _add(image, noise * np.float32(rng.uniform(1.0, 7.0)))
    return image
