"""The training loop: data order, optimiser and schedule, validation, checkpoints, DDP, AMP.

A run lives in one folder, ``<train.output_dir>/<run name>-<timestamp>``:

    config.yaml            the resolved configuration
    train.log              the log of every invocation (appended on resume)
    events.out.tfevents.*  TensorBoard scalars (train/*, val/*, final/*) and image panels
    checkpoints/last.pt    written at every epoch end, every train.save_every_steps steps,
                           at every validation and when the run stops or is interrupted
    checkpoints/best.pt    the checkpoint of the best validation hmean
    final_eval.json        precision, recall and hmean of best.pt on data.val_dir

A new run always gets a new folder; a resumed run continues in the folder of its checkpoint.

Under ``torchrun`` each process trains on its own shard of every epoch with
``train.batch_size`` images per step (the global batch is batch_size * world size) and
DistributedDataParallel averages the gradients. Only rank 0 writes files, logs and validates.

The data order depends only on (seed, epoch, rank, world size) and every checkpoint holds the
position inside the epoch and the RNG states, so a resumed run takes the same steps as one
that was never stopped.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import itertools
import json
import logging
import math
import signal
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dbnet.config import (
    Config,
    DataConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from dbnet.data.dataset import DetectionDataset
from dbnet.data.synth import generate_dataset
from dbnet.engine.checkpoint import (
    check_architecture,
    load_checkpoint,
    remove_stale_temp_files,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from dbnet.engine.distributed import ProcessInfo, init_distributed, seed_everything
from dbnet.engine.evaluate import evaluate_model
from dbnet.engine.loader import make_loader
from dbnet.engine.optim import build_optimizer, build_scheduler
from dbnet.errors import CheckpointError, ConfigError, DBNetError
from dbnet.loss import DBLoss
from dbnet.model.dbnet import build_model
from dbnet.visualize import training_panel

logger = logging.getLogger(__name__)

LOSS_KEYS = ("loss", "loss_shrink", "loss_threshold", "loss_binary")
LABEL_KEYS = ("shrink_map", "shrink_mask", "threshold_map", "threshold_mask")
CHECKPOINT_DIR = "checkpoints"
FINAL_EVAL_FILE = "final_eval.json"
# Scores of the final evaluation, as DetectionMetric.compute names them.
_FINAL_KEYS = ("precision", "recall", "hmean", "matched", "gt_care", "det_care")
# How many skipped files and gt problems the closing report lists.
_LISTED = 20


class NonFiniteLossError(DBNetError, RuntimeError):
    """A loss term became NaN or infinite (the message names the term, step and images)."""


# ---- configuration and run folder --------------------------------------------------------


def resolve_checkpoint(resume: str | Path) -> Path:
    """The checkpoint to resume from: a run folder's ``checkpoints/last.pt`` or a file.

    Raises:
        CheckpointError: Neither a run folder with a last.pt nor a checkpoint file.
    """
    path = Path(resume)
    if path.is_dir():
        last = path / CHECKPOINT_DIR / "last.pt"
        if not last.is_file():
            raise CheckpointError(f"{path}: a folder without {CHECKPOINT_DIR}/last.pt to resume")
        return last
    if not path.is_file():
        raise CheckpointError(f"resume: {path} is neither a run folder nor a checkpoint file")
    return path


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run folder holding `checkpoint`, or None for a checkpoint outside a run folder."""
    folder = checkpoint.parent if checkpoint.parent.name else checkpoint.resolve().parent
    if folder.name == CHECKPOINT_DIR and (folder.parent / "config.yaml").is_file():
        return folder.parent
    return None


def prepare_config(
    config_path: str | Path | None, overrides: list[str] | None, resume: str | Path | None
) -> Config:
    """The configuration of `dbnet train`.

    A new run reads `config_path`. A resumed run takes the configuration stored in its
    checkpoint unless `config_path` is given (its architecture must then match the
    checkpoint's); ``train.stop_at_step`` is not inherited. Overrides apply last.

    Args:
        config_path: A YAML file, or None when resuming.
        overrides: ``section.key=value`` strings.
        resume: A run folder or checkpoint file, or None for a new run.

    Raises:
        ConfigError: No configuration given, or a key or value that is not allowed.
        CheckpointError: `resume` cannot be read.
    """
    overrides = list(overrides or [])
    if config_path is None and resume is None:
        raise ConfigError("a configuration is needed: give --config FILE, or --resume RUN")

    if config_path is not None:
        config = load_config(config_path, overrides)
        if not config.train.run_name:
            config.train.run_name = Path(config_path).stem
        return config

    state = load_checkpoint(resolve_checkpoint(resume), mmap=True)
    values = copy.deepcopy(state["config"])
    values.setdefault("train", {})["stop_at_step"] = 0
    return config_from_dict(apply_overrides(values, overrides))


