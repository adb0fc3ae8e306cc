"""LeViT's per-head q/k/v: each head's width pruned alike in every head, proven.

timm's ``levit.Attention`` views one projection ``(B, N, H * (2 kd + vd))`` as ``(B, N, H, 2 kd
+ vd)`` and splits the last dim into q, k (kd) and v (vd). The heads stay whole; the same kd'
dims of q and k and the same vd' dims of v are kept in every head (the split sizes, the merged
width and the projection's columns follow). Its downsampling attention (``AttentionDownsample``)
splits one projection into k and v only and takes q from its own Linear on a subsampled input:
q's rows are tied head by head to k's. EfficientFormer's attention permutes the view before it
splits it (and transposes k's piece): the same layout. Proven against the masked reference in float64, and the
proof fails on a broken rewrite.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.testing import assert_equivalent, randomize_norms
from tests.zoo import assert_rolled_weight_fails, spread_parameters

timm = pytest.importorskip("timm")
from timm.models.levit import Attention, AttentionDownsample  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

RES = 3
T = torch.randn(2, RES * RES, 6)


class Tokens(nn.Module):
    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.attn = attn
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.attn(x)
        return self.head(x.mean(1))


def model() -> nn.Module:
    torch.manual_seed(0)
    m = Tokens(Attention(16, key_dim=4, num_heads=2, attn_ratio=2, resolution=RES))
    spread_parameters(m, "attention_biases")  # timm starts it at zero
    return randomize_norms(m).eval()


def prove(m: nn.Module):
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)
        plan = fxprune.plan(m, 0.5, example_inputs=(T,))
        pruned = fxprune.apply(m, plan, example_inputs=(T,))
    assert_equivalent(m, pruned, plan, [T], example_inputs=(T,))
    return pruned, plan


def test_levit_attention_prunes_each_heads_width_and_is_proven() -> None:
    m = model()
    groups = fxprune.find_groups(m, example_inputs=(T,))
    assert all(g.prunable for g in groups if g.key != "head")
    pruned, plan = prove(m)
    # 2 heads of (q 4, k 4, v 8) -> (2, 2, 4) each; the projection reads 2 x 4 channels.
    assert pruned.get_submodule("attn.qkv.linear").out_features == 2 * (2 + 2 + 4)
    assert pruned.get_submodule("attn.proj.ln.linear").in_features == 2 * 4
    split = next(n for n in pruned.graph.nodes if n.target == "split")
    assert list(split.args[1]) == [2, 2, 4]
    merged = next(n for n in pruned.graph.nodes if n.target == "reshape" and 8 in n.args)
    assert merged is not None


def test_a_broken_levit_rewrite_fails_the_proof() -> None:
    m = model()
    pruned, plan = prove(m)
    for name, dim in (("attn.qkv.linear", 0), ("attn.proj.ln.linear", 1)):
        assert_rolled_weight_fails(m, pruned, plan, (T,), name, dim)


def test_a_levit_value_read_elsewhere_keeps_the_block_whole() -> None:
    m = model()
    gm = torch.fx.symbolic_trace(m)
    split = next(n for n in gm.graph.nodes if n.target == "split")
    v = next(u for u in split.users if u.args[1] == 2)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        extra = gm.graph.call_method("sum", (v,))
        out.args = (gm.graph.call_function(torch.add, (out.args[0], extra)),)
    gm.recompile()
    with pytest.warns(fxprune.FxPruneWarning):
        groups = {g.key: g for g in fxprune.find_groups(gm, example_inputs=(T,))}
    assert not groups["attn.qkv.linear"].prunable


def test_timm_levit_prunes_its_attention_widths_and_is_proven() -> None:
    torch.manual_seed(0)
    net = timm.create_model("levit_128s", pretrained=False, num_classes=10, img_size=64).eval()
    spread_parameters(net, "attention_biases")
    net = randomize_norms(net)
    x = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)  # the downsampling attentions too
        plan = fxprune.plan(net, 0.5, example_inputs=(x,))
        pruned = fxprune.apply(net, plan, example_inputs=(x,))
    assert_equivalent(net, pruned, plan, [x], example_inputs=(x,))
    assert [g.key for g in fxprune.find_groups(net, example_inputs=(x,)) if not g.prunable] == ["head.linear"]
    qkv = pruned.get_submodule("stages.0.blocks.0.attn.qkv.linear")
    assert qkv.out_features < net.get_submodule("stages.0.blocks.0.attn.qkv.linear").out_features
    # Stage 2's downsampling attention: 8 heads of k 16 + v 64 -> 8 + 32, q 8 x 16 -> 8 x 8.
    down = "stages.1.downsample.attn_downsample"
    assert pruned.get_submodule(f"{down}.kv.linear").out_features == 8 * (8 + 32)
    assert pruned.get_submodule(f"{down}.q.ln.linear").out_features == 8 * 8
    assert pruned.get_submodule(f"{down}.proj.ln.linear").in_features == 8 * 32
    assert sum(p.numel() for p in pruned.parameters()) < 0.3 * sum(p.numel() for p in net.parameters())


class Downsampling(nn.Module):
    """Tokens of a 4x4 map through LeViT's downsampling attention to a 2x2 map."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.attn = AttentionDownsample(16, 12, key_dim=4, num_heads=2, attn_ratio=2, stride=2, resolution=4)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(self.embed(x)).mean(1))


