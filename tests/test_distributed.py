"""Two CPU processes under torchrun (gloo) train like one process on the same global batch.

What "the same" means: DistributedDataParallel averages the gradients of the per-process
losses, so the single-process reference below takes the global batch of both shards, runs
the model on all of it, and averages the DB loss of each shard. The DB loss is not a mean
over images (hard negatives are mined over the whole batch), so a plain single-process run
with batch 2 would differ by design, not by a bug.

BatchNorm is frozen (train.freeze_bn): per-process batch statistics would differ from the
global batch's, and SyncBatchNorm needs CUDA.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_runs import make_dataset, tiny_values, write_config

from dbnet.config import config_from_dict
from dbnet.data.dataset import DetectionDataset, collate
from dbnet.engine.checkpoint import load_checkpoint
from dbnet.engine.distributed import seed_everything
from dbnet.engine.loader import EpochBatchSampler
from dbnet.engine.optim import build_optimizer, build_scheduler
from dbnet.engine.train import LOSS_KEYS
from dbnet.loss import DBLoss
from dbnet.model.dbnet import build_model

STEPS = 3
PER_PROCESS = 1
WORLD = 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _reference(config, train_dir: Path) -> tuple[list[dict], dict[str, torch.Tensor], dict]:
    """One process, the global batch of both shards, DDP's loss averaging done by hand.

    Returns:
        Loss values per step, the final weights and the initial weights.
    """
    restore = seed_everything(config.train.seed, deterministic=True)
    try:
        model = build_model(config.model)
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        model.train()
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
        loss_fn = DBLoss(config.loss)
        optimizer = build_optimizer(model, config.optim)
        scheduler = build_scheduler(optimizer, config.schedule, total_steps=STEPS)
        dataset = DetectionDataset(train_dir, config.data, train=True, seed=config.train.seed)
        sampler = EpochBatchSampler(len(dataset), PER_PROCESS * WORLD, config.train.seed)

        logged = []
        epoch = 0
        while len(logged) < STEPS:
            sampler.set_epoch(epoch)
            for keys in sampler:
                items = []
                for key_epoch, index in keys:
                    dataset.set_epoch(key_epoch)
                    items.append(dataset[index])
                batch = collate(items)
                outputs = model(batch["image"])  # (2, 1, S, S) maps: the global batch

                shards = []
                for rank in range(WORLD):
                    part = slice(rank * PER_PROCESS, (rank + 1) * PER_PROCESS)
                    shards.append(
                        loss_fn(
                            {k: v[part] for k, v in outputs.items()},
                            {k: batch[k][part] for k in batch if torch.is_tensor(batch[k])},
                        )
                    )
                loss = sum(shard["loss"] for shard in shards) / WORLD
                logged.append(
                    {key: sum(float(s[key].detach()) for s in shards) / WORLD for key in LOSS_KEYS}
                )
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
                if len(logged) == STEPS:
                    break
            epoch += 1
        return logged, model.state_dict(), initial
    finally:
        restore()


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_on_the_global_batch(tmp_path: Path) -> None:
    train_dir = make_dataset(tmp_path / "train", count=4)
    values = tiny_values(tmp_path, train_dir)
    values["optim"].update(name="sgd", lr=0.05, momentum=0.9)
    values["train"].update(max_steps=STEPS, batch_size=PER_PROCESS, freeze_bn=True)
    config_path = write_config(tmp_path / "ddp.yaml", values)

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # stay on the loopback interface
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={WORLD}",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "dbnet.cli",
        "train",
        "--config",
        str(config_path),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr

    # Rank 0 alone wrote: one run folder, one event file, one log.
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert (run_dir / "train.log").read_text().count("run folder") == 1
    assert "rank 0 of 2" in (run_dir / "train.log").read_text()

    expected_losses, expected_weights, initial = _reference(config_from_dict(values), train_dir)

    events = EventAccumulator(str(run_dir))
    events.Reload()
    for key in LOSS_KEYS:
        logged = [event.value for event in events.Scalars(f"train/{key}")]
        wanted = [step[key] for step in expected_losses]
        assert logged == pytest.approx(wanted, rel=1e-4, abs=1e-5), key

    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["step"] == STEPS
    for name, tensor in expected_weights.items():
        torch.testing.assert_close(state["model"][name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    changed = [k for k, v in initial.items() if not torch.equal(v, expected_weights[k])]
    assert len(changed) > len(initial) // 2, "the steps must move the weights for this to test"
