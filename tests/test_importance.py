"""Importance criteria: each one on a constructed case where the right answer is known, and
masked-reference equivalence of the pruned model for every criterion."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import fxprune
from fxprune.api import analyze_model
from fxprune.importance import CRITERIA, MODEL_CRITERIA, ScoringOptions, score, score_groups
from fxprune.testing import assert_equivalent

ALL = ["l1", "l2", "fpgm", "bn", "apoz", "taylor", "random"]


pytestmark = pytest.mark.usefixtures("one_thread")


class Small(nn.Module):
    """conv-bn-relu x2, pooled into a classifier: the conv1 group is conv1/bn1/conv2-columns."""

    def __init__(self, c: int = 8, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x)).relu()
        return self.fc(x.mean((2, 3)))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def small(seed: int = 0) -> Small:
    torch.manual_seed(seed)
    m = Small().eval()
    with torch.no_grad():  # non-trivial BatchNorm state so every criterion sees real numbers
        for bn in (m.bn1, m.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    return m


def calib(n: int = 3, batch: int = 4, classes: int = 5, size: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n)]


def group_scores(model: nn.Module, key: str, importance, **options) -> torch.Tensor:
    analysis = analyze_model(model)
    group = analysis.group(key)
    return score_groups(analysis, importance, [group], ScoringOptions(**options))[group.index]


def test_registry_lists_every_criterion():
    assert set(ALL) <= set(fxprune.available_criteria())
    assert set(CRITERIA) & set(MODEL_CRITERIA) == set()


def test_l1_and_l2_rank_a_crafted_case_differently():
    m = small()
    with torch.no_grad():
        m.conv1.weight.fill_(0.3)
        m.conv1.weight[0].fill_(0.1)  # many small weights: L1 2.7, L2 0.52
        m.conv1.weight[1].zero_()
        m.conv1.weight[1, 0, 0, 0] = 2.0  # one large weight: L1 2.0, L2 2.0
        m.conv1.bias.zero_()
        m.bn1.weight.fill_(1.0)
        m.conv2.weight.zero_()
    l1 = group_scores(m, "conv1", "l1")
    l2 = group_scores(m, "conv1", "l2")
    assert int(l1.argmin()) == 1 and int(l2.argmin()) == 0
    assert torch.allclose(l1[:2], torch.tensor([2.7 + 1.0, 2.0 + 1.0]))
    assert torch.allclose(l2[:2], torch.tensor([(27 * 0.01 + 1.0) ** 0.5, (4.0 + 1.0) ** 0.5]))


def test_bn_ranks_zero_gamma_lowest_and_ignores_weights():
    m = small()
    with torch.no_grad():
        m.bn1.weight.copy_(torch.linspace(0.5, 1.2, 8))
        m.bn1.weight[5] = 0.0
        m.conv1.weight[5] *= 100  # large filter: L1 would keep it
    s = group_scores(m, "conv1", "bn")
    assert int(s.argmin()) == 5 and float(s[5]) == 0.0
    assert torch.allclose(s, m.bn1.weight.detach().abs())
    assert int(group_scores(m, "conv1", "l1").argmin()) != 5


def test_bn_falls_back_to_l1_without_batchnorm():
    torch.manual_seed(0)
    m = MLP()
    assert torch.equal(group_scores(m, "fc1", "bn"), group_scores(m, "fc1", "l1"))


def test_fpgm_ranks_the_mean_filter_lowest():
    m = small()
    torch.manual_seed(3)
    others = torch.randn(7, 3, 3, 3)
    with torch.no_grad():
        m.conv1.weight[:2] = others[:2]
        m.conv1.weight[2] = others.mean(0)  # the filter the others can replace best
        m.conv1.weight[3:] = others[2:]
    s = group_scores(m, "conv1", "fpgm")
    assert int(s.argmin()) == 2
    # A symmetric set: the geometric median is exactly the centre filter.
    c = torch.randn(27)
    v = torch.randn(4, 27)
    with torch.no_grad():
        m.conv1.weight.copy_(torch.cat([c + v[:3], c.unsqueeze(0), c - v[:3], (c + v[3]).unsqueeze(0)]).view(8, 3, 3, 3))
    s = group_scores(m, "conv1", "fpgm")
    assert int(s.argmin()) == 3 and float(s[3]) < 1e-3 * float(s.max())


def test_apoz_ranks_an_always_zero_channel_lowest():
    m = small()
    with torch.no_grad():
        m.bn1.bias[6] = -100.0  # pre-activation always negative: ReLU output always 0
    s = group_scores(m, "conv1", "apoz", calibration=calib())
    assert int(s.argmin()) == 6 and float(s[6]) == 0.0
    assert bool(((s >= 0) & (s <= 1)).all())
    assert float(s[torch.arange(8) != 6].min()) > 0.0


def test_apoz_watches_the_relu_outputs():
    """The score is 1 - the exact fraction of zeros of each channel after the ReLU."""
    m = small()
    batches = calib(2)
    s = group_scores(m, "conv1", "apoz", calibration=batches)
    with torch.no_grad():
        acts = torch.cat([F.relu(m.bn1(m.conv1(x))) for x, _ in batches])
    expected = 1.0 - (acts == 0).float().mean((0, 2, 3))
    assert torch.allclose(s, expected, atol=1e-6)


def test_apoz_without_relu_counts_what_a_relu_would_zero():
    torch.manual_seed(0)
    m = MLP()
    with torch.no_grad():
        m.fc1.bias[3] = -50.0  # fc1's output channel 3 is always negative
    data = [(torch.randn(16, 6), torch.randint(0, 4, (16,)))]
    s = group_scores(m, "fc1", "apoz", calibration=data)
    assert int(s.argmin()) == 3 and float(s[3]) == 0.0


def test_apoz_leaves_a_training_model_untouched():
    m = small().train()
    before = copy.deepcopy(m.state_dict())
    group_scores(m, "conv1", "apoz", calibration=calib())
    assert m.training and all(mod.training for mod in m.modules())
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k  # no BatchNorm statistics update


def test_taylor_ranks_a_zero_gradient_times_weight_channel_lowest():
    m = small()
    with torch.no_grad():
        m.conv2.weight[:, 4] = 0.0  # channel 4 feeds nothing: zero grad upstream, zero w here
    s = group_scores(m, "conv1", "taylor", calibration=calib())
    assert int(s.argmin()) == 4 and float(s[4]) == 0.0
    assert float(s[torch.arange(8) != 4].min()) > 0.0


def test_taylor_matches_a_hand_computed_estimate():
    m = small()
    batches = calib(2)
    s = group_scores(m, "conv1", "taylor", calibration=batches)
    ref = copy.deepcopy(m)
    expected = torch.zeros(8, dtype=torch.float64)
    for x, y in batches:
        ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        per = ((ref.conv1.weight * ref.conv1.weight.grad).sum((1, 2, 3)) + ref.conv1.bias * ref.conv1.bias.grad
               + ref.bn1.weight * ref.bn1.weight.grad + ref.bn1.bias * ref.bn1.bias.grad
               + (ref.conv2.weight * ref.conv2.weight.grad).sum((0, 2, 3)))
        expected += per.detach().double().abs()
    assert torch.allclose(s.double(), expected / len(batches), rtol=1e-4, atol=1e-7)


def test_taylor_uses_loss_fn_and_leaves_the_model_untouched():
    m = small()
    for p in m.fc.parameters():
        p.requires_grad_(False)
    before = copy.deepcopy(m.state_dict())
    calls = []

    def loss(output, target):
        calls.append(output.shape)
        return output.pow(2).mean()

    s = group_scores(m, "conv1", "taylor", calibration=calib(3), loss_fn=loss)
    assert len(calls) == 3 and s.shape == (8,)
    assert all(p.grad is None for p in m.parameters())
    assert [p.requires_grad for p in m.fc.parameters()] == [False, False]
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_calibration_batches_limits_the_batches_read():
    seen = []

    def stream():
        for i, batch in enumerate(calib(10)):
            seen.append(i)
            yield batch

    group_scores(small(), "conv1", "apoz", calibration=stream(), calibration_batches=2)
    assert seen == [0, 1]


@pytest.mark.parametrize("name", ["apoz", "taylor"])
def test_data_criteria_need_calibration(name):
    with pytest.raises(fxprune.FxPruneError, match="calibration="):
        fxprune.prune(small(), 0.5, importance=name)
    with pytest.raises(fxprune.FxPruneError, match="no batches"):
        fxprune.prune(small(), 0.5, importance=name, calibration=[])


def test_taylor_needs_targets_and_a_scalar_loss():
    inputs_only = [torch.randn(2, 3, 8, 8)]
    with pytest.raises(fxprune.FxPruneError, match="targets"):
        fxprune.prune(small(), 0.5, importance="taylor", calibration=inputs_only)
    with pytest.raises(fxprune.FxPruneError, match="scalar"):
        fxprune.prune(small(), 0.5, importance="taylor", calibration=calib(1), loss_fn=lambda o, t: o)
    with pytest.raises(fxprune.FxPruneError, match=r"\(inputs, targets\)"):
        fxprune.prune(small(), 0.5, importance="apoz", calibration=[(1, 2, 3)])


def test_random_is_seeded_and_deterministic():
    a = fxprune.plan(small(), 0.5, importance="random", seed=7)
    b = fxprune.plan(small(), 0.5, importance="random", seed=7)
    c = fxprune.plan(small(), 0.5, importance="random", seed=8)
    assert a.groups == b.groups and a.policy["seed"] == 7
    assert a.groups != c.groups
    assert a.criterion == "random"


def test_callables_with_one_or_two_arguments():
    def prefer_high_index(group):
        return torch.arange(group.size, dtype=torch.float32)

    def low_index(group, gm):
        assert isinstance(gm, torch.fx.GraphModule)
        return -torch.arange(group.size, dtype=torch.float32)

    p = fxprune.plan(small(), 0.5, importance=prefer_high_index)
    assert p.keep("conv1") == [4, 5, 6, 7] and p.criterion == "prefer_high_index"
    assert fxprune.plan(small(), 0.5, importance=low_index).keep("conv1") == [0, 1, 2, 3]
    with pytest.raises(fxprune.FxPruneError, match="3 scores for group conv1 of 8"):
        fxprune.plan(small(), 0.5, importance=lambda g: torch.ones(3))
    with pytest.raises(fxprune.FxPruneError, match="unknown importance 'l3'"):
        fxprune.plan(small(), 0.5, importance="l3")


def test_type_errors_inside_a_callable_are_not_swallowed():
    def broken(group, gm):
        raise TypeError("bug in my criterion")

    with pytest.raises(TypeError, match="bug in my criterion"):
        fxprune.plan(small(), 0.5, importance=broken)


def test_nan_scores_rank_lowest():
    m = small()
    with torch.no_grad():
        m.conv1.weight[2, 0, 0, 0] = float("nan")
    for name in ("l1", "l2", "fpgm"):
        p = fxprune.plan(m, 0.5, importance=name)
        assert 2 not in p.keep("conv1"), name


def test_score_keeps_its_old_signature():
    analysis = analyze_model(small())
    g = analysis.group("conv1")
    assert torch.equal(score(g, analysis.gm, "l1"), score_groups(analysis, "l1", [g])[g.index])
    with pytest.raises(fxprune.FxPruneError, match="whole models"):
        score(g, analysis.gm, "apoz")


# --------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("global_ranking", [False, True])
def test_every_criterion_is_equivalent_to_the_masked_reference_small(name, global_ranking):
    m = small()
    x = torch.randn(2, 3, 8, 8)
    pruned = fxprune.prune(m, 0.4, importance=name, calibration=calib(), global_ranking=global_ranking,
                           example_inputs=(x,))
    p = pruned.meta["fxprune_plan"]
    assert p.criterion == name and p.policy["global_ranking"] == global_ranking
    assert any(g.pruned for g in p.groups)
    assert_equivalent(m, pruned, p, (x,))


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.2, 1.0)
                mod.bias.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m


@pytest.mark.parametrize("name,global_ranking", [(n, False) for n in ALL] + [("l1", True), ("apoz", True), ("taylor", True)])
def test_every_criterion_is_equivalent_to_the_masked_reference_resnet18(resnet18, name, global_ranking):
    x = torch.randn(1, 3, 32, 32)
    data = calib(2, batch=2, classes=10, size=32)
    before = copy.deepcopy(resnet18.state_dict())
    pruned = fxprune.prune(resnet18, 0.3, importance=name, calibration=data, global_ranking=global_ranking)
    p = pruned.meta["fxprune_plan"]
    kept = sum(len(g.keep) for g in p.groups)
    if global_ranking:  # a global ranking may spare whole groups, but removes 30% overall
        prunable = [g for g in p.groups if g.key != "fc"]
        assert sum(len(g.keep) for g in prunable) == int(0.7 * sum(g.size for g in prunable))
    else:
        assert len(p.pruned_groups) == 12
    assert kept < sum(g.size for g in p.groups)
    assert_equivalent(resnet18, pruned, p, (x,), rtol=1e-4, atol=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in resnet18.state_dict().items())
    assert all(q.grad is None for q in resnet18.parameters())


class Grouped(nn.Module):
    """conv(3->16) -> grouped conv(16->24, groups=4): conv a's group comes in 4 blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.g = nn.Conv2d(16, 24, 3, padding=1, groups=4)
        self.b = nn.Conv2d(24, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b(torch.relu(self.g(torch.relu(self.bn(self.a(x)))))).mean((2, 3)))


