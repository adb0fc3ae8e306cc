"""MaxViT's einsum attention: whole heads pruned; channel counts read as sizes become constants.

torchvision's ``RelativePositionalMultiHeadAttention`` chunks one qkv Linear into q, k and v,
views each ``(B, G, P, H, DH)``, attends with two ``torch.einsum`` calls and a per-head relative
position bias, and merges the heads with ``reshape(B, G, P, D)`` where ``D`` is read from its
input's shape: the residual width, not the heads' width. Whole heads are exact (proven in
float64 against the masked reference); the merge's ``D`` is rewritten from the kept heads, and a
channel count used as the size of a dim that does not hold those channels becomes the constant
it is, so the residual width prunes too. Broken rewrites fail the proof.
"""

from __future__ import annotations

import warnings
from typing import Tuple

import pytest
import torch
import torch.nn as nn
from torchvision.models.maxvit import RelativePositionalMultiHeadAttention

import fxprune
from fxprune.testing import assert_equivalent, randomize_constants
from tests.zoo import assert_rolled_weight_fails, init_normal, spread_parameters

pytestmark = pytest.mark.usefixtures("one_thread")

DIM, HEAD_DIM, SIDE = 16, 4, 3  # 4 heads of 4, windows of 3 x 3 tokens
P = SIDE * SIDE
T = torch.randn(2, 2, P, 5)  # (batch, windows, tokens per window, features)


