"""The training loop on tiny synthetic data: loss, TensorBoard, validation, resume, signals."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_runs import make_dataset, tiny_config, tiny_values, write_config
from typer.testing import CliRunner

from dbnet.cli import app
from dbnet.config import ScheduleConfig, config_to_dict, load_config
from dbnet.data.dataset import DetectionDataset
from dbnet.engine import loader as loader_module
from dbnet.engine import train as train_module
from dbnet.engine.checkpoint import load_checkpoint
from dbnet.engine.distributed import ProcessInfo
from dbnet.engine.loader import EpochBatchSampler, make_loader
from dbnet.engine.optim import build_optimizer, build_scheduler, lr_factor
from dbnet.engine.train import NonFiniteLossError, prepare_config, read_final_eval, train
from dbnet.errors import CheckpointError, ConfigError, DBNetError
from dbnet.loss import DBLoss

LOSS_TAGS = ["train/loss", "train/loss_shrink", "train/loss_threshold", "train/loss_binary"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Four training images and two validation images."""
    root = tmp_path_factory.mktemp("data")
    return make_dataset(root / "train", count=4), make_dataset(root / "val", count=2, seed=1)


def _events(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def _scalars(run_dir: Path, tag: str) -> list[float]:
    """The values of a tag in step order (event files of one process may be read in any
    order: their names differ only by a counter when written within the same second)."""
    events = sorted((event.step, event.value) for event in _events(run_dir).Scalars(tag))
    steps = [step for step, _ in events]
    assert len(set(steps)) == len(steps), f"{tag}: steps logged twice {steps}"
    return [value for _, value in events]


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


# ---- schedule and data order -------------------------------------------------------------


def test_poly_decay_with_warmup() -> None:
    poly = ScheduleConfig(name="poly", power=0.9)
    assert lr_factor(0, 100, poly) == 1.0
    assert lr_factor(50, 100, poly) == pytest.approx(0.5**0.9)
    assert lr_factor(100, 100, poly) == 0.0
    assert lr_factor(150, 100, poly) == 0.0, "past the end the factor stays 0"

    warm = ScheduleConfig(name="constant", warmup_steps=10, warmup_factor=0.1)
    assert lr_factor(0, 100, warm) == pytest.approx(0.1)
    assert lr_factor(5, 100, warm) == pytest.approx(0.55)
    assert lr_factor(10, 100, warm) == 1.0
    assert lr_factor(90, 100, warm) == 1.0


def test_poly_decay_over_a_fraction_of_the_run() -> None:
    poly = ScheduleConfig(name="poly", power=0.9, warmup_steps=10, warmup_factor=0.1)
    assert lr_factor(20, 100, poly, progress=0.5) == pytest.approx(0.5**0.9)
    assert lr_factor(99, 100, poly, progress=0.1) == pytest.approx(0.9**0.9), "not the steps"
    assert lr_factor(5, 100, poly, progress=0.0) == pytest.approx(0.55), "warmup in steps"
    assert lr_factor(1, 100, poly, progress=1.2) == 0.0, "past the budget the factor stays 0"


def test_scheduler_steps_every_iteration() -> None:
    weight = torch.nn.Parameter(torch.zeros(1))
    model = torch.nn.Module()
    model.weight = weight
    optimizer = build_optimizer(model, load_config(None).optim)
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["weight_decay"] == 1e-4

    scheduler = build_scheduler(optimizer, ScheduleConfig(), total_steps=10)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.007 * 0.6**0.9)
    assert scheduler.state_dict()["lr_lambdas"] == [None], "the schedule is rebuilt, not stored"


@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_other_optimisers(name: str) -> None:
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, load_config(None, [f"optim.name={name}"]).optim)
    assert type(optimizer).__name__.lower() == name


