"""Optimiser and learning-rate schedule, stepped every iteration."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from dbnet.config import OptimConfig, ScheduleConfig


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    """SGD with momentum (DB's recipe), AdamW or Adam over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.name == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    if config.name == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def lr_factor(
    step: int, total_steps: int, config: ScheduleConfig, progress: float | None = None
) -> float:
    """The multiplier of the base learning rate after `step` optimiser steps.

    Poly decay ``(1 - progress) ** power`` (DB, section 4.2), times a linear warmup from
    ``warmup_factor`` to 1 over the first ``warmup_steps`` steps.

    Args:
        step: Optimiser steps taken.
        total_steps: Length of the schedule in steps.
        config: Schedule settings.
        progress: Fraction of the run done, in place of ``step / total_steps`` (a schedule
            measured in time); None for the step count.
    """
    if progress is None:
        progress = step / max(total_steps, 1)
    factor = 1.0
    if config.name == "poly":
        factor = max(0.0, 1.0 - progress) ** config.power
    if step < config.warmup_steps:
        fraction = step / config.warmup_steps
        factor *= config.warmup_factor + (1.0 - config.warmup_factor) * fraction
    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    config: ScheduleConfig,
    total_steps: int,
    progress: Callable[[], float] | None = None,
) -> LambdaLR:
    """A per-iteration LambdaLR over `total_steps` steps, or over a time budget.

    The factor is a closure, so the scheduler state holds only the step counter: a resumed
    run sizes its schedule from its own configuration.

    Args:
        optimizer: The optimiser whose learning rate is scheduled.
        config: Schedule settings.
        total_steps: Length of the schedule in steps (used when `progress` is None).
        progress: Returns the fraction of the run done when the next rate is computed, for
            a schedule measured in time (``schedule.length: minutes``); None for steps.
    """

    def factor(step: int) -> float:
        done = None if progress is None else progress()
        return lr_factor(step, total_steps, config, done)

    return LambdaLR(optimizer, factor)
