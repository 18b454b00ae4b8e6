"""Processes and devices: torchrun's environment, the process group, seeding.

``torchrun`` starts one process per device and sets RANK, WORLD_SIZE and LOCAL_RANK; a
plain ``python`` or ``dbnet`` start is rank 0 of 1. The backend is NCCL between GPUs and
gloo between CPU processes.
"""

from __future__ import annotations

import datetime
import os
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from dbnet.errors import ConfigError

# NOTE: rank 0 validates while the other ranks wait at a barrier; the default collective
# timeout (10-30 minutes) is too short for a full ICDAR 2015 validation on a slow machine.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class ProcessInfo:
    """This process's place among the training processes (torchrun's environment)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and validates."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when several processes train together."""
        return self.world_size > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """The device for `train.device` ("auto": CUDA when present, else CPU)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device: got 'cuda' but CUDA is not available; use auto or cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device_name: str) -> tuple[ProcessInfo, torch.device, bool]:
    """Reads torchrun's variables, picks the device and joins the process group.

    Returns:
        (process info, device, whether this call started the process group).
    """
    info = ProcessInfo(
        rank=int(os.environ.get("RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )
    device = pick_device(device_name, info.local_rank)
    if not info.distributed or dist.is_initialized():
        return info, device, False

    # NCCL between GPUs, gloo between CPU processes.
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        rank=info.rank,
        world_size=info.world_size,
        timeout=COLLECTIVE_TIMEOUT,
        device_id=device if device.type == "cuda" else None,
    )
    return info, device, True


def seed_everything(seed: int, deterministic: bool) -> Callable[[], None]:
    """Seeds python, numpy and torch; optionally asks for deterministic kernels.

    Returns:
        A function restoring the previous kernel settings (they are process-wide).
    """
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )

    def restore() -> None:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[2:]

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True  # fixed crop size: the fastest kernels win
    return restore