def test_taylor_reads_grouped_conv_inputs_by_conv_group():
    torch.manual_seed(0)
    m = Grouped().eval()
    batches = calib(2)
    s = group_scores(m, "a", "taylor", calibration=batches)
    ref = copy.deepcopy(m)
    expected = torch.zeros(16, dtype=torch.float64)
    for x, y in batches:
        ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        wg = ref.g.weight * ref.g.weight.grad  # [24, 4, 3, 3]: rows of conv group k read inputs 4k..4k+3
        g_in = torch.stack([wg[(i // 4) * 6:(i // 4 + 1) * 6, i % 4].sum() for i in range(16)])
        per = ((ref.a.weight * ref.a.weight.grad).sum((1, 2, 3)) + ref.a.bias * ref.a.bias.grad
               + ref.bn.weight * ref.bn.weight.grad + ref.bn.bias * ref.bn.bias.grad + g_in)
        expected += per.detach().double().abs()
    assert torch.allclose(s.double(), expected / 2, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", ALL)
def test_grouped_conv_blocks_keep_equal_counts_for_every_criterion(name):
    torch.manual_seed(0)
    m = Grouped().eval()
    x = torch.randn(2, 3, 8, 8)
    for kwargs in ({"ratio": 0.4}, {"ratio": 0.4, "global_ranking": True}, {"target_macs": 0.5, "example_inputs": x}):
        pruned = fxprune.prune(m, importance=name, calibration=calib(), **kwargs)
        p = pruned.meta["fxprune_plan"]
        for key, per_block in (("a", 4), ("g", 6)):
            keep = p.keep(key)
            counts = [sum(1 for i in keep if i // per_block == b) for b in range(4)]
            assert len(set(counts)) == 1 and len(keep) < 4 * per_block, (kwargs, key, counts)
        assert pruned.g.groups == 4
        assert_equivalent(m, pruned, p, (x,))


# --------------------------------------------------------------------------- fast norms vs rows


def _row_reference(analysis, group, p: float) -> torch.Tensor:
    """The criterion's definition, computed the slow way: each member's rows, in float64."""
    from fxprune.importance import member_rows

    total = torch.zeros(group.size, dtype=torch.float64)
    for m in group.members:
        rows = member_rows(analysis.gm, group, m)
        if rows is not None:
            total += rows.double().abs().pow(p).sum(1)
    return total if p == 1.0 else total.sqrt()


def _norm_models():
    from .zoo import ZOO, GroupedConvNet, LinearSENet, randomize_bn

    torch.manual_seed(0)
    yield "small", small(), None
    yield "grouped", Grouped().eval(), None
    yield "mlp", MLP().eval(), None
    for name, (ctor, shape) in ZOO.items():
        yield name, randomize_bn(ctor().eval()), None
    yield "grouped_zoo", GroupedConvNet().eval(), None
    yield "linear_se", LinearSENet().eval(), (torch.randn(2, 3, 16, 16),)  # its views need shapes
    yield "resnet18", torchvision.models.resnet18().eval(), None
    yield "mobilenet_v3_small", torchvision.models.mobilenet_v3_small().eval(), None
    yield "half", small().half(), None


@pytest.mark.parametrize("p, name", [(1.0, "l1"), (2.0, "l2")])
def test_fast_norms_match_the_row_definition(p, name):
    """Scores come from one pass per layer (both roles at once, scratch buffer, matrix-vector
    product); they must equal the definition read off each member's rows, on every layout:
    conv out/in, grouped and depthwise convs, flatten blocks, Linear, concat offsets, half."""
    seen = 0
    for label, model, inputs in _norm_models():
        analysis = analyze_model(model, example_inputs=inputs)
        groups = [g for g in analysis.groups if g.prunable]
        fast = score_groups(analysis, name, groups)
        for g in groups:
            ref = _row_reference(analysis, g, p)
            torch.testing.assert_close(fast[g.index].double(), ref, rtol=2e-5, atol=1e-6, msg=lambda m: f"{label} {g.key}: {m}")
            # Outside score_groups (a one-off cache) the numbers are the same, bit for bit.
            assert torch.equal(score(g, analysis.gm, name), fast[g.index])
            seen += 1
    assert seen > 50
