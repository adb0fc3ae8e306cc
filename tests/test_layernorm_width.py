"""LayerNorm / RMSNorm widths: renormalising groups and their proof contract.

A norm over the channel dim makes the width it normalises prunable: the group is marked
*renormalising* and the pruned model is proven against the masked reference in which each such
norm computes its statistics over the kept channels only (fxprune.testing.masked_norm), built
from the original graph and the plan, never from the rewrite.
"""

from __future__ import annotations

import copy
import json
import warnings
from typing import Any, Tuple

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.errors import PlanMismatchError
from fxprune.testing import assert_equivalent, masked_norm, masked_reference, randomize_constants, randomize_norms

pytestmark = pytest.mark.usefixtures("one_thread")


def params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def prove(model: nn.Module, ratio: float, x: torch.Tensor, **kw: Any) -> Tuple[torch.fx.GraphModule, fxprune.PruningPlan]:
    model = model.eval()
    plan = fxprune.plan(model, ratio, example_inputs=(x,), **kw)
    pruned = fxprune.apply(model, plan, example_inputs=(x,))
    assert_equivalent(model, pruned, plan, (x,), example_inputs=(x,))
    return pruned, plan


def group_of(model: Any, module: str, role: str = "out", **kw: Any) -> fxprune.Group:
    for g in fxprune.find_groups(model, **kw):
        if module in g.modules(role):
            return g
    raise KeyError(module)


# --------------------------------------------------------------------------- toy models


class Stream(nn.Module):
    """A residual stream of width 8 under nn.LayerNorm, F.layer_norm and nn.RMSNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.scale = nn.Parameter(torch.rand(8) + 0.5)
        self.rms = nn.RMSNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.mlp(self.norm(h))
        h = F.layer_norm(h, (8,), self.scale, None, 1e-6)
        return self.head(self.rms(h))


def stream() -> Stream:
    torch.manual_seed(0)
    return randomize_constants(Stream()).eval()


X = torch.randn(4, 5, 6)


def test_layernorm_coupled_stream_is_pruned_renormalising_and_proven() -> None:
    model = stream()
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)
        pruned, plan = prove(model, 0.5, X, strict=True)
    g = group_of(model, "embed")
    assert g.prunable and g.renormalising and not g.exact
    assert g.norms == ("LayerNorm norm", "layer_norm at layer_norm", "RMSNorm rms")  # scale: not a module weight
    assert {"norm", "rms"} <= set(g.modules("channelwise")) and [t.target for t in g.tensors] == ["scale"]
    assert "renormalising: LayerNorm norm, layer_norm at layer_norm, RMSNorm rms" in str(g)
    hidden = group_of(model, "mlp.0")
    assert hidden.prunable and hidden.exact and "renormalising" not in str(hidden)
    # The smaller layers: module norms rebuilt, the functional norm's normalized_shape rewritten.
    assert pruned.get_submodule("norm").normalized_shape == (4,) and pruned.get_submodule("norm").weight.shape == (4,)
    assert pruned.get_submodule("rms").normalized_shape == (4,)
    (ln,) = [n for n in pruned.graph.nodes if n.target is F.layer_norm]
    assert ln.args[1] == (4,) and pruned.get_parameter("scale").shape == (4,)
    assert pruned.get_submodule("embed").out_features == pruned.get_submodule("head").in_features == 4


def test_the_plan_records_which_groups_are_renormalising() -> None:
    model = stream()
    plan = fxprune.plan(model, 0.5, example_inputs=(X,))
    by_key = {g.key: g for g in plan.groups}
    assert by_key["embed"].renormalising and not by_key["mlp.0"].renormalising
    assert [g.key for g in plan.renormalising_groups] == ["embed"]
    assert "embed: 4/8 (renormalising)" in plan.summary()
    data = json.loads(plan.to_json())
    flags = {g["key"]: g.get("renormalising") for g in data["groups"]}
    assert flags == {"embed": True, "mlp.0": None, "head": None}  # written only where true
    again = fxprune.PruningPlan.from_json(plan.to_json())
    assert again == plan and again.groups[0].renormalising


def test_exact_plans_are_unchanged() -> None:
    """No LayerNorm over channels: plan JSON and reference are what they always were."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    plan = fxprune.plan(model, 0.5)
    assert all(not g.renormalising for g in plan.groups) and "renormalising" not in plan.to_json()
    ref = masked_reference(model, plan)
    assert not any(n.target is masked_norm for n in ref.graph.nodes)


def test_the_renormalising_reference_replaces_each_affected_norm() -> None:
    model = stream()
    _, plan = prove(model, 0.5, X)
    ref = masked_reference(model, plan)
    assert sum(n.target is masked_norm for n in ref.graph.nodes) == 3
    assert not any(n.target is F.layer_norm for n in ref.graph.nodes)
    assert {n.target for n in ref.graph.nodes if n.op == "call_module"} == {"embed", "mlp.0", "mlp.1", "mlp.2", "head"}