def read_final_eval(run_dir: str | Path, written_after: float = 0.0) -> dict[str, Any] | None:
    """The final evaluation of a run (checkpoint, val_dir, images, precision, recall, hmean).

    Args:
        run_dir: The run folder.
        written_after: Ignore a file older than this time (seconds since the epoch), e.g.
            one left by an earlier invocation of a resumed run.

    Returns:
        The scores, or None when the run has no (recent enough) final evaluation.
    """
    path = Path(run_dir) / FINAL_EVAL_FILE
    if not path.is_file() or path.stat().st_mtime < written_after:
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def create_run_dir(output_dir: str | Path, name: str) -> Path:
    """Creates a new run folder ``<output_dir>/<name>-<timestamp>[-n]``; never reuses one."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = f"{name or 'dbnet'}-{stamp}"
    for number in itertools.count(1):
        candidate = Path(output_dir) / (base if number == 1 else f"{base}-{number}")
        try:
            candidate.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            continue
        return candidate
    raise AssertionError("unreachable")


def ensure_synthetic_data(config: DataConfig) -> None:
    """Generates the training, validation and test sets that are missing
    (data.synth_if_missing).

    Existing folders are never touched. The validation and test sets use ``synth_seed + 1``
    and ``synth_seed + 2``, so the three sets hold different images; a count of 0 (or an
    empty data.test_dir) generates nothing.

    Raises:
        ConfigError: The training folder is missing and data.synth_train_count is 0.
    """
    if not config.synth_if_missing:
        return
    sets = [
        ("train_dir", config.train_dir, config.synth_train_count, config.synth_seed, "train"),
        ("val_dir", config.val_dir, config.synth_val_count, config.synth_seed + 1, "val"),
        ("test_dir", config.test_dir, config.synth_test_count, config.synth_seed + 2, "test"),
    ]
    for key, folder, count, seed, name in sets:
        if not folder or Path(folder).exists():
            continue
        if count <= 0:
            if name == "train":
                raise ConfigError(
                    f"data.{key} {folder} does not exist and data.synth_{name}_count is 0: "
                    "set a count above 0 to generate it, or point data.train_dir at a dataset"
                )
            continue
        logger.info("data.%s %s is missing: generating %d synthetic images", key, folder, count)
        summary = generate_dataset(folder, count, seed, size=tuple(config.synth_size))
        logger.info(
            "wrote %d images (%d words, %d ###) to %s in %.1f s",
            summary.images,
            summary.words,
            summary.dont_care,
            folder,
            summary.seconds,
        )


# ---- signals -----------------------------------------------------------------------------


class StopRequest:
    """Turns SIGINT and SIGTERM into a flag that the loop checks between steps.

    A second SIGINT raises KeyboardInterrupt at once (checkpoints are written atomically, so
    the last one stays intact).
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.signal_name is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(number).name


# ---- the trainer -------------------------------------------------------------------------


def train(config: Config, resume: str | Path | None = None) -> Path:
    """Trains DBNet as `config` says, optionally resuming a run.

    Args:
        config: The resolved configuration (see `prepare_config` for the CLI's rules).
        resume: A run folder (its checkpoints/last.pt) or a checkpoint file, or None.

    Returns:
        The run folder.

    Raises:
        ConfigError: A setting this machine or dataset cannot satisfy.
        CheckpointError: The checkpoint to resume is unreadable or of another architecture.
        NonFiniteLossError: A loss term became NaN or infinite (train.on_nonfinite).
    """
    process, device, started_group = init_distributed(config.train.device)
    try:
        with Trainer(config, resume, process, device) as trainer:
            return trainer.run()
    finally:
        if started_group:
            dist.destroy_process_group()


