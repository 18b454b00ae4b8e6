"""Typed configuration: YAML in, command-line overrides, validation, YAML out.

Every section is a dataclass with defaults, so a YAML file only states what differs
from the DB recipe. Unknown keys and wrong types are refused with the key's dotted
name and what is allowed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from dbnet.errors import ConfigError


@dataclass
class DataConfig:
    """Where the data is and how samples become tensors."""

    train_dir: str = "../shared/data/icdar2015/train"
    val_dir: str = "../shared/data/icdar2015/test"
    # A held-out test set for the final evaluation (train.final_eval) instead of val_dir,
    # which then only selects best.pt; "" for none.
    test_dir: str = ""
    # Generate the training, validation and test sets with the synthetic generator when
    # missing (seeds synth_seed, synth_seed + 1 and synth_seed + 2).
    synth_if_missing: bool = False
    synth_train_count: int = 0
    synth_val_count: int = 0
    synth_test_count: int = 0
    synth_size: tuple[int, int] = (640, 480)
    synth_seed: int = 0
    crop_size: int = 640
    scale_range: tuple[float, float] = (0.5, 3.0)
    # What scale_range is relative to: the image as read ("native"), or the image resized
    # for evaluation ("eval", eval_side to eval_size), so that training sees text at the
    # sizes evaluation will, whatever the size of the photograph.
    scale_reference: Literal["native", "eval"] = "native"
    rotate_degrees: float = 10.0
    flip: bool = True
    color_jitter: float = 0.0
    shrink_ratio: float = 0.4
    thresh_min: float = 0.3
    thresh_max: float = 0.7
    min_text_size: int = 8
    # Evaluation resize: "short" or "long" side to eval_size, rounded to multiples of 32.
    eval_side: Literal["short", "long"] = "short"
    eval_size: int = 736
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    strict: bool = False
    # Fraction of unreadable training samples tolerated before training stops.
    max_bad_fraction: float = 0.05


@dataclass
class ModelConfig:
    """Backbone, neck and head."""

    backbone: Literal[
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet18_dcn",
        "resnet34_dcn",
        "resnet50_dcn",
        "mobilenet_v3_large",
        "mobilenet_v3_small",
    ] = "resnet18"
    # Width multiplier of the backbone (1.0 = torchvision's network).
    width: float = 1.0
    # "none", "torchvision" (download, needs internet) or a local file path.
    pretrained: str = "none"
    neck: Literal["fpn", "asf"] = "fpn"
    inner_channels: int = 256
    k: float = 50.0
    # Momentum of every BatchNorm layer. torchvision builds MobileNetV3 with 0.01, which
    # leaves the running statistics far behind the weights in short runs from scratch.
    bn_momentum: float = 0.1
    channels_last: bool = False


@dataclass
class LossConfig:
    """Weights of the three DB loss terms and the hard negative ratio."""

    shrink_weight: float = 5.0
    threshold_weight: float = 10.0
    binary_weight: float = 1.0
    negative_ratio: float = 3.0
    # Hard negatives kept at least, as a fraction of the valid pixels of the batch, so that a
    # batch without text still learns background (DB keeps none there).
    min_negative_fraction: float = 0.01
    eps: float = 1e-6


@dataclass
class OptimConfig:
    """Optimiser."""

    name: Literal["sgd", "adamw", "adam"] = "sgd"
    lr: float = 0.007
    momentum: float = 0.9
    weight_decay: float = 1e-4


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, stepped every iteration."""

    name: Literal["poly", "constant"] = "poly"
    power: float = 0.9
    # What the poly decay runs over: optimiser steps (train.max_steps, else the epochs), or
    # the wall time of train.max_minutes, so that a run on a time budget ends at rate 0
    # whatever the speed of the machine.
    length: Literal["steps", "minutes"] = "steps"
    warmup_steps: int = 0
    warmup_factor: float = 0.1


