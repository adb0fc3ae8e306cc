"""Measuring a model: accuracy on held-out data, size, MACs and latency.

Latency (:func:`compare_latency`): the baseline and the pruned model timed **interleaved** by
:func:`fxprune.measure_latency` (``torch.utils.benchmark``, warm-up, CUDA synchronised,
``torch.inference_mode``, one CPU thread by default), median and IQR per model and the speed-up
from the per-round ratios, at batch 1 (the edge-device case) and batch 32 (throughput), in eager
mode and with ``torch.compile`` when it works (a failure is recorded with its reason rather than
aborting the report), and on a GPU also in fp16 + channels_last (the deployment layout).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.data import Dataset
from fxprune.workflow.extras import tqdm

from fxprune.cost import count_macs, count_params
from fxprune.latency import LatencyResult, format_speedup, realised_fraction
from fxprune.latency import measure_latency as core_measure_latency
from fxprune.workflow.data import make_loader
from fxprune.workflow.distributed import DistContext, all_reduce_sum
from fxprune.workflow.finetune import progress_enabled

__all__ = [
    "AccuracyResult",
    "evaluate_accuracy",
    "model_size_mb",
    "model_cost",
    "measure_latency",
    "compare_latency",
    "latency_target_key",
    "latency_row",
    "latency_key",
    "latency_settings",
    "LatencySetting",
    "DEPLOY_DTYPE",
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


#: The dtype the deployment setting on a GPU is timed in (with channels_last): what ``round_to=8``
#: targets (tensor cores), and supported by every CUDA card, unlike bf16.
DEPLOY_DTYPE = torch.float16


def latency_key(device: torch.device, mode: str, batch_size: int, *, dtype: Optional[torch.dtype] = None,
                channels_last: bool = False) -> str:
    """Name of one latency setting in ``report.json``, e.g. ``cpu/eager/b1`` or ``cuda/compile-fp16-cl/b32``.

    ``mode`` is ``eager`` or ``compile``/``compiled`` (both written ``compile``: the key
    report.json has always used); a deployment dtype / layout is appended to the mode.
    """
    label = "compile" if mode in ("compile", "compiled") else mode
    if dtype is not None:
        label += "-" + str(dtype).replace("torch.", "").replace("float", "fp")
    if channels_last:
        label += "-cl"
    return f"{torch.device(device).type}/{label}/b{batch_size}"


@dataclass(frozen=True)
class LatencySetting:
    """One (device, mode, batch, dtype, layout) at which baseline and pruned are timed together."""

    device: torch.device
    mode: str  # "eager" or "compiled" (fxprune.latency's names)
    batch_size: int
    dtype: Optional[torch.dtype] = None
    channels_last: bool = False

    @property
    def key(self) -> str:
        return latency_key(self.device, self.mode, self.batch_size, dtype=self.dtype,
                           channels_last=self.channels_last)


def latency_target_key(record: Mapping[str, Any]) -> str:
    """The report's latency key of the setting a latency target was measured at (``plan.policy["latency"]``).

    >>> latency_target_key({"device": "cuda", "mode": "eager", "batch_size": 32, "dtype": "float16",
    ...                     "channels_last": True})
    'cuda/eager-fp16-cl/b32'
    >>> latency_target_key({"device": "cpu", "mode": "compiled", "batch_size": 1, "dtype": "model's own"})
    'cpu/compile/b1'
    """
    dtype = getattr(torch, str(record.get("dtype"))) if record.get("dtype") in ("float16", "bfloat16") else None
    return latency_key(torch.device(str(record.get("device") or "cpu")), str(record.get("mode") or "eager"),
                       int(record.get("batch_size") or 1), dtype=dtype, channels_last=bool(record.get("channels_last")))


def latency_settings(devices: Sequence[Union[str, torch.device]] = ("cpu",), batch_sizes: Sequence[int] = (1, 32),
                     compile: bool = True, deploy: bool = True) -> list[LatencySetting]:
    """The settings the report times: every device x mode x batch in fp32/NCHW, and on a GPU also
    :data:`DEPLOY_DTYPE` + channels_last (``deploy``), the layout a deployment actually runs."""
    modes = ["eager"] + (["compiled"] if compile else [])
    settings = []
    for d in devices:
        device = torch.device(d)
        variants: list[tuple[Optional[torch.dtype], bool]] = [(None, False)]
        if deploy and device.type == "cuda":
            variants.append((DEPLOY_DTYPE, True))
        settings += [LatencySetting(device, m, b, dt, cl) for dt, cl in variants for m in modes for b in batch_sizes]
    return settings


def _failure(exc: BaseException) -> str:
    message = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {message[0] if message else ''}"[:300]


def compare_latency(baseline: nn.Module, pruned: nn.Module, sample: torch.Tensor, *,
                    settings: Optional[Sequence[LatencySetting]] = None,
                    devices: Sequence[Union[str, torch.device]] = ("cpu",), batch_sizes: Sequence[int] = (1, 32),
                    compile: bool = True, rounds: int = 20, threads: Optional[int] = None,
                    macs_reduction: Optional[float] = None, quiet: bool = True, label: str = "",
                    measure: Callable[..., LatencyResult] = core_measure_latency) -> dict[str, Any]:
    """Baseline and pruned timed **interleaved** at every setting (:func:`fxprune.measure_latency`).

    ``sample`` is one input (batch size 1), repeated to each batch size. ``threads``: CPU
    threads while timing (default 1, see :mod:`fxprune.latency`). ``macs_reduction`` (baseline
    MACs / pruned MACs) adds the realised fraction (speed-up / MACs reduction) per setting.

    Returns ``{"baseline": {...}, "pruned": {...}, "latency": {...}}``: per side
    ``latency_ms`` (medians, None where a setting failed; the keys report.json always had),
    ``latency_iqr_ms`` and ``latency_failures``; ``latency`` holds per setting the speed-up
    (median of per-round ratios) with its quartiles, the spread, ``slower`` and ``busy``, plus
    the threads, device names, torch version and method. A slower pruned model and a busy
    measurement are logged as warnings (prefixed by ``label``, e.g. a sweep point's name). The
    models themselves are not modified.
    """
    prefix = f"{label}: " if label else ""
    if settings is None:
        settings = latency_settings(devices, batch_sizes, compile)
    sides: dict[str, dict[str, Any]] = {side: {"latency_ms": {}, "latency_iqr_ms": {}, "latency_failures": {}}
                                        for side in ("baseline", "pruned")}
    table: dict[str, dict[str, Any]] = {}
    section: dict[str, Any] = {"settings": table, "threads": None, "torch": torch.__version__, "method": None,
                               "devices": {}, "busy": False, "slower": [], "warnings": []}
    bar = tqdm(settings, desc="latency", disable=not progress_enabled(quiet), leave=False)
    for setting in bar:
        key = setting.key
        try:
            result = measure({"baseline": baseline, "pruned": pruned}, example_inputs=(sample[:1],),
                             device=setting.device, mode=setting.mode, threads=threads, rounds=rounds,
                             batch_size=setting.batch_size, dtype=setting.dtype,
                             channels_last=setting.channels_last)
        except Exception as exc:  # compile failures vary (no compiler, unsupported op, ...)
            reason = _failure(exc)
            for side in sides.values():
                side["latency_ms"][key] = None
                side["latency_failures"][key] = reason
            table[key] = {"failed": reason}
            logger.warning("%slatency %s failed: %s", prefix, key, reason)
            continue
        finally:
            if setting.mode == "compiled":
                with contextlib.suppress(Exception):
                    torch._dynamo.reset()  # free the compiled graphs before the next setting
        row = latency_row(result, macs_reduction)
        table[key] = row
        for side in ("baseline", "pruned"):
            sides[side]["latency_ms"][key] = row[f"{side}_ms"]
            sides[side]["latency_iqr_ms"][key] = row[f"{side}_iqr_ms"]
        section["threads"] = result.threads
        section["method"] = result.method
        section["devices"][str(result.device)] = result.device_name
        logger.info("%slatency %s: baseline %.3f ± %.3f ms, pruned %.3f ± %.3f ms: %s (%d rounds, %d thread(s))",
                    prefix, key, row["baseline_ms"], row["baseline_iqr_ms"], row["pruned_ms"], row["pruned_iqr_ms"],
                    row["speedup_text"], row["samples"], row["threads"])
        if row["slower"]:
            section["slower"].append(key)
            message = (f"WARNING: {prefix}the pruned model is SLOWER than the baseline at {key}: "
                       f"{row['speedup_text']} ({row['pruned_ms']:.3f} ms vs {row['baseline_ms']:.3f} ms)")
            section["warnings"].append(message)
            logger.warning("%s", message)
        if row["busy"]:
            section["busy"] = True
            message = f"WARNING: {prefix}latency {key}: {result.warnings[0]}"
            section["warnings"].append(message)
            logger.warning("%s", message)
    return {**sides, "latency": section}


def latency_row(result: LatencyResult, macs_reduction: Optional[float] = None) -> dict[str, Any]:
    """One setting of report.json's ``latency.settings``: baseline vs pruned from a pair measurement."""
    names = list(result.models)
    base, pruned = result.models[names[0]], result.models[names[-1]]
    speed = result.speedup
    median = speed.median if speed is not None else None
    return {
        "device": result.device, "device_name": result.device_name, "mode": result.mode,
        "batch": result.input_shapes[0][0] if result.input_shapes and result.input_shapes[0] else None,
        "dtype": result.dtype, "channels_last": result.channels_last,
        "baseline_ms": base.median_ms, "baseline_iqr_ms": base.iqr_ms,
        "pruned_ms": pruned.median_ms, "pruned_iqr_ms": pruned.iqr_ms,
        "speedup": median, "speedup_q25": speed.q25 if speed else None, "speedup_q75": speed.q75 if speed else None,
        "speedup_text": format_speedup(median),
        "realised_fraction": realised_fraction(median, macs_reduction),
        "slower": bool(speed is not None and speed.slower),
        "busy": result.busy, "spread": max(m.spread for m in result.models.values()),
        "busy_threshold": result.busy_threshold,
        "samples": min(m.samples for m in result.models.values()), "threads": result.threads,
        "torch": result.torch_version,
    }


def measure_latency(model: nn.Module, sample: torch.Tensor, *,
                    devices: Sequence[Union[str, torch.device]] = ("cpu",),
                    batch_sizes: Sequence[int] = (1, 32), compile: bool = True,
                    warmup: int = 5, runs: int = 20,
                    quiet: bool = True) -> tuple[dict[str, Optional[float]], dict[str, str]]:
    """Median forward latency (ms) of ``model`` alone per device, mode and batch size.

    Kept for callers that time one model; a comparison must use :func:`compare_latency`
    (interleaved, so that both models see the same machine load). Timed at one CPU thread by
    :func:`fxprune.measure_latency`. Returns ``(latency_ms, failures)``: ``latency_ms[key]``
    is None where that setting failed and ``failures[key]`` says why.
    """
    results: dict[str, Optional[float]] = {}
    failures: dict[str, str] = {}
    settings = latency_settings(devices, batch_sizes, compile, deploy=False)
    for setting in tqdm(settings, desc="latency", disable=not progress_enabled(quiet), leave=False):
        key = setting.key
        try:
            result = core_measure_latency({"model": model}, example_inputs=(sample[:1],), device=setting.device,
                                          mode=setting.mode, rounds=max(1, runs), warmup=warmup,
                                          batch_size=setting.batch_size)
            results[key] = result.models["model"].median_ms
        except Exception as exc:  # compile failures vary (no compiler, unsupported op, ...)
            results[key] = None
            failures[key] = _failure(exc)
            logger.warning("latency %s failed: %s", key, failures[key])
        finally:
            if setting.mode == "compiled":
                with contextlib.suppress(Exception):
                    torch._dynamo.reset()
    return results, failures