def test_batches_depend_on_seed_and_epoch_only() -> None:
    sampler = EpochBatchSampler(10, batch_size=3, seed=7)
    assert len(sampler) == 3, "the incomplete tail batch is dropped"
    sampler.set_epoch(0)
    first = list(sampler)
    assert list(sampler) == first, "the same epoch gives the same batches"
    assert all(epoch == 0 for batch in first for epoch, _ in batch)

    sampler.set_epoch(1)
    assert [i for b in sampler for _, i in b] != [i for b in first for _, i in b]

    again = EpochBatchSampler(10, batch_size=3, seed=7)
    again.set_epoch(0, start_batch=2)
    assert list(again) == first[2:], "skipping batches must not change the rest"


def test_shards_of_two_processes_make_the_global_batches() -> None:
    single = EpochBatchSampler(8, batch_size=4, seed=3)
    shards = [EpochBatchSampler(8, batch_size=2, seed=3, rank=r, world_size=2) for r in range(2)]
    for sampler in (single, *shards):
        sampler.set_epoch(5)
    for whole, part0, part1 in zip(single, *shards, strict=True):
        assert not set(part0) & set(part1), "two processes got the same sample"
        assert sorted(part0 + part1) == sorted(whole)


def test_persistent_workers_see_each_epoch(tmp_path, data) -> None:
    config = tiny_config(tmp_path, data[0], overrides=["train.num_workers=1"])
    dataset = DetectionDataset(data[0], config.data, train=True, seed=config.train.seed)
    loader, sampler = make_loader(dataset, config, ProcessInfo(), torch.device("cpu"))
    images = {}
    for epoch in (0, 1, 2):
        sampler.set_epoch(epoch)
        keys = next(iter(sampler))
        batch = next(iter(loader))
        for position, (key_epoch, index) in enumerate(keys):
            dataset.set_epoch(key_epoch)
            expected = dataset[index]["image"]
            assert torch.equal(batch["image"][position], expected), f"epoch {epoch} sample {index}"
            images[epoch, index] = expected
    same_index = [i for (e, i) in images if e == 0 and (1, i) in images]
    for index in same_index:
        assert not torch.equal(images[0, index], images[1, index]), "epochs must differ"


def test_a_data_error_in_a_worker_is_one_readable_error(tmp_path) -> None:
    train_dir = make_dataset(tmp_path / "broken", count=4)
    (train_dir / "images" / "img_3.jpg").write_bytes(b"not a jpeg")
    overrides = ["train.num_workers=1", "data.max_bad_fraction=0.0"]
    with pytest.raises(DBNetError) as info:
        train(tiny_config(tmp_path, train_dir, overrides=overrides))
    assert "img_3.jpg" in str(info.value)
    assert "Traceback" not in str(info.value), "the worker's traceback leaked into the message"


def test_the_summary_lists_samples_skipped_in_workers(tmp_path) -> None:
    train_dir = make_dataset(tmp_path / "one_broken", count=4)
    (train_dir / "images" / "img_2.jpg").write_bytes(b"not a jpeg")
    overrides = ["train.num_workers=1", "data.max_bad_fraction=0.5", "train.epochs=2"]
    run_dir = train(tiny_config(tmp_path, train_dir, overrides=overrides))
    log = (run_dir / "train.log").read_text()
    assert "unreadable training samples skipped: 1" in log, log
    assert "img_2.jpg" in log.split("unreadable training samples skipped")[1]
    assert "instances ignored in training crops" in log


# ---- training ----------------------------------------------------------------------------


