"""Swin window attention: whole heads pruned with their relative position bias columns.

timm's ``WindowAttention`` (non-fused path) adds a relative position bias gathered from a table
``[(2W-1)^2, H]`` (one column per head) and, in shifted blocks, a window mask that is the same
for every head. Removing a head removes its q/k/v rows, its projection columns and its table
column; the rewrite is exact (proven against the masked reference in float64), and a table
column sliced for the wrong head fails the proof.
"""

from __future__ import annotations

import warnings
from typing import Any, Tuple

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.errors import InternalError
from fxprune.rewrite import unit_positions
from fxprune.testing import assert_equivalent, randomize_constants

timm = pytest.importorskip("timm")
from timm.models.swin_transformer import WindowAttention  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

WINDOW, DIM, HEADS, WINDOWS = 3, 24, 4, 2
N = WINDOW * WINDOW
T = torch.randn(2 * WINDOWS, N, 5)  # (batch * windows, tokens, features)


class Windows(nn.Module):
    """Tokens of ``WINDOWS`` windows -> window attention (optionally masked) -> residual -> head."""

    def __init__(self, masked: bool = True, attn: Any = None) -> None:
        super().__init__()
        self.embed = nn.Linear(5, DIM)
        self.attn = attn if attn is not None else WindowAttention(DIM, HEADS, window_size=WINDOW)
        self.head = nn.Linear(DIM, 3)
        mask = torch.zeros(WINDOWS, N, N)
        mask[1, :, : N // 2] = -100.0  # a shifted window's "other region" entries
        self.register_buffer("mask", mask if masked else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return self.head(h + self.attn(h, mask=self.mask))


def prove(model: nn.Module, x: torch.Tensor, ratio: float = 0.5) -> Tuple[nn.Module, fxprune.PruningPlan]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)
        plan = fxprune.plan(model, ratio, example_inputs=(x,))
        pruned = fxprune.apply(model, plan, example_inputs=(x,))
    assert_equivalent(model, pruned, plan, (x,), example_inputs=(x,))
    return pruned, plan


def windows(masked: bool = True) -> Windows:
    torch.manual_seed(0)
    return randomize_constants(Windows(masked)).eval()


@pytest.mark.parametrize("masked", [False, True])
def test_window_attention_prunes_whole_heads_with_their_bias_columns(masked: bool) -> None:
    model = windows(masked)
    heads = next(g for g in fxprune.find_groups(model, example_inputs=(T,)) if g.key == "attn.qkv")
    assert heads.prunable and heads.exact and heads.unit == DIM // HEADS and heads.size == DIM
    assert [(t.target, t.role) for t in heads.tensors] == [("attn.relative_position_bias_table", "operand")]
    analysis = fxprune.analyze_model(model, example_inputs=(T,))
    (slot,) = analysis.tensors["attn.relative_position_bias_table"]
    assert (slot.dim, slot.per) == (1, DIM // HEADS)
    pruned, plan = prove(model, T)
    keep = plan.keep("attn.qkv")
    kept_heads = sorted({i // (DIM // HEADS) for i in keep})
    assert len(kept_heads) == 2 and pruned.get_submodule("attn.qkv").out_features == 3 * 12
    table = pruned.get_parameter("attn.relative_position_bias_table")
    assert torch.equal(table, model.attn.relative_position_bias_table[:, kept_heads])
    # Every literal head count (the qkv view; with the mask, its two views too) follows the kept heads.
    def head_counts(gm: torch.fx.GraphModule) -> int:
        return sum(a == HEADS for n in gm.graph.nodes if n.target in ("view", "reshape") for a in n.args[1:])

    assert head_counts(torch.fx.symbolic_trace(model)) == (3 if masked else 1) and head_counts(pruned) == 0


def test_a_bias_column_of_the_wrong_head_fails_the_proof() -> None:
    model = windows()
    pruned, plan = prove(model, T)
    keep = plan.keep("attn.qkv")
    kept_heads = sorted({i // (DIM // HEADS) for i in keep})
    removed = [h for h in range(HEADS) if h not in kept_heads]
    table = pruned.get_parameter("attn.relative_position_bias_table")
    for wrong in (kept_heads[::-1], removed):
        with torch.no_grad():
            table.copy_(model.attn.relative_position_bias_table[:, wrong])
        with pytest.raises(AssertionError):
            assert_equivalent(model, pruned, plan, (T,), example_inputs=(T,))
    with torch.no_grad():
        table.copy_(model.attn.relative_position_bias_table[:, kept_heads])
    assert_equivalent(model, pruned, plan, (T,), example_inputs=(T,))  # restored: proven again


class PerHeadMask(nn.Module):
    """A mask with a value per head (size H on the head dim): not the same for every head."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = WindowAttention(DIM, HEADS, window_size=WINDOW)

    def forward(self, x: torch.Tensor, mask: Any = None) -> torch.Tensor:
        attn = self.inner
        B_, n, C = x.shape
        qkv = attn.qkv(x).reshape(B_, n, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        scores = (q * attn.scale) @ k.transpose(-2, -1)
        scores = scores + attn._get_rel_pos_bias()
        scores = scores.view(-1, WINDOWS, HEADS, n, n) + self.head_mask
        scores = attn.softmax(scores.view(-1, HEADS, n, n))
        return attn.proj((scores @ v).transpose(1, 2).reshape(B_, n, -1))


def test_a_mask_that_differs_per_head_keeps_the_heads_whole() -> None:
    attn = PerHeadMask()
    attn.register_buffer("head_mask", torch.randn(1, WINDOWS, HEADS, N, N))
    model = Windows(masked=False, attn=attn).eval()
    with pytest.warns(fxprune.FxPruneWarning):
        groups = fxprune.find_groups(model, example_inputs=(T,))
    qkv = next(g for g in groups if g.key == "attn.inner.qkv")
    assert not qkv.prunable


class BiasReadTwice(nn.Module):
    """The bias table also read whole elsewhere: slicing it for the heads would break that reader."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = WindowAttention(DIM, HEADS, window_size=WINDOW)
        self.embed, self.head = nn.Linear(5, DIM), nn.Linear(DIM, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return self.head(h + self.attn(h)) + self.attn.relative_position_bias_table.sum()


def test_a_bias_table_read_elsewhere_keeps_the_heads_whole() -> None:
    model = BiasReadTwice().eval()
    qkv = next(g for g in fxprune.find_groups(model, example_inputs=(T,)) if g.key == "attn.qkv")
    assert not qkv.prunable and "relative_position_bias_table is also read whole by sum" in qkv.reasons[0]


def test_unit_positions_refuses_partial_units() -> None:
    assert unit_positions(torch.tensor([2, 3]), 2).tolist() == [1]
    for bad in ([1, 2], [0, 1, 2]):
        with pytest.raises(InternalError, match="not whole units"):
            unit_positions(torch.tensor(bad), 2)


def test_timm_swin_prunes_heads_in_plain_and_shifted_blocks_and_is_proven() -> None:
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, embed_dim=32,
                              depths=(2, 2), num_heads=(2, 4), num_classes=5).eval()
    randomize_constants(model)
    x = torch.randn(1, 3, 56, 56)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)  # nothing left unpruned for want of a rule
        groups = fxprune.find_groups(model, example_inputs=(x,))
        heads = {g.key: g for g in groups if g.key.endswith("attn.qkv")}
        assert len(heads) == 4 and all(g.prunable and g.unit == 16 for g in heads.values())
        plan = fxprune.plan(model, 0.5, example_inputs=(x,))
        pruned = fxprune.apply(model, plan, example_inputs=(x,))
    assert_equivalent(model, pruned, plan, (x,), example_inputs=(x,))
    # Both stages' residual widths (through the cyclic shifts and the patch merging) renormalise.
    assert [g.key for g in plan.renormalising_groups] == ["patch_embed.proj", "layers.1.downsample.reduction"]
    assert pruned.get_submodule("layers.1.downsample.norm").normalized_shape == (64,)
    # blocks.1 of stage 0 is shifted (window mask); stage 1 is a single window (no mask).
    assert model.layers[0].blocks[1].attn_mask is not None
    assert pruned.get_parameter("layers.0.blocks.1.attn.relative_position_bias_table").shape == (169, 1)
    assert pruned.get_parameter("layers.1.blocks.0.attn.relative_position_bias_table").shape == (169, 2)
    assert sum(p.numel() for p in pruned.parameters()) < 0.3 * sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- Swin's residual width


class Shifted(nn.Module):
    """Channels-last map -> LayerNorm -> cyclic shift (torch.roll) -> MLP -> shift back -> patch merging."""

    def __init__(self, c: int = 8, dims: Tuple[int, ...] = (1, 2)) -> None:
        super().__init__()
        self.dims = dims
        self.embed = nn.Conv2d(3, c, 2, stride=2)
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(c), nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.merge_norm, self.reduction = nn.LayerNorm(4 * c), nn.Linear(4 * c, 2 * c, bias=False)
        self.head = nn.Linear(2 * c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).permute(0, 2, 3, 1)  # B, H, W, C
        y = torch.roll(self.norm(x), shifts=(-1, -1), dims=self.dims)
        x = x + torch.roll(self.fc2(torch.relu(self.fc1(y))), shifts=(1, 1), dims=self.dims)
        B, H, W, C = x.shape
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)  # timm's PatchMerging
        return self.head(self.reduction(self.merge_norm(x)).mean((1, 2)))


def test_roll_and_patch_merging_carry_the_residual_width() -> None:
    torch.manual_seed(1)
    model = randomize_constants(Shifted()).eval()
    x = torch.randn(2, 3, 8, 8)
    pruned, plan = prove(model, x)
    embed = next(g for g in fxprune.find_groups(model, example_inputs=(x,)) if g.key == "embed")
    assert embed.renormalising and embed.prunable and embed.modules("in").count("reduction") == 4
    assert pruned.get_submodule("merge_norm").normalized_shape == (16,)
    assert pruned.get_submodule("reduction").in_features == 16
    # The merged dim holds the kept channels once per 2x2 phase: a norm weight whose copies are
    # swapped (each phase's kept channels taken from another phase) fails the proof.
    weight = pruned.get_parameter("merge_norm.weight")
    with torch.no_grad():
        weight.copy_(weight.view(4, 4).roll(1, 0).flatten())
    with pytest.raises(AssertionError):
        assert_equivalent(model, pruned, plan, (x,), example_inputs=(x,))


def test_roll_along_the_channel_dim_is_not_guessed() -> None:
    model = Shifted(dims=(1, 3)).eval()
    with pytest.warns(fxprune.FxPruneWarning, match="roll along the channel dim"):
        embed = next(g for g in fxprune.find_groups(model, example_inputs=(torch.randn(1, 3, 8, 8),)) if g.key == "embed")
    assert not embed.prunable


@pytest.mark.slow
def test_timm_swin_tiny_full_size_prunes_widths_and_heads_and_is_proven() -> None:
    torch.manual_seed(0)
    model = randomize_constants(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)).eval()
    x = torch.randn(1, 3, 224, 224)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)
        plan = fxprune.plan(model, 0.5, example_inputs=(x,))
        pruned = fxprune.apply(model, plan, example_inputs=(x,))
    assert_equivalent(model, pruned, plan, (x,), example_inputs=(x,))
    assert len(plan.renormalising_groups) == 4 and len(plan.pruned_groups) == len(plan.groups) - 1
    assert sum(p.numel() for p in pruned.parameters()) < 0.35 * sum(p.numel() for p in model.parameters())