class Windows(nn.Module):
    """Tokens -> MaxViT attention with a residual -> a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, DIM)
        self.attn = RelativePositionalMultiHeadAttention(DIM, HEAD_DIM, P)
        self.head = nn.Linear(DIM, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return self.head(h + self.attn(h))


def windows() -> Windows:
    model = init_normal(Windows())
    torch.manual_seed(1)
    return spread_parameters(randomize_constants(model), "relative_position_bias_table").eval()


def prove(model: nn.Module, x: torch.Tensor, ratio: float = 0.5) -> Tuple[torch.fx.GraphModule, fxprune.PruningPlan]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)  # nothing frozen for want of a rule
        plan = fxprune.plan(model, ratio, example_inputs=(x,))
        pruned = fxprune.apply(model, plan, example_inputs=(x,))
    assert_equivalent(model, pruned, plan, (x,), example_inputs=(x,))
    return pruned, plan


def test_einsum_attention_prunes_whole_heads_and_the_residual_width() -> None:
    model = windows()
    groups = {g.key: g for g in fxprune.find_groups(model, example_inputs=(T,))}
    heads = groups["attn.to_qkv"]
    assert heads.prunable and heads.exact and heads.unit == HEAD_DIM and heads.size == DIM
    assert [(t.target, t.role) for t in heads.tensors] == [("attn.relative_position_bias_table", "operand")]
    assert groups["embed"].prunable  # the residual width: the merge's D no longer freezes it
    pruned, plan = prove(model, T)
    kept_heads = sorted({i // HEAD_DIM for i in plan.keep("attn.to_qkv")})
    assert len(kept_heads) == 2
    assert pruned.get_submodule("attn.to_qkv").out_features == 3 * 2 * HEAD_DIM
    assert pruned.get_submodule("attn.merge").in_features == 2 * HEAD_DIM
    assert pruned.get_submodule("attn.merge").out_features == pruned.get_submodule("embed").out_features < DIM
    table = pruned.get_parameter("attn.relative_position_bias_table")
    assert torch.equal(table, model.attn.relative_position_bias_table[:, kept_heads])


@pytest.mark.parametrize("module,dim", [("attn.to_qkv", 0), ("attn.merge", 1), ("attn.merge", 0), ("embed", 0)])
def test_a_rolled_weight_fails_the_proof(module: str, dim: int) -> None:
    model = windows()
    pruned, plan = prove(model, T)
    assert_rolled_weight_fails(model, pruned, plan, (T,), module, dim)


def test_a_bias_column_of_the_wrong_head_fails_the_proof() -> None:
    model = windows()
    pruned, plan = prove(model, T)
    kept = sorted({i // HEAD_DIM for i in plan.keep("attn.to_qkv")})
    table = pruned.get_parameter("attn.relative_position_bias_table")
    with torch.no_grad():
        table.copy_(model.attn.relative_position_bias_table[:, kept[::-1]])
    with pytest.raises(AssertionError):
        assert_equivalent(model, pruned, plan, (T,), example_inputs=(T,))


class NotPerHead(nn.Module):
    """The same block, but the scores are mixed across heads (a sum over the head dim) before the softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, DIM)
        self.to_qkv = nn.Linear(DIM, 3 * DIM)
        self.merge = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        B, G, N, D = h.shape
        q, k, v = torch.chunk(self.to_qkv(h), 3, dim=-1)
        q, k, v = (t.reshape(B, G, N, DIM // HEAD_DIM, HEAD_DIM).permute(0, 1, 3, 2, 4) for t in (q, k, v))
        scores = torch.einsum("bghid,bghjd->bghij", q, k)
        scores = torch.softmax(scores + scores.sum(2, keepdim=True), dim=-1)
        out = torch.einsum("bghij,bghjd->bghid", scores, v)
        return h + self.merge(out.permute(0, 1, 3, 2, 4).reshape(B, G, N, D))


def test_scores_mixed_across_heads_keep_the_heads_whole() -> None:
    model = init_normal(NotPerHead())
    with pytest.warns(fxprune.FxPruneWarning):
        groups = {g.key: g for g in fxprune.find_groups(model, example_inputs=(T,))}
    assert not groups["to_qkv"].prunable
    pruned, plan = prove_quiet(model, T)
    assert pruned.get_submodule("to_qkv").out_features == 3 * DIM


def prove_quiet(model: nn.Module, x: torch.Tensor) -> Tuple[torch.fx.GraphModule, fxprune.PruningPlan]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxprune.FxPruneWarning)
        plan = fxprune.plan(model, 0.5, example_inputs=(x,))
        pruned = fxprune.apply(model, plan, example_inputs=(x,))
    assert_equivalent(model, pruned, plan, (x,), example_inputs=(x,))
    return pruned, plan


class SizeReads(nn.Module):
    """Channel counts used as sizes of dims that do not hold those channels.

    ``C`` is ``fc``'s width (16, a prunable group) and also sizes the 16 tokens of the input (an
    untracked tensor) and of ``other``'s output (another group, channels at the last dim).
    Both reshapes must keep the constant 16 after ``fc`` is pruned.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.other, self.head = nn.Linear(6, 16), nn.Linear(6, 8), nn.Linear(16 + 8 + 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 16, 6)
        h = self.fc(x)
        B, N, C = h.shape
        y = self.other(x).reshape(B, C, 8)
        z = x.reshape(B, C, 6)
        return self.head(torch.cat([h, y, z], -1)).mean(1)


def test_a_channel_count_sizing_another_dim_becomes_a_constant() -> None:
    model = init_normal(SizeReads())
    x = torch.randn(2, 16, 6)
    groups = {g.key: g for g in fxprune.find_groups(model, example_inputs=(x,))}
    assert groups["fc"].prunable and groups["other"].prunable
    pruned, plan = prove(model, x)
    assert pruned.get_submodule("fc").out_features < 16 and pruned.get_submodule("other").out_features < 8
    reshapes = [n for n in pruned.graph.nodes if n.target == "reshape"]
    assert [n.args[2] for n in reshapes] == [16, 16]  # the token counts, as constants


class ComputedSizeRead(SizeReads):
    """A size computed from a channel count (``C * 1``) may vary with more than the channels: refused."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        B, N, C = h.shape
        z = x.reshape(B, C * 1, 6)
        return self.head(torch.cat([h, self.other(x), z], -1)).mean(1)


def test_a_size_computed_from_a_channel_count_still_freezes() -> None:
    model = init_normal(ComputedSizeRead())
    x = torch.randn(2, 16, 6)
    with pytest.warns(fxprune.FxPruneWarning, match="size read from a channel dim"):
        groups = {g.key: g for g in fxprune.find_groups(model, example_inputs=(x,))}
    assert not groups["fc"].prunable
    prove_quiet(model, x)


@pytest.mark.slow
def test_torchvision_maxvit_prunes_heads_and_widths_and_is_proven() -> None:
    import torchvision

    torch.manual_seed(0)
    model = randomize_constants(torchvision.models.maxvit_t(num_classes=5)).eval()
    x = torch.randn(1, 3, 224, 224)
    groups = fxprune.find_groups(model, example_inputs=(x,))
    assert [g.key for g in groups if g.frozen] == ["classifier.5"]
    pruned, plan = prove(model, x)
    assert sum(p.numel() for p in pruned.parameters()) < 0.3 * sum(p.numel() for p in model.parameters())