def test_a_short_run_lowers_the_loss_and_logs_to_tensorboard(tmp_path, data) -> None:
    train_dir, _ = data
    config = tiny_config(tmp_path, train_dir, overrides=["train.epochs=8", "train.image_every=4"])
    run_dir = train(config)

    assert run_dir.parent == tmp_path / "runs" and run_dir.name.startswith("tiny-")
    assert (run_dir / "train.log").stat().st_size > 0
    assert load_config(run_dir / "config.yaml") == config, "config.yaml is the resolved config"
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert last["step"] == 16 and last["config"] == config_to_dict(config)

    events = _events(run_dir)
    tags = events.Tags()
    expected = [*LOSS_TAGS, "train/lr", "train/images_per_second"]
    assert set(expected) <= set(tags["scalars"]), tags["scalars"]
    assert "train/maps" in tags["images"], tags["images"]

    losses = _scalars(run_dir, "train/loss")
    assert len(losses) == 16
    start, end = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert end < 0.85 * start, f"loss did not fall: {start:.3f} -> {end:.3f}"
    lrs = _scalars(run_dir, "train/lr")
    assert lrs[0] == pytest.approx(0.002) and lrs[-1] < lrs[0], "poly decay per iteration"


def test_validation_keeps_the_best_checkpoint_and_evaluates_it(tmp_path, data) -> None:
    train_dir, val_dir = data
    overrides = ["train.epochs=2", "train.val_every_steps=2", "train.final_eval=true"]
    run_dir = train(tiny_config(tmp_path, train_dir, val_dir, overrides))

    tags = _events(run_dir).Tags()["scalars"]
    assert {"val/precision", "val/recall", "val/hmean", "final/hmean"} <= set(tags), tags
    assert len(_scalars(run_dir, "val/hmean")) == 2, "validated at steps 2 and 4"
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert best["best_hmean"] == max(_scalars(run_dir, "val/hmean"))

    scores = read_final_eval(run_dir)
    assert scores is not None and scores["images"] == 2
    assert {"precision", "recall", "hmean"} <= set(scores)
    assert scores["checkpoint"].endswith("best.pt")
    assert read_final_eval(run_dir, written_after=time.time() + 60) is None


def test_a_new_run_never_reuses_a_folder(tmp_path, data) -> None:
    config = tiny_config(tmp_path, data[0], overrides=["train.max_steps=1"])
    first = train(config)
    before = (first / "checkpoints" / "last.pt").stat().st_mtime_ns
    second = train(config)
    assert second != first and second.parent == first.parent
    assert (first / "checkpoints" / "last.pt").stat().st_mtime_ns == before


def test_max_steps_sizes_the_schedule(tmp_path, data) -> None:
    run_dir = train(tiny_config(tmp_path, data[0], overrides=["train.max_steps=3"]))
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["step"] == 3 and state["total_steps"] == 3
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.0, "the poly schedule ends at 0"


def test_max_minutes_stops_early_keeping_the_schedule(tmp_path, data) -> None:
    config = tiny_config(tmp_path, data[0], overrides=["train.max_minutes=0.00001"])
    run_dir = train(config)
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["step"] == 1 and state["total_steps"] == 6
    assert "train.max_minutes" in (run_dir / "train.log").read_text()


def test_a_schedule_in_minutes_ends_at_rate_zero_when_the_budget_is_spent(tmp_path, data) -> None:
    train_dir, val_dir = data
    overrides = [
        "schedule.length=minutes",
        "train.max_minutes=0.02",
        "train.epochs=100000",
        "train.val_every_minutes=0.01",
    ]
    run_dir = train(tiny_config(tmp_path, train_dir, val_dir, overrides))
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["step"] > 2 and state["elapsed_seconds"] >= 0.02 * 60
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.0, "the time budget is spent"
    lrs = _scalars(run_dir, "train/lr")
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.5 * lrs[0], lrs
    assert len(_scalars(run_dir, "val/hmean")) >= 1, "validated every 0.01 minutes"
    assert "train.max_minutes" in (run_dir / "train.log").read_text()


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision(tmp_path, data, amp: str) -> None:
    overrides = [f"train.amp={amp}", "train.max_steps=2", "model.channels_last=true"]
    run_dir = train(tiny_config(tmp_path, data[0], overrides=overrides))
    assert all(map(torch.isfinite, map(torch.tensor, _scalars(run_dir, "train/loss"))))
    scaler = load_checkpoint(run_dir / "checkpoints" / "last.pt")["scaler"]
    assert bool(scaler) == (amp == "fp16"), "a GradScaler only for fp16"


