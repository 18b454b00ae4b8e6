"""ONNX export of the probability branch, with the resolved configuration embedded.

The exported graph has one input ``image`` (N, 3, H, W) float32, RGB normalised with
``data.mean`` and ``data.std``, and one output ``prob`` (N, 1, H, W) float32 in [0, 1];
batch, height and width are dynamic (H and W multiples of 32, as for the PyTorch model).
The configuration travels in the file's ``metadata_props`` so that
`dbnet.engine.predict.Predictor.from_onnx` resizes, normalises and post-processes exactly
as the checkpoint did.

The graph is traced with torch's ``torch.export``-based exporter (``dynamo=True``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import Tensor, nn

from dbnet.config import Config, config_to_dict
from dbnet.engine.predict import (
    ONNX_CONFIG_KEY,
    ONNX_FORMAT_KEY,
    ONNX_FORMAT_VERSION,
    ONNX_INPUT,
    ONNX_OUTPUT,
    OnnxBackend,
    TorchBackend,
    load_model,
)
from dbnet.errors import ConfigError, DBNetError

logger = logging.getLogger(__name__)

# NOTE: opset 18 is the exporter's native operator set; deformable convolutions need the
# DeformConv operator, which ONNX added in opset 19.
DEFAULT_OPSET = 18
DEFORMABLE_OPSET = 19
# Opsets below the native one are produced by ONNX's version converter; older than this the
# converter fails on resize and reduction operators.
MIN_OPSET = 16

# Sample shapes: tracing at one and checking at another shows that the shapes are dynamic.
_TRACE_SHAPE = (2, 3, 64, 96)  # (N, 3, H, W)
_CHECK_SHAPE = (1, 3, 96, 160)
# Loggers of the exporter's graph passes, chatty at INFO level.
_EXPORTER_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx")
# Largest difference tolerated between PyTorch and onnxruntime probabilities in the check.
_CHECK_TOLERANCE = 1e-3


class ProbabilityModel(nn.Module):
    """The eval-mode network with a plain tensor output, the probability map.

    Args:
        model: A DBNet; its `forward` returns a dict holding `prob` in eval mode.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Tensor:
        """(N, 3, H, W) normalised images -> (N, 1, H, W) probabilities in [0, 1]."""
        return self.model(image)["prob"]


@dataclass
class ExportReport:
    """The result of an export.

    Attributes:
        path: The .onnx file written.
        opset: Its ONNX operator set.
        check_shape: The input shape of the onnxruntime check (not the traced one).
        max_abs_diff: Largest |PyTorch - onnxruntime| probability on that input.
    """

    path: Path
    opset: int
    check_shape: tuple[int, ...]
    max_abs_diff: float


def default_opset(config: Config) -> int:
    """The operator set used when none is asked for: 19 for deformable backbones, else 18."""
    return DEFORMABLE_OPSET if config.model.backbone.endswith("_dcn") else DEFAULT_OPSET


