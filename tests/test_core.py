"""The core pass: equivalence against the masked reference, groups, and its contracts."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.fx
import torch.nn as nn
import torchvision

import fxprune
from fxprune.testing import assert_equivalent, masked_reference

from .zoo import ZOO, CumsumNet, GroupedConvNet, LinearSENet, SharedConvNet, randomize_bn

RATIOS = (0.3, 0.5, 0.7)


def params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def check(model: nn.Module, ratio: float, x: torch.Tensor, **kw) -> torch.fx.GraphModule:
    """Prune through plan/apply and prove the result equals the masked reference."""
    model = model.eval()
    plan = fxprune.plan(model, ratio, **kw)
    pruned = fxprune.apply(model, plan, example_inputs=kw.get("example_inputs"))
    assert_equivalent(model, pruned, plan, (x,), example_inputs=kw.get("example_inputs"))
    # prune() must build the very same thing.
    direct = fxprune.prune(model, ratio, **kw)
    assert direct.code == pruned.code
    for (ka, a), (kb, b) in zip(direct.state_dict().items(), pruned.state_dict().items()):
        assert ka == kb and torch.equal(a, b)
    return pruned


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(torchvision.models.resnet18()).eval()


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_torchvision_resnets_equivalent(name: str, ratio: float) -> None:
    torch.manual_seed(1)
    model = randomize_bn(getattr(torchvision.models, name)()).eval()
    x = torch.randn(2, 3, 64, 64)
    pruned = check(model, ratio, x)
    assert params(pruned) < params(model)
    assert pruned(x).shape == (2, 1000)
    # The pass really shrank the layers: conv1 of the first block keeps int(64 * (1 - r)).
    assert pruned.get_submodule("layer1.0.conv1").out_channels == int(64 * (1 - ratio))


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("name", sorted(ZOO))
def test_custom_models_equivalent(name: str, ratio: float) -> None:
    torch.manual_seed(2)
    ctor, shape = ZOO[name]
    model = randomize_bn(ctor())
    x = torch.randn(*shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)  # every rule is known: no freeze
        pruned = check(model, ratio, x)
    assert params(pruned) < params(model)


@pytest.mark.parametrize("ratio", RATIOS)
def test_linear_se_with_shapes_equivalent(ratio: float) -> None:
    torch.manual_seed(3)
    model = randomize_bn(LinearSENet())
    x = torch.randn(2, 3, 8, 8)
    pruned = check(model, ratio, x, example_inputs=(x,))
    # The SE's expand Linear is tied to the stem's channels through the broadcast multiply.
    assert pruned.get_submodule("se.fc2").out_features == pruned.get_submodule("stem.0").out_channels == int(24 * (1 - ratio))


def test_linear_se_without_shapes_fails_closed() -> None:
    model = LinearSENet().eval()
    with pytest.warns(fxprune.FxPruneWarning, match="view"):
        pruned = fxprune.prune(model, 0.5)
    # The stem's channels feed views fxprune cannot follow without shapes: left intact.
    assert pruned.get_submodule("stem.0").out_channels == 24
    assert pruned.get_submodule("conv.0").out_channels == 8  # an unrelated group is still pruned
    x = torch.randn(2, 3, 8, 8)
    assert_equivalent(model, pruned, fxprune.plan(model, 0.5), (x,))


RESNET18_GROUPS = [
    ("conv1", 64, ["conv1", "layer1.0.conv2", "layer1.1.conv2"]),
    ("layer1.0.conv1", 64, ["layer1.0.conv1"]),
    ("layer1.1.conv1", 64, ["layer1.1.conv1"]),
    ("layer2.0.conv1", 128, ["layer2.0.conv1"]),
    ("layer2.0.conv2", 128, ["layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"]),
    ("layer2.1.conv1", 128, ["layer2.1.conv1"]),
    ("layer3.0.conv1", 256, ["layer3.0.conv1"]),
    ("layer3.0.conv2", 256, ["layer3.0.conv2", "layer3.0.downsample.0", "layer3.1.conv2"]),
    ("layer3.1.conv1", 256, ["layer3.1.conv1"]),
    ("layer4.0.conv1", 512, ["layer4.0.conv1"]),
    ("layer4.0.conv2", 512, ["layer4.0.conv2", "layer4.0.downsample.0", "layer4.1.conv2"]),
    ("layer4.1.conv1", 512, ["layer4.1.conv1"]),
    ("fc", 1000, ["fc"]),
]


def test_resnet18_groups_fixed(resnet18: nn.Module) -> None:
    groups = fxprune.find_groups(torch.fx.symbolic_trace(resnet18))
    got = [(g.key, g.size, g.modules("out")) for g in groups]
    assert got == RESNET18_GROUPS
    assert [g.prunable for g in groups] == [True] * 12 + [False]
    stem = groups[0]
    assert stem.modules("channelwise") == ["bn1", "layer1.0.bn2", "layer1.1.bn2"]
    assert stem.modules("in") == ["layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.downsample.0"]
    last = groups[10]
    assert last.modules("in") == ["layer4.1.conv1", "fc"]
    text = str(groups)
    assert text.startswith("13 channel groups, 12 prunable")
    assert "group fc [1000 ch, frozen: reaches the model output" in text


def test_input_not_mutated(resnet18: nn.Module) -> None:
    traced = torch.fx.symbolic_trace(resnet18)
    before = {k: v.clone() for k, v in traced.state_dict().items()}
    code, metas = traced.code, [dict(n.meta) for n in traced.graph.nodes]
    pruned = fxprune.prune(traced, 0.5, example_inputs=(torch.randn(1, 3, 32, 32),))
    after = traced.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert traced.code == code
    assert [dict(n.meta) for n in traced.graph.nodes] == metas
    # The result owns its storage: nothing is shared with the input.
    src = {t.data_ptr() for t in list(traced.parameters()) + list(traced.buffers())}
    assert not src & {t.data_ptr() for t in list(pruned.parameters()) + list(pruned.buffers())}
    assert pruned is not traced and isinstance(pruned, torch.fx.GraphModule)


def test_batchnorm_statistics_sliced_consistently(resnet18: nn.Module) -> None:
    plan = fxprune.plan(resnet18, 0.5)
    pruned = fxprune.apply(resnet18, plan)
    keep = torch.tensor(plan.keep("layer2.0.conv1"))
    old, new = resnet18.layer2[0].bn1, pruned.get_submodule("layer2.0.bn1")
    assert new.num_features == len(keep) == 64
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(new, name), getattr(old, name)[keep])
    assert torch.equal(new.num_batches_tracked, old.num_batches_tracked)
    stem = torch.tensor(plan.keep("conv1"))  # the group layer2.0.conv1 reads
    residual = torch.tensor(plan.keep("layer2.0.conv2"))
    assert torch.equal(pruned.get_submodule("layer2.0.conv1").weight, resnet18.layer2[0].conv1.weight[keep][:, stem])
    assert torch.equal(pruned.get_submodule("layer2.0.conv2").weight, resnet18.layer2[0].conv2.weight[residual][:, keep])


def test_ratio_zero_is_identity(resnet18: nn.Module) -> None:
    pruned = fxprune.prune(resnet18, 0)
    assert params(pruned) == params(resnet18)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(pruned.eval()(x), resnet18(x), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), float("inf"), "0.3", None, True, [0.3]])
def test_bad_ratio_raises_value_error(resnet18: nn.Module, bad: object) -> None:
    with pytest.raises(ValueError, match=r"ratio") as info:
        fxprune.prune(resnet18, bad)  # type: ignore[arg-type]
    assert repr(bad) in str(info.value)


def test_keep_count_classic_recipe_and_at_least_one() -> None:
    from fxprune.planning import keep_count

    assert keep_count(64, 0.3) == int(64 * 0.7) == 44
    assert keep_count(3, 0.9) == 1
    assert keep_count(1, 0.5) == 1


def test_model_io_channels_never_pruned() -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    pruned = fxprune.prune(model, 0.7)
    assert pruned.get_submodule("conv1").in_channels == 3
    assert pruned.get_submodule("fc").out_features == 10
    assert pruned(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_ignore_patterns_keep_channels(resnet18: nn.Module) -> None:
    pruned = fxprune.prune(resnet18, 0.5, ignore=["layer3.*", "layer1.0.conv1"])
    assert pruned.get_submodule("layer1.0.conv1").out_channels == 64
    assert pruned.get_submodule("layer1.1.conv1").out_channels == 32
    for block in ("layer3.0", "layer3.1"):
        assert pruned.get_submodule(f"{block}.conv1").out_channels == 256
        assert pruned.get_submodule(f"{block}.conv2").out_channels == 256
    # layer3.0.conv1 consumes the layer2 residual group; ignoring it freezes that group too.
    assert pruned.get_submodule("layer2.0.conv2").out_channels == 128
    plan = fxprune.plan(resnet18, 0.5, ignore="layer3.*")
    assert_equivalent(resnet18, fxprune.apply(resnet18, plan), plan, (torch.randn(1, 3, 32, 32),))


def test_zero_channels_rank_lowest() -> None:
    torch.manual_seed(4)
    model = randomize_bn(torchvision.models.resnet18()).eval()
    dead = [3, 7, 11, 40]
    with torch.no_grad():
        model.layer1[0].conv1.weight[dead] = 0
        model.layer1[0].bn1.weight[dead] = 0
        model.layer1[0].conv2.weight[:, dead] = 0
    plan = fxprune.plan(model, 0.1)
    keep = plan.keep("layer1.0.conv1")
    assert len(keep) == int(64 * 0.9) == 57
    assert not set(dead) & set(keep)


def test_unknown_op_is_frozen_with_warning_naming_source_line() -> None:
    model = CumsumNet().eval()
    traced = fxprune.trace(model)  # records stack traces, so the warning names the source line
    with pytest.warns(fxprune.FxPruneWarning) as rec:
        pruned = fxprune.prune(traced, 0.5)
    msg = str(rec[0].message)
    assert "cumsum" in msg and "torch.cumsum(y, dim=1)" in msg and "zoo.py" in msg
    assert pruned.get_submodule("b.0").out_channels == 8  # the group cumsum reads is frozen
    assert pruned.get_submodule("c.0").out_channels == 4  # after it, channels are pruned as usual
    assert pruned.get_submodule("a.0").out_channels == 4
    x = torch.randn(2, 3, 8, 8)
    assert_equivalent(model, pruned, fxprune.plan(model, 0.5), (x,))


def test_trace_records_the_user_frames_of_each_node_and_nothing_outside_the_forward() -> None:
    traced = fxprune.trace(CumsumNet())  # this line is outside the traced forward
    node = traced.graph.find_nodes(op="call_function", target=torch.cumsum)[0]
    trace = node.stack_trace
    assert trace.strip().endswith("torch.cumsum(y, dim=1)") and "zoo.py" in trace and "in forward" in trace
    assert "test_core.py" not in trace  # the caller of trace() is not part of the model
    assert "torch/fx" not in trace and "fxprune/tracing.py" not in trace  # neither are fx's or ours
    # The nested module calls record their own line (the Sequential's, inside torch, is skipped).
    conv = traced.graph.find_nodes(op="call_module", target="a.0")[0]
    assert "self.a(x)" in conv.stack_trace


def test_strict_mode_raises_unsupported_node_error() -> None:
    traced = fxprune.trace(CumsumNet())
    with pytest.raises(fxprune.UnsupportedNodeError) as info:
        fxprune.prune(traced, 0.5, strict=True)
    err = info.value
    assert isinstance(err, fxprune.FxPruneError)
    assert err.node_name == "cumsum" and err.target is torch.cumsum
    text = str(err)
    assert "torch.cumsum(y, dim=1)" in text and "Hint:" in text and "register_rule" in text


def test_grouped_conv_pruned_with_the_same_count_per_group() -> None:
    # Issue 2 left grouped convs unpruned with a warning; issue 6 prunes them: every conv group
    # keeps the same number of inputs and of outputs, so `groups` stays valid (no warning).
    model = GroupedConvNet().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)
        pruned = fxprune.prune(model, 0.5)
    g = pruned.get_submodule("g")
    assert (g.groups, g.in_channels, g.out_channels) == (4, 8, 16)
    assert pruned.get_submodule("b.0").out_channels == 8
    assert_equivalent(model, pruned, fxprune.plan(model, 0.5), (torch.randn(1, 3, 8, 8),))


def test_shared_module_keeps_one_channel_set() -> None:
    model = SharedConvNet().eval()
    groups = fxprune.find_groups(model)
    shared = [g for g in groups if "shared" in g.modules("out")]
    assert len(shared) == 1 and set(shared[0].modules("in")) == {"shared", "out"}


def test_untraceable_model_gives_clear_error() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                return self.c(x)
            return x

    with pytest.raises(fxprune.FxPruneError, match="could not trace DataDependent.*Hint"):
        fxprune.prune(DataDependent(), 0.5)


def test_not_a_model_gives_clear_error() -> None:
    with pytest.raises(fxprune.FxPruneError, match="expected an nn.Module"):
        fxprune.prune("resnet18", 0.5)  # type: ignore[arg-type]


def test_bad_example_inputs_give_clear_error(resnet18: nn.Module) -> None:
    with pytest.raises(fxprune.FxPruneError, match="example_inputs"):
        fxprune.prune(resnet18, 0.5, example_inputs=(torch.randn(1, 5, 32, 32),))


def test_train_mode_model_is_pruned_and_stays_in_train_mode() -> None:
    model = torchvision.models.resnet18()
    model.train()
    pruned = fxprune.prune(model, 0.5, example_inputs=(torch.randn(2, 3, 32, 32),))
    assert pruned.training and model.training
    assert all(m.training for m in model.modules())
    pruned.eval()
    plan = fxprune.plan(model, 0.5)
    assert_equivalent(model, pruned, plan, (torch.randn(2, 3, 32, 32),))


def test_masked_reference_zeroes_removed_channels(resnet18: nn.Module) -> None:
    plan = fxprune.plan(resnet18, 0.5)
    ref = masked_reference(resnet18, plan)
    keep = plan.keep("layer1.0.conv1")
    removed = sorted(set(range(64)) - set(keep))
    assert torch.count_nonzero(ref.get_submodule("layer1.0.conv1").weight[removed]) == 0
    assert torch.count_nonzero(ref.get_submodule("layer1.0.conv2").weight[:, removed]) == 0
    stem = plan.keep("conv1")  # layer1.0.conv1's input columns belong to the stem group
    assert torch.equal(ref.get_submodule("layer1.0.conv1").weight[keep][:, stem],
                       resnet18.layer1[0].conv1.weight[keep][:, stem])
    # And the masked reference is genuinely different from the original model.
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(ref.eval()(x), resnet18(x))


def test_equivalence_check_catches_a_wrong_rewrite(resnet18: nn.Module) -> None:
    """The proof can fail: keep the wrong channels in one layer and it must notice."""
    plan = fxprune.plan(resnet18, 0.5)
    pruned = fxprune.apply(resnet18, plan)
    with torch.no_grad():
        pruned.get_submodule("layer2.0.conv1").weight.copy_(pruned.get_submodule("layer2.0.conv1").weight.flip(0))
    with pytest.raises(AssertionError):
        assert_equivalent(resnet18, pruned, plan, (torch.randn(1, 3, 32, 32),))


def test_fxprune_metadata_on_result_nodes(resnet18: nn.Module) -> None:
    x = torch.randn(1, 3, 32, 32)
    pruned = fxprune.prune(resnet18, 0.5, example_inputs=(x,))
    node = next(n for n in pruned.graph.nodes if n.name == "layer1_0_conv1")
    assert node.meta["fxprune_channels"] == 32
    assert node.meta["tensor_meta"].shape[1] == 32
    assert isinstance(node.meta["fxprune_layout"], fxprune.Layout)