@dataclass
class TrainConfig:
    """The training loop."""

    output_dir: str = "runs"
    run_name: str = ""
    epochs: int = 1200
    # When above 0, stop after this many optimiser steps (the schedule is sized on it).
    max_steps: int = 0
    # When above 0, stop after this many minutes of training (the schedule keeps its length).
    max_minutes: float = 0.0
    # When above 0, pause at this step: save last.pt and stop without changing the schedule.
    # It applies to one invocation only: a resumed run does not inherit it.
    stop_at_step: int = 0
    # Images per process and step: under torchrun the global batch is batch_size * world size.
    batch_size: int = 16
    num_workers: int = 4
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["none", "bf16", "fp16"] = "none"
    # Synchronise BatchNorm statistics across processes (CUDA only).
    sync_bn: bool = False
    # Keep BatchNorm layers on their running statistics (affine parameters still train).
    freeze_bn: bool = False
    deterministic: bool = False
    grad_clip: float = 0.0
    log_every: int = 20
    image_every: int = 500
    val_every_epochs: int = 10
    # When above 0, validate every this many steps as well.
    val_every_steps: int = 0
    # When above 0, validate every this many minutes of training as well.
    val_every_minutes: float = 0.0
    save_every_steps: int = 0
    # What to do on a non-finite loss: stop the run, or skip the batch (at most max_skips times).
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_nonfinite_skips: int = 10
    # When training ends: validate the final weights (if validation is on), then evaluate
    # best.pt on all of data.test_dir (data.val_dir when test_dir is ""). False: nothing is
    # evaluated at the end.
    final_eval: bool = True


@dataclass
class PostprocessConfig:
    """Probability map to boxes."""

    thresh: float = 0.3
    box_thresh: float = 0.6
    unclip_ratio: float = 1.5
    # "ratio": DB's offset, area * unclip_ratio / perimeter. "inverse": the offset that
    # exactly undoes the training shrink of a rectangle with `shrink_ratio` (unclip_ratio
    # then scales that offset, 1.0 meaning exact).
    unclip_mode: Literal["ratio", "inverse"] = "ratio"
    shrink_ratio: float = 0.4
    max_candidates: int = 1000
    min_size: float = 3.0
    mode: Literal["quad", "poly"] = "quad"
    score_mode: Literal["fast", "exact"] = "fast"


@dataclass
class EvalConfig:
    """Evaluation."""

    batch_size: int = 1
    iou_threshold: float = 0.5
    # Values of box_thresh to sweep in addition to the fixed one (empty: no sweep).
    sweep_box_thresh: list[float] = field(default_factory=list)
    # Validate on at most this many images during training (0: all).
    max_images: int = 0


@dataclass
class Config:
    """The whole configuration of a run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Checks `value` against the type `hint` and converts lossless cases (int -> float)."""
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin is Literal:
        allowed = get_args(hint)
        if isinstance(value, bool) or value not in allowed:
            raise ConfigError(f"{key}: got {value!r}, allowed: {', '.join(map(repr, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in get_args(hint):
            try:
                return _coerce(value, arm, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: got {value!r}, expected {hint}")
    if origin in (tuple, list):
        return _coerce_sequence(value, hint, key)
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{key}: got {value!r}, expected null")
        return None
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: got {value!r}, expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: got {value!r}, expected an integer")
        return value
    if hint is float:
        return _coerce_float(value, key)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: got {value!r}, expected a string")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {hint}")


def _coerce_float(value: Any, key: str) -> float:
    """A finite number; also accepts strings such as "1e-4" (YAML 1.1 reads them as text)."""
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = float(value)
    if number is None or not math.isfinite(number):
        raise ConfigError(f"{key}: got {value!r}, expected a finite number")
    return number


def _coerce_sequence(value: Any, hint: Any, key: str) -> tuple | list:
    """A list or tuple, item by item; fixed-length tuples check their length."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: got {value!r}, expected a list")
    origin = get_origin(hint)
    args = get_args(hint)
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ConfigError(f"{key}: got {len(value)} values {list(value)}, expected {len(args)}")
        return tuple(
            _coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    arm = args[0] if args else Any
    items = [_coerce(v, arm, f"{key}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _build(cls: type, values: Any, prefix: str) -> Any:
    """Builds dataclass `cls` from a mapping, refusing unknown keys."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(str(key) for key in set(values) - set(names))
    if unknown:
        where = f"{prefix}." if prefix else ""
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f" (did you mean {where}{close[0]}?)" if close else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]}{hint}; allowed keys: {', '.join(names)}"
        )
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, {} if value is None else value, key)
        else:
            kwargs[name] = _coerce(value, hint, key)
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any]) -> Config:
    """Builds and validates a Config from nested plain values."""
    config = _build(Config, values or {}, "")
    validate(config)
    return config


