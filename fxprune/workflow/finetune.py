"""Training and fine-tuning: the loop, distillation, BatchNorm recalibration, checkpoints.

The same loop trains the baseline and fine-tunes the pruned model. Its defaults follow the
usual recipe for short schedules: SGD with Nesterov momentum, a linear warm-up then a cosine
decay to zero (per step), label smoothing and weight decay; AdamW is an option.

Resuming gives *the same weights* as a run that was never interrupted. That needs every
source of randomness to be either saved or a pure function of ``(seed, epoch)``:

- the data order comes from :class:`~torch.utils.data.DistributedSampler`, which shuffles
  with a generator seeded by ``seed + epoch``;
- the augmentation (random horizontal flips of whole batches) draws from a generator seeded by
  ``(seed, epoch, rank)``;
- everything else (model, optimizer, LR schedule, AMP scaler, and the global torch / CUDA /
  numpy / python RNG states for any layer that draws random numbers, e.g. dropout) is in the
  checkpoint written after every epoch.

Checkpoints hold only tensors and plain containers, so they load with
``torch.load(weights_only=True)``, and are written atomically (a temporary file in the same
folder, fsync, then :func:`os.replace`): a run killed while writing leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from fxprune.workflow.extras import tqdm

from fxprune.artifact import process_alive
from fxprune.errors import InternalError
from fxprune.workflow import progress
from fxprune.workflow.data import make_loader
from fxprune.workflow.distributed import DistContext, all_reduce_sum, barrier
from fxprune.workflow.errors import CheckpointError, ConfigError
from fxprune.workflow.models import load_checkpoint_file

__all__ = [
    "remove_stale_temporaries",
    "TrainConfig",
    "TrainResult",
    "train",
    "recalibrate_batchnorm",
    "batchnorm_layers",
    "distillation_loss",
    "save_checkpoint",
    "load_training_checkpoint",
    "resume_fingerprint",
    "check_resumable",
    "rng_state",
    "set_rng_state",
    "progress_enabled",
    "CHECKPOINT_FORMAT",
]

logger = logging.getLogger("fxprune.workflow")

CHECKPOINT_FORMAT = "fxprune-train-checkpoint"
CHECKPOINT_VERSION = 1

# These options change the result of training; a checkpoint written under other values cannot
# be resumed into this run (the schedule or the batches would differ).
_RESUME_KEYS = ("epochs", "lr", "optimizer", "momentum", "nesterov", "weight_decay",
                "label_smoothing", "batch_size", "warmup_epochs", "seed", "augment",
                "distill_alpha", "temperature")


@dataclass
class TrainConfig:
    """How to train. The defaults are the fine-tuning recipe of ``fxprune run``."""

    epochs: int = 5
    lr: float = 0.05
    optimizer: str = "sgd"  # "sgd" (momentum, Nesterov) or "adamw"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    batch_size: int = 128
    warmup_epochs: float = 0.0  # linear warm-up length, in (fractional) epochs
    seed: int = 0
    augment: bool = False  # random horizontal flips (pays off in longer schedules)
    amp: str = "auto"  # "auto" (on CUDA only), "on", "off"
    channels_last: str = "auto"  # "auto" (on CUDA only), "on", "off"
    distill_alpha: float = 0.5  # weight of the distillation term when a teacher is given
    temperature: float = 4.0
    quiet: bool = False
    num_workers: int = 0
    desc: str = "train"  # label of the progress bar and log lines

    def validate(self) -> None:
        """Raise :class:`ConfigError` for values that cannot train."""
        if self.epochs < 0:
            raise ConfigError(f"epochs must be >= 0, got {self.epochs}")
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be > 0, got {self.lr}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise ConfigError(f"distillation weight must be in [0, 1], got {self.distill_alpha}")
        if not self.temperature > 0:
            raise ConfigError(f"distillation temperature must be > 0, got {self.temperature}")
        for name in ("amp", "channels_last"):
            if getattr(self, name) not in ("auto", "on", "off"):
                raise ConfigError(f"{name} must be 'auto', 'on' or 'off', got {getattr(self, name)!r}")


@dataclass
class TrainResult:
    """What :func:`train` did: per-epoch metrics and where it started."""

    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from_epoch: Optional[int] = None  # last completed epoch found in the checkpoint
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def progress_enabled(quiet: bool, ctx: Optional[DistContext] = None) -> bool:
    """Progress bars: not with ``quiet``, not on non-main ranks, not when stderr is no terminal."""
    if quiet or (ctx is not None and not ctx.is_main):
        return False
    stream = sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


# --------------------------------------------------------------------------------------------
# RNG state <-> tensors (so that checkpoints load with weights_only=True)
# --------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Global RNG states of torch, CUDA, numpy and python ``random``, as tensors and numbers."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        # random's Mersenne Twister state is 625 ints < 2**32: exact in int64.
        "python": {"version": int(py_version),
                   "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"].cpu())
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
_CHECKPOINT_TMP = re.compile(r"\.(?P<name>.+)\.tmp-(?P<pid>\d+)")


def remove_stale_temporaries(path: Union[str, Path]) -> List[Path]:
    """Remove what an interrupted :func:`save_checkpoint` of ``path`` left behind.

    A killed process cannot clean up after itself, and a checkpoint temporary is as large as
    the model and its optimizer state; so the next write cleans it. Only files named exactly
    as this module names its temporaries are touched, and only when their writer (the pid in
    the name) is this process or no longer runs: a concurrent writer's file is left alone.
    """
    path = Path(path)
    removed: List[Path] = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    for name in names:
        m = _CHECKPOINT_TMP.fullmatch(name)
        if not m or m.group("name") != path.name:
            continue
        pid = int(m.group("pid"))
        if pid != os.getpid() and process_alive(pid) is not False:
            continue
        candidate = path.parent / name
        try:
            if candidate.is_file() and not candidate.is_symlink():
                candidate.unlink()
                removed.append(candidate)
        except OSError:
            pass  # best effort: a leftover we cannot remove must not fail the checkpoint itself
    return removed


def save_checkpoint(obj: dict[str, Any], path: Union[str, Path]) -> None:
    """``torch.save`` to ``path`` atomically: temp file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    # Same folder so os.replace is a rename within one file system (atomic on POSIX).
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_training_checkpoint(path: Union[str, Path]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`train`, checking that it is one."""
    state = load_checkpoint_file(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not an fxprune training checkpoint (no '{CHECKPOINT_FORMAT}' marker); "
            f"delete it or point the run at another output folder")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state.get('version')} is not supported")
    return state


def resume_fingerprint(config: TrainConfig, distill: bool, world_size: int,
                       extra: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """What a checkpoint must have been written under to be resumed by this training.

    The training options that change the result, whether a teacher distils, the process
    count, and ``extra``: what the caller knows determined the weights training starts from
    (the data, the model, the pruning options...), which this loop cannot see.
    """
    fingerprint: dict[str, Any] = {key: getattr(config, key) for key in _RESUME_KEYS}
    fingerprint["distill"] = distill
    fingerprint["world_size"] = world_size
    for key, value in (extra or {}).items():
        if key in fingerprint:
            raise InternalError(f"resume fingerprint key {key!r} given twice")
        fingerprint[key] = value
    # Plain JSON data (tuples as lists, paths as strings): what a checkpoint written now holds
    # compares equal to what a later run computes, and loads with weights_only=True.
    return json.loads(json.dumps(fingerprint, sort_keys=True, default=str))


def _differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs (nested dicts flattened with dots)."""
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        found: list[str] = []
        for key in list(current) + [k for k in saved if k not in current]:
            found += _differences(saved.get(key), current.get(key), f"{prefix}{key}.")
        return found
    if saved != current:
        # "options." only groups the run's command-line options: show them by their own name.
        name = prefix[:-1].removeprefix("options.")
        return [f"{name}: {saved!r} -> {current!r}"]
    return []


def check_resumable(path: Union[str, Path], fingerprint: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """The checkpoint at ``path`` if it was written under ``fingerprint``; None if there is none.

    A checkpoint written under other settings raises :class:`CheckpointError` listing every
    option that differs (checkpoint -> now): resuming it would mix two runs' settings into
    one result, labelled as the new one.
    """
    path = Path(path)
    if not path.is_file():
        return None
    state = load_training_checkpoint(path)
    saved = state.get("config", {})
    changed = _differences(saved, dict(fingerprint))
    if changed:
        shown = "; ".join(changed[:8]) + (f"; and {len(changed) - 8} more" if len(changed) > 8 else "")
        raise CheckpointError(
            f"cannot resume from {path}: it was written with other settings ({shown}). "
            f"Rerun with the checkpoint's settings, or without --resume to start over "
            f"(the checkpoint is then overwritten).")
    return state


# --------------------------------------------------------------------------------------------
# Losses and pieces of the loop
# --------------------------------------------------------------------------------------------
def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """Hinton's KL(teacher || student) on temperature-softened logits, times ``T**2``.

    The ``T**2`` keeps the gradient scale of this term independent of the temperature.
    """
    t = temperature
    return F.kl_div(F.log_softmax(student_logits.float() / t, dim=1),
                    F.log_softmax(teacher_logits.float() / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on BatchNorm/bias parameters (1-d tensors): decaying them only fights
    # the normalisation and is the usual exclusion in short schedules.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                           nesterov=config.nesterov and config.momentum > 0)


def _make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int,
                    warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _amp_dtype(device: torch.device, mode: str) -> Optional[torch.dtype]:
    """The autocast dtype, or None for full precision."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16  # CPU autocast (explicit --amp on): bf16 is what it supports


def _channels_last(device: torch.device, mode: str) -> bool:
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def _flip_batch(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the batch left-right (drawn from ``generator``, on CPU)."""
    mask = torch.rand(images.shape[0], generator=generator) < 0.5
    mask = mask.to(images.device).view(-1, *([1] * (images.dim() - 1)))
    return torch.where(mask, images.flip(-1), images)


def _augment_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    # A large odd multiplier keeps (seed, epoch, rank) triples from colliding.
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_009 + rank)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
def train(model: nn.Module, train_set: Dataset, config: TrainConfig, *,
          device: Union[str, torch.device] = "cpu",
          teacher: Optional[nn.Module] = None,
          checkpoint: Union[str, Path, None] = None,
          resume: bool = False,
          ctx: Optional[DistContext] = None,
          on_epoch_end: Optional[Callable[[int, dict[str, float]], None]] = None,
          fingerprint: Optional[Mapping[str, Any]] = None) -> TrainResult:
    """Train ``model`` (in place) on ``train_set`` for ``config.epochs`` epochs.

    - ``teacher``: distil from it (loss = (1-a)*CE + a*T^2*KL), with ``a = config.distill_alpha``.
    - ``checkpoint``: written after every epoch (by the main process only) and, with
      ``resume``, read first: training continues after the last completed epoch. A missing
      checkpoint with ``resume`` just starts from the beginning.
    - ``ctx``: under torchrun, the model is wrapped in DistributedDataParallel and each process
      trains on its shard; the logged metrics are all-reduced.
    - ``on_epoch_end(epoch, metrics)``: called after each epoch's checkpoint is on disk.
    - ``fingerprint``: what else determined this training's result (data, starting weights,
      pruning options...); recorded in the checkpoint with the training options, and a
      checkpoint recorded under anything else is refused on resume (:func:`check_resumable`).

    The model is left in eval mode, on ``device``.
    """
    config.validate()
    ctx = ctx or DistContext()
    device = torch.device(device)
    started = time.perf_counter()
    result = TrainResult()
    amp_dtype = _amp_dtype(device, config.amp)
    channels_last = _channels_last(device, config.channels_last)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if teacher is not None:
        teacher.to(device).eval()
        if channels_last:
            teacher.to(memory_format=torch.channels_last)

    loader = make_loader(train_set, config.batch_size, train=True, seed=config.seed,
                         rank=ctx.rank, world_size=ctx.world_size,
                         num_workers=config.num_workers, pin_memory=device.type == "cuda")
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ConfigError(f"{config.desc}: the training set is empty")
    optimizer = _make_optimizer(model, config)
    scheduler = _make_scheduler(optimizer, config.epochs * steps_per_epoch,
                                int(round(config.warmup_epochs * steps_per_epoch)))
    # A gradient scaler is needed for float16 only; bfloat16 has float32's range.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    fingerprint = resume_fingerprint(config, teacher is not None, ctx.world_size, fingerprint)

    start_epoch = 0
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    state = check_resumable(ckpt_path, fingerprint) if resume and ckpt_path is not None else None
    if state is not None and ckpt_path is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{ckpt_path} does not fit this model/optimizer: {exc}") from exc
        set_rng_state(state["rng"])
        start_epoch = int(state["epoch"]) + 1
        result.history = list(state.get("history", []))
        result.resumed_from_epoch = int(state["epoch"])
        logger.info("%s: resumed from %s after epoch %d/%d", config.desc, ckpt_path,
                    start_epoch, config.epochs)
    elif resume and ckpt_path is not None:  # check_resumable found no file
        logger.info("%s: no checkpoint at %s yet, starting from the beginning", config.desc, ckpt_path)

    net: nn.Module = model
    if ctx.enabled:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    show = progress_enabled(config.quiet, ctx)
    tracker = progress.current()  # the running job's stage counter, ETA and step logging
    tracker.training(config.epochs - start_epoch, steps_per_epoch)
    for epoch in range(start_epoch, config.epochs):
        epoch_started = time.perf_counter()
        loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
        generator = _augment_generator(config.seed, epoch, ctx.rank)
        model.train()
        # Sums kept on the device: no host sync per step on a GPU.
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss*n, correct, n
        label = f"{config.desc} {epoch + 1}/{config.epochs}"
        tracker.epoch_started(label, steps_per_epoch)
        bar = tqdm(loader, desc=tracker.bar_description(label), disable=not show,
                   leave=False, dynamic_ncols=True)
        for images, labels in bar:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if config.augment:
                images = _flip_batch(images, generator)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                        else contextlib.nullcontext())
            with autocast:
                logits = net(images)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(images)
                    loss = ((1.0 - config.distill_alpha) * loss + config.distill_alpha
                            * distillation_loss(logits, teacher_logits, config.temperature))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            with torch.no_grad():
                n = labels.shape[0]
                totals += torch.stack([loss.detach().double() * n,
                                       (logits.argmax(1) == labels).sum().double(),
                                       torch.tensor(float(n), dtype=torch.float64, device=device)])
            tracker.step(n, loss=lambda: float(loss.detach()))
            if show:
                bar.set_postfix_str(tracker.bar_postfix(), refresh=False)
        tracker.epoch_done()
        all_reduce_sum(totals, ctx)
        loss_sum, correct, count = totals.tolist()
        metrics = {"epoch": epoch, "loss": loss_sum / max(count, 1.0),
                   "train_acc": 100.0 * correct / max(count, 1.0),
                   "lr": optimizer.param_groups[0]["lr"],
                   "seconds": time.perf_counter() - epoch_started}
        result.history.append(metrics)
        logger.info("%s epoch %d/%d: loss %.4f, train acc %.2f%%, %.1fs%s", config.desc, epoch + 1,
                    config.epochs, metrics["loss"], metrics["train_acc"], metrics["seconds"],
                    f", {count / metrics['seconds']:.0f} img/s" if metrics["seconds"] > 0 else "")
        if ckpt_path is not None and ctx.is_main:
            save_checkpoint({
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng_state(),
                "config": fingerprint,
                "history": result.history,
            }, ckpt_path)
        barrier(ctx)  # the checkpoint is complete before any process moves on
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)
    if ctx.enabled:
        # DDP keeps parameters in sync but each process updated its BatchNorm statistics on
        # its own shard after the last broadcast: take rank 0's so every process (and the
        # checkpoint, written by rank 0) holds the same model.
        with torch.no_grad():
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, src=0)
    model.eval()
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    result.seconds = time.perf_counter() - started
    return result


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics (what recalibration re-estimates)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def recalibrate_batchnorm(model: nn.Module, dataset: Dataset, *, batches: int = 20,
                          batch_size: int = 256, device: Union[str, torch.device] = "cpu",
                          seed: int = 0, quiet: bool = True) -> int:
    """Re-estimate every BatchNorm's running mean/variance on ``batches`` training batches.

    After pruning, the statistics a BatchNorm kept refer to the channels and inputs of the
    unpruned network; re-estimating them (with ``momentum=None``, an exact cumulative average
    over the batches, instead of an exponential one) recovers much of the accuracy before any
    fine-tuning. Only BatchNorm layers run in train mode, so dropout and the like stay off.
    Deterministic: the batches are a function of ``seed``. Returns the number of samples seen;
    the model is left in eval mode.
    """
    # Not torch.optim.swa_utils.update_bn: it puts the whole model in train mode (dropout and
    # stochastic depth on while the statistics are gathered), reads every batch of the loader
    # it is given, and has no way to cap the batches or keep their order a function of the seed.
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    device = torch.device(device)
    model.to(device).eval()
    saved_momentum = [bn.momentum for bn in layers]
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    loader = make_loader(dataset, batch_size, train=True, seed=seed)
    loader.sampler.set_epoch(0)  # type: ignore[union-attr]
    seen = 0
    try:
        with torch.no_grad():
            bar = tqdm(loader, total=min(batches, len(loader)), desc="BN recalibration",
                       disable=not progress_enabled(quiet), leave=False)
            for index, (images, _) in enumerate(bar):
                if index >= batches:
                    break
                model(images.to(device))
                seen += images.shape[0]
    finally:
        for bn, momentum in zip(layers, saved_momentum):
            bn.momentum = momentum
        model.eval()
    return seen