# --------------------------------------------------------------------------- broken rewrites fail


def _break(pruned: torch.fx.GraphModule, how: str) -> torch.fx.GraphModule:
    broken = copy.deepcopy(pruned)
    with torch.no_grad():
        if how == "permuted weight":
            w = broken.get_submodule("norm").weight
            w.copy_(w.flip(0))
        elif how == "functional weight":
            w = broken.get_parameter("scale")
            w.copy_(w.roll(1))
        elif how == "rms weight":
            w = broken.get_submodule("rms").weight
            w.copy_(w.roll(1))
    return broken


@pytest.mark.parametrize("how", ["permuted weight", "functional weight", "rms weight"])
def test_a_broken_renormalising_rewrite_fails_the_proof(how: str) -> None:
    model = stream()
    pruned, plan = prove(model, 0.5, X)
    with pytest.raises(AssertionError):
        assert_equivalent(model, _break(pruned, how), plan, (X,), example_inputs=(X,))


def test_a_norm_rebuilt_on_the_wrong_channels_fails_the_proof() -> None:
    """The norm keeps a wrong kept index (its scale sliced with other channels than the stream's)."""
    model = stream()
    pruned, plan = prove(model, 0.5, X)
    keep = plan.keep("embed")
    wrong = sorted(set(range(8)) - set(keep))[:1] + keep[1:]
    broken = copy.deepcopy(pruned)
    with torch.no_grad():
        broken.get_submodule("norm").weight.copy_(model.norm.weight[wrong])
        broken.get_submodule("norm").bias.copy_(model.norm.bias[wrong])
    with pytest.raises(AssertionError):
        assert_equivalent(model, broken, plan, (X,), example_inputs=(X,))


def test_a_norm_that_does_not_renormalise_fails_the_proof() -> None:
    """A 'rewrite' keeping the full-width norm over zeroed channels (the exact contract) fails."""
    model = stream()
    _, plan = prove(model, 0.5, X)
    fake = fxprune.trace(copy.deepcopy(model))
    keep = plan.keep("embed")
    removed = [i for i in range(8) if i not in keep]
    with torch.no_grad():  # every member of the stream zeroed, norms left at full width
        for name in ("embed.weight", "embed.bias", "mlp.2.weight", "mlp.2.bias", "norm.weight", "norm.bias",
                     "scale", "rms.weight"):
            fake.get_parameter(name)[removed] = 0
        fake.get_parameter("mlp.0.weight")[:, removed] = 0
        fake.get_parameter("head.weight")[:, removed] = 0
    with pytest.raises(AssertionError):
        assert_equivalent(model, fake, plan, (X,), example_inputs=(X,))


def test_masked_norm_is_layer_norm_and_rms_norm_over_the_kept_positions() -> None:
    x = torch.randn(3, 7, dtype=torch.float64)
    x[:, 2] = float("nan")  # a removed position never enters the statistics
    keep = torch.tensor([True, True, False, True, False, True, True])
    w, b = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    y = masked_norm(x, keep, w, b, 1e-5)
    torch.testing.assert_close(y[:, keep], F.layer_norm(x[:, keep], (5,), w[keep], b[keep], 1e-5))
    assert bool((y[:, ~keep] == 0).all())
    r = masked_norm(x, keep, w, None, None, rms=True)
    torch.testing.assert_close(r[:, keep], F.rms_norm(x[:, keep], (5,), w[keep]))
    assert bool((masked_norm(x, torch.zeros(7, dtype=torch.bool)) == 0).all())


# --------------------------------------------------------------------------- refusing them


def test_allow_renormalising_false_refuses_renormalising_groups() -> None:
    model = stream()
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)  # refused by design: no warning
        exact, exact_plan = prove(model, 0.5, X, strict=True, allow_renormalising=False)
        g = group_of(model, "embed", allow_renormalising=False)
    assert g.frozen and not g.renormalising and "allow_renormalising=False" in "; ".join(g.reasons)
    assert exact.get_submodule("embed").out_features == 8 and exact.get_submodule("mlp.0").out_features == 8
    assert not exact_plan.renormalising_groups
    assert fxprune.prune(model, 0.5, allow_renormalising=False).get_submodule("embed").out_features == 8
    renorm_plan = fxprune.plan(model, 0.5)
    with pytest.raises(PlanMismatchError, match="cannot be pruned.*allow_renormalising=False"):
        fxprune.apply(model, renorm_plan, allow_renormalising=False)


# --------------------------------------------------------------------------- layouts


