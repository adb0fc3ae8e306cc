"""Pass time: fxprune.prune vs Torch-Pruning 1.6 on resnet18/50/152, and scaling with graph size.

Side by side in one run, interleaved round by round (so all see the same machine load), on the
same thread setting and random weights:

- ``fxprune.prune(model, 0.3)`` from the ``nn.Module`` (tracing, analysis, L1 scores, plan and
  rewrite included; the two-argument call, no forward pass);
- the same with ``example_inputs`` (adds a forward pass for shape propagation at 224x224, which
  is what Torch-Pruning always does to build its graph);
- Torch-Pruning: ``MagnitudePruner(model, example_inputs, MagnitudeImportance(p=1),
  pruning_ratio=0.3, ignored_layers=[fc])`` (builds the DependencyGraph) + ``.step()``, on a
  fresh deep copy each round (it prunes in place; the copy is made outside the timing).

Scaling: residual CNNs of 16..256 blocks of tiny convolutions, so weight work is negligible and
the time per fx node shows whether the pass is linear in the graph size.

    pytest benchmarks/bench_pass_time.py
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Dict

import pytest
import torch
import torch.nn as nn
import torchvision

import fxprune

ARCHS = ["resnet18", "resnet50", "resnet152"]
RATIO = 0.3
BLOCKS = [16, 32, 64, 128, 256]
SIZE = 224


@functools.lru_cache(maxsize=None)
def original(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(arch, weights=None).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_pass_time(side_by_side: Any, record: Any, arch: str) -> None:
    model = original(arch)
    x = torch.randn(1, 3, SIZE, SIZE)
    variants: Dict[str, Any] = {
        "fxprune": lambda: fxprune.prune(model, RATIO),
        "fxprune+inputs": lambda: fxprune.prune(model, RATIO, example_inputs=x),
    }
    try:
        import torch_pruning as tp  # the `bench` extra
    except ImportError:
        tp = None
    if tp is not None:
        def tp_step(fresh: nn.Module) -> None:
            pruner = tp.pruner.MagnitudePruner(fresh, x, importance=tp.importance.MagnitudeImportance(p=1),
                                               pruning_ratio=RATIO, ignored_layers=[fresh.fc])
            pruner.step()

        # Torch-Pruning prunes in place: each round gets a deep copy, made outside the timing.
        variants["torch_pruning"] = (lambda: copy.deepcopy(model), tp_step)
        # Same recipe, same layer shapes: the comparison is like for like.
        check = copy.deepcopy(model)
        tp_step(check)
        ours = fxprune.prune(model, RATIO)
        assert {k: v.shape for k, v in check.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    times = side_by_side(variants, rounds=5)
    nodes = len(torch.fx.symbolic_trace(model).graph.nodes)
    for tool, ts in times.items():
        record("pass", ts, kind="pass", arch=arch, tool=tool, nodes=nodes)


class ResChain(nn.Module):
    """``blocks`` residual blocks (conv-bn-relu-conv-bn, add, relu) of 16 channels, then a head."""

    def __init__(self, blocks: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
            for _ in range(blocks))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = torch.relu(x + block(x))
        return self.fc(x.mean((2, 3)))


def test_pass_scaling(side_by_side: Any, record: Any) -> None:
    graphs = {}
    for blocks in BLOCKS:
        torch.manual_seed(0)
        graphs[blocks] = torch.fx.symbolic_trace(ResChain(blocks).eval())
    times = side_by_side({str(b): functools.partial(fxprune.prune, gm, RATIO) for b, gm in graphs.items()}, rounds=3)
    for blocks, gm in graphs.items():
        record("pass", times[str(blocks)], kind="scaling", blocks=blocks, nodes=len(gm.graph.nodes))