def export_onnx(
    model: nn.Module, config: Config, path: str | Path, opset: int | None = None
) -> ExportReport:
    """Exports the probability branch to ONNX, checks it and embeds the configuration.

    The file is written next to its destination first and moved there only once
    `onnx.checker` accepts it and onnxruntime reproduces PyTorch's probabilities on an
    input of another shape than the traced one.

    Args:
        model: The DBNet to export (switched to eval mode, run on CPU).
        config: The resolved configuration stored in the file's metadata.
        path: Destination .onnx file (its folder is created).
        opset: ONNX operator set; None for `default_opset`.

    Returns:
        What was written and how closely it matches PyTorch.

    Raises:
        ConfigError: An opset the model cannot be exported with.
        DBNetError: The exported model does not reproduce PyTorch's output.
    """
    onnx = _import_onnx()
    opset = default_opset(config) if opset is None else opset
    _check_opset(opset, config, newest=onnx.defs.onnx_opset_version())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    # Trace: batch, height and width stay symbolic.
    wrapped = ProbabilityModel(model).cpu().eval()
    sample = torch.randn(*_TRACE_SHAPE, generator=torch.Generator().manual_seed(0))
    dims = torch.export.Dim
    dynamic = {0: dims("batch", min=1), 2: dims("height", min=32), 3: dims("width", min=32)}
    with _quiet_exporter_logs():
        program = torch.onnx.export(
            wrapped,
            (sample,),
            input_names=[ONNX_INPUT],
            output_names=[ONNX_OUTPUT],
            opset_version=opset,
            dynamo=True,
            dynamic_shapes={"image": dynamic},
            verbose=False,
        )
    proto = program.model_proto
    produced = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if produced != opset:  # the exporter falls back to its own opset when conversion fails
        raise ConfigError(
            f"opset: got {opset}, but the exporter produced opset {produced}; "
            f"choose {MIN_OPSET} to {produced}"
        )

    # Metadata: what the input expects and the configuration to resize and post-process with.
    metadata = {
        ONNX_FORMAT_KEY: ONNX_FORMAT_VERSION,
        ONNX_CONFIG_KEY: json.dumps(config_to_dict(config)),
        "dbnet.input": f"{ONNX_INPUT}: (N, 3, H, W) float32 RGB, (x / 255 - data.mean) / "
        "data.std, H and W multiples of 32",
        "dbnet.output": f"{ONNX_OUTPUT}: (N, 1, H, W) float32 probabilities in [0, 1]",
    }
    onnx.helper.set_model_props(proto, metadata)

    # Write beside the destination, check, then move into place.
    staging = path.with_name(f".{path.name}.partial")
    try:
        onnx.save_model(proto, str(staging))
        onnx.checker.check_model(str(staging), full_check=True)
        max_diff = _compare(wrapped.model, staging, _CHECK_SHAPE)
        if not max_diff <= _CHECK_TOLERANCE:
            raise DBNetError(
                f"the exported model differs from PyTorch by {max_diff:.2e} on a "
                f"{_CHECK_SHAPE} input (tolerance {_CHECK_TOLERANCE:.0e}); not written"
            )
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)

    logger.debug("wrote %s (opset %d, max |torch - onnxruntime| %.2e)", path, opset, max_diff)
    return ExportReport(path, opset, _CHECK_SHAPE, max_diff)


def export_checkpoint(
    checkpoint: str | Path,
    path: str | Path,
    opset: int | None = None,
    overrides: Sequence[str] = (),
) -> ExportReport:
    """Exports a trained checkpoint (see `export_onnx`).

    Args:
        checkpoint: A checkpoint written by the trainer.
        path: Destination .onnx file.
        opset: ONNX operator set; None for `default_opset`.
        overrides: ``section.key=value`` changes to the configuration stored in the file
            (for example tuned ``postprocess.box_thresh``).
    """
    model, config = load_model(checkpoint, overrides)
    return export_onnx(model, config, path, opset)


def _import_onnx() -> ModuleType:
    """The onnx package; it and onnxscript (used by torch's exporter) are optional."""
    try:
        import onnx
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise DBNetError(
            f"ONNX export needs {exc.name}; install it with: pip install 'dbnet[onnx]'"
        ) from None
    return onnx


@contextlib.contextmanager
def _quiet_exporter_logs() -> Iterator[None]:
    """Keeps the exporter's passes (onnxscript, onnx_ir) to warnings unless we log debug."""
    loggers = [logging.getLogger(name) for name in _EXPORTER_LOGGERS]
    levels = [item.level for item in loggers]
    if not logger.isEnabledFor(logging.DEBUG):
        for item in loggers:
            item.setLevel(max(item.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for item, level in zip(loggers, levels, strict=True):
            item.setLevel(level)


def _check_opset(opset: int, config: Config, newest: int) -> None:
    """Refuses an opset outside [MIN_OPSET, newest], or too old for the backbone."""
    if not MIN_OPSET <= opset <= newest:
        raise ConfigError(
            f"opset: got {opset}, expected {MIN_OPSET} to {newest} (the newest this onnx knows)"
        )
    if config.model.backbone.endswith("_dcn") and opset < DEFORMABLE_OPSET:
        raise ConfigError(
            f"opset: got {opset}, but {config.model.backbone} has deformable convolutions, "
            f"which need opset {DEFORMABLE_OPSET} or later"
        )


def _compare(model: nn.Module, onnx_path: Path, shape: tuple[int, ...]) -> float:
    """Largest |PyTorch - onnxruntime| probability on one random normalised input."""
    images = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)  # (N, 3, H, W)
    expected = TorchBackend(model, torch.device("cpu"))(images)  # (N, 1, H, W)
    got = OnnxBackend(onnx_path, device="cpu")(images)
    if got.shape != expected.shape:
        raise DBNetError(f"the exported model returns {got.shape}, PyTorch {expected.shape}")
    return float(np.abs(got - expected).max())
