"""Inference on image files with a trained model: a PyTorch checkpoint or an exported ONNX file.

Both backends go through the same steps, so an exported model detects exactly what its
checkpoint detects::

    image file --read--> (h, w, 3) uint8 RGB --eval resize--> (H', W', 3), multiples of 32
        --normalise--> (1, 3, H', W') float32 --backend--> prob (1, 1, H', W') in [0, 1]
        --post-process--> polygons and scores in original pixels

A backend is any callable mapping a normalised batch (N, 3, H, W) float32 to probabilities
(N, 1, H, W) float32; `TorchBackend` and `OnnxBackend` are the two provided.

Outputs of `predict_images`, per image ``<stem>``: ``<stem>.jpg`` with the detections drawn,
``res_<stem>.txt`` in the ICDAR 2015 result format (one detection a line,
``x1,y1,...,xk,yk`` in integer pixels, optionally followed by ``,score``: an even count of
values is a polygon, an odd count ends with the score), and one ``predictions.json`` for the
whole run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dbnet.config import Config, apply_overrides, config_from_dict, config_to_dict
from dbnet.data.dataset import normalise
from dbnet.data.io import IMAGE_SUFFIXES, read_image
from dbnet.data.transforms import resize_for_eval
from dbnet.engine.checkpoint import load_checkpoint
from dbnet.errors import CheckpointError, ConfigError, DBNetError, ImageReadError
from dbnet.metrics import write_result_file
from dbnet.model.dbnet import build_model
from dbnet.postprocess import Detection, boxes_from_prob
from dbnet.visualize import draw_detections, write_image

logger = logging.getLogger(__name__)

# Keys of the metadata an exported ONNX file carries (ONNX `metadata_props`).
ONNX_CONFIG_KEY = "dbnet.config"
ONNX_FORMAT_KEY = "dbnet.format_version"
ONNX_FORMAT_VERSION = "1"
ONNX_INPUT = "image"
ONNX_OUTPUT = "prob"

PREDICTIONS_FILE = "predictions.json"
DEVICES = ("auto", "cpu", "cuda")

# A backend: normalised images (N, 3, H, W) float32 -> probabilities (N, 1, H, W) float32.
Backend = Callable[[np.ndarray], np.ndarray]


def resolve_device(name: str) -> torch.device:
    """The torch device for "auto", "cpu" or "cuda" ("auto": CUDA when available).

    Raises:
        ConfigError: An unknown name, or "cuda" on a machine without CUDA.
    """
    if name not in DEVICES:
        raise ConfigError(f"device: got {name!r}, allowed: {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was requested but CUDA is not available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


# ---- backends ----------------------------------------------------------------------------


class TorchBackend:
    """Runs a DBNet in eval mode.

    Args:
        model: The network; it is switched to eval mode and moved to `device`.
        device: Where it runs.
        channels_last: Feed channels-last inputs (for a model built with channels_last).
    """

    def __init__(self, model: nn.Module, device: torch.device, channels_last: bool = False) -> None:
        self.model = model.eval().to(device)
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Probabilities (N, 1, H, W) float32 of normalised images (N, 3, H, W) float32."""
        x = torch.from_numpy(images).to(self.device, memory_format=self.memory_format)
        with torch.inference_mode():
            prob = self.model(x)["prob"]  # (N, 1, H, W) in [0, 1]
        return prob.float().cpu().numpy()