class Trainer:
    """Everything one training run holds; `train` is the way to use it.

    Args:
        config: The resolved configuration.
        resume: A run folder or checkpoint file, or None.
        process: Rank and world size.
        device: Where to train.
    """

    def __init__(
        self,
        config: Config,
        resume: str | Path | None,
        process: ProcessInfo,
        device: torch.device,
    ) -> None:
        self.config = config
        self.process = process
        self.device = device
        self.writer: SummaryWriter | None = None
        self._log_handler: logging.Handler | None = None
        self._restore_kernels: Callable[[], None] | None = None
        self._log_levels: dict[str, int] = {}

        # Position in the run; replaced by the checkpoint's when resuming.
        self.epoch = 0
        self.batch_in_epoch = 0
        self.step = 0
        self.best_hmean = -1.0
        self.best_metrics: dict[str, Any] = {}
        self.elapsed = 0.0
        # The monotonic clock reading at which training (elapsed 0) began, while the loop runs.
        self._started: float | None = None
        self.nonfinite_skips = 0
        self.skipped: list[tuple[str, str]] = []
        self.ignored: Counter[str] = Counter()
        self.last_validated_step = -1
        self.last_saved_step = -1
        self._last_lr = 0.0
        try:
            self._setup(resume)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- set-up --------------------------------------------------------------------------

    def _setup(self, resume: str | Path | None) -> None:
        config, process, device = self.config, self.process, self.device
        state = None
        checkpoint = None
        if resume is not None:
            checkpoint = resolve_checkpoint(resume)
            state = load_checkpoint(checkpoint)
            check_architecture(state, config_to_dict(config)["model"], str(checkpoint))
        self._check_device_options()
        self._restore_kernels = seed_everything(
            config.train.seed + process.rank, config.train.deterministic
        )

        # The data first: a refused dataset leaves no run folder behind.
        self._build_data()
        self.run_dir = self._open_run_dir(checkpoint)
        self._start_logging()
        self._log_data()
        self._build_model(resuming=state is not None)
        self.iters_per_epoch = len(self.sampler)
        self.total_steps = config.train.max_steps or config.train.epochs * self.iters_per_epoch
        self.optimizer = build_optimizer(self.model, config.optim)
        clock = self._time_progress if config.schedule.length == "minutes" else None
        self.scheduler = build_scheduler(
            self.optimizer, config.schedule, self.total_steps, progress=clock
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.train.amp == "fp16")
        if state is not None:
            try:
                self._restore(state, checkpoint)
            except DBNetError:
                raise
            except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as exc:
                # A checkpoint that loads safely may still lack or garble the training state.
                detail = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2])
                raise CheckpointError(
                    f"{checkpoint}: cannot resume from it ({type(exc).__name__}: {detail})"
                ) from None
        self._start_tensorboard(resumed=state is not None)

    def _check_device_options(self) -> None:
        train = self.config.train
        if train.amp == "fp16" and self.device.type == "cpu":
            logger.warning("train.amp: fp16 on the CPU is slow; bf16 is the CPU's half precision")
        if train.sync_bn and self.process.distributed and self.device.type != "cuda":
            raise ConfigError(
                "train.sync_bn: SyncBatchNorm needs CUDA devices; on the CPU use "
                "train.sync_bn=false (optionally train.freeze_bn=true)"
            )
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[train.amp]

    def _open_run_dir(self, checkpoint: Path | None) -> Path:
        """The run folder: the checkpoint's when resuming from one, else a new one (rank 0)."""
        run_dir = run_dir_of(checkpoint) if checkpoint is not None else None
        if run_dir is None and self.process.is_main:
            run_dir = create_run_dir(self.config.train.output_dir, self.config.train.run_name)
        if self.process.distributed:
            shared = [run_dir]
            dist.broadcast_object_list(shared, src=0)
            run_dir = shared[0]
        assert run_dir is not None
        if self.process.is_main:
            (run_dir / CHECKPOINT_DIR).mkdir(exist_ok=True)
            remove_stale_temp_files(run_dir / CHECKPOINT_DIR)
            save_config(self.config, run_dir / "config.yaml")
        return run_dir

    def _start_logging(self) -> None:
        """train.log on rank 0; the other ranks only log warnings."""
        package = logging.getLogger("dbnet")
        self._log_levels = {"dbnet": package.level}
        if not self.process.is_main:
            package.setLevel(logging.WARNING)
            return
        if package.getEffectiveLevel() > logging.INFO:
            package.setLevel(logging.INFO)
        handler = logging.FileHandler(self.run_dir / "train.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        package.addHandler(handler)
        self._log_handler = handler
        logger.info("run folder %s (rank 0 of %d)", self.run_dir, self.process.world_size)

    def _start_tensorboard(self, resumed: bool) -> None:
        if self.process.is_main:
            # A resumed run drops the events a killed invocation logged after its checkpoint.
            purge = self.step + 1 if resumed else None
            self.writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=purge)

    def _build_data(self) -> None:
        data = self.config.data
        if self.process.is_main:
            ensure_synthetic_data(data)
        if self.process.distributed:
            dist.barrier()
        seed = self.config.train.seed
        self.train_set = DetectionDataset(data.train_dir, data, train=True, seed=seed)
        self.train_summary = self.train_set.summary()
        self.train_summary.require_usable()
        self.loader, self.sampler = make_loader(
            self.train_set, self.config, self.process, self.device
        )
        if len(self.sampler) == 0:
            raise ConfigError(
                f"train.batch_size: {len(self.train_set)} training images are not enough for "
                f"one batch of {self.config.train.batch_size} on each of "
                f"{self.process.world_size} process(es); lower train.batch_size"
            )

        self.val_set = None
        self.val_subset = None
        if Path(data.val_dir).is_dir():
            self.val_set = DetectionDataset(data.val_dir, data, train=False, seed=seed)
            limit = self.config.eval.max_images
            self.val_subset = self.val_set
            if 0 < limit < len(self.val_set):
                self.val_subset = Subset(self.val_set, range(limit))

        self.test_set = None
        if data.test_dir:
            if not Path(data.test_dir).is_dir():
                raise ConfigError(
                    f"data.test_dir {data.test_dir} does not exist: point it at a dataset "
                    'folder, or set data.test_dir="" to evaluate on data.val_dir at the end'
                )
            self.test_set = DetectionDataset(data.test_dir, data, train=False, seed=seed)

    def _log_data(self) -> None:
        data, train = self.config.data, self.config.train
        logger.info("training set %s", self.train_summary)
        logger.info(
            "%d image(s) per process and step, %d process(es), %d step(s) per epoch",
            train.batch_size,
            self.process.world_size,
            len(self.sampler),
        )
        if self.val_set is not None:
            logger.info("validation set %s: %d images", data.val_dir, len(self.val_set))
        elif self._validation_enabled(ignore_data=True) or train.final_eval:
            logger.warning("data.val_dir %s does not exist: no validation", data.val_dir)
        if self.test_set is not None:
            logger.info(
                "test set %s: %d images, evaluated once when training ends",
                data.test_dir,
                len(self.test_set),
            )

    def _build_model(self, resuming: bool) -> None:
        config = self.config
        model_config = config.model
        if resuming:  # every weight comes from the checkpoint: fetch no pretrained backbone
            model_config = dataclasses.replace(model_config, pretrained="none")
        model = build_model(model_config).to(self.device)
        if config.train.sync_bn and self.process.distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.bare_model = model
        if self.process.distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=device_ids)
        self.model = model
        self.loss_fn = DBLoss(config.loss).to(self.device)
        self._set_train_mode()
        count = sum(p.numel() for p in self.bare_model.parameters())
        logger.info("model %s: %.2fM parameters", config.model.backbone, count / 1e6)

    def _set_train_mode(self) -> None:
        self.model.train()
        if self.config.train.freeze_bn:
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def _restore(self, state: dict[str, Any], checkpoint: Path) -> None:
        """Loads weights, optimiser, schedule, scaler, position and RNG states."""
        self.bare_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.step = int(state["step"])
        self.best_hmean = float(state["best_hmean"])
        self.best_metrics = dict(state.get("best_metrics", {}))
        self.elapsed = float(state.get("elapsed_seconds", 0.0))
        self.nonfinite_skips = int(state.get("nonfinite_skips", 0))
        self.last_saved_step = self.step
        self.last_validated_step = int(state.get("last_validated_step", -1))
        if self.batch_in_epoch >= self.iters_per_epoch:  # the epoch was cut shorter since
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        set_rng_state(state["rng"])
        logger.info(
            "resumed %s: step %d, epoch %d (batch %d), lr %.6g",
            checkpoint,
            self.step,
            self.epoch,
            self.batch_in_epoch,
            self.optimizer.param_groups[0]["lr"],
        )

    def close(self) -> None:
        """Stops the loader workers, closes TensorBoard and the log file, restores settings."""
        self.loader = None  # persistent workers exit with their loader
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        package = logging.getLogger("dbnet")
        if self._log_handler is not None:
            package.removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None
        if "dbnet" in self._log_levels:
            package.setLevel(self._log_levels.pop("dbnet"))
        if self._restore_kernels is not None:
            self._restore_kernels()
            self._restore_kernels = None

    # ---- the loop ------------------------------------------------------------------------

    def run(self) -> Path:
        """Trains until a stop condition; returns the run folder."""
        # The handler stays on to the end: a first Ctrl-C during the final evaluation is
        # noted, a second one aborts, and last.pt is on disk before either can happen.
        with StopRequest() as stop:
            try:
                reason = self._loop(stop)
            except NonFiniteLossError:
                raise  # it saved the last finite weights itself
            except DBNetError:
                # A data error (training batch or validation set) between steps: keep the
                # steps done, to resume once the data is fixed.
                self._save_last()
                raise
            self._save_last()
            if reason in ("signal", "stop_at_step"):
                logger.info(
                    "paused at step %d (%s): continue with `dbnet train --resume %s`",
                    self.step,
                    stop.signal_name or "train.stop_at_step",
                    self.run_dir,
                )
                return self.run_dir

            # The final weights compete for best.pt before the final evaluation picks it.
            final = self.config.train.final_eval and self._final_set() is not None
            validated = self.last_validated_step == self.step
            if final and self._validation_enabled() and not validated:
                self._validate()
                self._save("last.pt")  # now with the validation's result
            if final:
                self._final_eval()
            self._gather_reports()
            if self.process.is_main:
                self._summary(reason)
        return self.run_dir

    def _loop(self, stop: StopRequest) -> str:
        """Epochs of steps; returns why it stopped."""
        train = self.config.train
        started = time.monotonic() - self.elapsed
        self._started = started
        window = _Window()
        while True:
            reason = self._stop_reason(False)
            if reason is not None:
                return reason

            self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
            bar_epoch = self.epoch
            bar = tqdm(
                total=self.iters_per_epoch,
                initial=self.batch_in_epoch,
                desc=f"epoch {self.epoch}",
                dynamic_ncols=True,
                disable=None if self.process.is_main else True,
            )
            redirect = logging_redirect_tqdm() if not bar.disable else contextlib.nullcontext()
            with bar, redirect:
                # Step time runs from the end of the previous step's bookkeeping, so it holds
                # the wait for data but not validation or checkpoint writing.
                tick = time.perf_counter()
                for batch in self.loader:
                    if "_error" in batch:
                        raise DBNetError(batch["_error"])
                    self._absorb_reports(batch.pop("_reports"))
                    local_stop = stop.signal_name is not None or (
                        train.max_minutes > 0
                        and time.monotonic() - started > train.max_minutes * 60
                    )
                    values, requested = self._train_step(batch, local_stop)
                    window.add(
                        values, self._last_lr, self._images(batch), time.perf_counter() - tick
                    )
                    before = self.elapsed
                    self.elapsed = time.monotonic() - started
                    bar.update()
                    bar.set_postfix({k.replace("loss_", ""): f"{v:.3f}" for k, v in values.items()})

                    self.batch_in_epoch += 1
                    epoch_end = self.batch_in_epoch == self.iters_per_epoch
                    if epoch_end:
                        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    self._after_step(
                        epoch_end, window, bar_epoch, minutes_due=self._minutes_due(before)
                    )

                    reason = self._stop_reason(requested, stop)
                    if reason is not None:
                        return reason
                    tick = time.perf_counter()

    def _time_progress(self) -> float:
        """The fraction of train.max_minutes used so far: the clock of schedule.length
        'minutes'."""
        elapsed = self.elapsed if self._started is None else time.monotonic() - self._started
        return elapsed / (self.config.train.max_minutes * 60)

    def _minutes_due(self, before: float) -> bool:
        """Whether the step that took the elapsed time from `before` to now crossed a
        multiple of train.val_every_minutes."""
        period = self.config.train.val_every_minutes * 60
        return period > 0 and int(self.elapsed // period) > int(before // period)

    def _stop_reason(self, requested: bool, stop: StopRequest | None = None) -> str | None:
        train = self.config.train
        if self.step >= self.total_steps:
            return "schedule_complete"
        if 0 < train.stop_at_step <= self.step:
            return "stop_at_step"
        if requested:
            return "signal" if stop is not None and stop.signal_name else "max_minutes"
        return None

    def _images(self, batch: dict[str, Any]) -> int:
        """Images in the global batch of a step."""
        return len(batch["path"]) * self.process.world_size

    def _train_step(self, batch: dict[str, Any], local_stop: bool) -> tuple[dict[str, float], bool]:
        """One optimiser step; returns the loss values (mean over processes) and whether a
        stop was requested on any process."""
        want_image = self.writer is not None and self._image_due(self.step + 1)
        images = batch["image"].to(self.device, non_blocking=True)  # (N, 3, S, S)
        if self.config.model.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = {key: batch[key].to(self.device, non_blocking=True) for key in LABEL_KEYS}

        with torch.autocast(self.device.type, self.amp_dtype, enabled=self.amp_dtype is not None):
            outputs = self.model(images)
        losses = self.loss_fn(outputs, labels)  # float32 scalars

        # One reduction carries the four loss values and the stop flag of every process.
        packed = torch.stack([losses[key].detach().float() for key in LOSS_KEYS])
        packed = torch.cat([packed, packed.new_tensor([float(local_stop)])])
        if self.process.distributed:
            dist.all_reduce(packed)
            packed[: len(LOSS_KEYS)] /= self.process.world_size
        values = dict(zip(LOSS_KEYS, packed[: len(LOSS_KEYS)].tolist(), strict=True))
        requested = packed[-1].item() > 0

        self._last_lr = self.optimizer.param_groups[0]["lr"]  # the rate of this step
        self.optimizer.zero_grad(set_to_none=True)
        if all(math.isfinite(v) for v in values.values()):
            self.scaler.scale(losses["loss"]).backward()
            if self.config.train.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.config.train.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self._nonfinite(losses, batch)
        with warnings.catch_warnings():
            # The fp16 scaler skips the steps whose gradients overflow; the schedule still
            # advances, which is what torch warns about.
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            self.scheduler.step()
        self.step += 1

        if want_image:
            self._log_images(batch, outputs)
        return values, requested

    def _nonfinite(self, losses: dict[str, Tensor], batch: dict[str, Any]) -> None:
        """Stops, or skips the batch, on a non-finite loss; names terms, step and images."""
        local = {key: float(value.detach()) for key, value in losses.items()}
        report = [(local, list(batch["path"]))]
        if self.process.distributed:
            gathered: list[Any] = [None] * self.process.world_size
            dist.all_gather_object(gathered, report[0])
            report = gathered

        bad_terms = sorted(
            {key for terms, _ in report for key, v in terms.items() if not math.isfinite(v)},
            key=LOSS_KEYS.index,
        )
        named = [key for key in bad_terms if key != "loss"] or bad_terms
        paths = [
            path
            for terms, files in report
            if not all(map(math.isfinite, terms.values()))
            for path in files
        ]
        values = ", ".join(
            f"{key}={terms[key]}"
            for terms, _ in report
            for key in named
            if not math.isfinite(terms[key])
        )
        message = (
            f"non-finite loss at step {self.step + 1} (epoch {self.epoch}): {values}; "
            f"images of the batch: {', '.join(paths)}"
        )

        train = self.config.train
        if train.on_nonfinite == "skip" and self.nonfinite_skips < train.max_nonfinite_skips:
            self.nonfinite_skips += 1
            logger.warning(
                "%s; batch skipped (%d of at most %d)",
                message,
                self.nonfinite_skips,
                train.max_nonfinite_skips,
            )
            return
        if train.on_nonfinite == "skip":
            message += (
                f"; {self.nonfinite_skips} batches already skipped (train.max_nonfinite_skips)"
            )
        if all(torch.isfinite(p).all() for p in self.bare_model.parameters()):
            self._save_last()  # the weights before this batch, to inspect or resume
        raise NonFiniteLossError(message)

    def _after_step(
        self, epoch_end: bool, window: _Window, epoch_of_step: int, minutes_due: bool = False
    ) -> None:
        """Logging, validation and checkpoints due after the step just taken.

        `minutes_due`: the step crossed a multiple of train.val_every_minutes.
        """
        train = self.config.train
        if self.step % train.log_every == 0:
            self._log_scalars(window, epoch_of_step)

        validate = self._validation_enabled() and (
            minutes_due
            or (train.val_every_steps > 0 and self.step % train.val_every_steps == 0)
            or (
                epoch_end
                and train.val_every_epochs > 0
                and self.epoch % train.val_every_epochs == 0
            )
        )
        if validate:
            self._validate()
        if (
            epoch_end
            or validate
            or (train.save_every_steps > 0 and self.step % train.save_every_steps == 0)
        ):
            self._save_last()

    def _image_due(self, step: int) -> bool:
        every = self.config.train.image_every
        return every > 0 and (step == 1 or step % every == 0)

    # ---- logging -------------------------------------------------------------------------

    def _log_scalars(self, window: _Window, epoch: int) -> None:
        means, lr, images_per_second = window.flush()
        if not means:
            return
        if self.writer is not None:
            for key, value in means.items():
                self.writer.add_scalar(f"train/{key}", value, self.step)
            self.writer.add_scalar("train/lr", lr, self.step)
            self.writer.add_scalar("train/images_per_second", images_per_second, self.step)
        if self.config.schedule.length == "minutes":
            position = f"{self.step} ({self.elapsed / 60:.2f}/{self.config.train.max_minutes} min)"
        else:
            position = f"{self.step}/{self.total_steps}"
        logger.info(
            "step %s epoch %d: loss %.4f (shrink %.4f, threshold %.4f, binary %.4f) "
            "lr %.3g, %.1f images/s",
            position,
            epoch,
            means["loss"],
            means["loss_shrink"],
            means["loss_threshold"],
            means["loss_binary"],
            lr,
            images_per_second,
        )

    def _log_images(self, batch: dict[str, Any], outputs: dict[str, Tensor]) -> None:
        """A panel of the first sample: input, targets and predicted maps."""
        assert self.writer is not None
        first = {key: value[0].detach().float().cpu().numpy() for key, value in outputs.items()}
        panel = training_panel(
            batch["image"][0].numpy(),  # (3, S, S) normalised
            batch["shrink_map"][0].numpy(),  # (S, S) in {0, 1}
            first["prob"][0],  # (S, S) in [0, 1]
            first["thresh"][0],
            first["binary"][0],
            mean=self.config.data.mean,
            std=self.config.data.std,
        )  # (h, 5 w, 3) uint8
        self.writer.add_image("train/maps", panel, self.step, dataformats="HWC")

    # ---- validation and checkpoints ------------------------------------------------------

    def _validation_enabled(self, ignore_data: bool = False) -> bool:
        train = self.config.train
        periodic = train.val_every_epochs > 0 or train.val_every_steps > 0
        periodic = periodic or train.val_every_minutes > 0
        return periodic and (ignore_data or self.val_set is not None)

    def _validate(self) -> None:
        """Evaluates on the validation set (rank 0) and keeps best.pt by hmean."""
        self.last_validated_step = self.step
        if self.process.is_main:
            assert self.val_subset is not None
            self.bare_model.eval()
            metrics = evaluate_model(self.bare_model, self.val_subset, self.config, self.device)
            self._set_train_mode()

            if self.writer is not None:
                for key in ("precision", "recall", "hmean"):
                    self.writer.add_scalar(f"val/{key}", float(metrics[key]), self.step)
            improved = float(metrics["hmean"]) > self.best_hmean
            logger.info(
                "validation at step %d on %d images: precision %.4f recall %.4f hmean %.4f%s",
                self.step,
                len(self.val_subset),
                metrics["precision"],
                metrics["recall"],
                metrics["hmean"],
                " (best so far)" if improved else f" (best {self.best_hmean:.4f})",
            )
            if improved:
                self.best_hmean = float(metrics["hmean"])
                self.best_metrics = {
                    **_plain_metrics(metrics),
                    "step": self.step,
                    "images": len(self.val_subset),
                }
                self._save("best.pt")
        if self.process.distributed:
            dist.barrier()

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs, as tensors and plain values."""
        return {
            "model": self.bare_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "step": self.step,
            "total_steps": self.total_steps,
            "config": config_to_dict(self.config),
            "best_hmean": self.best_hmean,
            "best_metrics": self.best_metrics,
            "last_validated_step": self.last_validated_step,
            "elapsed_seconds": self.elapsed,
            "nonfinite_skips": self.nonfinite_skips,
            "rng": rng_state(),
        }

    def _save(self, name: str) -> None:
        if self.process.is_main:
            save_checkpoint(self.run_dir / CHECKPOINT_DIR / name, self.state_dict())

    def _save_last(self) -> None:
        if self.last_saved_step != self.step:
            self._save("last.pt")
            self.last_saved_step = self.step

    def _final_set(self) -> DetectionDataset | None:
        """The set of the final evaluation: data.test_dir when given, else data.val_dir."""
        return self.test_set if self.test_set is not None else self.val_set

    def _final_eval(self) -> None:
        """Scores of best.pt (else last.pt) on the whole test set (else validation set).

        Writes them to final_eval.json: ``checkpoint``, ``step`` (of its weights),
        ``split`` ("test" or "val"), ``data_dir``, ``images``, ``box_thresh``, ``eval_size``,
        ``precision``, ``recall``, ``hmean``, ``matched``, ``gt_care``, ``det_care`` and
        ``seconds`` (of the evaluation).
        """
        dataset = self._final_set()
        if not self.process.is_main or dataset is None:
            return
        started = time.monotonic()
        best = self.run_dir / CHECKPOINT_DIR / "best.pt"
        path = best if best.is_file() else self.run_dir / CHECKPOINT_DIR / "last.pt"
        step = int(self.best_metrics.get("step", self.step)) if path == best else self.step

        validated = dataset is self.val_set and self.best_metrics.get("images") == len(dataset)
        if path == best and validated and "matched" in self.best_metrics:
            metrics = dict(self.best_metrics)  # best.pt was already validated on every image
        else:
            self.bare_model.load_state_dict(load_checkpoint(path)["model"])
            self.bare_model.eval()
            metrics = _plain_metrics(
                evaluate_model(self.bare_model, dataset, self.config, self.device)
            )
        split = "test" if dataset is self.test_set else "val"
        data = self.config.data
        result = {
            "checkpoint": str(path),
            "step": step,
            "split": split,
            "data_dir": data.test_dir if split == "test" else data.val_dir,
            "images": len(dataset),
            "box_thresh": self.config.postprocess.box_thresh,
            "eval_size": data.eval_size,
            **{key: metrics[key] for key in _FINAL_KEYS},
            "seconds": round(time.monotonic() - started, 1),
        }
        (self.run_dir / FINAL_EVAL_FILE).write_text(json.dumps(result, indent=2), encoding="utf-8")
        if self.writer is not None:
            for key in ("precision", "recall", "hmean"):
                self.writer.add_scalar(f"final/{key}", float(result[key]), self.step)
        logger.info(
            "final evaluation of %s (step %d) on the %s set %s (%d images): precision %.4f "
            "recall %.4f hmean %.4f",
            path.name,
            step,
            split,
            result["data_dir"],
            len(dataset),
            result["precision"],
            result["recall"],
            result["hmean"],
        )

    def _summary(self, reason: str) -> None:
        """The closing report: steps, time, best hmean and every skipped sample."""
        why = {
            "schedule_complete": "the schedule is complete",
            "max_minutes": f"train.max_minutes={self.config.train.max_minutes} elapsed",
        }.get(reason, reason)
        logger.info(
            "stopped at step %d/%d, epoch %d, after %s of training: %s; best validation hmean %s",
            self.step,
            self.total_steps,
            self.epoch,
            str(datetime.timedelta(seconds=round(self.elapsed))),
            why,
            f"{self.best_hmean:.4f}" if self.best_hmean >= 0 else "none",
        )
        for line in self._skipped_lines():
            logger.info("%s", line)
        if self.nonfinite_skips:
            logger.info("batches skipped for a non-finite loss: %d", self.nonfinite_skips)

    def _absorb_reports(self, reports: list[tuple[list[tuple[str, str]], Counter[str]]]) -> None:
        """Adds what the dataset skipped and ignored for the items of one batch."""
        for skipped, ignored in reports:
            self.skipped.extend(skipped)
            self.ignored.update(ignored)

    def _gather_reports(self) -> None:
        """Brings every process's skipped samples and ignored instances to rank 0."""
        if not self.process.distributed:
            return
        gathered: list[Any] = [None] * self.process.world_size
        dist.all_gather_object(gathered, (self.skipped, self.ignored))
        self.skipped = [entry for skipped, _ in gathered for entry in skipped]
        self.ignored = sum((ignored for _, ignored in gathered), Counter())

    def _skipped_lines(self) -> list[str]:
        """Lines of the closing report on unreadable samples and ignored instances."""
        problems = self.train_set.problems
        unique = dict.fromkeys(self.skipped)  # the same file may be skipped every epoch
        lines = [
            f"unreadable training samples skipped: {len(unique)}",
            *(f"  {file}: {reason}" for file, reason in list(unique)[:_LISTED]),
            f"gt problems (lines or files left out): {len(problems)}",
            *(f"  {problem}" for problem in problems[:_LISTED]),
        ]
        if len(unique) > _LISTED or len(problems) > _LISTED:
            lines.append(f"  (at most {_LISTED} of each listed)")
        ignored = ", ".join(f"{reason} {count}" for reason, count in self.ignored.most_common())
        lines.append(f"instances ignored in training crops: {ignored or 'none'}")
        return lines


class _Window:
    """Loss values, images and time accumulated between two log lines."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Starts an empty window."""
        self.sums: dict[str, float] = {}
        self.count = 0
        self.images = 0
        self.seconds = 0.0
        self.lr = 0.0

    def add(self, values: dict[str, float], lr: float, images: int, seconds: float) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1
        self.images += images
        self.seconds += seconds
        self.lr = lr

    def flush(self) -> tuple[dict[str, float], float, float]:
        """(mean loss values, last lr, images per second), then starts a new window."""
        means = {key: total / self.count for key, total in self.sums.items()} if self.count else {}
        result = (means, self.lr, self.images / max(self.seconds, 1e-9))
        self.reset()
        return result


def _plain_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numeric entries of a metric dict as python numbers (checkpoint- and JSON-safe)."""
    plain: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
            continue
        plain[key] = int(value) if isinstance(value, (int, np.integer)) else float(value)
    return plain
