"""Models torch.fx cannot trace are pruned through torch.export, and ATen ops speak the rules' vocabulary.

issue 11: an untraceable ``nn.Module`` given ``example_inputs`` falls back to ``torch.export``
(strict=False, eval mode) with a warning saying so and why fx failed; without them, the error
says to pass them; ``plan`` and ``apply`` take the same route; the model is left as found. The
lifter maps the ATen ops exported CNNs use onto the torch forms the rules know, so an exported
model prunes exactly as deep as the same model traced with fx.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.errors import FxPruneError, FxPruneWarning
from fxprune.export import from_exported, is_lifted
from fxprune.testing import assert_equivalent

X = torch.randn(2, 3, 16, 16)


class ChecksRank(nn.Module):
    """``if x.dim() != 4`` is control flow on a Proxy for torch.fx, a plain int for torch.export.

    ``forward`` also caches a tensor in an attribute, as Ultralytics' ``Detect`` does with its
    anchors: non-strict export would leave a FakeTensor there.
    """

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 4, 1)
        self.cache = torch.zeros(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError("expected NCHW")
        self.cache = torch.ones(x.shape[-1])
        return self.b(torch.relu(self.bn(self.a(x)))) * self.cache


def _quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def test_an_untraceable_module_is_exported_with_a_warning_saying_why() -> None:
    model = ChecksRank().eval()
    cache = model.cache
    with pytest.warns(FxPruneWarning, match=r"torch.fx could not trace ChecksRank: TraceError.*exported it with "
                                            r"torch.export \(strict=False, eval mode\)"):
        pruned = fxprune.prune(model, 0.5, example_inputs=(X,))
    assert is_lifted(pruned)
    assert pruned.get_submodule("a").out_channels == 4 and model.a.out_channels == 8
    assert model.cache is cache and type(model.cache) is torch.Tensor  # the model is left as it was found
    _quiet(assert_equivalent, model, pruned, pruned.meta["fxprune_plan"], [X],
           example_inputs=(X,))


def test_without_example_inputs_the_error_says_to_pass_them() -> None:
    for call in (fxprune.prune, fxprune.plan):
        with pytest.raises(FxPruneError, match=r"could not trace ChecksRank.*pass example_inputs=\(x,\).*torch.export"):
            call(ChecksRank(), 0.5)
    with pytest.raises(FxPruneError, match="pass example_inputs"):
        fxprune.find_groups(ChecksRank())


def test_plan_and_apply_take_the_same_route() -> None:
    model = ChecksRank().eval()
    p = _quiet(fxprune.plan, model, 0.5, example_inputs=(X,))
    built = _quiet(fxprune.apply, model, p, example_inputs=(X,))
    direct = _quiet(fxprune.prune, model, 0.5, example_inputs=(X,))
    assert p.keep("a") == direct.meta["fxprune_plan"].keep("a")
    with torch.no_grad():
        torch.testing.assert_close(built(X), direct(X))
    with pytest.raises(FxPruneError, match="pass example_inputs"):
        fxprune.apply(model, p)  # the plan was made on the exported graph: apply needs the same route
    groups = _quiet(fxprune.find_groups, model, example_inputs=(X,))
    assert [g.key for g in groups] == [g.key for g in _quiet(fxprune.analyze_model, model, example_inputs=(X,)).groups]


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return y if bool(y.sum() > 0) else -y


def test_a_model_neither_route_captures_names_both() -> None:
    with pytest.raises(FxPruneError, match=r"neither torch.fx nor torch.export could capture DataDependent"):
        _quiet(fxprune.prune, DataDependent(), 0.5, example_inputs=(X,))


class Vocabulary(nn.Module):
    """The ATen ops exported CNNs use, each in its torch spelling (fx traces this as it is)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 8, 1)
        self.gn = nn.GroupNorm(2, 8)
        self.d = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.hardswish(self.a(x), inplace=True)                    # aten.hardswish_
        y = F.pad(y, (1, 1, 1, 1))                                   # aten.pad / constant_pad_nd
        y = F.max_pool2d(y, 2)                                       # aten.max_pool2d
        y = F.interpolate(y, scale_factor=2.0, mode="nearest")      # aten.upsample_nearest2d.vec
        y = F.interpolate(y, size=(9, 9), mode="bilinear", align_corners=False)  # upsample_bilinear2d.vec
        y = y.permute(0, 2, 3, 1).permute(0, 3, 1, 2).transpose(2, 3)  # aten.permute, aten.transpose
        y = torch.sigmoid(self.b(y)) * 2.0 + 1.0 - 0.5              # aten.mul/add/sub.Scalar
        s = y.mean((2, 3), keepdim=True).squeeze(-1).unsqueeze(-1)  # aten.mean.dim, squeeze.dim, unsqueeze
        y = F.silu(self.c(y * s))
        y = y + F.layer_norm(y, (9,))                               # aten.layer_norm over W: not the channels
        return self.d(self.gn(y) + y.abs().sqrt())                  # aten.group_norm (whole groups), unary ops