def test_synthetic_data_is_generated_when_missing(tmp_path) -> None:
    values = tiny_values(tmp_path, tmp_path / "synth" / "train", tmp_path / "synth" / "val")
    values["data"].update(synth_if_missing=True, synth_train_count=2, synth_val_count=1)
    values["data"]["synth_size"] = [96, 96]
    values["train"].update(max_steps=1, batch_size=1)
    config_path = write_config(tmp_path / "synth.yaml", values)
    train(prepare_config(config_path, [], None))
    assert len(list((tmp_path / "synth" / "train" / "images").iterdir())) == 2
    assert len(list((tmp_path / "synth" / "val" / "images").iterdir())) == 1


# ---- refusals ----------------------------------------------------------------------------


def test_a_training_set_without_usable_instances_is_refused(tmp_path) -> None:
    train_dir = make_dataset(tmp_path / "dont_care", count=3, dont_care=True)
    with pytest.raises(DBNetError) as info:
        train(tiny_config(tmp_path, train_dir))
    message = str(info.value)
    assert "3 images" in message and "0 usable" in message, message
    assert not (tmp_path / "runs").exists(), "a refused run leaves no folder"


def test_the_all_dont_care_case_is_refused_by_the_cli(tmp_path, cases_dir) -> None:
    values = tiny_values(tmp_path, cases_dir / "07_all_dont_care")
    config_path = write_config(tmp_path / "c.yaml", values)
    result = CliRunner().invoke(app, ["train", "--config", str(config_path)])
    assert result.exit_code == 1, result.output
    assert "1 images and 0 usable" in result.output


def test_a_batch_larger_than_the_set_is_refused(tmp_path, data) -> None:
    with pytest.raises(ConfigError, match="train.batch_size: 4 training images"):
        train(tiny_config(tmp_path, data[0], overrides=["train.batch_size=5"]))


def test_resuming_another_architecture_is_refused(tmp_path, data) -> None:
    run_dir = train(tiny_config(tmp_path, data[0], overrides=["train.max_steps=1"]))
    other = tiny_config(tmp_path, data[0], overrides=["model.backbone=mobilenet_v3_large"])
    with pytest.raises(CheckpointError) as info:
        train(other, resume=run_dir)
    message = str(info.value)
    assert "'mobilenet_v3_small' in the checkpoint" in message
    assert "'mobilenet_v3_large' requested" in message


# ---- non-finite losses -------------------------------------------------------------------


class _NaNLoss:
    """DBLoss whose threshold term becomes NaN on the calls listed in `bad_calls`."""

    bad_calls: tuple[int, ...] = (2,)

    def __init__(self, config) -> None:
        self.inner = DBLoss(config)
        self.calls = 0

    def to(self, device: torch.device) -> _NaNLoss:
        return self

    def __call__(self, outputs: dict, batch: dict) -> dict:
        self.calls += 1
        losses = self.inner(outputs, batch)
        if self.calls in self.bad_calls:
            losses["loss_threshold"] = losses["loss_threshold"] * float("nan")
            losses["loss"] = (
                losses["loss_shrink"] + losses["loss_threshold"] + losses["loss_binary"]
            )
        return losses


@pytest.fixture
def batch_paths(monkeypatch) -> list[list[str]]:
    """The image files of every training batch, in order."""
    paths: list[list[str]] = []
    real_collate = loader_module.collate

    def recording_collate(items):
        batch = real_collate(items)
        paths.append(list(batch["path"]))
        return batch

    monkeypatch.setattr(loader_module, "collate", recording_collate)
    return paths


