"""The proof must be able to fail, and tracing must never crash on what zoo models do.

Small models that reproduce what timm / torchvision models do to the proof tools and the
tracer (issue 16 items 1-4, issue 10 items 16 and 19): zero-initialised heads and gains that
make the proof vacuous, attention-bias caches that keep a Proxy between traces, helpers that
mutate a list argument under shape propagation, float32 constants in a float64 proof, and
NaN statistics in removed channels.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from typing import Any, Dict, List, Optional

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune import FxPruneError, FxPruneWarning
from fxprune.testing import (VacuousProofError, assert_equivalent, cast_model, constant_tensors, masked_reference,
                             randomize_constants, randomize_norms)
from fxprune.tracing import stale_proxies


# The helpers below have no channel rule on purpose; their freeze warnings are expected.
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:channels left unpruned")]

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c)


class ZeroHeadNet(nn.Module):
    """conv-bn-relu x2, pool, and a classifier initialised to zero (timm mixer / sequencer heads)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), _bn(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), _bn(16)
        self.head = nn.Linear(16, 5)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x)).relu()
        x = self.bn2(self.conv2(x)).relu()
        return self.head(x.mean((2, 3)))


class DeadBranchNet(nn.Module):
    """A residual block whose branch ends in a zero gain (nf_regnet's zero-initialised conv3.gain)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_a = nn.Conv2d(8, 16, 3, padding=1)
        self.conv_b = nn.Conv2d(16, 8, 3, padding=1)
        self.gain = nn.Parameter(torch.zeros(()))
        self.norm = nn.GroupNorm(2, 8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.gain * self.conv_b(self.conv_a(x).relu())
        return self.head(self.norm(x))


@pytest.fixture(autouse=True)
def seeded() -> None:
    """Fixed initial weights: which channels a ReLU leaves dead must not depend on test order."""
    torch.manual_seed(0)


def _swap_rows(pruned: torch.fx.GraphModule, conv: str) -> torch.fx.GraphModule:
    """A deliberately broken rewrite: the kept output channels of one conv in reverse order (its
    consumers unchanged), as a wrong index in a slice would do. Reversing all of them rather
    than swapping two: two channels a ReLU leaves dead on the inputs would swap unseen."""
    layer = pruned.get_submodule(conv)
    with torch.no_grad():
        layer.weight.copy_(layer.weight.flip(0))
        if layer.bias is not None:
            layer.bias.copy_(layer.bias.flip(0))
    return pruned


def _plan_and_apply(model: nn.Module, ratio: float = 0.5, **kw: Any) -> Any:
    plan = fxprune.plan(model.eval(), ratio, **kw)
    return plan, fxprune.apply(model, plan, example_inputs=kw.get("example_inputs"))


# ------------------------------------------------------------------ 1: vacuous proofs


def test_zero_head_makes_the_proof_vacuous_and_it_says_so() -> None:
    model = ZeroHeadNet().eval()
    plan, pruned = _plan_and_apply(model)
    # Before: a broken rewrite passed, since the output never depends on the channels.
    with pytest.raises(VacuousProofError, match=r"vacuous proof.*does not depend on those channels.*head\.weight"):
        assert_equivalent(model, _swap_rows(pruned, "conv1"), plan, (X,))


def test_vacuous_proof_opt_out() -> None:
    model = ZeroHeadNet().eval()
    plan, pruned = _plan_and_apply(model)
    assert_equivalent(model, pruned, plan, (X,), allow_vacuous=True)


def test_randomized_constants_make_a_broken_rewrite_fail() -> None:
    model = randomize_norms(ZeroHeadNet()).eval()  # before: the zero head stayed zero
    plan, pruned = _plan_and_apply(model)
    assert_equivalent(model, pruned, plan, (X,))  # a correct rewrite still passes
    with pytest.raises(AssertionError) as info:
        assert_equivalent(model, _swap_rows(pruned, "conv1"), plan, (X,))  # before: passed
    assert not isinstance(info.value, VacuousProofError)  # a real mismatch, not a vacuous proof
    assert "head.weight" not in constant_tensors(model)


def test_dead_residual_branch_is_vacuous_until_its_gain_is_randomized() -> None:
    model = DeadBranchNet().eval()
    plan = fxprune.plan(model, {"conv_a": 0.5})
    pruned = fxprune.apply(model, plan)
    assert pruned.get_submodule("conv_a").out_channels == 8
    with pytest.raises(VacuousProofError, match=r"gain"):
        assert_equivalent(model, pruned, plan, (X,))
    randomize_constants(model)
    assert float(model.gain.detach()) != 0
    pruned = fxprune.apply(model, plan)
    assert_equivalent(model, pruned, plan, (X,))
    with pytest.raises(AssertionError):
        assert_equivalent(model, _swap_rows(pruned, "conv_a"), plan, (X,))


def test_removing_channels_that_are_zero_already_is_not_vacuous() -> None:
    model = randomize_norms(ZeroHeadNet()).eval()
    with torch.no_grad():  # the channels L1 removes are zero already: the reference equals the model
        model.conv2.weight[8:] = 0
        model.conv2.bias[8:] = 0
        model.bn2.weight[8:] = 0
        model.bn2.bias[8:] = 0
    plan = fxprune.plan(model, {"conv2": 0.5})
    assert sorted(plan.keep("conv2")) == list(range(8))
    pruned = fxprune.apply(model, plan)
    assert_equivalent(model, pruned, plan, (X,))  # the kept channels still reach the output
    with pytest.raises(AssertionError):
        assert_equivalent(model, _swap_rows(pruned, "conv2"), plan, (X,))


def test_randomize_constants_covers_every_constant_tensor() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln, self.gn, self.bn = nn.LayerNorm(6), nn.GroupNorm(2, 6), nn.BatchNorm1d(6)
            self.layer_scale = nn.Parameter(torch.full((6,), 1e-6))
            self.rezero = nn.Parameter(torch.zeros(()))
            self.head = nn.Linear(6, 3)
            nn.init.zeros_(self.head.weight)
            self.varied = nn.Parameter(torch.arange(6.0))
            self.register_buffer("index", torch.zeros(6, dtype=torch.long))
            self.register_buffer("blur", torch.full((6,), 1 / 6))

    m = Block()
    assert set(constant_tensors(m)) >= {"ln.weight", "ln.bias", "gn.weight", "gn.bias", "bn.weight", "bn.bias",
                                         "bn.running_mean", "bn.running_var", "layer_scale", "rezero",
                                         "head.weight", "blur"}
    randomize_constants(m, seed=3)
    assert constant_tensors(m) == []
    assert torch.equal(m.varied, torch.arange(6.0)) and torch.equal(m.index, torch.zeros(6, dtype=torch.long))
    assert bool((m.bn.running_var > 0).all())
    assert float(m.layer_scale.detach().abs().max()) < 2e-6  # jitter keeps a layer scale's magnitude
    assert bool((m.head.weight.abs() <= 6 ** -0.5).all())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    randomize_constants(m, seed=4)  # nothing constant is left: a second call changes nothing
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


# ------------------------------------------------------------------ 2: Proxies cached across traces


class CachedBias(nn.Module):
    """timm's attention-bias cache: a tensor computed in forward, cached per device in a dict."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(c, c, 1)
        self.biases = nn.Parameter(torch.randn(c))
        self.bias_cache: Dict[str, torch.Tensor] = {}

    def get_bias(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        if key not in self.bias_cache:
            self.bias_cache[key] = self.biases.view(1, -1, 1, 1) * 2
        return self.bias_cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) + self.get_bias(x.device)


class CachedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.attn = CachedBias(8)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.attn(self.conv1(x)).relu())


def test_find_groups_then_prune_the_same_instance() -> None:
    model = CachedNet().eval()
    fxprune.find_groups(model)  # before: the cache kept this trace's Proxy...
    assert model.attn.bias_cache == {} and stale_proxies(model) == []
    pruned = fxprune.prune(model, 0.5)  # ...and this second trace died with KeyError in graph.walk
    assert pruned.get_submodule("conv1").out_channels == 4
    assert_equivalent(model, pruned, pruned.meta["fxprune_plan"], (X,))


def test_proxies_left_by_the_users_own_trace_are_hidden_and_kept() -> None:
    model = CachedNet().eval()
    torch.fx.symbolic_trace(model)
    assert stale_proxies(model) == ["attn.bias_cache"]
    pruned = fxprune.prune(model, 0.5)
    assert pruned.get_submodule("conv1").out_channels == 4
    assert stale_proxies(model) == ["attn.bias_cache"]  # the model passed in is never modified


def test_a_graph_reading_a_node_of_another_trace_is_a_clear_error() -> None:
    model = CachedNet().eval()
    torch.fx.symbolic_trace(model)
    twice = torch.fx.symbolic_trace(model)  # torch's own tracer reads the stale Proxy back
    with pytest.raises(FxPruneError, match=r"node of another graph.*Proxy kept from an earlier trace"):
        fxprune.find_groups(twice)  # before: KeyError: 'mul'


