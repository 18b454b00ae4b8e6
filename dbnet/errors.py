"""Exceptions raised for user mistakes; the CLI prints them as one line and exits with 1."""

from __future__ import annotations

from pathlib import Path


class DBNetError(Exception):
    """Base class of every error caused by input the user controls (data, config, files)."""


class AnnotationError(DBNetError, ValueError):
    """A ground-truth file that cannot be read as intended.

    Args:
        file: The gt file.
        line: 1-based line number, or None when the problem is the whole file.
        message: What was received and what was expected.
    """

    def __init__(self, file: str | Path, line: int | None, message: str) -> None:
        self.file = str(file)
        self.line = line
        self.message = message
        where = f"{self.file}:{line}" if line is not None else self.file
        super().__init__(f"{where}: {message}")


class ImageReadError(DBNetError, ValueError):
    """An image file that is missing, truncated or not an image."""

    def __init__(self, file: str | Path, message: str) -> None:
        self.file = str(file)
        self.message = message
        super().__init__(f"{self.file}: {message}")


class ConfigError(DBNetError, ValueError):
    """A configuration key or value that is not allowed."""


class CheckpointError(DBNetError, ValueError):
    """A checkpoint that cannot be trusted or does not fit the requested model."""