def test_a_nonfinite_loss_stops_naming_term_step_and_images(
    tmp_path, data, monkeypatch, batch_paths
) -> None:
    monkeypatch.setattr(train_module, "DBLoss", _NaNLoss)
    with pytest.raises(NonFiniteLossError) as info:
        train(tiny_config(tmp_path, data[0]))
    message = str(info.value)
    assert "loss_threshold=nan" in message and "at step 2" in message, message
    assert "loss_shrink" not in message, "only the non-finite term is named"
    for path in batch_paths[1]:
        assert path in message
    assert len(batch_paths) == 2, "training stops at the second batch"
    last = load_checkpoint(next((tmp_path / "runs").iterdir()) / "checkpoints" / "last.pt")
    assert last["step"] == 1, "the weights before the bad batch are saved"


def test_nonfinite_batches_can_be_skipped_up_to_a_limit(tmp_path, data, monkeypatch) -> None:
    monkeypatch.setattr(_NaNLoss, "bad_calls", (2, 4))
    monkeypatch.setattr(train_module, "DBLoss", _NaNLoss)
    overrides = ["train.on_nonfinite=skip", "train.max_nonfinite_skips=1"]
    with pytest.raises(NonFiniteLossError, match="1 batches already skipped") as info:
        train(tiny_config(tmp_path, data[0], overrides=overrides))
    assert "at step 4" in str(info.value)


# ---- resume ------------------------------------------------------------------------------


def _final_state(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")


def _assert_same_training_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), f"{name} differs after resuming"
    for key, slots in a["optimizer"]["state"].items():
        for slot, value in slots.items():
            assert torch.equal(
                torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][key][slot])
            )


def test_a_resumed_run_continues_bit_for_bit(tmp_path, data) -> None:
    # Augmentation on, one persistent worker: data order and per-sample randomness must be
    # restored, not just the weights.
    overrides = ["train.num_workers=1", "train.epochs=3", "optim.name=sgd", "optim.lr=0.01"]
    uninterrupted = train(tiny_config(tmp_path / "a", data[0], overrides=overrides))

    paused = train(
        tiny_config(tmp_path / "b", data[0], overrides=[*overrides, "train.stop_at_step=3"])
    )
    middle = _final_state(paused)
    assert middle["step"] == 3 and middle["batch_in_epoch"] == 1, "paused inside epoch 1"

    resumed_config = prepare_config(None, [], paused)
    assert resumed_config.train.stop_at_step == 0, "a resume does not inherit stop_at_step"
    assert train(resumed_config, resume=paused) == paused, "a resume writes into its run folder"

    _assert_same_training_state(_final_state(uninterrupted), _final_state(paused))
    assert _scalars(paused, "train/loss") == _scalars(uninterrupted, "train/loss")


def test_resume_through_the_cli(tmp_path, data) -> None:
    values = tiny_values(tmp_path, *data)
    values["train"].update(epochs=2, val_every_epochs=1, final_eval=True)
    config_path = write_config(tmp_path / "c.yaml", values)
    runner = CliRunner()

    first = runner.invoke(app, ["train", "-c", str(config_path), "--set", "train.stop_at_step=1"])
    assert first.exit_code == 0, first.output
    run_dir = Path(first.output.split("run folder: ")[1].split()[0])
    assert "precision" not in first.output, "a paused run has no final evaluation"

    second = runner.invoke(app, ["train", "--resume", str(run_dir), "train.log_every=2"])
    assert second.exit_code == 0, second.output
    assert f"run folder: {run_dir}" in second.output
    assert "best.pt" in second.output and "hmean" in second.output
    assert _final_state(run_dir)["step"] == 4


# ---- signals and kills (subprocesses) ----------------------------------------------------


