"""torchvision's Swin (V1 and V2): window attention with heads and residual width pruned apart.

torchvision's ``shifted_window_attention`` derives ``head_dim = C // num_heads`` from its input
width ``C``, so within that call the heads' width is the residual width. The rewrite swaps it
for :func:`fxprune.layers.window_attention`, the same computation with ``head_dim`` explicit:
the input width (qkv's columns), the output width (proj's rows) and the heads (q/k/v rows and
proj's columns, whole units, with V1's relative position bias columns or V2's bias MLP rows and logit scales) are then pruned apart. Each
case is proven against the masked reference in float64, and the proof fails on broken rewrites.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import pytest
import torch
import torch.fx
from torchvision.models import swin_transformer as swin
from torchvision.models.video import swin_transformer as swin3d

import fxprune
from fxprune.layers import shifted_window_mask, window_attention
from fxprune.testing import assert_equivalent, randomize_norms
from tests.zoo import assert_rolled_parameter_fails, assert_rolled_weight_fails, spread_parameters

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(1, 3, 32, 32)


def small(v2: bool = False) -> torch.nn.Module:
    """Two stages of Swin (embedding 16, 2 then 4 heads, 4x4 windows): plain and shifted blocks."""
    torch.manual_seed(0)
    block = swin.SwinTransformerBlockV2 if v2 else swin.SwinTransformerBlock
    merge = swin.PatchMergingV2 if v2 else swin.PatchMerging
    model = swin.SwinTransformer([4, 4], 16, [2, 2], [2, 4], [4, 4], num_classes=10, block=block,
                                 downsample_layer=merge)
    spread_parameters(model, "relative_position_bias_table", "logit_scale")  # torchvision starts them near zero
    return randomize_norms(model).eval()


@pytest.mark.parametrize("shape,shift", [((1, 8, 8, 6), [2, 2]), ((2, 7, 9, 6), [2, 2]), ((1, 8, 8, 6), [0, 0]),
                                         ((1, 4, 8, 6), [2, 2])], ids=["shifted", "padded", "plain", "window-as-high"])
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_window_attention_computes_torchvisions_function(shape: Any, shift: Any, v2: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64)
    qkv, proj = torch.randn(18, 6, dtype=torch.float64), torch.randn(6, 6, dtype=torch.float64)
    qkv_bias, proj_bias = torch.randn(18, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    bias = torch.randn(1, 2, 16, 16, dtype=torch.float64)
    scale = torch.rand(2, 1, 1, dtype=torch.float64) * 3 if v2 else None
    args = (x, qkv, proj, bias, [4, 4], 2, shift)
    kw = dict(qkv_bias=qkv_bias, proj_bias=proj_bias, logit_scale=scale, training=False)
    want = swin.shifted_window_attention(*args, **kw)
    torch.testing.assert_close(window_attention(*args, **kw), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(window_attention(*args, **kw, head_dim=3), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape,window,shift", [((1, 4, 8, 8, 6), [2, 4, 4], [1, 2, 2]), ((2, 3, 7, 9, 6), [2, 4, 4], [1, 2, 2]),
                                                ((1, 4, 8, 8, 6), [2, 4, 4], [0, 0, 0])], ids=["shifted", "padded", "plain"])
def test_window_attention_computes_torchvisions_3d_function(shape: Any, window: Any, shift: Any) -> None:
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64)
    qkv, proj = torch.randn(18, 6, dtype=torch.float64), torch.randn(6, 6, dtype=torch.float64)
    kw = dict(qkv_bias=torch.randn(18, dtype=torch.float64), proj_bias=torch.randn(6, dtype=torch.float64), training=False)
    bias = torch.randn(1, 2, 32, 32, dtype=torch.float64)
    want = swin3d.shifted_window_attention_3d(x, qkv, proj, bias, window, 2, shift, **kw)
    torch.testing.assert_close(window_attention(x, qkv, proj, bias, window, 2, shift, **kw), want, rtol=1e-12, atol=1e-12)


def test_the_shift_mask_separates_the_regions_a_shift_brings_together() -> None:
    mask = shifted_window_mask([8, 8], [4, 4], [2, 2], torch.zeros(()))
    assert mask.shape == (4, 16, 16)
    assert bool((mask[0] == 0).all())  # the top-left window holds one region
    assert int((mask[3] == 0).sum()) == 4 * 4 * 4  # the last window: four regions of 4 tokens each


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_torchvision_swin_prunes_its_widths_and_heads_and_is_proven(v2: bool) -> None:
    model = small(v2)
    groups = {g.key: g for g in fxprune.find_groups(model, example_inputs=(X,))}
    stream = groups["features.0.0"]
    assert stream.prunable and stream.renormalising
    # V1's heads are named by the q/k/v weight (whole units of head_dim); V2's by the last
    # Linear of the MLP that computes the position bias, whose channels are the heads.
    heads = [g for key, g in groups.items() if key.endswith(".attn.cpb_mlp.2" if v2 else ".attn.qkv")]
    assert len(heads) == 4 and all(g.prunable and g.exact for g in heads)
    assert [g.size for g in heads] == ([2, 2, 4, 4] if v2 else [16, 16, 32, 32])
    plan = fxprune.plan(model, 0.5, example_inputs=(X,))
    pruned = fxprune.apply(model, plan, example_inputs=(X,))
    assert_equivalent(model, pruned, plan, (X,), example_inputs=(X,))
    calls = [n for n in pruned.graph.nodes if n.op == "call_function" and "attention" in str(n.target)]
    assert len(calls) == 4 and all(n.target is window_attention and n.kwargs["head_dim"] == 8 for n in calls)
    assert [n.args[5] for n in calls] == [1, 1, 2, 2]
    assert pruned.get_parameter("features.1.0.attn.qkv.weight").shape == (24, 8)
    assert pruned.get_parameter("features.1.0.attn.proj.weight").shape == (8, 8)
    if v2:
        assert pruned.get_parameter("features.3.0.attn.cpb_mlp.2.weight").shape == (2, 256)
        assert pruned.get_parameter("features.3.0.attn.logit_scale").shape == (2, 1, 1)
    else:
        assert pruned.get_parameter("features.1.0.attn.relative_position_bias_table").shape == (49, 1)
    assert sum(p.numel() for p in pruned.parameters()) < 0.4 * sum(p.numel() for p in model.parameters())


def test_broken_swin_v2_head_rewrites_fail_the_proof() -> None:
    model = small(v2=True)
    plan = fxprune.plan(model, 0.5, example_inputs=(X,))
    pruned = fxprune.apply(model, plan, example_inputs=(X,))
    # The bias MLP's row of the wrong head, q/k/v rows of the wrong head, proj's columns.
    assert_rolled_weight_fails(model, pruned, plan, (X,), "features.3.1.attn.cpb_mlp.2", 0)
    assert_rolled_weight_fails(model, pruned, plan, (X,), "features.3.1.attn.qkv", 0)
    assert_rolled_weight_fails(model, pruned, plan, (X,), "features.3.1.attn.proj", 1)
    # The logit scale of the wrong head (stage 2 keeps 2 of 4 heads).
    assert_rolled_parameter_fails(model, pruned, plan, (X,), "features.3.1.attn.logit_scale", 0)
    # A head count left at the original (torchvision's bias view and the attention disagree).
    def original_heads(node: torch.fx.Node) -> None:
        node.args = node.args[:5] + (node.args[5] * 2,) + node.args[6:]

    assert_edited_attention_fails(model, pruned, plan, original_heads)


def test_a_v2_position_bias_read_elsewhere_keeps_its_heads_whole() -> None:
    model = small(v2=True)
    gm = torch.fx.symbolic_trace(model)
    mlp = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "features.1.0.attn.cpb_mlp.2")
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        # Its per-head output reaches the model's output: those channels cannot change.
        out.args = ((out.args[0], mlp),)
    gm.recompile()
    groups = {g.key: g for g in fxprune.find_groups(gm, example_inputs=(X,))}
    assert not groups["features.1.0.attn.cpb_mlp.2"].prunable and groups["features.1.1.attn.cpb_mlp.2"].prunable
    plan = fxprune.plan(gm, 0.5, example_inputs=(X,))
    pruned = fxprune.apply(gm, plan, example_inputs=(X,))
    assert_equivalent(gm, pruned, plan, (X,), example_inputs=(X,))
    assert pruned.get_parameter("features.1.0.attn.qkv.weight").shape == (48, 8)


def assert_edited_attention_fails(model: torch.nn.Module, pruned: torch.fx.GraphModule, plan: fxprune.PruningPlan,
                                  edit: Callable[[torch.fx.Node], None]) -> None:
    """The proof must fail (or the model not run) once ``edit`` changes every window attention call."""
    broken = copy.deepcopy(pruned)
    for node in broken.graph.nodes:
        if node.target is window_attention:
            edit(node)
    broken.recompile()
    with pytest.raises((AssertionError, RuntimeError)):
        assert_equivalent(model, broken, plan, (X,), example_inputs=(X,))


def uneven_plan(model: torch.nn.Module) -> fxprune.PruningPlan:
    """Ratio 0.5, but the residual stream keeps 12 of its 16 channels: C // num_heads != head_dim.

    (A uniform ratio prunes the width and the heads alike, so torchvision's ``C // num_heads``
    would happen to be right; global ranking or a per-group ratio does not.)
    """
    plan = fxprune.plan(model, 0.5, example_inputs=(X,))
    plan.groups = [dataclasses.replace(g, keep=list(range(12))) if g.key == "features.0.0" else g for g in plan.groups]
    return plan


def test_a_residual_width_pruned_unlike_the_heads_is_proven() -> None:
    model = small()
    plan = uneven_plan(model)
    pruned = fxprune.apply(model, plan, example_inputs=(X,))
    assert_equivalent(model, pruned, plan, (X,), example_inputs=(X,))
    assert pruned.get_parameter("features.1.0.attn.qkv.weight").shape == (24, 12)  # 1 head of 8, 12 inputs


def test_broken_swin_rewrites_fail_the_proof() -> None:
    model = small()
    plan = uneven_plan(model)
    pruned = fxprune.apply(model, plan, example_inputs=(X,))
    # Rows of the q/k/v weight shifted by one (a head's channels moved) and proj's columns.
    assert_rolled_weight_fails(model, pruned, plan, (X,), "features.3.1.attn.qkv", 0)
    assert_rolled_weight_fails(model, pruned, plan, (X,), "features.3.1.attn.proj", 1)
    # The bias table's column of the wrong head (stage 2 keeps 2 of 4 heads).
    assert_rolled_parameter_fails(model, pruned, plan, (X,), "features.3.1.attn.relative_position_bias_table", 1)
    # torchvision's function on the pruned widths (head_dim read as C // num_heads again).
    def torchvisions_function(node: torch.fx.Node) -> None:
        node.target = swin.shifted_window_attention
        node.kwargs = {k: v for k, v in node.kwargs.items() if k != "head_dim"}

    assert_edited_attention_fails(model, pruned, plan, torchvisions_function)


def test_a_pruned_swin_is_traced_and_pruned_again() -> None:
    model = small()
    once = fxprune.prune(model, 0.5, example_inputs=(X,))
    again = torch.fx.symbolic_trace(once)  # window_attention stays one call (an fx leaf)
    assert any(n.target is window_attention for n in again.graph.nodes)
    plan = fxprune.plan(once, 0.5, example_inputs=(X,))
    twice = fxprune.apply(once, plan, example_inputs=(X,))
    assert_equivalent(once, twice, plan, (X,), example_inputs=(X,))
    assert sum(p.numel() for p in twice.parameters()) < sum(p.numel() for p in once.parameters())


def test_a_bias_table_read_elsewhere_keeps_the_heads_whole() -> None:
    model = small()
    gm = torch.fx.symbolic_trace(model)
    table = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "features.1.0.attn.relative_position_bias_table")
    with gm.graph.inserting_before(next(n for n in gm.graph.nodes if n.op == "output")):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        total = gm.graph.call_function(torch.add, (out.args[0], gm.graph.call_method("sum", (table,))))
        out.args = (total,)
    gm.recompile()
    groups = {g.key: g for g in fxprune.find_groups(gm, example_inputs=(X,))}
    assert not groups["features.1.0.attn.qkv"].prunable and groups["features.1.1.attn.qkv"].prunable
    plan = fxprune.plan(gm, 0.5, example_inputs=(X,))
    pruned = fxprune.apply(gm, plan, example_inputs=(X,))
    assert_equivalent(gm, pruned, plan, (X,), example_inputs=(X,))


def test_video_swin_prunes_widths_and_heads_and_is_proven() -> None:
    torch.manual_seed(0)
    model = swin3d.SwinTransformer3d([2, 4, 4], 16, [2, 2], [2, 4], [2, 4, 4], num_classes=10)
    spread_parameters(model, "relative_position_bias_table")
    model = randomize_norms(model).eval()
    x = torch.randn(1, 3, 4, 32, 32)
    plan = fxprune.plan(model, 0.5, example_inputs=(x,))
    pruned = fxprune.apply(model, plan, example_inputs=(x,))
    assert_equivalent(model, pruned, plan, (x,), example_inputs=(x,))
    assert pruned.get_parameter("features.2.1.attn.relative_position_bias_table").shape[1] == 2
    assert pruned.get_parameter("features.2.1.attn.qkv.weight").shape == (48, 16)
    assert_rolled_parameter_fails(model, pruned, plan, (x,), "features.2.1.attn.relative_position_bias_table", 1)
