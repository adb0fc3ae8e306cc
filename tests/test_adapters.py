"""One registration teaches fxprune a custom layer: ``fxprune.register_layer``.

The adapter says which tensors each role's channels index and along which dim; the channel
rule (derived for per-channel layers), the tracer's leaf, the builder, the proof's mask, the
scoring view and the size read-back all come from it. Each case is proven in float64 against
the masked reference, a broken rewrite fails the proof, and L1 scores include the layer.
"""

from __future__ import annotations

import copy
from typing import Optional

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.adapters import DEFAULT_LAYERS, LayerAdapter, adapter_for, using_layers
from fxprune.errors import FxPruneError
from fxprune.importance import ScoringOptions, score_groups
from fxprune.rules import Layout
from fxprune.testing import assert_equivalent
from tests.zoo import init_normal

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(2, 3, 8, 8)


@fxprune.register_layer(roles={"channelwise": (("scale", 0), ("shift", 0))}, counts={"channelwise": ("channels",)})
class ScaleShift(nn.Module):
    """``y[c] = x[c] * scale[c] + shift[c]``: per-channel tensors only, so the rule is derived too."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.scale = nn.Parameter(torch.ones(channels))
        self.register_buffer("shift", torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:  # a branch on a count: fx could not trace through it
            raise ValueError("wrong width")
        return x * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)


def _mix_rule(ctx, node: torch.fx.Node) -> Optional[Layout]:
    """``Mix``: a 1x1 channel mixer with its own parameter names (reads the input, makes ``width``)."""
    layout = ctx.layout(node.args[0])
    if layout is not None:
        ctx.member(node, "in", layout)
    out = ctx.produce(node, ctx.module(node).width, -3, 4)  # a new group: the channels of an NCHW output
    ctx.member(node, "out", out)
    return out


class Mix(nn.Module):
    """``y = einsum(mat, x) + offset``: rows ``out``, columns ``in`` of ``mat``, stored [in, out]."""

    def __init__(self, cin: int, width: int) -> None:
        super().__init__()
        self.cin, self.width = cin, width
        self.mat = nn.Parameter(torch.randn(cin, width))
        self.offset = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,co->bohw", x, self.mat) + self.offset.view(1, -1, 1, 1)


class Net(nn.Module):
    def __init__(self, mix: bool = False) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.s = ScaleShift(8)
        self.m = Mix(8, 6) if mix else nn.Conv2d(8, 6, 1)
        self.b = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.m(torch.relu(self.s(self.a(x))))))


def model(mix: bool = False) -> Net:
    net = init_normal(Net(mix))
    torch.manual_seed(2)
    net.s.shift.normal_()  # a buffer: init_normal leaves it at zero, where a wrong slice is invisible
    return net


def prove(net: nn.Module, ratio: float = 0.5) -> tuple:
    plan = fxprune.plan(net, ratio, example_inputs=(X,))
    pruned = fxprune.apply(net, plan, example_inputs=(X,))
    assert_equivalent(net, pruned, plan, (X,), example_inputs=(X,))
    return pruned, plan


def test_a_per_channel_layer_is_taught_by_one_registration() -> None:
    net = model()
    groups = {g.key: g for g in fxprune.find_groups(net, example_inputs=(X,))}
    members = {(m.module, m.role) for m in groups["a"].members}
    assert ("s", "channelwise") in members and groups["a"].prunable
    pruned, plan = prove(net)
    keep = torch.tensor(plan.keep("a"))
    s = pruned.get_submodule("s")
    assert type(s) is ScaleShift and s.channels == len(keep) == 4
    assert torch.equal(s.scale, net.s.scale[keep]) and torch.equal(s.shift, net.s.shift[keep])
    assert "shift" in dict(s.named_buffers())  # a buffer stays a buffer
    assert net.s.scale.numel() == 8  # the input model is untouched


def test_a_wrong_slice_of_the_layer_fails_the_proof() -> None:
    net = model()
    pruned, plan = prove(net)
    for name in ("scale", "shift"):
        broken = copy.deepcopy(pruned)
        t = getattr(broken.get_submodule("s"), name)
        with torch.no_grad():
            t.copy_(t.roll(1, 0))
        with pytest.raises(AssertionError):
            assert_equivalent(net, broken, plan, (X,), example_inputs=(X,))


def test_the_layer_counts_in_l1_scores() -> None:
    net = model()
    analysis = fxprune.analyze_model(net, example_inputs=(X,))
    group = next(g for g in analysis.groups if g.key == "a")
    with_layer = score_groups(analysis, "l1", [group])[group.index]
    bare = copy.deepcopy(net)
    with torch.no_grad():
        bare.s.scale.zero_()
        bare.s.shift.zero_()
    analysis0 = fxprune.analyze_model(bare, example_inputs=(X,))
    without = score_groups(analysis0, "l1", [next(g for g in analysis0.groups if g.key == "a")])
    expected = net.s.scale.detach().abs()  # its parameter; the shift buffer is not a learned weight
    assert torch.allclose(with_layer - next(iter(without.values())), expected.to(with_layer.dtype), atol=1e-5)


def test_a_mixing_layer_with_its_own_tensor_layout_and_rule() -> None:
    adapter = LayerAdapter({"out": (("mat", 1), ("offset", 0)), "in": (("mat", 0),)},
                           counts={"out": ("width",), "in": ("cin",)}, rule=_mix_rule)
    with using_layers(DEFAULT_LAYERS.extended({Mix: adapter})):
        net = model(mix=True)
        assert adapter.sizes(net.m) == {"out": 6, "in": 8}
        pruned, plan = prove(net)
        m = pruned.get_submodule("m")
        assert (m.cin, m.width) == (4, 3) and tuple(m.mat.shape) == (4, 3)
        assert adapter_for(m) is adapter and adapter.sizes(m) == {"out": 3, "in": 4}
        broken = copy.deepcopy(pruned)
        with torch.no_grad():
            broken.m.mat.copy_(broken.m.mat.roll(1, 1))
        with pytest.raises(AssertionError):
            assert_equivalent(net, broken, plan, (X,), example_inputs=(X,))
    assert Mix not in DEFAULT_LAYERS and adapter_for(Mix(2, 2)) is None  # nothing leaked


def test_a_layer_with_inputs_but_no_rule_stays_whole_with_a_warning() -> None:
    with using_layers(DEFAULT_LAYERS.extended({Mix: LayerAdapter({"out": (("mat", 1),), "in": (("mat", 0),)})})):
        net = model(mix=True)
        with pytest.warns(fxprune.FxPruneWarning, match="Mix"):
            groups = {g.key: g for g in fxprune.find_groups(net, example_inputs=(X,))}
        assert not groups["a"].prunable


@pytest.mark.parametrize("roles", [{}, {"weights": (("w", 0),)}, {"out": ()}, {"out": (("w", -1),)}])
def test_a_bad_adapter_is_refused_at_registration(roles: dict) -> None:
    with pytest.raises(FxPruneError, match="adapter"):
        LayerAdapter(roles)


def test_per_channel_tensors_of_another_size_keep_the_channels_whole() -> None:
    class Wrong(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale.sum()

    with using_layers(DEFAULT_LAYERS.extended({Wrong: LayerAdapter({"channelwise": (("scale", 0),)})})):
        net = nn.Sequential(nn.Conv2d(3, 8, 3), Wrong(), nn.Conv2d(8, 4, 3)).eval()
        with pytest.warns(fxprune.FxPruneWarning, match=r"per-channel tensors have \[5\] entries"):
            groups = {g.key: g for g in fxprune.find_groups(net, example_inputs=(X,))}
        assert not groups["0"].prunable


# ----------------------------------------------------------------------------- built-in layers as adapters


def test_batchnorm_is_an_adapter_slicing_its_statistics_and_masking_them_to_a_zero_output() -> None:
    from fxprune.adapters import BUILTIN_LAYERS
    from fxprune.registry import Registry
    bn = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.arange(4.0))
        bn.running_var.copy_(torch.arange(1.0, 5.0))
        bn.weight.copy_(torch.arange(10.0, 14.0))
    adapter = adapter_for(bn)
    assert adapter is BUILTIN_LAYERS[nn.BatchNorm2d]
    small = adapter.build(bn, {"channelwise": torch.tensor([1, 3])})
    assert small.num_features == 2 and small.running_var.tolist() == [2.0, 4.0] and small.weight.tolist() == [11.0, 13.0]
    assert isinstance(small.weight, nn.Parameter) and small.weight.data_ptr() != bn.weight.data_ptr()
    assert bn.num_features == 4 and bn.weight.tolist() == [10.0, 11.0, 12.0, 13.0]  # the input is untouched
    assert adapter.sizes(small) == {"channelwise": 2}
    assert adapter.weights(bn, "channelwise").tolist() == [[10.0], [11.0], [12.0], [13.0]]  # the scale alone scores
    masked = copy.deepcopy(bn)
    adapter.mask(masked, "channelwise", torch.tensor([True, False, False, False]))
    assert masked.running_var[0] == 1 and masked.running_mean[0] == 0 and masked.weight[0] == 0
    with torch.no_grad():
        bn.running_var[0] = float("nan")  # a removed channel's statistics may be anything
    adapter.mask(bn, "channelwise", torch.tensor([True, False, False, False]))
    assert bool((bn(torch.randn(2, 4, 3, 3))[:, 0] == 0).all())
    with using_layers(Registry("from scratch")):  # a table that never heard of BatchNorm still knows it
        assert adapter_for(nn.BatchNorm2d(3)) is adapter


def test_layer_norm_keeps_a_tuple_shape_and_prelu_instance_norm_score_nothing() -> None:
    ln = nn.LayerNorm(6)
    small = adapter_for(ln).build(ln, {"channelwise": torch.tensor([0, 2, 5])})
    assert small.normalized_shape == (3,) and small(torch.randn(2, 3)).shape == (2, 3)
    assert adapter_for(nn.PReLU(4)).weights(nn.PReLU(4), "channelwise") is None
    assert adapter_for(nn.InstanceNorm2d(4, affine=True)).weights(nn.InstanceNorm2d(4, affine=True), "channelwise") is None


def test_every_built_in_layer_is_one_adapter_and_the_low_level_tables_ship_empty() -> None:
    from fxprune.adapters import BUILTIN_LAYERS, ConvAdapter, GroupNormAdapter, LinearAdapter, MultiheadAttentionAdapter
    from fxprune.importance import DEFAULT_WEIGHTS
    from fxprune.layers import PrunedMultiheadAttention
    from fxprune.rewrite import DEFAULT_BUILDERS
    from fxprune.testing import DEFAULT_MASKS
    expected = {nn.Conv2d: ConvAdapter, nn.ConvTranspose2d: ConvAdapter, nn.Linear: LinearAdapter,
                nn.GroupNorm: GroupNormAdapter, nn.MultiheadAttention: MultiheadAttentionAdapter,
                PrunedMultiheadAttention: MultiheadAttentionAdapter, nn.BatchNorm2d: LayerAdapter}
    for t, kind in expected.items():
        assert type(BUILTIN_LAYERS[t]) is kind, t
    # What a layer is physically lives in its adapter only: no second description elsewhere.
    for table in (DEFAULT_BUILDERS, DEFAULT_MASKS, DEFAULT_WEIGHTS):  # (other tests may register their own layers)
        assert not set(table.own) & set(BUILTIN_LAYERS.own), table


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mha, self.out = nn.Linear(6, 8), nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        a, _ = self.mha(h, h, h, need_weights=False)
        return self.out(a)


def test_multihead_attention_l1_scores_read_each_roles_own_tensors() -> None:
    # Each head channel owns its q, k and v rows of the packed projection and a column of
    # out_proj; the input role is the packed projection's columns, the output role out_proj's
    # rows. (These once read out_proj for every role.)
    from fxprune.importance import member_norms
    torch.manual_seed(0)
    model = _Attention().eval()
    analysis = fxprune.analyze_model(model, example_inputs=(torch.randn(2, 5, 6),))
    mha = model.mha
    w, out = mha.in_proj_weight.detach(), mha.out_proj.weight.detach()
    per_position = {"in": w.abs().sum(0), "out": out.abs().sum(1),
                    "channelwise": w.abs().sum(1).view(3, 8).sum(0) + out.abs().sum(0)}
    seen = set()
    for group in analysis.groups:
        for member in group.members:
            if member.module != "mha":
                continue
            start = member.offset * member.block
            want = per_position[member.role][start : start + group.size * member.block].reshape(group.size, -1).sum(1)
            got = member_norms(analysis.gm, group, member, 1.0)
            torch.testing.assert_close(got, want.float())
            seen.add(member.role)
    assert seen == {"in", "out", "channelwise"}


class Interleaved(nn.Module):
    """``y[c] = x[c] * p[2c] + p[2c + 1]``: scale and shift interleaved in one tensor of ``2 * C``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.p = nn.Parameter(torch.randn(2 * channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:  # fx cannot trace through it: a leaf
            raise ValueError("wrong width")
        pairs = self.p.view(-1, 2)
        return x * pairs[:, 0].view(1, -1, 1, 1) + pairs[:, 1].view(1, -1, 1, 1)


class InterleavedAdapter(LayerAdapter):
    """Physics beyond a plain index: channel c owns entries 2c and 2c + 1 of ``p``."""

    def counts_of(self, module: nn.Module, role: str) -> list:
        return [module.p.numel() // 2]

    def weights(self, module: nn.Module, role: str) -> Optional[torch.Tensor]:
        return module.p.detach().view(-1, 2)

    def build(self, module: nn.Module, idx: dict) -> nn.Module:
        from fxprune.adapters import copy_with
        keep = idx["channelwise"]
        rows = torch.stack([2 * keep, 2 * keep + 1], 1).flatten()
        new = copy_with(module, {"p": module.p.detach()[rows]})
        new.channels = len(keep)
        return new

    def mask(self, module: nn.Module, role: str, removed: torch.Tensor) -> None:
        with torch.no_grad():
            module.p.view(-1, 2)[removed] = 0


def test_a_custom_layer_with_its_own_physics_is_one_adapter_subclass() -> None:
    torch.manual_seed(0)
    table = DEFAULT_LAYERS.extended({Interleaved: InterleavedAdapter({"channelwise": (("p", 0),)})})
    net = init_normal(nn.Sequential(nn.Conv2d(3, 8, 3), Interleaved(8), nn.ReLU(), nn.Conv2d(8, 4, 3))).eval()
    with using_layers(table):
        plan = fxprune.plan(net, 0.5, example_inputs=(X,))
        pruned = fxprune.apply(net, plan, example_inputs=(X,))
        assert pruned.get_submodule("1").channels == 4 and pruned.get_submodule("1").p.numel() == 8
        assert_equivalent(net, pruned, plan, (X,), example_inputs=(X,))
        broken = copy.deepcopy(pruned)
        with torch.no_grad():
            broken.get_submodule("1").p.copy_(broken.get_submodule("1").p.view(-1, 2).flip(1).flatten())
        with pytest.raises(AssertionError):
            assert_equivalent(net, broken, plan, (X,), example_inputs=(X,))
    with pytest.warns(fxprune.FxPruneWarning):  # outside, nobody taught it: whole, with a warning
        assert fxprune.plan(net, 0.5, example_inputs=(X,)).keep("0") == list(range(8))


def test_multihead_attention_taylor_scores_read_each_roles_own_tensors() -> None:
    # Taylor reads the same tensors as the weight view (w * dL/dw, signed, summed per channel);
    # it once read nothing of an nn.MultiheadAttention.
    torch.manual_seed(1)
    model = _Attention().eval()
    x, y = torch.randn(4, 5, 6), torch.randint(0, 3, (4, 5))
    loss_fn = lambda out, t: nn.functional.cross_entropy(out.reshape(-1, 3), t.reshape(-1))  # noqa: E731
    analysis = fxprune.analyze_model(model, example_inputs=(x,))
    heads = next(g for g in analysis.groups if g.members[0].module == "mha" and g.members[0].role == "channelwise")
    got = score_groups(analysis, "taylor", [heads], ScoringOptions(calibration=[(x, y)], loss_fn=loss_fn))[heads.index]
    work = copy.deepcopy(model)
    loss_fn(work(x), y).backward()
    mha = work.mha
    prod = lambda t: (t * t.grad).detach()  # noqa: E731
    per_channel = (prod(mha.in_proj_weight).sum(1).view(3, 8).sum(0) + prod(mha.in_proj_bias).view(3, 8).sum(0)
                   + prod(mha.out_proj.weight).sum(0))
    member = heads.members[0]
    want = per_channel.double().reshape(heads.size, -1).sum(1).abs()
    assert member.block * heads.size == 8
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    assert bool((got > 0).all())