class AttributeCache(nn.Module):
    """A cache held in a plain attribute rather than a container."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)
        self.scale = nn.Parameter(torch.ones(1, 8, 1, 1))
        self.cached: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cached is None:
            self.cached = self.scale * 2
        return self.conv2(self.conv1(x).relu() * self.cached)


def test_a_plain_attribute_cache_is_restored_after_tracing() -> None:
    model = AttributeCache().eval()
    fxprune.find_groups(model)
    assert model.cached is None
    fxprune.find_groups(model)
    torch.fx.symbolic_trace(model)  # the user's own trace leaves a Proxy where fxprune cannot hide it
    with pytest.raises(FxPruneError, match=r"earlier trace in cached"):
        fxprune.find_groups(model)


# ------------------------------------------------------------------ 3 and issue 10.16: shape propagation


@torch.fx.wrap
def pad_to_window(sizes: List[int], x: torch.Tensor) -> torch.Tensor:
    """Mutates its list argument, as torchvision's swin3d window-size helper does."""
    for i in range(len(sizes)):
        sizes[i] = min(sizes[i], x.shape[i + 2])
    return x


class WindowNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), _bn(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x)).relu()
        x = pad_to_window([7, 7], self.conv2(x))
        return self.conv3(x)


def test_a_helper_that_mutates_its_list_argument_gets_shapes() -> None:
    model = randomize_norms(WindowNet()).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = fxprune.plan(model, 0.5, example_inputs=(X,))  # before: FxPruneError from ShapeProp
    assert not [w for w in caught if "shape propagation" in str(w.message)]
    pruned = fxprune.apply(model, plan, example_inputs=(X,))
    assert pruned.get_submodule("conv1").out_channels == 4
    assert_equivalent(model, pruned, plan, (X,), example_inputs=(X,))


@torch.fx.wrap
def forward_only(x: torch.Tensor) -> torch.Tensor:
    """User code that runs from the generated forward but not node by node (fx's Interpreter)."""
    if sys._getframe(1).f_code.co_name != "forward":
        raise RuntimeError("forward_only must be called from forward")
    return x


class ForwardOnlyNet(WindowNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x)).relu()
        return self.conv3(forward_only(self.conv2(x)))


