"""Checkpoints: atomic save, safe load, format version and architecture checks.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
`torch.load(weights_only=True)`: a file that needs arbitrary pickled objects is refused
without running any of its code. Keys (see `save_checkpoint`):

    format_version  int, FORMAT_VERSION at save time
    model           model state dict (unwrapped: no DDP "module." prefix)
    optimizer       optimiser state dict
    scheduler       LR scheduler state dict
    scaler          GradScaler state dict (empty when fp16 is off)
    epoch           epoch in progress (0-based)
    step            optimiser steps done
    batch_in_epoch  batches of `epoch` already consumed
    config          resolved configuration, nested plain values
    best_hmean      best validation hmean so far (-1 before any validation)
    rng             torch / CUDA / numpy / python RNG states
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import random
import uuid
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dbnet.errors import CheckpointError

logger = logging.getLogger(__name__)

# NOTE: bump when the layout of the dict changes; older files are refused with both numbers.
FORMAT_VERSION = 1

# Model fields that change the shapes of the weights: a checkpoint must agree on all of them.
ARCHITECTURE_KEYS = ("backbone", "width", "neck", "inner_channels")

TEMP_SUFFIX = ".tmp"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Writes `state` to `path` atomically.

    The bytes go to a temporary file in the same folder, are flushed and fsynced, and the
    file is renamed over `path` with `os.replace`. A crash or kill at any moment leaves
    either the previous file or the new one, never a torn file.

    Args:
        path: Destination file, usually `<run>/checkpoints/last.pt`.
        state: Plain values and tensors; `format_version` is added when missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format_version": FORMAT_VERSION, **state}

    # A unique name beside the target (same file system, so the rename is atomic); opened
    # with "x" rather than mkstemp so the file gets the usual permissions (umask).
    temp_name = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}"
    try:
        with open(temp_name, "xb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Makes a rename durable (the directory entry itself); a no-op where unsupported."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Deletes temporary files left by a save that was killed; returns what it removed."""
    removed = []
    for temp in Path(folder).glob(f".*.pt.*{TEMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
            removed.append(temp)
    if removed:
        logger.info("removed %d unfinished checkpoint file(s) in %s", len(removed), folder)
    return removed


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Reads a checkpoint safely, on the CPU.

    Args:
        path: A `.pt` file written by `save_checkpoint`.
        mmap: Map the tensors from the file instead of reading them (fast when only the
            configuration or counters are needed).

    Returns:
        The state dict (keys in the module docstring).

    Raises:
        CheckpointError: The file is missing, empty, truncated, not a zip archive written
            by torch.save, needs arbitrary code to unpickle, or has another format version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    # torch.save writes a zip archive: anything else (an empty, torn or foreign file) is
    # named plainly instead of by the unpickler's internal error.
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: not a readable checkpoint (the file is empty)")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a readable checkpoint (not the zip archive torch.save writes: "
            "truncated, or another kind of file); nothing was unpickled"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # pickle protocol notes on bad files
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        blocked = _blocked_object(exc)
        if blocked is None:  # not a torch file, or one written with unusual pickle opcodes
            raise CheckpointError(
                f"{path}: not a readable checkpoint ({_first_line(exc)}); nothing was unpickled"
            ) from None
        raise CheckpointError(
            f"{path}: refused, the file holds objects other than tensors and plain values "
            f"({blocked}); it was not unpickled"
        ) from None
    except Exception as exc:  # torch raises many types on a torn or foreign file
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc!r})") from None

    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of training state, got {type(state)}")
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r}, this dbnet reads version "
            f"{FORMAT_VERSION}"
        )
    missing = [key for key in ("model", "config") if key not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    weights = state["model"]
    if not isinstance(weights, dict) or not all(
        isinstance(value, torch.Tensor) for value in weights.values()
    ):
        raise CheckpointError(f"{path}: the model weights are not a mapping of names to tensors")
    if not isinstance(state["config"], dict):
        raise CheckpointError(f"{path}: the stored configuration is not a mapping")
    return state


def _blocked_object(exc: Exception) -> str | None:
    """The line of torch's refusal that names a blocked global, if there is one."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return next((line for line in lines if "GLOBAL" in line), None)


def _first_line(exc: Exception) -> str:
    """The specific line of torch's refusal, without its advice to load unsafely."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    specific = [line for line in lines if not line.startswith(boilerplate)]
    return (specific or [type(exc).__name__])[0]


def check_architecture(state: dict[str, Any], model_config: dict[str, Any], path: str) -> None:
    """Refuses a checkpoint whose model does not have the requested architecture.

    Args:
        state: A loaded checkpoint.
        model_config: The requested `model` section as plain values.
        path: The checkpoint's file name, for the message.

    Raises:
        CheckpointError: Naming every differing key with both values.
    """
    stored = state.get("config", {}).get("model", {})
    if not isinstance(stored, dict):
        stored = {}
    differences = [
        f"model.{key}={stored.get(key)!r} in the checkpoint, {model_config.get(key)!r} requested"
        for key in ARCHITECTURE_KEYS
        if stored.get(key) != model_config.get(key)
    ]
    if differences:
        raise CheckpointError(f"{path}: another architecture: {'; '.join(differences)}")


def rng_state() -> dict[str, Any]:
    """The random number generator states of this process, as tensors and plain values."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "state": list(mt_state), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda_states)