def config_to_dict(config: Config) -> dict[str, Any]:
    """Nested plain values (tuples as lists), ready for YAML or a checkpoint."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(config))


def parse_override(text: str) -> tuple[list[str], Any]:
    """Splits `section.key=value` into the key path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"override {text!r}: value is not valid YAML ({_yaml_problem(exc)})"
        ) from None
    return path, value


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: its line and column when known, and what is wrong."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies `section.key=value` overrides to nested plain values (a copy)."""
    values = copy.deepcopy(values or {})
    for text in overrides:
        path, value = parse_override(text)
        node = values
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            node = child
        old = node.get(path[-1])
        if isinstance(old, dict) and isinstance(value, dict):
            node[path[-1]] = _merge(old, value)
        else:
            node[path[-1]] = value
    return values


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Nested dict merge: `update` wins key by key."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> Config:
    """Reads a YAML file (safe loader), applies overrides and validates.

    Relative data paths in the file stay as written: they are resolved against the
    current directory, the way a user types them on the command line.

    Args:
        path: The YAML file, or None for `base` (or the defaults) alone.
        overrides: ``section.key=value`` strings, applied last.
        base: Nested plain values the file is merged over key by key (for example the
            configuration stored in a checkpoint); None starts from the defaults.
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{path}: not a YAML text file (byte 0x{exc.object[exc.start]:02x} at offset "
                f"{exc.start} is not UTF-8)"
            ) from None
        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(exc)})") from None
        if not isinstance(values, dict):
            raise ConfigError(
                f"{path}: expected a mapping of sections, got {type(values).__name__}"
            )
        try:  # the file's own keys and types first, so that their errors name the file
            _build(Config, values, "")
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    values = _merge(base, values) if base is not None else values
    values = apply_overrides(values, overrides or [])
    return config_from_dict(values)


def save_config(config: Config, path: str | Path) -> None:
    """Writes the resolved configuration as YAML."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False), encoding="utf-8")