D = torch.randn(2, 16, 6)


def downsampling() -> nn.Module:
    torch.manual_seed(0)
    m = Downsampling()
    spread_parameters(m, "attention_biases")
    return randomize_norms(m).eval()


def test_levit_downsampling_attention_ties_q_to_k_head_by_head_and_is_proven() -> None:
    m = downsampling()
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)
        groups = {g.key: g for g in fxprune.find_groups(m, example_inputs=(D,))}
        plan = fxprune.plan(m, 0.5, example_inputs=(D,))
        pruned = fxprune.apply(m, plan, example_inputs=(D,))
    assert all(g.prunable for key, g in groups.items() if key != "head")
    assert_equivalent(m, pruned, plan, [D], example_inputs=(D,))
    # 2 heads of (k 4, v 8) -> (2, 4); q 2 x 4 -> 2 x 2; the projection reads 2 x 4 channels.
    assert pruned.get_submodule("attn.kv.linear").out_features == 2 * (2 + 4)
    assert pruned.get_submodule("attn.q.ln.linear").out_features == 2 * 2
    assert pruned.get_submodule("attn.proj.ln.linear").in_features == 2 * 4
    split = next(n for n in pruned.graph.nodes if n.target == "split")
    assert list(split.args[1]) == [2, 4]
    for name, dim in (("attn.q.ln.linear", 0), ("attn.kv.linear", 0), ("attn.proj.ln.linear", 1)):
        assert_rolled_weight_fails(m, pruned, plan, (D,), name, dim)


def test_a_downsampling_query_read_elsewhere_keeps_the_block_whole() -> None:
    gm = torch.fx.symbolic_trace(downsampling())
    qview = next(n for n in gm.graph.nodes if n.target == "view" and n.args[2:] == (-1, 2, 4))  # q: (B, Nq, H, kd)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        out.args = (gm.graph.call_function(torch.add, (out.args[0], gm.graph.call_method("sum", (qview,)))),)
    gm.recompile()
    with pytest.warns(fxprune.FxPruneWarning, match="splits or interleaves the channel dim"):
        groups = {g.key: g for g in fxprune.find_groups(gm, example_inputs=(D,))}
        plan = fxprune.plan(gm, 0.5, example_inputs=(D,))
        pruned = fxprune.apply(gm, plan, example_inputs=(D,))
    assert not groups["attn.kv.linear"].prunable
    assert_equivalent(gm, pruned, plan, [D], example_inputs=(D,))


class KeywordSplit(nn.Module):
    """LeViT's layout written by hand, the split sizes passed by keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 2 * (4 + 4 + 8))
        self.proj = nn.Linear(2 * 8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 2, -1).split(split_size=[4, 4, 8], dim=3)
        attn = (q.permute(0, 2, 1, 3) @ k.permute(0, 2, 3, 1) * 0.5).softmax(dim=-1)
        return self.proj((attn @ v.permute(0, 2, 1, 3)).transpose(1, 2).reshape(b, n, 16))


def test_split_sizes_given_by_keyword_are_rewritten() -> None:
    torch.manual_seed(0)
    m = randomize_norms(Tokens(KeywordSplit()).eval())
    pruned, plan = prove(m)
    split = next(n for n in pruned.graph.nodes if n.target == "split")
    assert list(split.kwargs["split_size"]) == [2, 2, 4]
    assert pruned.get_submodule("attn.proj").in_features == 8


def test_efficientformer_attention_permuted_before_the_split_prunes_each_heads_width() -> None:
    from timm.models.efficientformer import Attention as EfficientFormerAttention

    torch.manual_seed(0)
    m = Tokens(EfficientFormerAttention(16, key_dim=4, num_heads=2, attn_ratio=2, resolution=RES))
    m = randomize_norms(spread_parameters(m, "attention_biases")).eval()
    pruned, plan = prove(m)
    # 2 heads of (q 4, k 4, v 8) -> (2, 2, 4) each, as for LeViT's layout.
    assert pruned.get_submodule("attn.qkv").out_features == 2 * (2 + 2 + 4)
    assert pruned.get_submodule("attn.proj").in_features == 2 * 4
    split = next(n for n in pruned.graph.nodes if n.target == "split")
    assert list(split.args[1]) == [2, 2, 4]
    for name, dim in (("attn.qkv", 0), ("attn.proj", 1)):
        assert_rolled_weight_fails(m, pruned, plan, (T,), name, dim)
