"""The training loop: learning, resume after a kill, atomic checkpoints, BN recalibration, DDP."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from fxprune.workflow.errors import CheckpointError, ConfigError
from fxprune.workflow.evaluate import evaluate_accuracy
from fxprune.workflow.finetune import (TrainConfig, distillation_loss, load_training_checkpoint,
                                       recalibrate_batchnorm, save_checkpoint, train)

from .helpers import TinyNet, synthetic_images

CLASSES = [str(i) for i in range(10)]


def _config(**changes) -> TrainConfig:
    values = dict(epochs=3, lr=0.1, batch_size=32, quiet=True, warmup_epochs=0.5)
    values.update(changes)
    return TrainConfig(**values)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyNet()


def test_training_learns(synthetic_dataset) -> None:
    model = _model()
    before = evaluate_accuracy(model, synthetic_dataset, classes=CLASSES).top1
    result = train(model, synthetic_dataset, _config(epochs=4))
    after = evaluate_accuracy(model, synthetic_dataset, classes=CLASSES).top1
    assert [h["epoch"] for h in result.history] == [0, 1, 2, 3]
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert before < 30 and after > 80  # the synthetic classes are easy to tell apart
    assert not model.training


class _Killed(Exception):
    pass


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_resume_after_a_kill_gives_identical_weights(tmp_path: Path, synthetic_dataset,
                                                     optimizer: str) -> None:
    # Flips and dropout draw random numbers: both must line up after the resume.
    config = _config(optimizer=optimizer, lr=0.1 if optimizer == "sgd" else 3e-3, augment=True)
    teacher = _model(seed=9).eval()  # distillation is part of the state that must line up

    reference = _model()
    train(reference, synthetic_dataset, config, teacher=teacher, checkpoint=tmp_path / "ref.pt")

    def kill_after_first_epoch(epoch: int, metrics: dict) -> None:
        if epoch == 0:
            raise _Killed()

    interrupted = _model()
    ckpt = tmp_path / "run.pt"
    with pytest.raises(_Killed):
        train(interrupted, synthetic_dataset, config, teacher=teacher, checkpoint=ckpt,
              on_epoch_end=kill_after_first_epoch)
    assert load_training_checkpoint(ckpt)["epoch"] == 0
    # Something else ran in between and moved the global RNG: resume must restore it.
    torch.rand(1000)

    resumed = _model(seed=5)  # a fresh process would rebuild the model from scratch
    result = train(resumed, synthetic_dataset, config, teacher=teacher, checkpoint=ckpt, resume=True)
    assert result.resumed_from_epoch == 0
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    ref_state, new_state = reference.state_dict(), resumed.state_dict()
    for key in ref_state:
        assert torch.equal(ref_state[key], new_state[key]), key
    # The per-epoch metrics agree exactly too (all but the wall time).
    def metrics(path: Path) -> list:
        return [{k: v for k, v in h.items() if k != "seconds"}
                for h in load_training_checkpoint(path)["history"]]

    assert metrics(ckpt) == metrics(tmp_path / "ref.pt")


def test_checkpoints_are_tensors_only(tmp_path: Path, synthetic_dataset) -> None:
    train(_model(), synthetic_dataset, _config(epochs=1), checkpoint=tmp_path / "c.pt")
    state = torch.load(tmp_path / "c.pt", weights_only=True)  # no pickled code inside
    assert set(state) >= {"model", "optimizer", "scheduler", "rng", "epoch", "config"}
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, handle, *args, **kwargs):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_resume_refuses_other_settings_and_corrupt_files(tmp_path: Path, synthetic_dataset) -> None:
    ckpt = tmp_path / "c.pt"
    train(_model(), synthetic_dataset, _config(epochs=1), checkpoint=ckpt)
    with pytest.raises(CheckpointError, match=r"other settings \(epochs: 1 -> 2"):
        train(_model(), synthetic_dataset, _config(epochs=2), checkpoint=ckpt, resume=True)
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt"):
        train(_model(), synthetic_dataset, _config(epochs=1), checkpoint=ckpt, resume=True)


def test_resume_without_a_checkpoint_starts_over(tmp_path: Path, synthetic_dataset) -> None:
    result = train(_model(), synthetic_dataset, _config(epochs=1), checkpoint=tmp_path / "none.pt",
                   resume=True)
    assert result.resumed_from_epoch is None and len(result.history) == 1


def test_bad_settings_are_config_errors(synthetic_dataset) -> None:
    with pytest.raises(ConfigError, match="optimizer"):
        train(_model(), synthetic_dataset, _config(optimizer="lion"))
    with pytest.raises(ConfigError, match="learning rate"):
        train(_model(), synthetic_dataset, _config(lr=0))


def test_bn_recalibration_computes_exact_statistics(synthetic_dataset) -> None:
    model = _model().eval()
    momentum = model.bn1.momentum
    seen = recalibrate_batchnorm(model, synthetic_dataset, batches=4, batch_size=64)
    assert seen == 256
    # momentum=None makes running_mean the plain average of the 4 batch means: with equal
    # batches, the mean of conv1's output over exactly the samples seen.
    from fxprune.workflow.data import make_loader

    loader = make_loader(synthetic_dataset, 64, train=True, seed=0)
    loader.sampler.set_epoch(0)
    inputs = torch.cat([x for _, x in zip(range(4), (b for b, _ in loader))])
    with torch.no_grad():
        features = model.conv1(inputs)
    assert torch.allclose(model.bn1.running_mean, features.mean(dim=(0, 2, 3)), atol=1e-5)
    assert model.bn1.momentum == momentum and not model.training and not model.bn1.training


def test_distillation_loss() -> None:
    logits = torch.randn(8, 10)
    assert distillation_loss(logits, logits, 4.0).abs().item() < 1e-6
    assert distillation_loss(logits, torch.randn(8, 10), 4.0).item() > 0


# --------------------------------------------------------------------------------------------
# Two processes with gloo
# --------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from fxprune.workflow.data import TensorImageDataset
    from fxprune.workflow.distributed import init_distributed, shutdown_distributed

    ctx = init_distributed("cpu")
    images, labels = synthetic_images(256)
    data = TensorImageDataset(images, labels, (0.3,), (0.3,))
    torch.manual_seed(0)
    model = TinyNet()
    result = train(model, data, _config(epochs=2), ctx=ctx, checkpoint=Path(out) / "ckpt.pt")
    accuracy = evaluate_accuracy(model, data, classes=CLASSES, batch_size=50, ctx=ctx)
    torch.save({"state": model.state_dict(), "history": result.history, "top1": accuracy.top1,
                "samples": accuracy.samples, "world": ctx.world_size}, Path(out) / f"rank{rank}.pt")
    shutdown_distributed(ctx)


def test_two_process_ddp_with_gloo(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["world"] == r1["world"] == 2
    # Both processes end with the same model (parameters via DDP, BN buffers via broadcast)...
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), key
    # ...which rank 0 checkpointed...
    ckpt = load_training_checkpoint(tmp_path / "ckpt.pt")
    assert all(torch.equal(ckpt["model"][k], r0["state"][k]) for k in r0["state"])
    # ...and the metrics are all-reduced: identical on both ranks, every sample counted once,
    # equal to a single-process evaluation of the same model.
    def metrics(history: list) -> list:
        return [{k: v for k, v in h.items() if k != "seconds"} for h in history]

    assert metrics(r0["history"]) == metrics(r1["history"])
    assert r0["samples"] == r1["samples"] == 256 and r0["top1"] == r1["top1"]
    model = TinyNet()
    model.load_state_dict(r0["state"])
    images, labels = synthetic_images(256)
    from fxprune.workflow.data import TensorImageDataset

    single = evaluate_accuracy(model, TensorImageDataset(images, labels, (0.3,), (0.3,)), classes=CLASSES)
    assert single.top1 == r0["top1"]
    # Each process saw half of the 256 samples per epoch: 4 steps of 32, trained together.
    assert r0["history"][0]["train_acc"] >= 0 and ckpt["config"]["world_size"] == 2
