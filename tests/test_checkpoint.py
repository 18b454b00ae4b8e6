"""Checkpoints: atomic saves that survive a kill, safe loading, refusal of foreign files."""

from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dbnet.engine import checkpoint as checkpoint_module
from dbnet.engine.checkpoint import (
    FORMAT_VERSION,
    check_architecture,
    load_checkpoint,
    remove_stale_temp_files,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from dbnet.errors import CheckpointError


def _state(value: float = 1.0) -> dict:
    return {
        "model": {"weight": torch.full((3, 3), value)},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.007}]},
        "step": 12,
        "config": {"model": {"backbone": "resnet18", "width": 1.0, "neck": "fpn"}},
        "best_hmean": 0.5,
    }


class _CreatesAFile:
    """Unpickling this object would create a file: what a malicious checkpoint does."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, _state(2.0))
    state = load_checkpoint(path)
    assert state["format_version"] == FORMAT_VERSION
    assert torch.equal(state["model"]["weight"], torch.full((3, 3), 2.0))
    assert state["step"] == 12 and state["best_hmean"] == 0.5


def test_save_replaces_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint(path, _state(1.0))
    save_checkpoint(path, _state(3.0))
    assert load_checkpoint(path)["model"]["weight"][0, 0] == 3.0
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


def test_saved_files_follow_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, _state())
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, _state(1.0))

    def torn_save(obj: object, file) -> None:
        file.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, _state(2.0))
    assert load_checkpoint(path)["model"]["weight"][0, 0] == 1.0, "previous checkpoint lost"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"], "temporary file left behind"


_SLOW_SAVER = """
import os, sys, time
from pathlib import Path
import torch
from dbnet.engine import checkpoint

path, marker = Path(sys.argv[1]), Path(sys.argv[2])
real_fsync = os.fsync

def slow_fsync(fd):
    marker.touch()          # the new bytes are in the temporary file, not yet renamed
    time.sleep(30)
    real_fsync(fd)

checkpoint.save_checkpoint(path, {"model": {"w": torch.zeros(4)}, "config": {}, "step": 1})
checkpoint.os.fsync = slow_fsync
checkpoint.save_checkpoint(path, {"model": {"w": torch.ones(4)}, "config": {}, "step": 2})
"""


def test_sigkill_in_the_middle_of_a_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    path, marker = tmp_path / "last.pt", tmp_path / "saving"
    process = subprocess.Popen([sys.executable, "-c", _SLOW_SAVER, str(path), str(marker)])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert process.poll() is None, "the saver died before its second save"
            assert time.monotonic() < deadline, "the saver never reached its second save"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    temporary = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert temporary, "the kill should have left the unfinished temporary file"
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.zeros(4))

    assert remove_stale_temp_files(tmp_path) == temporary
    assert [p.name for p in tmp_path.iterdir() if p.name != "saving"] == ["last.pt"]


def test_a_crafted_pickle_is_refused_without_running_it(tmp_path: Path) -> None:
    created = tmp_path / "created_by_unpickling"
    path = tmp_path / "evil.pt"
    torch.save({"format_version": FORMAT_VERSION, "model": {}, "x": _CreatesAFile(created)}, path)

    with pytest.raises(CheckpointError, match="refused") as info:
        load_checkpoint(path)
    assert not created.exists(), "loading ran code from the checkpoint"
    assert "builtins" in str(info.value) or "open" in str(info.value), info.value


def test_a_plain_pickle_file_is_refused_without_running_it(tmp_path: Path) -> None:
    created = tmp_path / "created_by_unpickling"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(_CreatesAFile(created)))
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)
    assert not created.exists(), "loading ran code from the file"


def test_another_format_version_is_refused_naming_both(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    torch.save({**_state(), "format_version": FORMAT_VERSION + 41}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert f"version {FORMAT_VERSION + 41}" in message and f"version {FORMAT_VERSION}" in message


def test_a_file_without_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="format version None"):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", None])
def test_unreadable_files(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "last.pt"
    if content is None:  # the first half of a real checkpoint
        save_checkpoint(path, _state())
        data = path.read_bytes()
        content = data[: len(data) // 2]
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)


def test_missing_file() -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint("/nonexistent/last.pt")


def test_another_architecture_is_refused_naming_both() -> None:
    state = _state()
    requested = {"backbone": "resnet50", "width": 1.0, "neck": "fpn", "inner_channels": None}
    state["config"]["model"]["inner_channels"] = None
    with pytest.raises(CheckpointError) as info:
        check_architecture(state, requested, "run/last.pt")
    message = str(info.value)
    assert "model.backbone='resnet18' in the checkpoint" in message
    assert "'resnet50' requested" in message
    assert "width" not in message, "only differing keys are named"


def test_the_same_architecture_passes() -> None:
    state = _state()
    check_architecture(state, dict(state["config"]["model"]), "last.pt")


def test_rng_states_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    save_checkpoint(tmp_path / "rng.pt", {"model": {}, "config": {}, "rng": rng_state()})
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])

    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    again = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]
