"""Whole-unit group constraints: the constraint type, GroupNorm groups and attention heads.

Every rewrite here is exact (masking-equivalent), so each is proven against the masked
reference in float64, and each proof is shown to fail on a deliberately broken rewrite.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.errors import FxPruneError, PlanMismatchError
from fxprune.groups import (EqualPerBlock, Group, GroupConstraint, WholeUnits, check_balanced, fit_count,
                            resolve_constraints, select_channels)
from fxprune.allocation import count_step, group_count
from fxprune.planning import GroupPlan
from fxprune.testing import assert_equivalent, randomize_norms
from tests.zoo import spread_parameters


@pytest.fixture(autouse=True)
def seeded() -> None:
    torch.manual_seed(0)


def _prove(model: nn.Module, x: torch.Tensor, ratio: float = 0.5, **kw: Any) -> Tuple[nn.Module, nn.Module, fxprune.PruningPlan]:
    model = randomize_norms(model.eval())
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)
        plan = fxprune.plan(model, ratio, example_inputs=(x,), **kw)
        pruned = fxprune.apply(model, plan, example_inputs=(x,))
    assert_equivalent(model, pruned, plan, [x], example_inputs=(x,))
    return model, pruned, plan


def _group(model: nn.Module, x: torch.Tensor, key: str) -> Group:
    return next(g for g in fxprune.find_groups(model.eval(), example_inputs=(x,)) if g.key == key)


def _with_keep(plan: fxprune.PruningPlan, key: str, keep: list) -> fxprune.PruningPlan:
    new = copy.deepcopy(plan)
    new.groups = [dataclasses.replace(g, keep=list(keep)) if g.key == key else g for g in new.groups]
    return new


# ----------------------------------------------------------------------------- the constraint type


def test_constraints_resolve_by_lcm_and_units_must_nest_in_blocks() -> None:
    assert resolve_constraints(16, []) == (GroupConstraint(1, 1), None)
    assert resolve_constraints(64, [WholeUnits(4), WholeUnits(8), EqualPerBlock(2)]) == (GroupConstraint(2, 8), None)
    assert resolve_constraints(24, [WholeUnits(4), WholeUnits(6)])[0].unit == 12
    found, why = resolve_constraints(12, [EqualPerBlock(4), WholeUnits(2)])
    assert why is not None and "do not nest" in why
    assert "whole units of 5" in str(resolve_constraints(12, [WholeUnits(5)])[1])
    assert "equal blocks" in str(resolve_constraints(12, [EqualPerBlock(5)])[1])


def test_group_constraint_checks_whole_units_and_equal_blocks() -> None:
    c = GroupConstraint(1, 4)
    assert c.step == 4 and c.keeps([4, 5, 6, 7], 12) and c.keeps(list(range(12)), 12)
    assert "kept only in part" in str(c.problem([0, 1, 2, 4], 12))
    assert "at least one unit" in str(c.problem([], 12))
    both = GroupConstraint(2, 2)
    assert both.keeps([0, 1, 6, 7], 8) and not both.keeps([0, 1, 2, 3], 8)


def test_a_group_exposes_its_constraint_typed_and_blocks_still_works() -> None:
    g = Group(0, "g", 24, (), False, (), blocks=2, unit=3)
    assert g.constraints == (EqualPerBlock(2), WholeUnits(3)) and g.constraint == GroupConstraint(2, 3)
    assert Group(0, "p", 8, (), False).constraints == ()
    assert g.block_size == 12 and "in units of 3" in str(g)


def test_fit_count_select_channels_and_count_step_honour_whole_units() -> None:
    g = Group(0, "heads", 32, (), False, unit=8)
    assert [fit_count(g, n) for n in (1, 11, 12, 16, 31, 40)] == [8, 8, 16, 16, 32, 32]
    assert count_step(g) == 8 and count_step(g, 16) == 16 and group_count(g, 13) == 16
    scores = torch.zeros(32)
    scores[8:16] = 1.0   # unit 1 strongest overall
    scores[30] = 5.0     # unit 3 has one very strong channel: its sum wins too
    assert select_channels(g, scores, 16) == list(range(8, 16)) + list(range(24, 32))
    with pytest.raises(FxPruneError, match="whole units of 8"):
        select_channels(g, scores, 12)
    nan = torch.ones(32)
    nan[0] = float("nan")  # a NaN score ranks its whole unit lowest
    assert select_channels(g, nan, 24) == list(range(8, 32))
    blocked = Group(1, "b", 16, (), False, (), blocks=2, unit=4)
    assert fit_count(blocked, 5) == 8
    assert select_channels(blocked, torch.arange(16.0), 8) == [4, 5, 6, 7, 12, 13, 14, 15]
    assert check_balanced(blocked, [4, 5, 6, 7, 12, 13, 14, 15]) is None
    assert "kept only in part" in str(check_balanced(blocked, [3, 4, 5, 6, 12, 13, 14, 15]))
    # Blocks alone: the message the rewrite has always given.
    assert "feeds a grouped convolution" in str(check_balanced(Group(2, "c", 8, (), False, (), blocks=2), [0, 1, 2, 4]))


# ----------------------------------------------------------------------------- GroupNorm


class GNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.b = nn.Conv2d(16, 24, 3, padding=1)
        self.w = nn.Parameter(torch.randn(24))
        self.bias = nn.Parameter(torch.randn(24))
        self.head = nn.Conv2d(24, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.gn(self.a(x)))
        y = F.group_norm(self.b(y), 6, self.w, self.bias, 1e-5)
        return self.head(F.silu(y)).mean((2, 3))


X = torch.randn(2, 3, 8, 8)


def test_groupnorm_prunes_whole_groups_module_and_functional() -> None:
    a, b = _group(GNNet(), X, "a"), _group(GNNet(), X, "b")
    assert a.prunable and a.unit == 4 and b.prunable and b.unit == 4
    assert {t.target for t in b.tensors} == {"w", "bias"}
    model, pruned, plan = _prove(GNNet(), X)
    gn = pruned.get_submodule("gn")
    assert (gn.num_channels, gn.num_groups, gn.weight.numel()) == (8, 2, 8)
    keep_b = plan.keep("b")
    assert len(keep_b) == 12 and all(len([i for i in keep_b if i // 4 == u]) in (0, 4) for u in range(6))
    call = next(n for n in pruned.graph.nodes if n.target is F.group_norm)
    assert call.args[1] == 3 and pruned.w.shape == (12,)


def test_groupnorm_proof_fails_on_a_wrong_kept_unit_and_a_wrong_slice() -> None:
    model, pruned, plan = _prove(GNNet(), X)
    keep = plan.keep("a")
    wrong = [i for i in range(16) if i not in keep][:4] + keep[4:]  # another whole unit than the one built
    with pytest.raises(AssertionError):
        assert_equivalent(model, pruned, _with_keep(plan, "a", sorted(wrong)), [X], example_inputs=(X,))
    bad = copy.deepcopy(pruned)
    with torch.no_grad():  # the GroupNorm's affine tensors of the two kept units swapped
        bad.gn.weight.copy_(bad.gn.weight.roll(4))
        bad.gn.bias.copy_(bad.gn.bias.roll(4))
    with pytest.raises(AssertionError):
        assert_equivalent(model, bad, plan, [X], example_inputs=(X,))
    bad = copy.deepcopy(pruned)
    bad.gn.num_groups = 1  # a rewrite that forgot num_groups normalises over both units
    with pytest.raises(AssertionError):
        assert_equivalent(model, bad, plan, [X], example_inputs=(X,))


def test_a_plan_keeping_part_of_a_groupnorm_group_is_refused() -> None:
    model = GNNet().eval()
    plan = fxprune.plan(model, 0.5, example_inputs=(X,))
    with pytest.raises(PlanMismatchError, match="whole units of 4"):
        fxprune.apply(model, _with_keep(plan, "a", [0, 1, 2, 3, 4, 5, 6, 8]), example_inputs=(X,))


class GNFrozen(nn.Module):
    """num_groups=1 (renormalising, tests/test_groupnorm_width.py), and GroupNorm units that do not nest in a grouped conv's blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.one = nn.GroupNorm(1, 8)
        self.b = nn.Conv2d(8, 12, 1)
        self.gn = nn.GroupNorm(2, 12)  # units of 6
        self.g = nn.Conv2d(12, 8, 3, padding=1, groups=4)  # blocks of 3
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.g(self.gn(self.b(self.one(self.a(x)))))).mean((2, 3))


