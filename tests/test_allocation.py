"""Allocation policies: dict ratios, global ranking, round_to/min_channels, MACs/params targets
(met within one channel-step), the cost model, and iterative pruning."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

import fxprune
from fxprune.allocation import CostModel, GlobalRanking, Policy, _uniform_candidates, finish_count, normalise
from fxprune.api import _exact_measure, analyze_model
from fxprune.cost import count_macs, count_params
from fxprune.groups import fit_count
from fxprune.testing import assert_equivalent


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


X32 = torch.randn(1, 3, 32, 32)


def channels(gm: nn.Module) -> dict:
    """Output channels of every conv/Linear, by name."""
    out = {}
    for name, mod in gm.named_modules():
        if isinstance(mod, nn.Conv2d):
            out[name] = mod.out_channels
        elif isinstance(mod, nn.Linear):
            out[name] = mod.out_features
    return out


# --------------------------------------------------------------------------- counts


@settings(max_examples=300, deadline=None)
@given(size=st.integers(1, 600), n=st.integers(-5, 700), round_to=st.integers(1, 64), min_channels=st.integers(1, 700))
def test_finish_count_properties(size, n, round_to, min_channels):
    k = finish_count(size, n, round_to, min_channels)
    assert 1 <= k <= size
    assert k >= min(min_channels, size)
    if k < size:
        assert k % round_to == 0  # every pruned group keeps a multiple of round_to
        assert k >= round_to
    if round_to == 1:
        assert k == max(1, min(size, n), min(size, min_channels))
    else:
        # the nearest admissible multiple: no admissible multiple is strictly closer to n
        clamped = max(1, min(size, n), min(size, min_channels))
        if k < size and clamped < size:
            lo = max(round_to, -(-min(size, min_channels) // round_to) * round_to)
            hi = (size // round_to) * round_to
            best = min(range(lo, hi + 1, round_to), key=lambda m: (abs(m - clamped), -m))
            assert k == best


def test_finish_count_examples():
    assert finish_count(64, 44, 8) == 48  # 44 -> nearest multiple, halves up
    assert finish_count(64, 43, 8) == 40
    assert finish_count(64, 3, 8) == 8  # never 0
    assert finish_count(10, 9, 8) == 8  # never more than C
    assert finish_count(6, 3, 8) == 6  # too small for any multiple: left whole
    assert finish_count(64, 64, 8) == 64  # unpruned stays unpruned
    assert finish_count(64, 5, 1, 16) == 16


def test_round_to_is_respected_in_every_pruned_layer(resnet18):
    before = channels(resnet18)
    for kwargs in ({"ratio": 0.3}, {"ratio": 0.45, "global_ranking": True}, {"target_macs": 0.6, "example_inputs": X32}):
        pruned = fxprune.prune(resnet18, round_to=16, **kwargs)
        after = channels(pruned)
        changed = [n for n in before if after[n] != before[n]]
        assert changed, kwargs
        for name in changed:
            assert after[name] % 16 == 0 and 0 < after[name] < before[name], (kwargs, name, after[name])
        for bn_name, bn in pruned.named_modules():
            if isinstance(bn, nn.BatchNorm2d):
                assert bn.num_features % 16 == 0
        assert_equivalent(resnet18, pruned, pruned.meta["fxprune_plan"], (X32,), rtol=1e-4, atol=1e-4)


def test_min_channels(resnet18):
    after = channels(fxprune.prune(resnet18, 0.95, min_channels=16))
    assert after["layer1.0.conv1"] == 16 and after["layer4.0.conv1"] == int(512 * 0.05)
    after = channels(fxprune.prune(resnet18, 0.95, min_channels=100))
    assert after["layer1.0.conv1"] == 64 and after["layer4.0.conv1"] == 100


# --------------------------------------------------------------------------- dict ratios


def test_dict_ratios_match_producers_first_match_wins(resnet18):
    p = fxprune.plan(resnet18, {"layer4.*": 0.5, "layer3.0.conv1": 0.25, "layer3.*": 0.75, "conv1": 0.125})
    counts = p.counts()
    assert counts["layer4.0.conv1"] == 256 and counts["layer4.1.conv1"] == 256
    assert counts["layer4.0.conv2"] == 256  # residual group: layer4's own producers
    assert counts["layer3.0.conv1"] == 192  # the specific pattern came first
    assert counts["layer3.1.conv1"] == 64 and counts["layer3.0.conv2"] == 64
    assert counts["conv1"] == 56  # the stem + layer1 residual group (its producers match 'conv1')
    # layer2's groups: no pattern matches their producers; layer2.0.conv1 *consumes* the
    # layer1 group but that does not make it layer2's
    assert counts["layer2.0.conv1"] == 128 and counts["layer2.0.conv2"] == 128
    assert p.policy["ratio"] == {"layer4.*": 0.5, "layer3.0.conv1": 0.25, "layer3.*": 0.75, "conv1": 0.125}
    pruned = fxprune.apply(resnet18, p)
    assert_equivalent(resnet18, pruned, p, (X32,), rtol=1e-4, atol=1e-4)


def test_dict_ratios_default_ratio_and_validation(resnet18):
    p = fxprune.plan(resnet18, {"layer4.*": 0.5}, default_ratio=0.25)
    assert p.counts()["layer4.0.conv1"] == 256 and p.counts()["layer2.0.conv1"] == 96
    with pytest.warns(fxprune.FxPruneWarning, match="'nosuch.*' matches no module"):
        fxprune.plan(resnet18, {"nosuch.*": 0.5})
    with pytest.raises(ValueError, match=r"ratio\['layer4.\*'\].*1.5"):
        fxprune.plan(resnet18, {"layer4.*": 1.5})
    with pytest.raises(ValueError, match="patterns must be strings"):
        fxprune.plan(resnet18, {4: 0.5})
    with pytest.raises(fxprune.FxPruneError, match="float ratio, not a dict"):
        fxprune.plan(resnet18, {"layer4.*": 0.5}, global_ranking=True)


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), "0.3", None, True])
def test_ratio_validation_names_the_value(bad):
    with pytest.raises(ValueError, match="ratio") as err:
        fxprune.prune(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)), bad)
    assert repr(bad) in str(err.value) or str(bad) in str(err.value)


@pytest.mark.parametrize("kwargs,match", [
    ({"ratio": 0.3, "round_to": 0}, "round_to"),
    ({"ratio": 0.3, "min_channels": 2.5}, "min_channels"),
    ({"ratio": 0.3, "max_group_ratio": 1.0}, "max_group_ratio"),
    ({"ratio": 0.3, "default_ratio": -1}, "default_ratio"),
    ({"target_macs": 0.0, "example_inputs": X32}, "target_macs.*0.0"),
    ({"target_params": 1.5}, "target_params.*1.5"),
])
def test_option_validation(resnet18, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fxprune.plan(resnet18, **kwargs)


# --------------------------------------------------------------------------- global ranking


def test_normalise_divides_by_the_mean():
    s = normalise(torch.tensor([1.0, 2.0, 3.0, float("-inf")]))
    assert torch.allclose(s[:3], torch.tensor([0.5, 1.0, 1.5])) and s[3] == -float("inf")
    assert torch.equal(normalise(torch.zeros(3)), torch.zeros(3))


def test_global_ranking_compares_groups_on_normalised_scores(resnet18):
    analysis = analyze_model(resnet18)
    a, b = analysis.group("layer1.0.conv1"), analysis.group("layer2.0.conv1")
    # a's weights are 1000x larger, but one of its channels is tiny relative to a's own
    sa = torch.full((a.size,), 1000.0)
    sa[5] = 10.0
    sb = torch.linspace(1.0, 2.0, b.size)
    ranking = GlobalRanking([a, b], {a.index: sa, b.index: sb}, Policy(ratio=0.0).validated())
    counts = ranking.counts(a.size + b.size - 1)
    assert counts == {a.index: a.size - 1, b.index: b.size}
    counts = ranking.counts(a.size + b.size - 10)  # b's lowest go next, not a's large ones
    assert counts == {a.index: a.size - 1, b.index: b.size - 9}


def test_global_ranking_respects_max_group_ratio(resnet18):
    def lopsided(group):  # in layer4's groups all but 8 channels look worthless next to those 8
        scores = 1.0 + torch.rand(group.size) * 1e-3
        if group.key.startswith("layer4"):
            scores[8:] = 1e-6
        return scores

    p = fxprune.plan(resnet18, 0.5, global_ranking=True, importance=lopsided, max_group_ratio=0.75)
    for g in p.groups:
        if g.pruned:
            assert len(g.keep) >= int(g.size * 0.25)
    for key in ("layer4.0.conv1", "layer4.1.conv1", "layer4.0.conv2"):
        assert len(p.keep(key)) == 128  # pruned down to the floor, and no further


# --------------------------------------------------------------------------- cost model


def _small_vit() -> nn.Module:
    # nn.MultiheadAttention (packed q/k/v) and a class token and position embedding read directly.
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                                mlp_dim=32, num_classes=10)


def _layer_scale_blocks() -> nn.Module:
    # ConvNeXt blocks: a layer-scale parameter the graph reads directly.
    from torchvision.models.convnext import CNBlock
    return nn.Sequential(nn.Conv2d(3, 16, 4, 4), CNBlock(16, 1e-6, 0.0), CNBlock(16, 1e-6, 0.0))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "small_vit", "layer_scale"])
def test_cost_model_predicts_the_rebuilt_model_exactly(name):
    torch.manual_seed(0)
    makers = {"small_vit": _small_vit, "layer_scale": _layer_scale_blocks}
    m = (makers[name]() if name in makers else getattr(torchvision.models, name)(num_classes=10)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = analyze_model(m, example_inputs=(X32,))
    cost = CostModel(analysis, (X32,))
    assert cost.base_macs == count_macs(m, X32) and cost.base_params == count_params(m)
    exact = _exact_measure(analysis, (X32,))
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        counts = {g.index: fit_count(g, int(torch.randint(1, g.size + 1, (1,), generator=gen)))
                  for g in analysis.groups if g.prunable}
        assert cost.measure(counts) == exact(counts)


# --------------------------------------------------------------------------- targets


def test_target_macs_uniform_met_within_one_step(resnet18):
    base = count_macs(resnet18, X32)
    pruned = fxprune.prune(resnet18, target_macs=0.5, example_inputs=X32)
    p = pruned.meta["fxprune_plan"]
    macs = count_macs(pruned, X32)
    assert macs <= 0.5 * base
    assert p.policy["achieved_macs"] == pytest.approx(macs / base) and p.policy["macs"] == macs
    assert p.policy["target_macs"] == 0.5 and p.policy["search"] == "uniform ratio"
    # replaying the found ratio gives the same plan; one ratio step less pruning misses the target
    r = p.policy["ratio"]
    assert fxprune.plan(resnet18, r).groups == p.groups
    groups = [g for g in analyze_model(resnet18).groups if g.prunable]
    previous = max(c for c in _uniform_candidates(groups, 0.9) if c < r)
    assert count_macs(fxprune.prune(resnet18, previous), X32) > 0.5 * base


def test_target_macs_global_met_within_one_channel(resnet18):
    base = count_macs(resnet18, X32)
    pruned = fxprune.prune(resnet18, target_macs=0.4, example_inputs=X32, global_ranking=True)
    p = pruned.meta["fxprune_plan"]
    assert count_macs(pruned, X32) <= 0.4 * base and p.policy["achieved_macs"] <= 0.4
    k = p.policy["kept_channels"]
    analysis = analyze_model(resnet18, example_inputs=(X32,))
    prunable = [g for g in analysis.groups if g.prunable]
    from fxprune.importance import score_groups
    ranking = GlobalRanking(prunable, score_groups(analysis, "l1"), Policy(ratio=0.0, global_ranking=True).validated())
    assert ranking.counts(k) == {g.index: len(p.keep(g.key)) for g in prunable}
    # one more channel kept (the next in the global ranking) exceeds the target
    assert _exact_measure(analysis, (X32,))(ranking.counts(k + 1))["macs"] > 0.4 * base
    assert_equivalent(resnet18, pruned, p, (X32,), rtol=1e-4, atol=1e-4)


def test_target_params_without_example_inputs(resnet18):
    base = count_params(resnet18)
    pruned = fxprune.prune(resnet18, target_params=0.3)
    assert count_params(pruned) <= 0.3 * base
    p = pruned.meta["fxprune_plan"]
    assert p.policy["achieved_params"] == pytest.approx(count_params(pruned) / base)
    assert "achieved_macs" not in p.policy


def test_both_targets_are_met(resnet18):
    pruned = fxprune.prune(resnet18, target_macs=0.7, target_params=0.3, example_inputs=X32, round_to=8)
    p = pruned.meta["fxprune_plan"]
    assert p.policy["achieved_macs"] <= 0.7 and p.policy["achieved_params"] <= 0.3


def test_plan_with_target_records_achievement_without_returning_a_model(resnet18):
    p = fxprune.plan(resnet18, target_macs=0.5, example_inputs=X32, importance="fpgm")
    assert p.criterion == "fpgm" and p.policy["achieved_macs"] <= 0.5
    assert count_macs(fxprune.apply(resnet18, p), X32) == p.policy["macs"]


def test_target_errors(resnet18):
    with pytest.raises(fxprune.FxPruneError, match="example_inputs"):
        fxprune.prune(resnet18, target_macs=0.5)
    with pytest.raises(fxprune.FxPruneError, match="either ratio= or a target"):
        fxprune.prune(resnet18, 0.3, target_macs=0.5, example_inputs=X32)
    with pytest.raises(fxprune.FxPruneError, match="cannot be met.*max_group_ratio=0.5"):
        fxprune.prune(resnet18, target_macs=0.05, example_inputs=X32, max_group_ratio=0.5)
    with pytest.raises(fxprune.FxPruneError, match="cannot be met"):
        fxprune.prune(resnet18, target_params=0.001, global_ranking=True)


def test_target_one_keeps_everything(resnet18):
    pruned = fxprune.prune(resnet18, target_macs=1.0, example_inputs=X32)
    assert channels(pruned) == channels(resnet18)


# --------------------------------------------------------------------------- iterative


def test_prune_iteratively_ratio_ends_where_one_shot_ends(resnet18):
    calls = []

    def finetune(model, step):
        assert isinstance(model, torch.fx.GraphModule)
        calls.append((step, channels(model)["layer1.0.conv1"]))
        return None

    final = fxprune.prune_iteratively(resnet18, 0.5, steps=3, finetune=finetune, round_to=4)
    one_shot = fxprune.prune(resnet18, 0.5, round_to=4)
    assert channels(final) == channels(one_shot)
    assert calls == [(1, 52), (2, 44), (3, 32)]  # 64 * (1 - 0.5 * i/3), rounded to 4
    # the composite plan rebuilds the final architecture from the original
    composite = final.meta["fxprune_plan"]
    assert len(final.meta["fxprune_steps"]) == 3 and composite.policy["steps"] == 3
    rebuilt = fxprune.apply(resnet18, composite)
    assert channels(rebuilt) == channels(final)
    # no fine-tuning happened, so the weights agree too: the composite is the same cut
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(X32), final(X32), rtol=1e-4, atol=1e-4)


def test_prune_iteratively_uses_the_finetuned_model_and_meets_targets(resnet18):
    base = count_macs(resnet18, X32)
    seen = []

    def finetune(model, step):
        seen.append(count_macs(model, X32) / base)
        tuned = copy.deepcopy(model)
        with torch.no_grad():  # "training" that makes the later scores differ
            for p in tuned.parameters():
                p.mul_(1.0 + 0.01 * step)
        tuned.meta["tuned"] = step
        return tuned

    final = fxprune.prune_iteratively(resnet18, target_macs=0.4, steps=2, finetune=finetune,
                                      example_inputs=X32, global_ranking=True)
    assert final.meta.get("tuned") == 2
    assert len(seen) == 2 and seen[0] <= 0.7 + 1e-9 and seen[1] <= 0.4
    assert count_macs(final, X32) <= 0.4 * base


def test_prune_iteratively_validation(resnet18):
    with pytest.raises(ValueError, match="steps"):
        fxprune.prune_iteratively(resnet18, 0.3, steps=0)
    with pytest.raises(fxprune.FxPruneError, match="finetune"):
        fxprune.prune_iteratively(resnet18, 0.3, finetune="no")
    with pytest.raises(fxprune.FxPruneError, match="nn.Module"):
        fxprune.prune_iteratively(resnet18, 0.3, steps=1, finetune=lambda m, s: 3)


@pytest.mark.parametrize("kwargs", [{}, {"global_ranking": True}, {"round_to": 8}, {"min_channels": 100},
                                    {"importance": "taylor"}])
def test_ratio_zero_is_the_identity_under_every_option(resnet18, kwargs):
    pruned = fxprune.prune(resnet18, 0.0, **kwargs)  # taylor without calibration: nothing to score
    assert count_params(pruned) == count_params(resnet18)
    with torch.no_grad():
        torch.testing.assert_close(pruned(X32), resnet18(X32))


def test_round_to_combines_with_grouped_conv_blocks():
    from tests.test_importance import Grouped

    torch.manual_seed(0)
    m = Grouped().eval()
    p = fxprune.plan(m, 0.4, round_to=6)
    assert len(p.keep("a")) == 12  # a multiple of lcm(6, 4 blocks); 16 * 0.6 = 9.6 -> 12
    assert len(p.keep("g")) == 12  # lcm(6, 4) = 12; int(24 * 0.6) = 14 -> 12
    assert len(p.keep("b")) == 6


def test_a_wrong_cost_prediction_falls_back_to_measuring(resnet18, monkeypatch):
    """If the cost model under-predicts, the pass measures rebuilt models instead: still met."""
    from tests.test_importance import Grouped

    real = CostModel.measure
    monkeypatch.setattr(CostModel, "measure", lambda self, counts: {k: v // 2 for k, v in real(self, counts).items()})
    base = count_macs(resnet18, X32)
    pruned = fxprune.prune(resnet18, target_macs=0.5, example_inputs=X32)
    p = pruned.meta["fxprune_plan"]
    assert p.policy["measured_search"] is True and count_macs(pruned, X32) <= 0.5 * base
    # a grouped-conv model: the measuring rebuilds keep its blocks balanced
    torch.manual_seed(0)
    g = Grouped().eval()
    x = torch.randn(1, 3, 8, 8)
    pruned = fxprune.prune(g, target_macs=0.5, example_inputs=x)
    assert pruned.meta["fxprune_plan"].policy["measured_search"] is True
    assert count_macs(pruned, x) <= 0.5 * count_macs(g, x)
    # with the honest prediction there is no second search, and it finds the same cut
    monkeypatch.setattr(CostModel, "measure", real)
    honest = fxprune.plan(resnet18, target_macs=0.5, example_inputs=X32)
    assert "measured_search" not in honest.policy and honest.groups == p.groups


def test_macs_count_every_attention_kernel():
    # Two kernels PyTorch has no FLOP formula for: nn.MultiheadAttention's fused fast path (eval,
    # no autograd) and the CPU kernel of F.scaled_dot_product_attention. Both are counted.
    class Sdpa(nn.Module):
        def forward(self, q):
            return torch.nn.functional.scaled_dot_product_attention(q, q, q)

    tokens, dim = 5, 8
    mha = nn.MultiheadAttention(dim, 2, batch_first=True).eval()
    x = torch.randn(1, tokens, dim)
    core = 2 * tokens * tokens * dim  # scores and the weighted sum
    assert count_macs(Sdpa(), (x.view(1, 1, tokens, dim),)) == core
    with torch.no_grad():
        assert count_macs(_Wrap(mha), (x,)) == 4 * tokens * dim * dim + core
    assert torch.backends.mha.get_fastpath_enabled()  # restored afterwards


class _Wrap(nn.Module):
    def __init__(self, mha: nn.Module) -> None:
        super().__init__()
        self.mha = mha

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]