def test_shape_propagation_failing_in_user_code_degrades_with_a_warning(capfd: pytest.CaptureFixture[str]) -> None:
    model = randomize_norms(ForwardOnlyNet()).eval()
    with pytest.warns(FxPruneWarning, match=r"shape propagation on example_inputs failed at node %forward_only.*"
                                            r"forward_only must be called from forward.*continuing without shapes"):
        pruned = fxprune.prune(model, 0.5, example_inputs=(X,))  # before: FxPruneError
    assert pruned.get_submodule("conv1").out_channels == 4
    assert "Traceback" not in capfd.readouterr().err
    assert_equivalent(model, pruned, pruned.meta["fxprune_plan"], (X,))


def test_inputs_the_model_cannot_take_are_still_a_clear_error(capfd: pytest.CaptureFixture[str]) -> None:
    model = WindowNet().eval()
    with pytest.raises(FxPruneError, match=r"example_inputs failed at node %conv1.*RuntimeError.*Hint"):
        fxprune.prune(model, 0.5, example_inputs=(torch.randn(1, 5, 8, 8),))
    # Before: torch's ShapeProp printed its traceback to stderr first.
    assert "Traceback" not in capfd.readouterr().err
    with pytest.raises(FxPruneError, match=r"example_inputs has 2 elements, but the forward of WindowNet takes 1"):
        fxprune.prune(model, 0.5, example_inputs=(X, X))  # before: the second input was ignored


def test_load_prints_no_shape_propagation_traceback(capfd: pytest.CaptureFixture[str]) -> None:
    model = WindowNet().eval()
    plan = fxprune.plan(model, 0.5)
    out = os.path.join(tempfile.mkdtemp(), "a")
    # Recorded input shapes the model cannot run on: load falls back to replaying without them.
    fxprune.save(fxprune.apply(model, plan), out, plan=plan, example_inputs=(torch.randn(1, 3, 1, 1),))
    capfd.readouterr()
    loaded = fxprune.load(out, model=WindowNet())
    assert loaded.get_submodule("conv1").out_channels == 4
    assert "Traceback" not in capfd.readouterr().err


# ------------------------------------------------------------------ 4: float32 constants in a float64 proof


