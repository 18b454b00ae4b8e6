"""ONNX export: a valid file, dynamic batch and sizes, the configuration in its metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from typer.testing import CliRunner

from dbnet.cli import app
from dbnet.config import Config, ModelConfig, config_to_dict
from dbnet.engine.checkpoint import save_checkpoint
from dbnet.engine.predict import (
    ONNX_CONFIG_KEY,
    OnnxBackend,
    Predictor,
    TorchBackend,
    load_model,
)
from dbnet.errors import CheckpointError, ConfigError
from dbnet.export import DEFAULT_OPSET, default_opset, export_checkpoint, export_onnx
from dbnet.model.dbnet import build_model

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """A random ResNet-18 checkpoint and its export through `dbnet export`."""
    torch.manual_seed(0)
    config = Config(model=ModelConfig(backbone="resnet18", inner_channels=32))
    config.data.eval_size = 96
    model = build_model(config.model)

    folder = tmp_path_factory.mktemp("export")
    checkpoint = folder / "model.pt"
    save_checkpoint(checkpoint, {"model": model.state_dict(), "config": config_to_dict(config)})
    onnx_file = folder / "deploy" / "model.onnx"
    result = runner.invoke(
        app,
        ["export", "--checkpoint", str(checkpoint), "--out", str(onnx_file)]
        + ["--set", "postprocess.box_thresh=0.45"],
    )
    assert result.exit_code == 0, result.output
    return checkpoint, onnx_file, result.output


def test_export_writes_a_checked_file(exported: tuple[Path, Path, str]) -> None:
    _, onnx_file, output = exported
    assert f"opset {DEFAULT_OPSET}" in output, output
    onnx.checker.check_model(str(onnx_file), full_check=True)
    assert [p.name for p in onnx_file.parent.iterdir()] == ["model.onnx"], "no staging left"

    model = onnx.load(str(onnx_file))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [18]
    assert len(model.graph.initializer) > 0 and not any(
        t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer
    ), "weights are stored inside the file"


def test_interface_is_image_to_prob_with_dynamic_axes(exported: tuple[Path, Path, str]) -> None:
    graph = onnx.load(str(exported[1])).graph
    assert [i.name for i in graph.input] == ["image"]
    assert [o.name for o in graph.output] == ["prob"]

    dims = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]
    assert graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    out_dims = graph.output[0].type.tensor_type.shape.dim
    assert out_dims[1].dim_value == 1 and all(out_dims[i].dim_param for i in (0, 2, 3))


def test_dynamic_batch_and_sizes_match_pytorch(exported: tuple[Path, Path, str]) -> None:
    checkpoint, onnx_file, _ = exported
    model, _ = load_model(checkpoint)
    torch_backend = TorchBackend(model, torch.device("cpu"))
    onnx_backend = OnnxBackend(onnx_file, device="cpu", threads=1)
    rng = np.random.default_rng(0)

    # Export traced (2, 3, 64, 96): other sizes, a tall and a wide one, and batch 2.
    for shape in [(1, 3, 224, 96), (2, 3, 96, 160), (1, 3, 32, 32)]:
        images = rng.standard_normal(shape, dtype=np.float32)
        got = onnx_backend(images)
        expected = torch_backend(images)
        assert got.shape == (shape[0], 1, *shape[2:]), got.shape
        assert np.abs(got - expected).max() < 1e-4, f"{shape}: {np.abs(got - expected).max()}"

    # A batch of two gives the same maps as the two images one at a time.
    images = rng.standard_normal((2, 3, 64, 128), dtype=np.float32)
    batched = onnx_backend(images)
    for i in range(2):
        assert np.abs(batched[i] - onnx_backend(images[i : i + 1])[0]).max() < 1e-5


def test_configuration_travels_in_the_metadata(exported: tuple[Path, Path, str]) -> None:
    checkpoint, onnx_file, _ = exported
    metadata = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    stored = json.loads(metadata[ONNX_CONFIG_KEY])

    _, expected = load_model(checkpoint, ["postprocess.box_thresh=0.45"])
    assert stored == config_to_dict(expected)

    predictor = Predictor.from_onnx(onnx_file, "cpu", ["postprocess.thresh=0.2"], threads=1)
    assert predictor.config.postprocess.box_thresh == 0.45, "from the export's --set"
    assert predictor.config.postprocess.thresh == 0.2, "from predict's overrides"
    assert predictor.config.data.eval_size == 96
    assert predictor.config.model.backbone == "resnet18"


def test_opset_below_the_minimum_is_refused(
    exported: tuple[Path, Path, str], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="opset"):
        export_checkpoint(exported[0], tmp_path / "old.onnx", opset=11)
    assert not (tmp_path / "old.onnx").exists()

    result = runner.invoke(
        app,
        ["export", "--checkpoint", str(exported[0]), "--out", str(tmp_path / "m.onnx")]
        + ["--opset", "11"],
    )
    assert result.exit_code == 1 and "opset" in result.output, result.output


def test_deformable_backbones_need_opset_19(tmp_path: Path) -> None:
    config = Config(model=ModelConfig(backbone="resnet18_dcn"))
    assert default_opset(config) == 19
    assert default_opset(Config()) == DEFAULT_OPSET
    with pytest.raises(ConfigError, match="deformable"):
        export_onnx(torch.nn.Identity(), config, tmp_path / "dcn.onnx", opset=18)


def _foreign_onnx(path: Path, input_name: str = "image") -> Path:
    """An identity model from another tool: no dbnet metadata."""
    node = helper.make_node("Identity", [input_name], ["prob"])
    graph = helper.make_graph(
        [node],
        "foreign",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["n", 3, "h", "w"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_onnx_files_not_written_by_dbnet_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no dbnet configuration"):
        Predictor.from_onnx(_foreign_onnx(tmp_path / "a.onnx"), "cpu")
    with pytest.raises(CheckpointError, match="expected input 'image'"):
        Predictor.from_onnx(_foreign_onnx(tmp_path / "b.onnx", "input"), "cpu")

    (tmp_path / "c.onnx").write_bytes(b"not a model")
    result = runner.invoke(
        app,
        [
            "predict",
            "--onnx",
            str(tmp_path / "c.onnx"),
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code == 1 and "cannot load the ONNX model" in result.output, result.output