class OnnxBackend:
    """Runs an ONNX file written by `dbnet.export.export_onnx` with onnxruntime.

    Args:
        path: The .onnx file.
        device: "auto", "cpu" or "cuda"; CUDA needs onnxruntime's CUDA provider.
        threads: Intra-op threads of onnxruntime (0: its default, all cores).

    Raises:
        DBNetError: onnxruntime is not installed.
        CheckpointError: The file cannot be loaded or was not written by dbnet.
    """

    def __init__(self, path: str | Path, device: str = "auto", threads: int = 0) -> None:
        # onnxruntime is an optional dependency: only this backend needs it.
        try:
            import onnxruntime as ort
        except ImportError:
            raise DBNetError(
                "onnxruntime is not installed; install it with: pip install 'dbnet[onnx]'"
            ) from None

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such ONNX file: {path}")
        providers = self._providers(device, ort.get_available_providers())
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own unexported exception types
            raise CheckpointError(f"{path}: cannot load the ONNX model ({exc})") from None

        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [ONNX_INPUT] or ONNX_OUTPUT not in outputs:
            raise CheckpointError(
                f"{path}: expected input {ONNX_INPUT!r} and output {ONNX_OUTPUT!r}, got inputs "
                f"{inputs} and outputs {outputs}; export the model with `dbnet export`"
            )
        self.path = path
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    @staticmethod
    def _providers(device: str, available: Sequence[str]) -> list[str]:
        if device not in DEVICES:
            raise ConfigError(f"device: got {device!r}, allowed: {', '.join(DEVICES)}")
        cuda = "CUDAExecutionProvider" in available
        if device == "cuda" and not cuda:
            raise ConfigError("device: 'cuda' was requested but onnxruntime has no CUDA provider")
        if device != "cpu" and cuda:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def config_dict(self) -> dict[str, Any]:
        """The resolved configuration embedded at export, as nested plain values.

        Raises:
            CheckpointError: The metadata is missing, of another format version, or not JSON.
        """
        version = self.metadata.get(ONNX_FORMAT_KEY)
        text = self.metadata.get(ONNX_CONFIG_KEY)
        if text is None or version is None:
            raise CheckpointError(
                f"{self.path}: no dbnet configuration in the ONNX metadata; "
                "export the model with `dbnet export`"
            )
        if version != ONNX_FORMAT_VERSION:
            raise CheckpointError(
                f"{self.path}: ONNX metadata format {version!r}, this version of dbnet reads "
                f"{ONNX_FORMAT_VERSION!r}"
            )
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise CheckpointError(
                f"{self.path}: configuration metadata is not JSON ({exc})"
            ) from None

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Probabilities (N, 1, H, W) float32 of normalised images (N, 3, H, W) float32."""
        (prob,) = self.session.run([ONNX_OUTPUT], {ONNX_INPUT: images})
        return prob


# ---- loading -----------------------------------------------------------------------------


def load_model(path: str | Path, overrides: Sequence[str] = ()) -> tuple[nn.Module, Config]:
    """Builds the model stored in a checkpoint and loads its weights.

    The architecture comes from the checkpoint's configuration; pretrained backbone weights
    are never fetched, since the checkpoint holds all weights.

    Args:
        path: A checkpoint written by the trainer.
        overrides: ``section.key=value`` changes to the stored configuration (for example
            ``postprocess.box_thresh=0.5``).

    Returns:
        The model in eval mode and the resolved configuration.

    Raises:
        CheckpointError: The checkpoint has no configuration or its weights do not fit.
        ConfigError: An override that is not allowed.
    """
    state = load_checkpoint(path)
    if not isinstance(state["config"], dict):
        raise CheckpointError(f"{path}: the stored configuration is not a mapping")
    config = config_from_dict(apply_overrides(state["config"], list(overrides)))
    config.model.pretrained = "none"

    model = build_model(config.model)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:  # missing, unexpected or mis-shaped weights
        detail = str(exc).strip().splitlines()
        raise CheckpointError(
            f"{path}: the weights do not fit the stored model configuration "
            f"({config.model.backbone}): {' '.join(detail[:2])}"
        ) from None
    return model.eval(), config


# ---- the predictor -----------------------------------------------------------------------


@dataclass
class ImagePrediction:
    """The detections of one image.

    Attributes:
        file: The image file (None for an array passed directly).
        height: Original height in pixels.
        width: Original width in pixels.
        detections: Polygons in original pixels with their scores.
    """

    file: Path | None
    height: int
    width: int
    detections: list[Detection]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: file, width, height, polygons (lists of [x, y]) and scores."""
        return {
            "file": str(self.file) if self.file is not None else None,
            "width": self.width,
            "height": self.height,
            "polygons": [
                [[round(float(x), 2), round(float(y), 2)] for x, y in d.points]
                for d in self.detections
            ],
            "scores": [round(float(d.score), 5) for d in self.detections],
        }


class Predictor:
    """Image in, text polygons out, through one backend and the configured resize and
    post-processing.

    Args:
        backend: Normalised (N, 3, H, W) float32 -> probabilities (N, 1, H, W) float32.
        config: Supplies the eval resize (`data.eval_side`, `data.eval_size`), the
            normalisation (`data.mean`, `data.std`) and `postprocess`.
    """

    def __init__(self, backend: Backend, config: Config) -> None:
        self.backend = backend
        self.config = config

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str = "auto", overrides: Sequence[str] = ()
    ) -> Predictor:
        """A predictor running a PyTorch checkpoint (see `load_model` for `overrides`)."""
        model, config = load_model(path, overrides)
        backend = TorchBackend(model, resolve_device(device), config.model.channels_last)
        return cls(backend, config)

    @classmethod
    def from_onnx(
        cls,
        path: str | Path,
        device: str = "auto",
        overrides: Sequence[str] = (),
        threads: int = 0,
    ) -> Predictor:
        """A predictor running an exported ONNX file with the configuration embedded in it."""
        backend = OnnxBackend(path, device, threads)
        config = config_from_dict(apply_overrides(backend.config_dict(), list(overrides)))
        return cls(backend, config)

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """Eval resize and normalisation.

        Args:
            image: (h, w, 3) uint8 RGB, any size from 1x1.

        Returns:
            (1, 3, H', W') float32, H' and W' multiples of 32.
        """
        data = self.config.data
        resized, _ = resize_for_eval(image, data.eval_side, data.eval_size)  # (H', W', 3)
        return normalise(resized, data.mean, data.std)[None]  # (1, 3, H', W')

    def probability(self, image: np.ndarray) -> np.ndarray:
        """The probability map (H', W') float32 in [0, 1] at network resolution."""
        return self.backend(self.preprocess(image))[0, 0]

    def predict(self, image: np.ndarray) -> list[Detection]:
        """Detections of one (h, w, 3) uint8 RGB image, in its pixels."""
        prob = self.probability(image)  # (H', W')
        return boxes_from_prob(prob, image.shape[:2], self.config.postprocess)

    def predict_file(self, path: str | Path) -> tuple[np.ndarray, ImagePrediction]:
        """Reads and predicts one image file.

        Returns:
            The decoded (h, w, 3) uint8 RGB image and its prediction.

        Raises:
            ImageReadError: The file is missing or cannot be decoded.
        """
        image = read_image(path)
        height, width = image.shape[:2]
        return image, ImagePrediction(Path(path), height, width, self.predict(image))