def validate(config: Config) -> None:
    """Checks value ranges that types alone cannot express."""
    data, model, optim, schedule = config.data, config.model, config.optim, config.schedule
    train, post, evaluation = config.train, config.postprocess, config.eval
    checks = [
        ("data.shrink_ratio", data.shrink_ratio, 0 < data.shrink_ratio < 1, "in (0, 1)"),
        (
            "data.thresh_min/thresh_max",
            (data.thresh_min, data.thresh_max),
            0 <= data.thresh_min < data.thresh_max <= 1,
            "0 <= thresh_min < thresh_max <= 1",
        ),
        (
            "data.crop_size",
            data.crop_size,
            data.crop_size >= 32 and data.crop_size % 32 == 0,
            "a multiple of 32, at least 32",
        ),
        (
            "data.scale_range",
            data.scale_range,
            0 < data.scale_range[0] <= data.scale_range[1],
            "0 < low <= high",
        ),
        (
            "data.rotate_degrees",
            data.rotate_degrees,
            0 <= data.rotate_degrees <= 180,
            "in [0, 180]",
        ),
        ("data.color_jitter", data.color_jitter, 0 <= data.color_jitter <= 1, "in [0, 1]"),
        ("data.min_text_size", data.min_text_size, data.min_text_size >= 0, "0 or more"),
        ("data.eval_size", data.eval_size, data.eval_size >= 32, "at least 32"),
        ("data.std", data.std, all(v > 0 for v in data.std), "three values above 0"),
        (
            "data.max_bad_fraction",
            data.max_bad_fraction,
            0 <= data.max_bad_fraction <= 1,
            "in [0, 1]",
        ),
        (
            "data.synth_train_count",
            data.synth_train_count,
            data.synth_train_count >= 0,
            "0 or more",
        ),
        ("data.synth_val_count", data.synth_val_count, data.synth_val_count >= 0, "0 or more"),
        (
            "data.synth_test_count",
            data.synth_test_count,
            data.synth_test_count >= 0,
            "0 or more",
        ),
        ("model.width", model.width, model.width > 0, "above 0"),
        (
            "model.inner_channels",
            model.inner_channels,
            model.inner_channels >= 4 and model.inner_channels % 4 == 0,
            "a multiple of 4",
        ),
        ("model.k", model.k, model.k > 0, "above 0"),
        ("model.bn_momentum", model.bn_momentum, 0 < model.bn_momentum <= 1, "in (0, 1]"),
        ("optim.lr", optim.lr, optim.lr > 0, "above 0"),
        ("optim.momentum", optim.momentum, 0 <= optim.momentum < 1, "in [0, 1)"),
        ("optim.weight_decay", optim.weight_decay, optim.weight_decay >= 0, "0 or more"),
        ("schedule.power", schedule.power, schedule.power > 0, "above 0"),
        ("schedule.warmup_steps", schedule.warmup_steps, schedule.warmup_steps >= 0, "0 or more"),
        (
            "schedule.warmup_factor",
            schedule.warmup_factor,
            0 < schedule.warmup_factor <= 1,
            "in (0, 1]",
        ),
        ("train.epochs", train.epochs, train.epochs >= 1, "at least 1"),
        ("train.max_steps", train.max_steps, train.max_steps >= 0, "0 (off) or more"),
        ("train.max_minutes", train.max_minutes, train.max_minutes >= 0, "0 (off) or more"),
        ("train.stop_at_step", train.stop_at_step, train.stop_at_step >= 0, "0 (off) or more"),
        ("train.batch_size", train.batch_size, train.batch_size >= 1, "at least 1"),
        ("train.num_workers", train.num_workers, train.num_workers >= 0, "0 or more"),
        ("train.grad_clip", train.grad_clip, train.grad_clip >= 0, "0 (off) or more"),
        ("train.log_every", train.log_every, train.log_every >= 1, "at least 1"),
        ("train.image_every", train.image_every, train.image_every >= 0, "0 (off) or more"),
        (
            "train.val_every_epochs",
            train.val_every_epochs,
            train.val_every_epochs >= 0,
            "0 (off) or more",
        ),
        (
            "train.val_every_steps",
            train.val_every_steps,
            train.val_every_steps >= 0,
            "0 (off) or more",
        ),
        (
            "train.val_every_minutes",
            train.val_every_minutes,
            train.val_every_minutes >= 0,
            "0 (off) or more",
        ),
        (
            "train.save_every_steps",
            train.save_every_steps,
            train.save_every_steps >= 0,
            "0 (off) or more",
        ),
        (
            "train.max_nonfinite_skips",
            train.max_nonfinite_skips,
            train.max_nonfinite_skips >= 0,
            "0 or more",
        ),
        ("postprocess.thresh", post.thresh, 0 <= post.thresh <= 1, "in [0, 1]"),
        ("postprocess.box_thresh", post.box_thresh, 0 <= post.box_thresh <= 1, "in [0, 1]"),
        ("postprocess.unclip_ratio", post.unclip_ratio, post.unclip_ratio > 0, "above 0"),
        ("postprocess.max_candidates", post.max_candidates, post.max_candidates >= 1, "at least 1"),
        ("postprocess.min_size", post.min_size, post.min_size >= 0, "0 or more"),
        ("eval.batch_size", evaluation.batch_size, evaluation.batch_size >= 1, "at least 1"),
        (
            "eval.iou_threshold",
            evaluation.iou_threshold,
            0 < evaluation.iou_threshold < 1,
            "in (0, 1)",
        ),
        (
            "eval.sweep_box_thresh",
            evaluation.sweep_box_thresh,
            all(0 <= v <= 1 for v in evaluation.sweep_box_thresh),
            "values in [0, 1]",
        ),
        ("eval.max_images", evaluation.max_images, evaluation.max_images >= 0, "0 (all) or more"),
    ]
    for key, value, ok, allowed in checks:
        if not ok:
            shown = list(value) if isinstance(value, tuple) else value
            raise ConfigError(f"{key}: got {shown!r}, expected {allowed}")
    if schedule.length == "minutes" and train.max_minutes <= 0:
        raise ConfigError(
            "schedule.length: 'minutes' needs a time budget; got train.max_minutes="
            f"{train.max_minutes}, expected above 0 (or schedule.length: steps)"
        )