def test_groupnorm_that_cannot_lose_a_whole_group_stays_whole() -> None:
    a, b = _group(GNFrozen(), X, "a"), _group(GNFrozen(), X, "b")
    assert a.prunable and a.renormalising and any("num_groups=1" in n for n in a.norms)
    assert not b.prunable and "do not nest" in "".join(b.reasons)
    _prove(GNFrozen(), X)


class GNCat(nn.Module):
    """A GroupNorm over a concatenation: each group keeps whole units of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 4, 1)
        self.gn = nn.GroupNorm(3, 12)
        self.c = nn.Conv2d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.gn(torch.cat([self.a(x), self.b(x)], 1))).mean((2, 3))


def test_groupnorm_over_a_concatenation_keeps_whole_units_per_group() -> None:
    assert _group(GNCat(), X, "a").unit == 4 and not _group(GNCat(), X, "b").prunable  # one unit: nothing to remove
    _, pruned, _ = _prove(GNCat(), X)
    assert pruned.get_submodule("gn").num_groups == 2 and pruned.get_submodule("a").out_channels == 4


# ----------------------------------------------------------------------------- attention heads


class HandAttention(nn.Module):
    """The older timm Attention: ``B, N, C = x.shape`` merges the heads back to C, heads read with qkv[i]."""

    def __init__(self, dim: int = 24, heads: int = 4, fused: bool = False) -> None:
        super().__init__()
        self.heads, self.fused = heads, fused
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.scale = (dim // heads) ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Tokens(nn.Module):
    def __init__(self, attn: nn.Module, dim: int = 24) -> None:
        super().__init__()
        self.embed = nn.Linear(5, dim)
        self.attn = attn
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(self.embed(x)))


T = torch.randn(2, 7, 5)


@pytest.mark.parametrize("fused", [False, True])
def test_hand_written_attention_prunes_whole_heads_not_the_embedding(fused: bool) -> None:
    model = Tokens(HandAttention(fused=fused))
    heads = _group(model, T, "attn.qkv")
    assert heads.prunable and heads.size == 24 and heads.unit == 6
    assert [m.offset for m in heads.members if m.module == "attn.qkv"] == [0, 24, 48]
    model, pruned, plan = _prove(model, T)
    keep = plan.keep("attn.qkv")
    assert len(keep) == 12 and all(len([i for i in keep if i // 6 == h]) in (0, 6) for h in range(4))
    assert pruned.get_submodule("attn.qkv").out_features == 36 and pruned.get_submodule("attn.proj").in_features == 12
    # The embedding width (C = x.shape[-1]) is its own group, not confused with the heads' width.
    assert len(plan.keep("embed")) == 12 and pruned.get_submodule("attn.qkv").in_features == 12


def test_attention_proof_fails_when_heads_are_mixed_up() -> None:
    model, pruned, plan = _prove(Tokens(HandAttention()), T)
    bad = copy.deepcopy(pruned)
    with torch.no_grad():  # the kept k rows of the two kept heads swapped (q and v left alone)
        w = bad.attn.qkv.weight
        w[12:24] = w[12:24].roll(6, 0).clone()
    with pytest.raises(AssertionError):
        assert_equivalent(model, bad, plan, [T], example_inputs=(T,))
    keep = plan.keep("attn.qkv")
    other = sorted(set(range(24)) - set(keep))
    with pytest.raises(AssertionError):  # proved against another pair of heads than the one built
        assert_equivalent(model, pruned, _with_keep(plan, "attn.qkv", other), [T], example_inputs=(T,))


@pytest.mark.parametrize("fused", [False, True])
def test_attention_heads_prune_alike_on_the_exported_graph(fused: bool) -> None:
    model = randomize_norms(Tokens(HandAttention(fused=fused)).eval())
    program = torch.export.export(model, (T,), strict=False)
    heads = next(g for g in fxprune.find_groups(program, example_inputs=(T,)) if g.key == "attn.qkv")
    assert heads.prunable and heads.unit == 6  # qkv[i] is aten.select, attention aten ops
    pruned = fxprune.prune(program, 0.5, example_inputs=(T,))
    assert pruned.get_submodule("attn.qkv").out_features == 36
    assert_equivalent(program, pruned, pruned.meta["fxprune_plan"], [T], example_inputs=(T,))


class MaskedAttention(HandAttention):
    """A per-head additive bias on the scores: not a pattern the rule knows, so the heads stay whole."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) + self.bias
        return self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C))