# ---- files in, files out -----------------------------------------------------------------


def find_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Expands folders to the image files directly inside them (by extension, sorted).

    Files named explicitly are kept whatever their extension, so that a misnamed image is
    reported when it fails to decode rather than silently dropped.

    Raises:
        FileNotFoundError: An input does not exist.
        DBNetError: No image file at all.
    """
    images: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(
                p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                logger.warning("%s: no image files (%s)", item, ", ".join(IMAGE_SUFFIXES))
            images.extend(found)
        elif item.is_file():
            images.append(item)
        else:
            raise FileNotFoundError(f"no such image file or folder: {item}")
    if not images:
        raise DBNetError(f"no image files in {', '.join(map(str, inputs))}")
    return images


def output_paths(image: Path, out_dir: Path) -> tuple[Path, Path]:
    """The drawn picture ``<stem>.jpg`` and the result file ``res_<stem>.txt`` of an image."""
    return out_dir / f"{image.stem}.jpg", out_dir / f"res_{image.stem}.txt"


def _check_outputs(images: Sequence[Path], out_dir: Path) -> None:
    """Refuses inputs whose outputs would collide with each other or overwrite an input."""
    owners: dict[str, Path] = {}
    for image in images:
        if image.stem in owners:
            raise DBNetError(
                f"{owners[image.stem]} and {image} share the name {image.stem!r}: their results "
                "would overwrite each other; predict them into different --out folders"
            )
        owners[image.stem] = image

    inputs = {image.resolve() for image in images}
    for image in images:
        for path in output_paths(image, out_dir):
            if path.resolve() in inputs:
                raise DBNetError(f"{path} is an input image: choose another --out folder")


@dataclass
class PredictionRun:
    """What `predict_images` did.

    Attributes:
        predictions: One entry per image predicted, in input order.
        failed: (file, reason) of every image that could not be read.
        json_path: The predictions.json written.
    """

    predictions: list[ImagePrediction] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    json_path: Path | None = None


def predict_images(
    predictor: Predictor,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    draw: bool = True,
    with_scores: bool = False,
) -> PredictionRun:
    """Predicts image files and folders, writing pictures, result files and one JSON.

    The output folder may exist; files of the same names are replaced, nothing else is
    touched. An image that cannot be read is logged, recorded in the run and skipped.

    Args:
        predictor: The model with its resize and post-processing.
        inputs: Image files and folders of images.
        out_dir: Where ``<stem>.jpg``, ``res_<stem>.txt`` and ``predictions.json`` go.
        draw: Write the pictures with the detections drawn.
        with_scores: Append each detection's score to its line in the result files.

    Returns:
        The predictions, the failures and the JSON path.

    Raises:
        FileNotFoundError: An input does not exist.
        NotADirectoryError: `out_dir` exists and is not a folder.
        DBNetError: No image found, or outputs that would collide or overwrite an input.
    """
    images = find_images(inputs)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} exists and is not a folder")
    _check_outputs(images, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    run = PredictionRun()
    for path in tqdm(images, desc="predict", unit="img", disable=None):
        try:
            image, prediction = predictor.predict_file(path)
        except ImageReadError as exc:
            logger.warning("skipped %s", exc)
            run.failed.append((str(path), exc.message))
            continue

        picture_path, result_path = output_paths(path, out_dir)
        detections = prediction.detections
        scores = [d.score for d in detections] if with_scores else None
        write_result_file(result_path, [d.points for d in detections], scores)
        if draw:
            write_image(picture_path, draw_detections(image, detections))
        run.predictions.append(prediction)

    run.json_path = out_dir / PREDICTIONS_FILE
    _write_predictions_json(run.json_path, run, config_to_dict(predictor.config)["postprocess"])
    return run


def _write_predictions_json(path: Path, run: PredictionRun, postprocess: dict[str, Any]) -> None:
    """Writes ``{"images": [...], "failed": [...], "postprocess": {...}}``, one image a line."""
    images = ",\n  ".join(json.dumps(p.to_dict()) for p in run.predictions)
    failed = [{"file": file, "error": reason} for file, reason in run.failed]
    text = (
        f'{{"images": [\n  {images}\n ],\n'
        f' "failed": {json.dumps(failed)},\n'
        f' "postprocess": {json.dumps(postprocess)}}}\n'
    )
    path.write_text(text, encoding="utf-8")
