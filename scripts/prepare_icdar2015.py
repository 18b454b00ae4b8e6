"""Lays out the ICDAR 2015 Incidental Scene Text zips as a dbnet dataset.

The Robust Reading Competition site (https://rrc.cvc.uab.es, Challenge 4, after
registration) hands out four zip files, images and gt files at the zip root:

    ch4_training_images.zip                         img_1.jpg ... img_1000.jpg
    ch4_training_localization_transcription_gt.zip  gt_img_1.txt ... gt_img_1000.txt
    ch4_test_images.zip                             img_1.jpg ... img_500.jpg
    Challenge4_Test_Task1_GT.zip                    gt_img_1.txt ... gt_img_500.txt

This script extracts them to OUT/train/{images,gts} and OUT/test/{images,gts} and reports
the counts. Every member must be a plain file name: a member with a folder, ``..`` or an
absolute path is refused before anything is written.

Usage:
    python scripts/prepare_icdar2015.py ZIP_DIR [--out data/icdar2015] [--overwrite]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import zipfile
from pathlib import Path, PurePosixPath

from dbnet.data.io import IMAGE_SUFFIXES, Problem, find_pairs

# (split, subfolder, zip file name)
ARCHIVES = (
    ("train", "images", "ch4_training_images.zip"),
    ("train", "gts", "ch4_training_localization_transcription_gt.zip"),
    ("test", "images", "ch4_test_images.zip"),
    ("test", "gts", "Challenge4_Test_Task1_GT.zip"),
)


class PrepareError(Exception):
    """A zip file that is missing, unreadable or holds unexpected members."""


def member_names(archive: Path, subfolder: str) -> list[str]:
    """The file names an archive will contribute, after checking every member.

    Args:
        archive: A zip file.
        subfolder: "images" or "gts": what the members must be.

    Returns:
        The member names, each a plain file name.

    Raises:
        PrepareError: The zip is missing or corrupt, or a member has a path component or
            is not an image (images) or a ``gt_*.txt`` file (gts).
    """
    if not archive.is_file():
        raise PrepareError(f"{archive}: no such zip file")
    try:
        with zipfile.ZipFile(archive) as zipped:
            names = zipped.namelist()
    except zipfile.BadZipFile as exc:
        raise PrepareError(f"{archive}: not a zip file ({exc})") from None

    for name in names:
        if not _is_plain_name(name):
            raise PrepareError(
                f"{archive}: member {name!r} has a path component; expected plain file names "
                "at the zip root (img_N.jpg or gt_img_N.txt)"
            )
        suffix = PurePosixPath(name).suffix.lower()
        wanted = suffix in IMAGE_SUFFIXES if subfolder == "images" else _is_gt_name(name)
        if not wanted:
            expected = "an image" if subfolder == "images" else "a gt_*.txt file"
            raise PrepareError(f"{archive}: member {name!r} is not {expected}")
    return names


def extract(archive: Path, names: list[str], target: Path) -> None:
    """Writes the named members of an archive into a folder (checked names only)."""
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as zipped:
        for name in names:
            with zipped.open(name) as source, open(target / name, "wb") as sink:
                shutil.copyfileobj(source, sink)


def prepare(zip_dir: Path, out: Path, overwrite: bool = False) -> dict[str, dict[str, int]]:
    """Extracts the four archives and pairs the result.

    Args:
        zip_dir: The folder holding the four zip files.
        out: The dataset folder to create (OUT/train, OUT/test).
        overwrite: Replace files already in OUT; otherwise a non-empty target is refused.

    Returns:
        Per split: counts of images, gts, pairs and pairing problems.

    Raises:
        PrepareError: A zip is missing or bad, or the target holds files.
    """
    # Check every archive and target before writing anything.
    plan = []
    for split, subfolder, file_name in ARCHIVES:
        names = member_names(zip_dir / file_name, subfolder)
        target = out / split / subfolder
        if not overwrite and target.is_dir() and any(target.iterdir()):
            raise PrepareError(f"{target} already holds files; pass --overwrite to replace them")
        plan.append((split, subfolder, zip_dir / file_name, names))

    counts: dict[str, dict[str, int]] = {"train": {}, "test": {}}
    for split, subfolder, archive, names in plan:
        extract(archive, names, out / split / subfolder)
        counts[split][subfolder] = len(names)

    for split, split_counts in counts.items():
        problems: list[Problem] = []
        split_counts["pairs"] = len(find_pairs(out / split, problems=problems))
        split_counts["problems"] = len(problems)
    return counts


def _is_plain_name(name: str) -> bool:
    """A bare file name: no folder, no drive, no backslash, not "." or ".."."""
    if "\\" in name or ":" in name or name in ("", ".", ".."):
        return False
    return len(PurePosixPath(name).parts) == 1 and not name.endswith("/")


def _is_gt_name(name: str) -> bool:
    return name.startswith("gt_") and name.lower().endswith(".txt")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(
        description="Extract the ICDAR 2015 Challenge 4 zips into OUT/{train,test}/{images,gts}."
    )
    parser.add_argument("zip_dir", type=Path, help="folder holding the four zip files")
    parser.add_argument(
        "--out", type=Path, default=Path("data/icdar2015"), help="dataset folder to create"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace files already in the target folders"
    )
    args = parser.parse_args(argv)

    try:
        counts = prepare(args.zip_dir, args.out, overwrite=args.overwrite)
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    for split, split_counts in counts.items():
        print(
            f"{args.out / split}: {split_counts['images']} images, {split_counts['gts']} gt files,"
            f" {split_counts['pairs']} pairs, {split_counts['problems']} pairing problems"
        )
    return 1 if any(c["problems"] for c in counts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