def test_attention_with_an_unknown_per_head_op_stays_whole() -> None:
    model = Tokens(MaskedAttention()).eval()
    with pytest.warns(fxprune.FxPruneWarning):
        groups = fxprune.find_groups(model, example_inputs=(T,))
    qkv = next(g for g in groups if g.key == "attn.qkv")
    assert not qkv.prunable and qkv.size == 72


def test_timm_attention_heads_fused_and_not_with_qk_norm() -> None:
    timm = pytest.importorskip("timm")
    from timm.layers import Attention
    for fused in (True, False):
        attn = Attention(24, num_heads=4, qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm)
        attn.fused_attn = fused
        model = Tokens(attn)
        assert _group(model, T, "attn.qkv").unit == 6
        _, pruned, plan = _prove(model, T)
        assert pruned.get_submodule("attn.qkv").out_features == 36
        view = next(n for n in pruned.graph.nodes if n.op == "call_method" and n.target == "reshape")
        assert view.args[-2:] == (2, 6)  # the head count follows the kept heads; head_dim stays


def test_timm_tiny_vit_prunes_heads_and_mlp_and_is_proven() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=16, depth=2,
                              num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    heads = [g for g in fxprune.find_groups(model.eval(), example_inputs=(x,)) if g.key.endswith("attn.qkv")]
    assert len(heads) == 2 and all(g.prunable and g.unit == 64 for g in heads)
    model, pruned, plan = _prove(model, x)
    assert pruned.get_submodule("blocks.0.attn.qkv").out_features == 3 * 128
    assert sum(p.numel() for p in pruned.parameters()) < 0.65 * sum(p.numel() for p in model.parameters())