class ChannelsLastBlock(nn.Module):
    """torchvision's CNBlock: dwconv -> permute -> LayerNorm -> Linear -> GELU -> Linear ->
    layer_scale * x -> permute, a residual; timm's LayerNorm2d (permute, F.layer_norm, permute)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 2, stride=2)
        self.stem_norm_weight = nn.Parameter(torch.rand(c) + 0.5)
        self.stem_norm_bias = nn.Parameter(torch.randn(c))
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.layer_scale = nn.Parameter(torch.rand(c, 1, 1) + 0.5)
        self.down = nn.Conv2d(c, 2 * c, 2, stride=2)
        self.head = nn.Linear(2 * c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).permute(0, 2, 3, 1)
        x = F.layer_norm(x, [8], self.stem_norm_weight, self.stem_norm_bias, 1e-6)
        x = x.permute(0, 3, 1, 2)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y)))).permute(0, 3, 1, 2)
        x = x + self.layer_scale * y
        return self.head(self.down(x).mean((2, 3)))


def test_channels_last_convnext_block_and_layernorm2d() -> None:
    torch.manual_seed(2)
    model = ChannelsLastBlock().eval()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)
        pruned, plan = prove(model, 0.5, x, strict=True)
    g = group_of(model, "stem", example_inputs=(x,))
    assert g.renormalising and g.prunable and "dw" in g.modules("channelwise")
    assert pruned.get_submodule("dw").out_channels == pruned.get_submodule("norm").normalized_shape[0] == 4
    assert pruned.get_parameter("layer_scale").shape == (4, 1, 1)
    (ln,) = [n for n in pruned.graph.nodes if n.target is F.layer_norm]
    assert ln.args[1] == [4]  # the list stays a list
    assert pruned.get_submodule("down").out_channels == 8  # exact group, pruned as before


class LayerNorm2d(nn.LayerNorm):
    """timm's / torchvision's LayerNorm2d: traced through, it passes ``self.normalized_shape``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class WithLayerNorm2d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.b = nn.Conv2d(3, 8, 1), LayerNorm2d(8), nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.norm(self.a(x)))


def test_keep_class_updates_the_width_a_traced_through_norm_reads() -> None:
    torch.manual_seed(6)
    model = randomize_constants(WithLayerNorm2d()).eval()
    x = torch.randn(2, 3, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)  # the copy is proven, no fallback
        kept = fxprune.prune(model, 0.5, keep_class=True)
    assert type(kept) is WithLayerNorm2d and kept.norm.normalized_shape == (4,) and model.norm.normalized_shape == (8,)
    assert_equivalent(model, kept, kept.meta["fxprune_plan"], (x,))