class ConstantNet(nn.Module):
    """A graph that asks for float32 itself (torchvision RAFT's ``coords_grid(...).float()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), _bn(8)
        self.conv2 = nn.Conv2d(8, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.bn1(self.conv1(x)).relu())
        coords = torch.arange(x.shape[1], device=x.device).float()  # float32, whatever x is
        return x.mean((2, 3)) @ torch.diag(coords + 1)


def test_float32_requests_in_the_graph_follow_the_proof_dtype() -> None:
    model = randomize_norms(ConstantNet()).eval()
    plan, pruned = _plan_and_apply(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="the proof could not run")  # float64 itself, no fallback
        assert_equivalent(model, pruned, plan, (X,))  # before: RuntimeError (Double vs Float) in testing.py
    with pytest.raises(AssertionError):
        assert_equivalent(model, _swap_rows(pruned, "conv1"), plan, (X,))


def test_a_float32_constant_attribute_of_a_graph_module() -> None:
    model = randomize_norms(ConstantNet()).eval()
    gm = fxprune.trace(model)
    proj = torch.randn(6, 5)
    object.__setattr__(gm, "proj", proj)  # a plain attribute (an unlifted constant), not a buffer
    output = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(output), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # fx: "no underlying reference" (not a buffer, on purpose)
        const = gm.graph.get_attr("proj")
        out = gm.graph.call_function(torch.matmul, (output.args[0], const))
    output.args = (out,)
    gm.recompile()
    assert "proj" not in dict(gm.named_buffers())
    plan, pruned = _plan_and_apply(gm)
    assert pruned.proj.dtype == torch.float32
    assert_equivalent(gm, pruned, plan, (X,))  # before: RuntimeError (Double vs Float)


def test_cast_model_reaches_constants_caches_node_arguments_and_dtype_requests() -> None:
    gm = fxprune.trace(ConstantNet())
    gm.cache = {"k": torch.ones(2)}
    output = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(output):
        ones = gm.graph.call_function(torch.ones, (6,), {"dtype": torch.float32})
        total = gm.graph.call_function(torch.add, (output.args[0], ones))
    output.args = (total,)
    gm.recompile()
    cast_model(gm, torch.float64)
    assert gm.conv1.weight.dtype == gm.cache["k"].dtype == torch.float64
    assert ones.kwargs["dtype"] == torch.float64
    assert not [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "float"]
    assert gm(X.double()).dtype == torch.float64
    # A tensor held as a node argument (only fx's Interpreter can run such a graph).
    held = fxprune.trace(ConstantNet())
    node = next(n for n in held.graph.nodes if n.op == "call_function" and n.target is torch.diag)
    node.args = (torch.ones(6),)
    cast_model(held, torch.float64)
    assert node.args[0].dtype == torch.float64


def test_exported_program_with_a_float32_constant() -> None:
    model = randomize_norms(ConstantNet()).eval()
    exported = torch.export.export(model, (X,))
    plan = fxprune.plan(exported, 0.5)
    pruned = fxprune.apply(exported, plan)
    assert pruned.get_submodule("conv1").out_channels == 4
    assert_equivalent(exported, pruned, plan, (X,))


@torch.fx.wrap
def float32_only(x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32:
        raise RuntimeError("expected scalar type Float")
    return x


class Float32OnlyNet(WindowNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(self.conv1(x)).relu()
        return self.conv3(float32_only(self.conv2(x)))


def test_a_model_that_cannot_run_in_float64_falls_back_with_a_warning() -> None:
    model = randomize_norms(Float32OnlyNet()).eval()
    plan, pruned = _plan_and_apply(model)
    with pytest.warns(FxPruneWarning, match=r"could not run in torch.float64.*float32 tolerances"):
        assert_equivalent(model, pruned, plan, (X,))
    with pytest.raises(AssertionError), warnings.catch_warnings():
        warnings.simplefilter("ignore", FxPruneWarning)
        assert_equivalent(model, _swap_rows(pruned, "conv1"), plan, (X,))


# ------------------------------------------------------------------ issue 10.19: NaN statistics


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_statistics_of_a_removed_channel(value: float) -> None:
    model = randomize_norms(ZeroHeadNet()).eval()
    plan = fxprune.plan(model, 0.5)
    removed = sorted(set(range(16)) - set(plan.keep("conv1")))
    with torch.no_grad():
        model.bn1.running_var[removed[0]] = value
        model.bn1.running_mean[removed[1]] = value
    pruned = fxprune.apply(model, plan)
    ref = masked_reference(model, plan)
    assert bool(torch.isfinite(ref(X)).all())  # before: NaN everywhere (0 x NaN)
    assert_equivalent(model, pruned, plan, (X,))
    with pytest.raises(AssertionError):
        assert_equivalent(model, _swap_rows(pruned, "conv2"), plan, (X,))


# ------------------------------------------------------------------ the zoo models themselves (slow)


def _flip_a_pruned_layer(model: nn.Module, pruned: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Break the rewrite: reverse the output rows of the first layer the plan made narrower."""
    for name, layer in pruned.named_modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)) and layer.weight.shape[0] < model.get_submodule(name).weight.shape[0]:
            return _swap_rows(pruned, name)
    raise AssertionError("nothing was pruned")


@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs, size", [("mixer_s16_224", {"img_size": 64}, 64), ("nf_regnet_b0", {}, 64),
                                                ("sequencer2d_s", {}, 112)])