@pytest.mark.slow
def test_timm_vit_tiny_full_depth_small_input_is_proven() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    _, pruned, _ = _prove(model, x)
    assert all(pruned.get_submodule(f"blocks.{i}.attn.qkv").out_features == 3 * 128 for i in range(12))


# ----------------------------------------------------------------------------- nn.MultiheadAttention


class MHANet(nn.Module):
    def __init__(self, batch_first: bool = True, mask: bool = False, cross: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 16)
        self.mha = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.head = nn.Linear(16, 3)
        self.register_buffer("mask", torch.zeros(7, 7) if mask else None)
        self.cross = cross

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.embed(x)
        a, _ = self.mha(y, y * 2 if self.cross else y, y, need_weights=False, attn_mask=self.mask)
        return self.head(torch.relu(a))


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_prunes_whole_heads_into_its_own_layer(batch_first: bool) -> None:
    from fxprune.layers import PrunedMultiheadAttention
    heads = _group(MHANet(batch_first), T, "mha:channelwise")
    assert heads.prunable and heads.unit == 4 and heads.size == 16
    model, pruned, plan = _prove(MHANet(batch_first), T)
    mha = pruned.get_submodule("mha")
    assert isinstance(mha, PrunedMultiheadAttention) and (mha.num_heads, mha.head_dim) == (2, 4)
    assert mha.in_proj_weight.shape == (24, len(plan.keep("embed"))) and mha.out_proj.weight.shape == (8, 8)
    bad = copy.deepcopy(pruned)
    with torch.no_grad():  # the q rows of the two kept heads swapped
        bad.mha.in_proj_weight[:8] = bad.mha.in_proj_weight[:8].roll(4, 0).clone()
    with pytest.raises(AssertionError):
        assert_equivalent(model, bad, plan, [T], example_inputs=(T,))


def test_multihead_attention_with_a_mask_or_cross_attention_stays_whole() -> None:
    for kw in ({"mask": True}, {"cross": True}):
        with warnings.catch_warnings():
            warnings.simplefilter("error", fxprune.FxPruneWarning)  # known and frozen by design: no warning
            groups = fxprune.find_groups(MHANet(**kw).eval(), example_inputs=(T,))
        assert not any(g.key.startswith("mha:") for g in groups)
        assert not next(g for g in groups if g.key == "embed").prunable


def test_torchvision_vision_transformer_prunes_heads_and_is_proven() -> None:
    torchvision = pytest.importorskip("torchvision")
    from fxprune.testing import randomize_constants
    model = randomize_constants(torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10))
    x = torch.randn(1, 3, 32, 32)
    _, pruned, _ = _prove(model, x)
    attn = pruned.get_submodule("encoder.layers.encoder_layer_0.self_attention")
    assert attn.num_heads == 2 and attn.head_dim == 16


def test_a_pruned_attention_layer_is_pruned_again_and_saved(tmp_path: Any) -> None:
    from fxprune.layers import PrunedMultiheadAttention
    model, pruned, plan = _prove(MHANet(), T)
    # Iterative pruning: the pruned model is analysed again, its attention layer a leaf with a rule.
    heads = _group(pruned, T, "mha:channelwise")
    assert heads.prunable and heads.unit == 4 and heads.size == 8
    _, again, plan2 = _prove(pruned, T)
    attn = again.get_submodule("mha")
    assert isinstance(attn, PrunedMultiheadAttention) and attn.num_heads == 1 and attn.in_dim == 4
    fxprune.save(pruned, tmp_path / "m", plan=plan, example_inputs=(T,))