def test_rms_norm_functional() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.w, self.b = nn.Linear(4, 10), nn.Parameter(torch.rand(10) + 0.5), nn.Linear(10, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(F.rms_norm(self.a(x), (10,), self.w, 1e-6))

    torch.manual_seed(3)
    pruned, plan = prove(M(), 0.5, torch.randn(3, 4))
    assert plan.groups[0].renormalising and pruned.get_parameter("w").shape == (5,)


class Frozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.norm = nn.LayerNorm([4, 6, 6])  # channels together with H and W: not the last-dim case
        self.flat = nn.Linear(16, 8)
        self.norm2 = nn.LayerNorm(16)  # over a flattened 4 x 2 x 2 map: channel blocks
        self.b = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.adaptive_avg_pool2d(self.norm(self.a(x)), 2).flatten(1)
        return self.b(self.flat(self.norm2(y)))


def test_other_norms_over_channels_stay_frozen_by_design() -> None:
    torch.manual_seed(4)
    x = torch.randn(2, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)
        g = group_of(Frozen(), "a", example_inputs=(x,))
        pruned, _ = prove(Frozen(), 0.5, x)
    assert g.frozen and not g.renormalising
    assert any("normalises over the channel dim together with other dims" in r for r in g.reasons)
    assert pruned.get_submodule("a").out_channels == 4 and pruned.get_submodule("flat").out_features == 4


class ReadsTheWidth(nn.Module):
    """MaxViT's attention reshapes an untracked tensor to ``(B, N, C)`` with C read from the stream."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.a(x))
        b, n, c = h.shape
        mixed = torch.cumsum(h, dim=1).reshape(b, n, 2, c // 2).flatten(2)  # cumsum: no rule, untracked after
        return self.b(h + mixed.reshape(b, n, c))


def test_a_width_read_for_an_untracked_reshape_is_refused() -> None:
    torch.manual_seed(5)
    x = torch.randn(2, 3, 4)
    with pytest.warns(fxprune.FxPruneWarning):
        pruned, _ = prove(ReadsTheWidth(), 0.5, x)
    assert pruned.get_submodule("a").out_features == 8  # left whole: the pruned model still runs


def test_exported_layer_norm_prunes_like_the_traced_one() -> None:
    """aten.layer_norm on an exported program maps to F.layer_norm: the same renormalising group."""
    model = stream()
    program = torch.export.export(model, (X,), strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)
        from_export = fxprune.prune(program, 0.5, example_inputs=(X,))
        from_fx = fxprune.prune(model, 0.5, example_inputs=(X,))
    assert params(from_export) == params(from_fx) < params(model)
    plan = from_export.meta["fxprune_plan"]
    assert plan.renormalising_groups
    assert_equivalent(program, from_export, plan, [X], example_inputs=(X,))


class TokenStream(nn.Module):
    """ViT's stem: patch embedding, a class token expanded and concatenated along the tokens,
    a position embedding, then pre-norm MLP blocks and the class token's head."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, c, 2, stride=2)
        self.cls_token = nn.Parameter(torch.randn(1, 1, c))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, c))
        self.norm1, self.fc1, self.fc2 = nn.LayerNorm(c), nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.norm, self.head = nn.LayerNorm(c), nn.Linear(c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = x + self.fc2(F.gelu(self.fc1(self.norm1(x))))
        return self.head(self.norm(x)[:, 0])


def test_class_token_and_position_embedding_follow_the_embedding_width() -> None:
    torch.manual_seed(7)
    x = torch.randn(2, 3, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)
        pruned, plan = prove(TokenStream(), 0.5, x, strict=True)
    assert plan.groups[0].renormalising and plan.groups[0].pruned
    assert pruned.get_parameter("cls_token").shape == (1, 1, 4) and pruned.get_parameter("pos_embed").shape == (1, 5, 4)


def test_exported_token_stream_class_token_and_select() -> None:
    """On an exported graph: aten.expand of the class token, aten.select of its output row."""
    torch.manual_seed(8)
    model = TokenStream().eval()
    x = torch.randn(2, 3, 4, 4)
    program = torch.export.export(model, (x,), strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)
        pruned = fxprune.prune(program, 0.5, example_inputs=(x,))
    plan = pruned.meta["fxprune_plan"]
    assert plan.groups[0].renormalising and plan.groups[0].pruned
    assert_equivalent(program, pruned, plan, [x], example_inputs=(x,))


# --------------------------------------------------------------------------- models


def test_torchvision_convnext_tiny_prunes_its_residual_width() -> None:
    import torchvision

    torch.manual_seed(0)
    model = randomize_norms(torchvision.models.convnext_tiny(num_classes=10)).eval()
    x = torch.randn(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)
        pruned, plan = prove(model, 0.5, x, strict=True)
    stages = [g for g in plan.groups if g.renormalising]
    assert [g.size for g in stages] == [96, 192, 384, 768] and all(g.pruned for g in stages)
    assert pruned.get_submodule("features.7.2.block.2").normalized_shape == (384,)
    assert params(pruned) < 0.27 * params(model)  # 27.8 M -> 7.06 M (Torch-Pruning 1.6: 7.1 M)


@pytest.mark.slow
def test_timm_convnext_pico() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model("convnext_pico", pretrained=False, num_classes=10)).eval()
    x = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)
        pruned, plan = prove(model, 0.5, x)
    assert len(plan.renormalising_groups) == 4
    assert params(pruned) < 0.3 * params(model)


@pytest.mark.slow
def test_hugging_face_convnext_from_a_small_config() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1], num_labels=10)
    model = randomize_norms(transformers.ConvNextForImageClassification(config)).eval()
    x = torch.randn(1, 3, 64, 64)
    pruned, plan = prove(model, 0.5, x)
    assert len(plan.renormalising_groups) == 4
    assert params(pruned) < 0.35 * params(model)


@pytest.mark.slow
def test_timm_vit_tiny_prunes_its_embedding_width() -> None:
    """The embedding (residual) width under every LayerNorm, class token and position embedding
    included; the heads stay whole (attention is not modelled here)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10)
    model = randomize_norms(model).eval()
    x = torch.randn(1, 3, 32, 32)
    pruned, plan = prove(model, 0.5, x)
    (stream,) = plan.renormalising_groups
    assert stream.size == 192 and len(stream.keep) == 96
    assert pruned.get_parameter("cls_token").shape == (1, 1, 96)
    assert params(pruned) < 0.35 * params(model)  # 5.38 M -> 1.81 M


@pytest.mark.slow
def test_hugging_face_vit_from_a_small_config() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=128, num_labels=10)
    model = randomize_norms(transformers.ViTForImageClassification(config)).eval()
    x = torch.randn(1, 3, 32, 32)
    pruned, plan = prove(model, 0.5, x)
    (stream,) = plan.renormalising_groups
    assert stream.size == 64 and len(stream.keep) == 32
    assert params(pruned) < 0.45 * params(model)  # 81 k -> 33 k, heads whole
