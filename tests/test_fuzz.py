"""Property tests: random DAG CNNs built from the supported op set, pruned at random ratios, must
compute what their masked reference computes.

A network is a recipe of steps, each reading earlier tensors (so branches, residuals and
concatenations appear naturally); every tensor no step consumes is concatenated into the head.
Every op used has a rule, so the pass runs with ``strict=True``: an op the analysis does not
understand fails the example rather than being frozen quietly.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, List, Sequence, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fxprune
from fxprune.testing import assert_equivalent, randomize_norms

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class Step:
    kind: str                 # conv | dw | residual | se | linear_se | cat | pool | act
    src: int                  # the tensor it reads
    other: int = 0            # second tensor (residual, cat)
    cout: int = 0             # output channels of a conv
    k: int = 1                # kernel size
    groups: int = 1           # conv groups
    variant: int = 0          # which activation / pooling / form


ACTS = (
    lambda x: F.relu(x), lambda x: torch.relu(x), lambda x: x.relu(), lambda x: F.silu(x),
    lambda x: F.hardswish(x), lambda x: torch.sigmoid(x) * x, lambda x: F.gelu(x), lambda x: torch.tanh(x) + 1.0,
)
POOLS = (
    lambda x: F.max_pool2d(x, 3, 1, 1), lambda x: F.avg_pool2d(x, 3, 1, 1), nn.MaxPool2d(3, 1, 1),
    lambda x: x,
)


class RandomNet(nn.Module):
    """Executes a recipe. Python loops over a fixed recipe trace to a plain fx graph."""

    def __init__(self, steps: Sequence[Step], channels: Sequence[int], head: int, classes: int = 5) -> None:
        super().__init__()
        self.steps = list(steps)
        self.channels = list(channels)
        self.head_kind = head
        self.layers = nn.ModuleDict()
        for i, s in enumerate(self.steps):
            cin = self.channels[s.src]
            if s.kind == "conv":
                self.layers[f"s{i}"] = nn.Sequential(
                    nn.Conv2d(cin, s.cout, s.k, padding=s.k // 2, groups=s.groups, bias=s.variant % 2 == 0),
                    nn.BatchNorm2d(s.cout))
            elif s.kind == "dw":
                self.layers[f"s{i}"] = nn.Sequential(nn.Conv2d(cin, cin, 3, padding=1, groups=cin), nn.BatchNorm2d(cin))
            elif s.kind == "residual":  # project `other` to src's width and add
                self.layers[f"s{i}"] = nn.Conv2d(self.channels[s.other], cin, 1)
            elif s.kind == "se":
                mid = max(1, cin // 2)
                self.layers[f"s{i}"] = nn.Sequential(nn.Conv2d(cin, mid, 1), nn.ReLU(), nn.Conv2d(mid, cin, 1))
            elif s.kind == "linear_se":
                mid = max(1, cin // 2)
                self.layers[f"s{i}"] = nn.Sequential(nn.Linear(cin, mid), nn.ReLU(), nn.Linear(mid, cin))
        leaves = self.leaves()
        width = sum(self.channels[t] for t in leaves)
        if head == 0:
            self.fc = nn.Linear(width, classes)
        elif head == 1:
            self.fc = nn.Linear(width * 4, classes)
        else:
            self.fc = nn.Sequential(nn.Linear(width * 4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, classes))

    def leaves(self) -> List[int]:
        used = {s.src for s in self.steps} | {s.other for s in self.steps if s.kind in ("residual", "cat")}
        return [t for t in range(1, len(self.channels)) if t not in used] or [len(self.channels) - 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ts = [x]
        for i, s in enumerate(self.steps):
            a = ts[s.src]
            if s.kind in ("conv", "dw"):
                y = ACTS[s.variant % len(ACTS)](self.layers[f"s{i}"](a))
            elif s.kind == "residual":
                y = self.layers[f"s{i}"](ts[s.other])
                y = a + y if s.variant % 3 == 0 else torch.add(y, a) if s.variant % 3 == 1 else a - y
            elif s.kind == "se":
                y = a * torch.sigmoid(self.layers[f"s{i}"](a.mean((2, 3), keepdim=True)))
            elif s.kind == "linear_se":
                b, c, _, _ = a.size()
                w = torch.sigmoid(self.layers[f"s{i}"](F.adaptive_avg_pool2d(a, 1).view(b, c)))
                y = a * w.view(b, c, 1, 1)
            elif s.kind == "cat":
                y = torch.cat([a, ts[s.other]], dim=1)
            elif s.kind == "pool":
                y = POOLS[s.variant % len(POOLS)](a)
            else:
                y = ACTS[s.variant % len(ACTS)](a)
            ts.append(y)
        y = torch.cat([ts[t] for t in self.leaves()], 1)
        if self.head_kind == 0:
            return self.fc(y.mean((2, 3)))
        y = F.adaptive_avg_pool2d(y, 2)
        y = torch.flatten(y, 1) if self.head_kind == 1 else y.view(y.size(0), -1)
        return self.fc(y)


def _common_groups(cin: int, cout: int) -> List[int]:
    g = math.gcd(cin, cout)
    return [d for d in range(1, g + 1) if g % d == 0]


@st.composite
def networks(draw: Any, shapes: bool) -> RandomNet:
    kinds = ["conv", "conv", "dw", "residual", "se", "cat", "pool", "act"] + (["linear_se"] if shapes else [])
    channels = [3]
    steps: List[Step] = []
    for _ in range(draw(st.integers(2, 7))):
        kind = draw(st.sampled_from(kinds if len(channels) > 1 else ["conv"]))
        src = draw(st.integers(1 if len(channels) > 1 else 0, len(channels) - 1))
        other = draw(st.integers(1 if len(channels) > 1 else 0, len(channels) - 1))
        cin = channels[src]
        if kind == "conv":
            cout = draw(st.integers(1, 12))
            groups = draw(st.sampled_from(_common_groups(cin, cout))) if src else 1
            step = Step(kind, src, cout=cout, k=draw(st.sampled_from([1, 3])), groups=groups,
                        variant=draw(st.integers(0, 15)))
            channels.append(cout)
        elif kind == "cat":
            step = Step(kind, src, other=other)
            channels.append(cin + channels[other])
        else:
            step = Step(kind, src, other=other, variant=draw(st.integers(0, 15)))
            channels.append(cin)
        steps.append(step)
    return RandomNet(steps, channels, head=draw(st.integers(0, 2)))


def _prove(model: nn.Module, ratio: float, shapes: bool, seed: int, **kw: Any) -> None:
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    randomize_norms(model, seed).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    ex = (x,) if shapes else None
    plan = fxprune.plan(model, ratio, example_inputs=ex, strict=True, **kw)
    pruned = fxprune.apply(model, plan, example_inputs=ex, strict=True)
    assert_equivalent(model, pruned, plan, (x,), example_inputs=ex)
    assert sum(p.numel() for p in pruned.parameters()) <= sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape


@SETTINGS
@given(data=st.data(), ratio=st.floats(0.0, 0.9), seed=st.integers(0, 2**16))
def test_random_cnn_with_shapes_is_equivalent(data: Any, ratio: float, seed: int) -> None:
    _prove(data.draw(networks(shapes=True)), ratio, True, seed)


@SETTINGS
@given(data=st.data(), ratio=st.floats(0.0, 0.9), seed=st.integers(0, 2**16),
       options=st.sampled_from([{}, {"importance": "l2"}, {"importance": "random"}, {"global_ranking": True}]))
def test_random_cnn_without_shapes_is_equivalent(data: Any, ratio: float, seed: int, options: dict) -> None:
    _prove(data.draw(networks(shapes=False)), ratio, False, seed, **options)


# --------------------------------------------------------------------------- dim shuffles


class DimWalk(nn.Module):
    """conv -> a random walk of permute/transpose/unsqueeze/squeeze -> channels last ->
    Linear/GELU/Linear -> back to NCHW -> conv. The channel dim must be followed throughout."""

    def __init__(self, ops: Sequence[Tuple[str, Tuple[int, ...]]], final: Tuple[int, ...], back: Tuple[int, ...]) -> None:
        super().__init__()
        self.ops, self.final, self.back = list(ops), final, back
        self.a = nn.Conv2d(3, 10, 3, padding=1)
        self.fc1 = nn.Linear(10, 16)
        self.fc2 = nn.Linear(16, 8)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        for op, args in self.ops:
            if op == "permute":
                y = y.permute(*args) if len(args) % 2 else torch.permute(y, args)
            elif op == "transpose":
                y = torch.transpose(y, *args) if args[0] % 2 else y.transpose(*args)
            elif op == "unsqueeze":
                y = y.unsqueeze(args[0])
            else:
                y = y.squeeze(args[0])
        y = y.permute(*self.final)  # channels last: N H W C (size-1 dims squeezed already)
        y = self.fc2(F.gelu(self.fc1(y)))
        return self.b(y.permute(*self.back)).mean((2, 3))


@st.composite
def walks(draw: Any, shapes: bool) -> DimWalk:
    labels = ["n", "c", "h", "w"]
    ops: List[Tuple[str, Tuple[int, ...]]] = []
    for _ in range(draw(st.integers(0, 6))):
        choices = ["permute", "transpose"] + (["unsqueeze", "squeeze"] if shapes else [])
        op = draw(st.sampled_from(choices))
        rank = len(labels)
        if op == "permute":
            perm = tuple(draw(st.permutations(range(rank))))
            labels = [labels[p] for p in perm]
            ops.append((op, perm))
        elif op == "transpose":
            i, j = draw(st.integers(-rank, rank - 1)), draw(st.integers(-rank, rank - 1))
            labels[i], labels[j] = labels[j], labels[i]
            ops.append((op, (i, j)))
        elif op == "unsqueeze" and rank < 6:
            d = draw(st.integers(-rank - 1, rank))
            labels.insert(d % (rank + 1), "1")
            ops.append((op, (d,)))
        elif op == "squeeze" and "1" in labels:
            d = labels.index("1")
            labels.pop(d)
            ops.append((op, (d,)))
    while "1" in labels:  # remove what is left of the inserted dims
        d = labels.index("1")
        ops.append(("squeeze", (d,)))
        labels.pop(d)
    final = tuple(labels.index(k) for k in ("n", "h", "w", "c"))
    return DimWalk(ops, final, (0, 3, 1, 2))


@SETTINGS
@given(data=st.data(), ratio=st.floats(0.1, 0.8), shapes=st.booleans())
def test_channel_dim_is_followed_through_random_dim_shuffles(data: Any, ratio: float, shapes: bool) -> None:
    model = data.draw(walks(shapes))
    x = torch.randn(2, 3, 4, 5)  # distinct sizes: a wrong dim cannot line up by accident
    ex = (x,) if shapes else None
    plan = fxprune.plan(model.eval(), ratio, example_inputs=ex, strict=True)
    pruned = fxprune.apply(model, plan, example_inputs=ex)
    assert pruned.get_submodule("a").out_channels == pruned.get_submodule("fc1").in_features == max(1, int(10 * (1 - ratio)))
    assert_equivalent(model, pruned, plan, (x,), example_inputs=ex)


# --------------------------------------------------------------------------- hazards
#
# Patterns that once produced a pruned model that could not run, or made the pass fail on its
# own plan: per-channel parameter operands of element-wise ops, modules called on the model
# input as well as inside, one tensor concatenated more than once (C2f), literal channel counts
# in views. The pass may freeze what it cannot prove, with a warning, but whatever it returns
# must run and equal its masked reference, with and without example inputs.

SIDE = 6  # spatial size of the fuzz input: views below spell it out as literals


@dataclass(frozen=True)
class Hazard:
    kind: str      # conv | operand | shared | repeat | c2f | view | act
    src: int
    other: int = 0
    cout: int = 0
    variant: int = 0


def _operand_shape(variant: int, c: int) -> Tuple[int, ...]:
    return ((1, c, 1, 1), (c, 1, 1), (1, c, 1, 1), (c, 1, 1), (1, 1, 1, 1), (c,), (1, c, 1, 1), (c, 1, 1))[variant % 8]


class HazardNet(nn.Module):
    """Executes a recipe of hazards; every tensor no step reads goes to the head."""

    def __init__(self, steps: Sequence[Hazard], channels: Sequence[int], head: int) -> None:
        super().__init__()
        self.steps, self.channels, self.head_kind = list(steps), list(channels), head
        self.layers = nn.ModuleDict()
        for i, s in enumerate(self.steps):
            cin = self.channels[s.src]
            if s.kind == "conv":
                self.layers[f"s{i}"] = nn.Sequential(nn.Conv2d(cin, s.cout, 3, padding=1), nn.BatchNorm2d(s.cout))
            elif s.kind == "operand":
                shape = _operand_shape(s.variant, cin)
                if s.variant % 8 == 6:
                    self.register_buffer(f"p{i}", torch.randn(shape))
                else:
                    self.register_parameter(f"p{i}", nn.Parameter(torch.randn(shape)))
            elif s.kind == "shared":
                # The shared layer reads the model input (3 channels) at one call site.
                self.layers[f"q{i}"] = nn.Conv2d(cin, 3, 1)
                self.layers[f"s{i}"] = nn.BatchNorm2d(3) if s.variant % 3 == 1 else nn.Conv2d(3, s.cout, 1)
            elif s.kind == "c2f":
                self.layers[f"s{i}"] = nn.Conv2d(cin // 2, cin // 2, 3, padding=1)
        width = sum(self.channels[t] for t in self.leaves())
        if head == 0:
            self.fc = nn.Linear(width, 4)
        elif head == 1:
            self.fc = nn.Linear(width * 4, 4)
        else:
            self.fc = nn.Sequential(nn.Linear(width * 4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))

    def leaves(self) -> List[int]:
        used = {s.src for s in self.steps} | {s.other for s in self.steps if s.kind == "repeat" and s.variant % 4 == 3}
        return [t for t in range(1, len(self.channels)) if t not in used] or [len(self.channels) - 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ts = [x]
        for i, s in enumerate(self.steps):
            a, c, v = ts[s.src], self.channels[s.src], s.variant
            if s.kind == "conv":
                y = F.relu(self.layers[f"s{i}"](a))
            elif s.kind == "operand":
                p = getattr(self, f"p{i}")
                form = v % 8
                if form == 0:
                    y = torch.clamp(a, min=p)
                elif form == 1:
                    y = a.clamp(max=p)
                elif form == 2:
                    y = torch.where(a > p, a, p)
                elif form == 3:
                    y = p * a  # layer scale
                elif form == 4:
                    y = torch.maximum(a, p)  # broadcasts: one value for every channel
                elif form == 5:
                    y = a + p.view(1, -1, 1, 1)  # a parameter expression: frozen, with a warning
                elif form == 6:
                    y = torch.add(a, other=p)  # a buffer, by keyword
                else:
                    y = torch.minimum(p, a)
            elif s.kind == "shared":
                q, shared = self.layers[f"q{i}"], self.layers[f"s{i}"]
                inner = F.relu(q(a))
                y = shared(x) + shared(inner) if v % 3 != 2 else shared(inner) * shared(x)
            elif s.kind == "repeat":
                form = v % 4
                y = torch.cat([a, a] if form == 0 else [a, x, a] if form == 1 else [x, a, x] if form == 2
                              else [a, ts[s.other], a], 1)
            elif s.kind == "c2f":
                pieces = a.chunk(2, 1)
                y = torch.cat([pieces[0], pieces[1], self.layers[f"s{i}"](pieces[1])], 1)
            elif s.kind == "view":
                form = v % 4
                if form == 0:
                    y = a.view(a.size(0), c, -1).view(a.size(0), c, SIDE, SIDE)  # literal channel count
                elif form == 1:
                    b, ch, h, w = a.size()
                    y = a.view(b, ch, h * w).relu().view(b, ch, h, w)  # read from the tensor: follows pruning
                elif form == 2:
                    y = a.reshape(a.size(0), -1, SIDE * SIDE).reshape(a.size(0), -1, SIDE, SIDE)
                else:
                    y = a.reshape(-1, c, SIDE * SIDE).reshape(-1, c, SIDE, SIDE)
            else:
                y = torch.sigmoid(a) * a
            ts.append(y)
        y = torch.cat([ts[t] for t in self.leaves()], 1)
        if self.head_kind == 0:
            return self.fc(y.mean((2, 3)))
        y = F.adaptive_avg_pool2d(y, 2)
        width = sum(self.channels[t] for t in self.leaves())
        return self.fc(y.view(-1, width * 4) if self.head_kind == 1 else torch.flatten(y, 1))


@st.composite
def hazard_networks(draw: Any) -> HazardNet:
    channels = [3]
    steps: List[Hazard] = []
    kinds = ["conv", "conv", "operand", "operand", "operand", "shared", "repeat", "c2f", "view", "act"]
    for _ in range(draw(st.integers(2, 6))):
        kind = draw(st.sampled_from(kinds if len(channels) > 1 else ["conv", "shared", "repeat"]))
        src = draw(st.integers(1 if len(channels) > 1 else 0, len(channels) - 1))
        other = draw(st.integers(1 if len(channels) > 1 else 0, len(channels) - 1))
        convs = [i + 1 for i, s in enumerate(steps) if s.kind == "conv"]
        if kind == "operand" and convs and draw(st.booleans()):
            src = draw(st.sampled_from(convs))  # often right after a conv: a prunable group to slice with
        cin, variant = channels[src], draw(st.integers(0, 23))
        if kind == "c2f" and cin % 2:
            kind = "repeat"
        if kind == "conv":
            cout = draw(st.integers(2, 10))
            steps.append(Hazard(kind, src, cout=cout, variant=variant))
            channels.append(cout)
        elif kind == "shared":
            cout = draw(st.integers(2, 8))
            steps.append(Hazard(kind, src, cout=cout, variant=variant))
            channels.append(3 if variant % 3 == 1 else cout)
        elif kind == "repeat":
            steps.append(Hazard(kind, src, other=other, variant=variant))
            form = variant % 4
            channels.append(2 * cin + (3 if form == 1 else 0) if form < 2 else cin + 6 if form == 2 else 2 * cin + channels[other])
        elif kind == "c2f":
            steps.append(Hazard(kind, src, variant=variant))
            channels.append(cin + cin // 2)
        else:
            steps.append(Hazard(kind, src, variant=variant))
            channels.append(cin)
    return HazardNet(steps, channels, head=draw(st.integers(0, 2)))


def _prove_hazards(model: HazardNet, ratio: float, seed: int) -> None:
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    randomize_norms(model, seed).eval()
    x = torch.randn(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = model(x).shape
    for ex in (None, (x,)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fxprune.FxPruneWarning)  # freezing what cannot be proven is allowed
            try:
                plan = fxprune.plan(model, ratio, example_inputs=ex)
                pruned = fxprune.apply(model, plan, example_inputs=ex)
                direct = fxprune.prune(model, ratio, example_inputs=ex)
            except fxprune.FxPruneError as exc:  # allowed, if it says what is wrong; a bug is never one
                assert str(exc)
                continue
            with torch.no_grad():
                assert pruned(x).shape == want and direct(x).shape == want
            assert_equivalent(model, pruned, plan, (x,), example_inputs=ex)


HAZARD_SETTINGS = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                           suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@HAZARD_SETTINGS
@given(data=st.data(), ratio=st.floats(0.2, 0.8), seed=st.integers(0, 2**16))
def test_random_hazard_graphs_prune_to_models_that_run_and_match(data: Any, ratio: float, seed: int) -> None:
    _prove_hazards(data.draw(hazard_networks()), ratio, seed)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), ratio=st.floats(0.05, 0.95), seed=st.integers(0, 2**16))
def test_many_random_hazard_graphs_prune_to_models_that_run_and_match(data: Any, ratio: float, seed: int) -> None:
    _prove_hazards(data.draw(hazard_networks()), ratio, seed)