# ----------------------------------------------------------------------------- separate q, k, v projections


class SeparateQKV(nn.Module):
    """Hugging Face's layout: q, k and v Linears, each viewed (B, N, H, D) and transposed, sdpa, merged."""

    def __init__(self, dim: int = 24, heads: int = 4, mask_heads: int = 0) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.heads, self.head_dim = heads, dim // heads
        self.register_buffer("mask", torch.randn(1, mask_heads, 7, 7) if mask_heads else torch.zeros(1, 1, 7, 7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = (p(x).view(B, N, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        return self.o(y.transpose(1, 2).reshape(B, N, -1))


def test_separate_q_k_v_projections_prune_whole_heads() -> None:
    model = Tokens(SeparateQKV())
    heads = _group(model, T, "attn.q")
    assert heads.prunable and heads.unit == 6 and {m.module for m in heads.members} == {"attn.q", "attn.k", "attn.v", "attn.o"}
    model, pruned, plan = _prove(model, T)
    assert [pruned.get_submodule(f"attn.{p}").out_features for p in "qkv"] == [12, 12, 12]
    bad = copy.deepcopy(pruned)
    with torch.no_grad():  # k's rows of the two kept heads swapped
        bad.attn.k.weight.copy_(bad.attn.k.weight.roll(6, 0))
        bad.attn.k.bias.copy_(bad.attn.k.bias.roll(6, 0))
    with pytest.raises(AssertionError):
        assert_equivalent(model, bad, plan, [T], example_inputs=(T,))


def test_a_mask_with_a_head_dim_keeps_separate_heads_whole() -> None:
    with pytest.warns(fxprune.FxPruneWarning):  # the view splitting the channels is then not understood
        groups = fxprune.find_groups(Tokens(SeparateQKV(mask_heads=4)).eval(), example_inputs=(T,))
    assert not next(g for g in groups if g.key == "attn.q").prunable


def small_hf_vit() -> tuple:
    """A two-layer Hugging Face ViT (width 64, 4 heads, 32 px) with random constants, and an input."""
    transformers = pytest.importorskip("transformers")
    from fxprune.testing import randomize_constants
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=64,
                                    num_attention_heads=4, intermediate_size=128, num_labels=3)
    return randomize_constants(transformers.ViTForImageClassification(config).eval()), torch.randn(1, 3, 32, 32)


def test_hugging_face_vit_prunes_whole_heads_and_is_proven() -> None:
    model, x = small_hf_vit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxprune.FxPruneWarning)  # traced through torch.export, said so
        pruned = fxprune.prune(model, 0.5, example_inputs=(x,))
        assert_equivalent(model, pruned, pruned.meta["fxprune_plan"], [x], example_inputs=(x,))
    assert pruned.get_submodule("vit.layers.0.attention.k_proj").out_features == 32
    assert pruned.get_submodule("vit.layers.0.attention.o_proj").in_features == 32


def test_hugging_face_swin_prunes_whole_heads_with_their_bias_columns() -> None:
    # Hugging Face's Swin passes its relative position bias (a table gathered per head, plus the
    # shifted windows' mask, the same for every head) to sdpa as the mask: each removed head
    # takes its table column; a column of the wrong head fails the proof.
    transformers = pytest.importorskip("transformers")
    config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2], num_heads=[4],
                                     window_size=4, num_labels=3)
    torch.manual_seed(0)
    model = transformers.SwinForImageClassification(config).eval()
    spread_parameters(model, "relative_position_bias_table")  # Hugging Face starts it at zero
    model = randomize_norms(model)
    x = torch.randn(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxprune.FxPruneWarning)  # traced through torch.export, said so
        plan = fxprune.plan(model, 0.5, example_inputs=(x,))
        pruned = fxprune.apply(model, plan, example_inputs=(x,))
        assert_equivalent(model, pruned, plan, [x], example_inputs=(x,))
    block = "swin.encoder.layers.0.blocks.1.attention"
    assert pruned.get_submodule(f"{block}.q_proj").out_features == 8  # 2 of 4 heads of 4
    table = pruned.get_parameter(f"{block}.relative_position_bias.relative_position_bias_table")
    assert table.shape == (49, 2)
    bad = copy.deepcopy(pruned)
    with torch.no_grad():
        bad.get_parameter(f"{block}.relative_position_bias.relative_position_bias_table").copy_(table.roll(1, 1))
    with pytest.raises(AssertionError), warnings.catch_warnings():
        warnings.simplefilter("ignore", fxprune.FxPruneWarning)
        assert_equivalent(model, bad, plan, [x], example_inputs=(x,))