def test_timm_zero_initialised_models_are_vacuous_until_randomized(name: str, kwargs: Dict[str, Any], size: int) -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    x = torch.randn(1, 3, size, size)
    plan = fxprune.plan(model, 0.3)
    pruned = fxprune.apply(model, plan)
    with pytest.raises(VacuousProofError):  # before: passed, proving nothing
        assert_equivalent(model, _flip_a_pruned_layer(model, pruned), plan, (x,))
    randomize_norms(model)
    plan = fxprune.plan(model, 0.3)
    pruned = fxprune.apply(model, plan)
    assert_equivalent(model, pruned, plan, (x,))
    with pytest.raises(AssertionError) as info:
        assert_equivalent(model, _flip_a_pruned_layer(model, pruned), plan, (x,))
    assert not isinstance(info.value, VacuousProofError)


@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs, size", [("levit_128", {"img_size": 64}, 64), ("efficientformer_l1", {}, 224)])
def test_timm_attention_bias_caches_find_groups_then_prune(name: str, kwargs: Dict[str, Any], size: int) -> None:
    timm = pytest.importorskip("timm")
    model = randomize_norms(timm.create_model(name, pretrained=False, num_classes=10, **kwargs)).eval()
    fxprune.find_groups(model)
    pruned = fxprune.prune(model, 0.3)  # before: KeyError: 'getitem_N' in fxprune/graph.py walk
    assert stale_proxies(model) == []
    assert_equivalent(model, pruned, pruned.meta["fxprune_plan"], (torch.randn(1, 3, size, size),))


@pytest.mark.slow
def test_torchvision_swin3d_with_example_inputs() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = randomize_norms(torchvision.models.video.swin3d_t(num_classes=10)).eval()
    x = torch.randn(1, 3, 4, 64, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = fxprune.prune(model, 0.3, example_inputs=(x,))  # before: FxPruneError (immutable_list)
    assert not [w for w in caught if "shape propagation" in str(w.message)]
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    assert_equivalent(model, pruned, pruned.meta["fxprune_plan"], (x,), example_inputs=(x,))


@pytest.mark.slow
def test_torchvision_raft_exported_proves_in_float64() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = randomize_norms(torchvision.models.optical_flow.raft_small()).eval()
    images = (torch.randn(1, 3, 128, 128), torch.randn(1, 3, 128, 128))
    exported = torch.export.export(model, images)
    plan = fxprune.plan(exported, 0.3)
    pruned = fxprune.apply(exported, plan)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="the proof could not run")  # float64 itself, no fallback
        assert_equivalent(exported, pruned, plan, images)  # before: expected scalar type Double but found Float


@pytest.mark.parametrize("how", ["target_macs", "apoz"])
def test_every_interpreter_over_the_graph_hands_helpers_mutable_lists(how: str) -> None:
    """The FLOP recorder (MACs targets) and the activation recorder (APoZ) run the graph node by
    node too: a helper that mutates its list argument must work under them as under forward."""
    model = randomize_norms(WindowNet()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxprune.FxPruneWarning)
        if how == "target_macs":
            pruned = fxprune.prune(model, target_macs=0.6, example_inputs=(X,))
        else:
            pruned = fxprune.prune(model, 0.5, importance="apoz", example_inputs=(X,),
                                   calibration=[X])
    assert pruned(X).shape == model(X).shape


class FunctionalBN(nn.Module):
    """A BatchNorm subclass that fx traces through, reading self.training in Python (timm's BatchNormAct2d)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y = F.batch_norm(y, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias,
                         self.training, 0.1, 1e-5)
        return self.head(y)


def test_a_model_given_in_train_mode_is_traced_in_eval_mode_and_says_so() -> None:
    """A graph traced in train mode bakes training=True into functional batch norm: in eval mode it
    would use batch statistics (wrong outputs; an error at batch 1)."""
    model = randomize_norms(FunctionalBN()).train()
    with pytest.warns(fxprune.FxPruneWarning, match="reads self.training"):
        gm = fxprune.trace(model)
    assert model.training and all(m.training for m in model.modules())  # modes restored
    x = torch.randn(1, 3, 6, 6)
    gm.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))  # batch 1 runs, with the running statistics
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)
        fxprune.trace(model)  # in eval mode there is nothing to say
