"""Configuration: YAML in, overrides, type and range errors naming the key, YAML out."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from typer.testing import CliRunner

from dbnet.cli import app
from dbnet.config import (
    Config,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_override,
    save_config,
)
from dbnet.errors import ConfigError

CONFIGS = ROOT / "configs"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_empty_config_is_the_default_recipe() -> None:
    config = config_from_dict({})
    assert config == Config()
    assert config.optim.name == "sgd" and config.optim.lr == 0.007
    assert config.schedule.name == "poly" and config.schedule.power == 0.9


def test_yaml_file_then_overrides_win(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", "train:\n  batch_size: 8\n  epochs: 3\noptim:\n  lr: 0.01\n")
    config = load_config(path, ["train.batch_size=4", "optim.name=adamw"])
    assert config.train.batch_size == 4, "the override must win over the file"
    assert config.train.epochs == 3, "keys not overridden keep the file's value"
    assert config.optim.name == "adamw"
    assert config.optim.lr == 0.01


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.batchsize=4", ["train.batchsize", "did you mean train.batch_size", "allowed keys"]),
        ("trian.epochs=4", ["trian", "did you mean train", "data, model"]),
        ("model.colour=1", ["model.colour", "backbone", "inner_channels"]),
    ],
)
def test_unknown_key_names_the_key_and_the_allowed_ones(override: str, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    for text in expected:
        assert text in str(info.value), f"{text!r} missing from: {info.value}"


def test_unknown_key_in_a_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", "data:\n  crop: 320\n")
    with pytest.raises(ConfigError, match=r"unknown key data\.crop .*crop_size"):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.batch_size=four", "train.batch_size: got 'four', expected an integer"),
        ("train.batch_size=2.5", "train.batch_size: got 2.5, expected an integer"),
        ("train.batch_size=true", "train.batch_size: got True, expected an integer"),
        ("optim.lr=fast", "optim.lr: got 'fast', expected a finite number"),
        ("optim.lr=.inf", "optim.lr: got inf, expected a finite number"),
        ("optim.lr=nan", "optim.lr: got 'nan', expected a finite number"),
        ("train.final_eval=maybe", "train.final_eval: got 'maybe', expected true or false"),
        ("train.final_eval=1", "train.final_eval: got 1, expected true or false"),
        ("optim.name=lion", "optim.name: got 'lion', allowed: 'sgd', 'adamw', 'adam'"),
        ("train.amp=false", "train.amp: got False, allowed: 'none', 'bf16', 'fp16'"),
        ("model.backbone=resnet101", "allowed: 'resnet18'"),
        ("data.scale_range=[1.0]", "data.scale_range: got 1 values [1.0], expected 2"),
        ("data.scale_range=[1.0, big]", "data.scale_range[1]: got 'big'"),
        ("data.scale_range=2", "data.scale_range: got 2, expected a list"),
        ("eval.sweep_box_thresh=[0.5, x]", "eval.sweep_box_thresh[1]: got 'x'"),
        ("data.train_dir=[a, b]", "data.train_dir: got ['a', 'b'], expected a string"),
        ("train=false", "train: expected a mapping of keys, got False"),
        ("train=3", "train: expected a mapping of keys, got 3"),
    ],
)
def test_wrong_type_names_the_key_and_what_is_allowed(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.crop_size=100", "data.crop_size: got 100, expected a multiple of 32"),
        ("train.batch_size=0", "train.batch_size: got 0, expected at least 1"),
        ("optim.lr=0", "optim.lr: got 0.0, expected above 0"),
        ("train.max_steps=-1", "train.max_steps: got -1"),
        ("schedule.warmup_factor=0", "schedule.warmup_factor: got 0.0"),
        ("data.scale_range=[2, 1]", "data.scale_range: got [2.0, 1.0], expected 0 < low <= high"),
        ("eval.iou_threshold=1.5", "eval.iou_threshold: got 1.5"),
        ("train.val_every_minutes=-1", "train.val_every_minutes: got -1.0"),
        ("schedule.length=minutes", "schedule.length: 'minutes' needs a time budget"),
    ],
)
def test_out_of_range_values_name_the_key_and_the_range(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert expected in str(info.value)


def test_numbers_are_coerced_losslessly() -> None:
    config = load_config(None, ["optim.lr=1", "optim.weight_decay=1e-4", "train.seed=0x10"])
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    # YAML 1.1 reads 1e-4 (no dot) as a string; it must still be the number.
    assert config.optim.weight_decay == pytest.approx(1e-4)
    assert config.train.seed == 16
    assert load_config(None, ["data.scale_range=[1, 2]"]).data.scale_range == (1.0, 2.0)


def test_numbers_written_as_text_in_a_yaml_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", "optim:\n  lr: 7e-3\n")
    assert load_config(path).optim.lr == pytest.approx(0.007)


def test_string_fields_accept_numbers_and_values_with_equals_signs() -> None:
    config = load_config(None, ["train.run_name=123", "data.train_dir=/x/a=b"])
    assert config.train.run_name == "123"
    assert config.data.train_dir == "/x/a=b", "only the first '=' separates key and value"


@pytest.mark.parametrize("text", ["train.batch_size", "=4", " = 4", "train.epochs=[1,"])
def test_malformed_overrides_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="override"):
        parse_override(text)


def test_override_through_a_value_is_refused() -> None:
    with pytest.raises(ConfigError, match="batch_size is not a section"):
        apply_overrides({}, ["train.batch_size=2", "train.batch_size.x=1"])


def test_a_whole_section_override_merges_with_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", "train:\n  epochs: 3\n  batch_size: 8\n")
    config = load_config(path, ["train={batch_size: 2}"])
    assert config.train.batch_size == 2
    assert config.train.epochs == 3, "a section override must not drop the file's other keys"


def test_overrides_do_not_change_the_input() -> None:
    values = {"train": {"epochs": 3}}
    apply_overrides(values, ["train.epochs=5"])
    assert values == {"train": {"epochs": 3}}


def test_empty_sections_are_defaults(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", "train:\nmodel: {}\n")
    assert load_config(path) == Config()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- a\n- b\n", "expected a mapping of sections, got list"),
        ("train: [1\n", "not valid YAML"),
    ],
)
def test_bad_files(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError, match=expected):
        load_config(path)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/c.yaml")


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    config = load_config(
        None, ["data.scale_range=[0.7, 2.5]", "eval.sweep_box_thresh=[0.5, 0.6]", "train.amp=bf16"]
    )
    save_config(config, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == config
    assert isinstance(again.data.scale_range, tuple)


def test_config_to_dict_is_plain_yaml() -> None:
    values = config_to_dict(Config())
    assert isinstance(values["data"]["mean"], list), "tuples become lists for YAML"
    text = yaml.safe_dump(values)
    assert config_from_dict(yaml.safe_load(text)) == Config()


def test_every_field_has_a_default_of_its_type() -> None:
    # A section added without a default (or with a mistyped one) fails here first.
    for section in dataclasses.fields(Config):
        values = config_to_dict(Config())[section.name]
        assert config_from_dict({section.name: values}) == Config()


@pytest.mark.parametrize(
    "name", ["icdar2015_resnet18.yaml", "icdar2015_resnet50_dcn.yaml", "cpu_small.yaml"]
)
def test_shipped_configs_load(name: str) -> None:
    config = load_config(CONFIGS / name)
    assert config.train.batch_size >= 1


@pytest.mark.parametrize(
    ("name", "backbone"),
    [("icdar2015_resnet18.yaml", "resnet18"), ("icdar2015_resnet50_dcn.yaml", "resnet50_dcn")],
)
def test_paper_recipes(name: str, backbone: str) -> None:
    config = load_config(CONFIGS / name)
    assert config.model.backbone == backbone
    assert (config.data.crop_size, config.train.batch_size, config.train.epochs) == (640, 16, 1200)
    assert (config.optim.name, config.optim.lr, config.optim.momentum) == ("sgd", 0.007, 0.9)
    assert config.optim.weight_decay == pytest.approx(1e-4)
    assert (config.schedule.name, config.schedule.power) == ("poly", 0.9)
    assert (config.data.eval_side, config.data.eval_size) == ("short", 736)
    assert config.data.train_dir == "../shared/data/icdar2015/train"
    assert config.data.val_dir == "../shared/data/icdar2015/test"


def test_cli_reports_a_config_error_in_one_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.yaml", "train:\n  epochs: 1\n")
    result = CliRunner().invoke(app, ["train", "--config", str(path), "--set", "train.batchsize=4"])
    assert result.exit_code == 1, result.output
    assert "unknown key train.batchsize" in result.output
    assert "Traceback" not in result.output


def test_cli_train_needs_a_config_or_a_run() -> None:
    result = CliRunner().invoke(app, ["train"])
    assert result.exit_code == 1
    assert "--config" in result.output