def test_exported_ops_map_to_the_rules_vocabulary_and_prune_as_deep_as_fx() -> None:
    model = Vocabulary().eval()
    x = torch.randn(2, 3, 16, 16)
    program = torch.export.export(model, (x,), strict=False)
    lifted = from_exported(program)
    left = sorted({str(n.target) for n in lifted.graph.nodes if n.op == "call_function" and "aten." in str(n.target)})
    assert left == []
    with warnings.catch_warnings():
        warnings.simplefilter("error", FxPruneWarning)  # nothing unknown on either path
        from_fx = fxprune.prune(model, 0.5, example_inputs=(x,))
        from_export = fxprune.prune(program, 0.5, example_inputs=(x,))
    size = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert size(from_export) == size(from_fx) < size(model)
    assert from_export.get_submodule("b").out_channels == from_fx.get_submodule("b").out_channels == 4
    # GroupNorm(2, 8) removes whole groups of 4 on both paths (aten.group_norm is F.group_norm).
    assert from_export.get_submodule("c").out_channels == from_fx.get_submodule("c").out_channels == 4
    assert from_fx.get_submodule("gn").num_groups == 1
    assert_equivalent(program, from_export, from_export.meta["fxprune_plan"], [x],
                      example_inputs=(x,))


def test_keep_class_on_the_export_route_proves_the_copy_by_running_it() -> None:
    model = ChecksRank().eval()
    kept = _quiet(fxprune.prune, model, 0.5, example_inputs=(X,), keep_class=True)
    graph = _quiet(fxprune.prune, model, 0.5, example_inputs=(X,))
    assert type(kept) is ChecksRank and kept.a.out_channels == 4 and model.a.out_channels == 8
    with torch.no_grad():
        torch.testing.assert_close(kept(X), graph(X))
    _quiet(assert_equivalent, model, kept, kept.meta["fxprune_plan"], [X], example_inputs=(X,))


class ReadsWidthUntraceable(ChecksRank):
    """Its forward reads a width pruning changes, in Python: the copy computes something else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError("expected NCHW")
        return self.b(torch.relu(self.bn(self.a(x))) * (1.0 / self.a.out_channels))


def test_keep_class_on_the_export_route_refuses_a_copy_that_computes_otherwise() -> None:
    model = ReadsWidthUntraceable().eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fxprune.prune(model, 0.5, example_inputs=(X,), keep_class=True)
    assert isinstance(out, torch.fx.GraphModule)
    messages = [str(w.message) for w in caught if str(w.message).startswith("keep_class=True")]
    assert len(messages) == 1 and "differs from the pruned graph's" in messages[0], messages


class PoolIndices(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, 2, return_indices=True)[0] + F.adaptive_max_pool2d(x, 1, return_indices=True)[0]


def test_tuple_ops_read_at_element_zero_lift_to_their_tensor_form() -> None:
    x = torch.randn(1, 4, 8, 8)
    lifted = from_exported(torch.export.export(PoolIndices(), (x,), strict=False))
    targets = [n.target for n in lifted.graph.nodes if n.op == "call_function"]
    assert torch.max_pool2d in targets and F.adaptive_max_pool2d in targets
    assert not any("aten." in str(t) for t in targets), targets
    torch.testing.assert_close(lifted(x), PoolIndices()(x))


class ChannelDropout(nn.Module):
    """nn.Dropout2d, in place and not (smp's FPN head): exported as ``aten.feature_dropout(_)``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.drop_ = nn.Dropout2d(0.2, inplace=True)
        self.drop = nn.Dropout2d(0.2)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.drop(self.drop_(torch.relu(self.a(x)))))


def test_exported_channel_dropout_passes_channels_through() -> None:
    model = ChannelDropout().eval()
    x = torch.randn(2, 3, 16, 16)
    program = torch.export.export(model, (x,), strict=False)
    raw = {str(n.target) for n in program.graph_module.graph.nodes if n.op == "call_function"}
    lifted = from_exported(program)
    left = sorted({str(n.target) for n in lifted.graph.nodes if n.op == "call_function" and "aten." in str(n.target)})
    assert left == [], (raw, left)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FxPruneWarning)  # no rule missing: nothing frozen with a warning
        pruned = fxprune.prune(program, 0.5, example_inputs=(x,))
    assert pruned.get_submodule("a").out_channels == 4
    assert_equivalent(program, pruned, pruned.meta["fxprune_plan"], [x], example_inputs=(x,))