def _wait_for(predicate, process: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            pytest.fail(
                f"the training process exited ({process.returncode}) before {what}:\n{output}"
            )
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _trainer(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dbnet.cli", "train", *args],
        env=env or _subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.parametrize(
    ("signal_number", "workers"), [(signal.SIGTERM, 0), (signal.SIGINT, 1)], ids=["term", "ctrl-c"]
)
def test_a_signal_saves_last_and_exits_cleanly(tmp_path, data, signal_number, workers) -> None:
    values = tiny_values(tmp_path, data[0])
    values["train"].update(epochs=1000, num_workers=workers)
    config_path = write_config(tmp_path / "c.yaml", values)
    # A session of its own: Ctrl-C reaches the whole process group, loader workers included.
    process = subprocess.Popen(
        [sys.executable, "-m", "dbnet.cli", "train", "--config", str(config_path)],
        env=_subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    runs = tmp_path / "runs"

    def trained_two_steps() -> bool:
        logs = list(runs.glob("*/train.log"))
        return bool(logs) and "step 2/" in logs[0].read_text()

    _wait_for(trained_two_steps, process, "two steps")
    os.killpg(process.pid, signal_number)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    run_dir = next(runs.iterdir())
    state = _final_state(run_dir)
    assert 2 <= state["step"] < 2000
    log = (run_dir / "train.log").read_text()
    assert f"paused at step {state['step']} ({signal.Signals(signal_number).name})" in log
    assert f"--resume {run_dir}" in output
    assert "Traceback" not in output, output


_SLOW_SAVES = """
import os, stat, sys, time
from pathlib import Path
marker = Path(os.environ["SAVE_MARKER"])
real_fsync = os.fsync

def slow_fsync(fd):
    if not stat.S_ISDIR(os.fstat(fd).st_mode):  # the checkpoint file, not its folder
        with marker.open("a") as file:
            file.write("saving\\n")
        time.sleep(float(os.environ["SAVE_SECONDS"]))
    real_fsync(fd)

os.fsync = slow_fsync
from dbnet.cli import main
sys.argv = ["dbnet", *sys.argv[1:]]
main()
"""


def test_sigkill_during_checkpoint_saves_then_resume(tmp_path, data) -> None:
    values = tiny_values(tmp_path, data[0])
    values["train"].update(epochs=4, save_every_steps=1)
    config_path = write_config(tmp_path / "c.yaml", values)
    marker = tmp_path / "saves.txt"
    env = dict(_subprocess_env(), SAVE_MARKER=str(marker), SAVE_SECONDS="0.3")
    runs = tmp_path / "runs"

    def saves() -> int:
        return len(marker.read_text().splitlines()) if marker.exists() else 0

    def slow_trainer(args: list[str]) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-c", _SLOW_SAVES, "train", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    # 1: killed in the middle of its second save (the first one is complete).
    process = slow_trainer(["--config", str(config_path)])
    _wait_for(lambda: saves() >= 2, process, "the second save")
    process.kill()
    process.wait(timeout=30)
    run_dir = next(runs.iterdir())
    assert list((run_dir / "checkpoints").glob(".last.pt.*.tmp")), "the kill hit a save"
    assert _final_state(run_dir)["step"] == 1, "the previous checkpoint must be intact"

    # 2: resumed, killed at a random moment during its saves and steps.
    rng = random.Random(0)
    for _ in range(2):
        before = saves()
        process = slow_trainer(["--resume", str(run_dir)])
        _wait_for(lambda b=before: saves() > b, process, "a save after resuming")
        time.sleep(rng.uniform(0.0, 0.5))
        process.kill()
        process.wait(timeout=30)
        state = _final_state(run_dir)  # loads: never a torn file
        assert 1 <= state["step"] <= 8

    # 3: resumed to the end without slow saves; it matches a run that was never killed.
    process = _trainer(["--resume", str(run_dir)])
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    assert not list((run_dir / "checkpoints").glob("*.tmp")), "unfinished saves are cleaned up"
    reference = train(tiny_config(tmp_path / "ref", data[0], overrides=["train.epochs=4"]))
    _assert_same_training_state(_final_state(reference), _final_state(run_dir))
