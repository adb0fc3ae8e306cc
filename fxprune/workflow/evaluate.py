"""Measuring a model: accuracy on held-out data, size, MACs and latency.

Latency is measured the way the seed article did not: after warm-up, with
``torch.cuda.synchronize`` around every timed call on a GPU, under
``torch.inference_mode``, and reported as the median of several runs, at batch 1 (the
edge-device case) and batch 32 (throughput), in eager mode and with ``torch.compile`` when it
works (a failure is recorded with its reason rather than aborting the report).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.data import Dataset
from fxprune.workflow.extras import tqdm

from fxprune.cost import count_macs, count_params
from fxprune.workflow.data import make_loader
from fxprune.workflow.distributed import DistContext, all_reduce_sum
from fxprune.workflow.finetune import progress_enabled

__all__ = [
    "AccuracyResult",
    "evaluate_accuracy",
    "model_size_mb",
    "model_cost",
    "measure_latency",
    "latency_key",
]

logger = logging.getLogger("fxprune.workflow")


@dataclass
class AccuracyResult:
    """Accuracy of a classifier on a data set (percentages)."""

    top1: float
    top5: float
    loss: float
    samples: int
    per_class: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"top1": self.top1, "top5": self.top5, "loss": self.loss, "samples": self.samples,
                "per_class": dict(self.per_class)}


def evaluate_accuracy(model: nn.Module, dataset: Dataset, *, classes: Sequence[str],
                      batch_size: int = 512, device: Union[str, torch.device] = "cpu",
                      ctx: Optional[DistContext] = None, num_workers: int = 0,
                      quiet: bool = True, desc: str = "evaluate") -> AccuracyResult:
    """Top-1, top-5 and per-class accuracy of ``model`` on ``dataset``, in full precision.

    Under torchrun every process evaluates its shard and the counts are all-reduced, so every
    process returns the accuracy over the whole data set, each sample counted once.
    """
    ctx = ctx or DistContext()
    device = torch.device(device)
    num_classes = len(classes)
    model.to(device).eval()
    loader = make_loader(dataset, batch_size, train=False, rank=ctx.rank,
                         world_size=ctx.world_size, num_workers=num_workers,
                         pin_memory=device.type == "cuda")
    # [correct per class, samples per class]; top-5 correct; summed loss - all on the device.
    per_class = torch.zeros(2, num_classes, dtype=torch.float64, device=device)
    extra = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.inference_mode():
        for images, labels in tqdm(loader, desc=desc, disable=not progress_enabled(quiet, ctx),
                                   leave=False, dynamic_ncols=True):
            images, labels = images.to(device), labels.to(device)
            logits = model(images).float()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit1 = (top[:, 0] == labels).double()
            hit5 = (top == labels[:, None]).any(dim=1).double()
            per_class[0].index_add_(0, labels, hit1)
            per_class[1].index_add_(0, labels, torch.ones_like(hit1))
            extra[0] += hit5.sum()
            extra[1] += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").double()
    all_reduce_sum(per_class, ctx)
    all_reduce_sum(extra, ctx)
    correct, counts = per_class.cpu()
    total = float(counts.sum())
    if total == 0:
        return AccuracyResult(top1=float("nan"), top5=float("nan"), loss=float("nan"), samples=0)
    return AccuracyResult(
        top1=100.0 * float(correct.sum()) / total,
        top5=100.0 * float(extra[0]) / total,
        loss=float(extra[1]) / total,
        samples=int(total),
        per_class={name: (100.0 * float(c) / float(n) if n > 0 else float("nan"))
                   for name, c, n in zip(classes, correct.tolist(), counts.tolist())},
    )


def model_size_mb(model: nn.Module) -> float:
    """Size on disk of ``torch.save(model.state_dict())``, in MB (10**6 bytes)."""
    handle, path = tempfile.mkstemp(suffix=".pt")
    os.close(handle)
    try:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save(state, path)
        return os.path.getsize(path) / 1e6
    finally:
        os.unlink(path)


def model_cost(model: nn.Module, example: torch.Tensor) -> dict[str, Any]:
    """Parameters, MACs per sample (``example`` is one input of batch size 1) and size on disk."""
    model = model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return {
        "params": count_params(model),
        "macs": count_macs(model, example[:1].to(device)),
        "size_mb": model_size_mb(model),
    }


def latency_key(device: torch.device, mode: str, batch_size: int) -> str:
    """Name of one latency setting in ``report.json``, e.g. ``cpu/eager/b1``."""
    return f"{device.type}/{mode}/b{batch_size}"


def _time_runs(fn: Callable[[], Any], device: torch.device, warmup: int, runs: int) -> float:
    """Median wall time of ``fn`` in milliseconds, after ``warmup`` untimed calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        sync()
        start = time.perf_counter()
        fn()
        sync()  # a CUDA call returns before the GPU has finished: wait for it
        times.append((time.perf_counter() - start) * 1000.0)
    return float(statistics.median(times))


def measure_latency(model: nn.Module, sample: torch.Tensor, *,
                    devices: Sequence[Union[str, torch.device]] = ("cpu",),
                    batch_sizes: Sequence[int] = (1, 32), compile: bool = True,
                    warmup: int = 5, runs: int = 20,
                    quiet: bool = True) -> tuple[dict[str, Optional[float]], dict[str, str]]:
    """Median forward latency (ms) of ``model`` per device, mode and batch size.

    ``sample`` is one input (batch size 1); batches are made by repeating it. Returns
    ``(latency_ms, failures)``: ``latency_ms[key]`` is None where that setting failed and
    ``failures[key]`` says why (typically ``torch.compile`` without a working compiler).
    The model itself is not modified (each device gets its own copy).
    """
    results: dict[str, Optional[float]] = {}
    failures: dict[str, str] = {}
    modes = ["eager"] + (["compile"] if compile else [])
    settings = [(torch.device(d), m, b) for d in devices for m in modes for b in batch_sizes]
    bar = tqdm(settings, desc="latency", disable=not progress_enabled(quiet), leave=False)
    copies: dict[torch.device, nn.Module] = {}
    for device, mode, batch in bar:
        key = latency_key(device, mode, batch)
        if device not in copies:
            copies[device] = copy.deepcopy(model).to(device).eval()
        net = copies[device]
        inputs = sample[:1].to(device).expand(batch, *sample.shape[1:]).contiguous()
        try:
            if mode == "compile":
                # One compiled graph per batch size, with static shapes: what a deployment
                # would ship, and no recompilation inside the timed runs.
                runner: Callable[..., Any] = torch.compile(net, dynamic=False)
            else:
                runner = net
            with torch.inference_mode():
                results[key] = _time_runs(lambda: runner(inputs), device, warmup,
                                          max(3, runs if batch == 1 else runs // 2))
        except Exception as exc:  # compile failures vary (no compiler, unsupported op, ...)
            results[key] = None
            message = str(exc).strip().splitlines()
            failures[key] = f"{type(exc).__name__}: {message[0] if message else ''}"[:300]
            logger.warning("latency %s failed: %s", key, failures[key])
    with contextlib.suppress(Exception):
        torch._dynamo.reset()  # free compiled graphs before the next model is measured
    return results, failures
