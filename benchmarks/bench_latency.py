"""Latency of original vs pruned ResNets: is the pruned model really faster, and by how much of
its MACs reduction?

resnet18 and resnet50 (random weights, L1 importance) at ratios 0.3 / 0.5 / 0.7, batch 1 and
32, 224x224 inputs, eager and ``torch.compile(dynamic=False)``, on CUDA when present else CPU.
Next to them: Torch-Pruning 1.6's uniform 0.5 resnet18 (MagnitudePruner, same layer shapes)
and fxprune with ``round_to`` 8 / 16 where the plain recipe leaves odd channel counts.

    pytest benchmarks/bench_latency.py                       # summary table printed at the end
    FXPRUNE_BENCH_FULL=1 pytest benchmarks/bench_latency.py  # compiled at every ratio too

All variants of one (model, batch, mode) are timed together by :func:`fxprune.measure_latency`,
in turn, round after round, so that they see the same machine load; speed-ups use each variant's
fastest round (``min``), the statistic least disturbed by other processes, and the summary also
shows medians.
"""

from __future__ import annotations

import copy
import functools
import os
from typing import Any, Dict, Optional, Tuple

import pytest
import torch
import torch.nn as nn
import torchvision

import fxprune
from fxprune.cost import count_macs

FULL = os.environ.get("FXPRUNE_BENCH_FULL", "") not in ("", "0")  # see benchmarks/conftest.py
THREADS = int(os.environ.get("FXPRUNE_BENCH_THREADS", "1"))  # as benchmarks/conftest.py sets them

ARCHS = ["resnet18", "resnet50"]
RATIOS = [0.3, 0.5, 0.7]
BATCHES = [1, 32]
MODES = ["eager", "compiled"]
ROUND_TO = [8, 16]
SIZE = 224


@functools.lru_cache(maxsize=None)
def original(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(arch, weights=None).eval()


@functools.lru_cache(maxsize=None)
def pruned(arch: str, ratio: float, round_to: int = 1) -> nn.Module:
    return fxprune.prune(original(arch), ratio, round_to=round_to).eval()


@functools.lru_cache(maxsize=None)
def torch_pruning(arch: str, ratio: float) -> Optional[nn.Module]:
    try:
        import torch_pruning as tp  # the `bench` extra; only the comparison needs it
    except ImportError:
        return None
    model = copy.deepcopy(original(arch))
    example = torch.randn(1, 3, SIZE, SIZE)
    pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=ratio, ignored_layers=[model.fc])
    pruner.step()
    return model.eval()


@functools.lru_cache(maxsize=None)
def macs(model: nn.Module) -> int:
    # Per image, counted by torch.utils.flop_counter (fxprune.cost), on CPU.
    return count_macs(model, torch.randn(1, 3, SIZE, SIZE))


def _variants(arch: str, batch: int, mode: str) -> Dict[str, Tuple[nn.Module, Tuple[float, int, int]]]:
    """The models timed together for one (arch, batch, mode): name -> (model, sort key)."""
    out: Dict[str, Tuple[nn.Module, Tuple[float, int, int]]] = {"original": (original(arch), (0.0, 0, 0))}
    for ratio in RATIOS:
        if mode == "compiled" and not FULL and ratio != 0.5:
            continue  # each inductor compile costs 20-50 s on 2 CPU cores; FXPRUNE_BENCH_FULL=1 for all
        out[f"fxprune r={ratio}"] = (pruned(arch, ratio), (ratio, 0, 1))
    if arch == "resnet18":
        # Torch-Pruning's uniform 0.5 resnet18 has exactly the layer shapes of fxprune's r=0.5.
        tp_model = torch_pruning(arch, 0.5)
        if tp_model is not None:
            assert {k: v.shape for k, v in tp_model.state_dict().items()} == \
                {k: v.shape for k, v in pruned(arch, 0.5).state_dict().items()}
            out["Torch-Pruning r=0.5"] = (tp_model, (0.5, 0, 2))
        if mode == "eager" or FULL:
            # r=0.3 keeps 44/89/179/358 channels and r=0.7 keeps 19/38/76/153: odd counts that
            # vector kernels pad or finish in scalar tails. round_to rounds every group.
            for ratio in (0.3, 0.7):
                for round_to in ROUND_TO:
                    out[f"fxprune r={ratio} round_to={round_to}"] = (pruned(arch, ratio, round_to), (ratio, round_to, 1))
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("arch", ARCHS)
def test_latency(record: Any, device: torch.device, arch: str, batch: int, mode: str) -> None:
    variants = _variants(arch, batch, mode)
    if mode == "compiled":
        torch._dynamo.reset()
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    # fxprune.measure_latency times every variant interleaved (one Timer sample of each per round,
    # the start rotated each round), at the session's thread count, compiling in warm-up.
    result = fxprune.measure_latency({name: model for name, (model, _) in variants.items()},
                                     example_inputs=(torch.randn(1, 3, SIZE, SIZE),), batch_size=batch,
                                     device=device, mode=mode, threads=THREADS if device.type == "cpu" else None,
                                     rounds=15 if batch == 1 else 5, warmup=1, min_sample_s=0.0,
                                     progress=print)
    for warning in result.warnings:
        print(f"{arch} b{batch} {mode}: {warning}")
    for name, (model, sort) in variants.items():
        times_s = [t / 1000.0 for t in result.models[name].times_ms]
        record("latency", times_s, arch=arch, batch=batch, mode=mode, device=device.type, macs=macs(model),
               variant=name, sort=sort)
