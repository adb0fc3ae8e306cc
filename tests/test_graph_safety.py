"""The pass never returns a model that cannot run, and plan and apply always agree.

Each model reproduces one pattern that used to be pruned into a broken model, or made the pass
fail on its own plan: a per-channel tensor operand of an element-wise op, a module also called
on the model input, one untracked tensor concatenated twice, a literal channel count in a
view, and a Linear -> BatchNorm1d downstream of an op without a rule. Wherever something is
pruned, the result is proven against its masked reference (float64, eval mode), and every
result is run.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Tuple

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.errors import InternalError
from fxprune.testing import assert_equivalent, randomize_norms

pytestmark = pytest.mark.usefixtures("one_thread")


def prove(model: nn.Module, ratio: float, x: torch.Tensor, shapes: bool, **kw: Any) -> torch.fx.GraphModule:
    """Plan, apply, prove against the masked reference, and run the result."""
    torch.manual_seed(0)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    randomize_norms(model).eval()
    ex = (x,) if shapes else None
    plan = fxprune.plan(model, ratio, example_inputs=ex, **kw)
    pruned = fxprune.apply(model, plan, example_inputs=ex)
    assert_equivalent(model, pruned, plan, (x,), example_inputs=ex)
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape
    # prune() takes the same path in one call: it must agree with plan + apply.
    again = fxprune.prune(model, ratio, example_inputs=ex, **kw)
    with torch.no_grad():
        torch.testing.assert_close(again(x), pruned(x))
    return pruned


def quiet() -> Any:
    """A context in which an FxPruneWarning fails the test (everything here has a rule)."""
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("error", fxprune.FxPruneWarning)
    return ctx


def group_of(model: nn.Module, module: str, role: str = "out", **kw: Any) -> fxprune.Group:
    for g in fxprune.find_groups(model, **kw):
        if module in g.modules(role):
            return g
    raise KeyError(module)


X = torch.randn(2, 3, 6, 6)


# =========================================================================== item 10: tensor operands


class PerChannelOperand(nn.Module):
    """conv -> an element-wise op with a 1 x C x 1 x 1 parameter or buffer -> conv."""

    FORMS: Tuple[Tuple[str, Callable[["PerChannelOperand", torch.Tensor], torch.Tensor]], ...] = (
        ("clamp_min_kwarg", lambda m, y: torch.clamp(y, min=m.floor)),
        ("clamp_positional", lambda m, y: torch.clamp(y, m.floor, m.ceil)),
        ("clamp_method_kwargs", lambda m, y: y.clamp(min=m.floor, max=m.ceil)),
        ("clip_max_kwarg", lambda m, y: torch.clip(y, max=m.ceil)),
        ("maximum", lambda m, y: torch.maximum(y, m.floor)),
        ("minimum_parameter_first", lambda m, y: torch.minimum(m.ceil, y)),
        ("where", lambda m, y: torch.where(y > m.floor, y, m.floor)),
        ("mul_layer_scale", lambda m, y: m.gamma * y),
        ("add_buffer", lambda m, y: y + m.shift),
        ("add_other_kwarg", lambda m, y: torch.add(y, other=m.shift, alpha=2.0)),
        ("div_method", lambda m, y: y.div(m.gamma)),
        ("sub_rank3_parameter", lambda m, y: y - m.bias3),
    )

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = dict(self.FORMS)[form]
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.floor = nn.Parameter(torch.zeros(1, 8, 1, 1))
        self.ceil = nn.Parameter(torch.zeros(1, 8, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, 8, 1, 1))
        self.bias3 = nn.Parameter(torch.zeros(8, 1, 1))
        self.register_buffer("shift", torch.linspace(-1, 1, 8).view(1, 8, 1, 1))
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.form(self, self.a(x))).mean((2, 3))


@pytest.mark.parametrize("shapes", [True, False])
@pytest.mark.parametrize("form", [name for name, _ in PerChannelOperand.FORMS])
def test_a_per_channel_parameter_operand_is_sliced_with_its_channels(form: str, shapes: bool) -> None:
    model = PerChannelOperand(form)
    if form == "div_method":
        model.gamma.data.fill_(1.0)
    ctx = quiet()
    try:
        pruned = prove(model, 0.5, X, shapes, strict=True)
    finally:
        ctx.__exit__(None, None, None)
    assert pruned.get_submodule("a").out_channels == pruned.get_submodule("b").in_channels == 4
    read = {n.target for n in pruned.graph.nodes if n.op == "get_attr"}
    for name in read:  # every parameter the op reads was sliced to the kept channels
        assert 4 in getattr(pruned, name).shape and 8 not in getattr(pruned, name).shape


class ParameterExpressionOperand(nn.Module):
    """The operand is computed from a parameter across its channels (a cumulative sum): not sliceable.

    (A mere view of a C-vector, ``self.bias.view(1, -1, 1, 1)``, is sliced: tests/test_elementwise.py.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bias = nn.Parameter(torch.randn(8))
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.clamp(self.a(x), min=self.bias.cumsum(0).view(1, -1, 1, 1))).mean((2, 3))


@pytest.mark.parametrize("shapes", [True, False])
def test_a_channel_sized_parameter_expression_freezes_with_a_warning(shapes: bool) -> None:
    model = ParameterExpressionOperand().eval()
    ex = (X,) if shapes else None
    with pytest.warns(fxprune.FxPruneWarning, match=r"operand view .*clamp.*test_graph_safety\.py"):
        pruned = prove(model, 0.5, X, shapes)
    assert pruned.get_submodule("a").out_channels == 8
    with pytest.raises(fxprune.UnsupportedNodeError, match="clamp"):
        fxprune.prune(model, 0.5, example_inputs=ex, strict=True)


class ParameterAlsoReadWhole(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.floor = nn.Parameter(torch.randn(1, 8, 1, 1))
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.clamp(self.a(x), min=self.floor)
        return self.b(y).mean((2, 3)) + self.floor.sum()


@pytest.mark.parametrize("shapes", [True, False])
def test_a_parameter_also_read_whole_is_not_sliced(shapes: bool) -> None:
    pruned = prove(ParameterAlsoReadWhole(), 0.5, X, shapes)
    assert pruned.get_submodule("a").out_channels == 8
    assert "also read whole" in " ".join(group_of(ParameterAlsoReadWhole(), "a").reasons)


class ParameterReadTwice(nn.Module):
    """One floor bounds two convs: their channels become one set, both sites slice it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.c = nn.Conv2d(3, 8, 1)
        self.floor = nn.Parameter(torch.randn(1, 8, 1, 1))
        self.b = nn.Conv2d(8, 4, 1)
        self.d = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(torch.clamp(self.a(x), min=self.floor))
        z = self.d(F.relu(torch.maximum(self.c(x), self.floor)))
        return (y + z).mean((2, 3))


@pytest.mark.parametrize("shapes", [True, False])
def test_a_parameter_read_at_two_ops_ties_their_channels(shapes: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)
        pruned = prove(ParameterReadTwice(), 0.5, X, shapes, strict=True)
    assert pruned.get_submodule("a").out_channels == pruned.get_submodule("c").out_channels == 4
    assert pruned.floor.shape == (1, 4, 1, 1)
    group = group_of(ParameterReadTwice(), "a")
    assert "c" in group.modules("out")


class ModelInputOperand(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.clamp(self.a(x), max=x)).mean((2, 3))


@pytest.mark.parametrize("shapes", [True, False])
def test_the_model_input_as_a_bound_pins_the_channels(shapes: bool) -> None:
    pruned = prove(ModelInputOperand(), 0.6, X, shapes)
    assert pruned.get_submodule("a").out_channels == 3


# =========================================================================== item 11: shared modules


class CalledOnTheInput(nn.Module):
    """``shared`` reads the model input at one call site and a conv's output at the other."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.shared = {"conv": nn.Conv2d(3, 6, 1), "bn": nn.BatchNorm2d(3), "dw": nn.Conv2d(3, 3, 3, padding=1, groups=3)}[kind]
        self.b = nn.Conv2d(6 if kind == "conv" else 3, 4, 1)
        self.c = nn.Conv2d(6 if kind == "conv" else 3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.shared(x)  # the model input: its channels can never change
        second = self.shared(F.relu(self.a(x)))
        return (self.b(first) + self.c(second)).mean((2, 3))


@pytest.mark.parametrize("shapes", [True, False])
@pytest.mark.parametrize("kind", ["conv", "bn", "dw"])
def test_a_module_also_called_on_the_model_input_keeps_its_input_channels(kind: str, shapes: bool) -> None:
    model = CalledOnTheInput(kind)
    pruned = prove(model, 0.5, X, shapes)
    assert pruned.get_submodule("a").out_channels == 3
    reason = " ".join(group_of(CalledOnTheInput(kind), "a").reasons)
    assert "shared" in reason and "call sites" in reason
    if kind == "conv":  # its output rows are still one prunable set across both calls
        assert pruned.get_submodule("shared").out_channels == 3


class LinearCalledOnTheInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.shared = nn.Linear(5, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.shared(x) * self.shared(torch.relu(self.a(x))))


@pytest.mark.parametrize("shapes", [True, False])
def test_a_linear_called_on_the_input_and_on_a_hidden_layer(shapes: bool) -> None:
    pruned = prove(LinearCalledOnTheInput(), 0.5, torch.randn(3, 5), shapes)
    assert pruned.get_submodule("a").out_features == 5
    assert pruned.get_submodule("shared").out_features == 3


# =========================================================================== item 12: group keys


class InputCatTwice(nn.Module):
    """The model input concatenated twice beside a conv: two untracked slices of one consumer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Conv2d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([x, self.a(x), x], 1)).mean((2, 3))


class C2fLike(nn.Module):
    """Ultralytics' C2f: chunk a conv's output, run a block on the last piece, concatenate all."""

    def __init__(self) -> None:
        super().__init__()
        self.cv1 = nn.Conv2d(3, 8, 1)
        self.m = nn.Conv2d(4, 4, 3, padding=1)
        self.cv2 = nn.Conv2d(12, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pieces = self.cv1(x).chunk(2, 1)
        y = [pieces[0], pieces[1]]
        y.append(self.m(y[-1]))
        return self.cv2(torch.cat(y, 1)).mean((2, 3))


@pytest.mark.filterwarnings("ignore::fxprune.FxPruneWarning")
@pytest.mark.parametrize("shapes", [True, False])
@pytest.mark.parametrize("make", [InputCatTwice, C2fLike])
def test_groups_have_unique_keys_and_prune_follows_its_own_plan(make: Callable[[], nn.Module], shapes: bool) -> None:
    model = make().eval()
    ex = (X,) if shapes else None
    keys = [g.key for g in fxprune.find_groups(model, example_inputs=ex)]
    assert len(keys) == len(set(keys)), keys
    prove(model, 0.5, X, shapes)
    plan = fxprune.plan(model, 0.5, example_inputs=ex)
    again = fxprune.PruningPlan.from_json(plan.to_json())
    assert again == plan
    with torch.no_grad():
        torch.testing.assert_close(fxprune.apply(model, again, example_inputs=ex)(X),
                                   fxprune.apply(model, plan, example_inputs=ex)(X))


def test_input_cat_twice_keeps_the_old_key_for_the_first_and_prunes_the_conv() -> None:
    model = InputCatTwice().eval()
    keys = [g.key for g in fxprune.find_groups(model, example_inputs=(X,))]
    assert "head:in" in keys and "head:in@9" in keys and "a" in keys
    assert prove(model, 0.5, X, True).get_submodule("a").out_channels == 3


def test_a_plan_naming_a_group_twice_is_a_mismatch_not_a_missing_entry() -> None:
    model = InputCatTwice().eval()
    plan = fxprune.plan(model, 0.5, example_inputs=(X,))
    plan.groups.append(plan.groups[-1])
    with pytest.raises(fxprune.PlanMismatchError, match="more than once"):
        fxprune.apply(model, plan, example_inputs=(X,))


def test_unique_keys_are_stable_and_never_clash() -> None:
    from fxprune.groups import unique_keys

    cands = [("head:in", "head:in@0"), ("head:in", "head:in@3"), ("head:in@3", "head:in@3@0"), ("conv", "conv@3"),
             ("conv", "conv@4")]
    keys = unique_keys(cands)
    assert len(set(keys)) == len(keys)
    assert keys[0] == "head:in" and keys[2] == "head:in@3" and keys[3] == "conv"
    assert unique_keys(cands) == keys


# =========================================================================== item 14: literal view sizes


class LiteralView(nn.Module):
    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 if form == "n8" else 8 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        if self.form == "n8":
            return self.fc(y.view(y.size(0), 8, -1).mean(2))
        y = F.adaptive_avg_pool2d(y, 2)
        if self.form == "flat32":
            return self.fc(y.view(-1, 32))
        return self.fc(torch.reshape(y, (y.size(0), 32)))


# With shapes, the literal is rewritten from the kept count instead (tests/test_split_slice.py).
@pytest.mark.parametrize("shapes", [False])
@pytest.mark.parametrize("form", ["n8", "flat32", "reshape32"])
def test_a_literal_channel_count_in_a_view_freezes_with_a_warning(form: str, shapes: bool) -> None:
    model = LiteralView(form).eval()
    ex = (X,) if shapes else None
    with pytest.warns(fxprune.FxPruneWarning, match=r"(view|reshape).*test_graph_safety\.py"):
        pruned = prove(model, 0.5, X, shapes)
    assert pruned.get_submodule("a").out_channels == 8
    with pytest.raises(fxprune.UnsupportedNodeError):
        fxprune.prune(model, 0.5, example_inputs=ex, strict=True)


class SizedView(nn.Module):
    """The channel count read back from the tensor itself follows pruning."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)
        self.se = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        b, c, _, _ = y.size()
        w = torch.sigmoid(self.se(y.mean((2, 3)))).view(b, c, 1, 1)
        z = (y * w).view(b, y.size(1), -1).mean(2)
        return self.fc(z + y.mean((2, 3)).expand(b, c))


def test_a_view_sized_from_the_tensor_itself_is_pruned() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)
        pruned = prove(SizedView(), 0.5, X, True, strict=True)
    assert pruned.get_submodule("a").out_channels == pruned.get_submodule("se").out_features == 4


class LiteralExpand(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.b(y + y.mean((2, 3), keepdim=True).expand(-1, 8, 6, 6)).mean((2, 3))


def test_a_literal_channel_count_in_expand_freezes() -> None:
    with pytest.warns(fxprune.FxPruneWarning, match="expand"):
        pruned = prove(LiteralExpand(), 0.5, X, True)
    assert pruned.get_submodule("a").out_channels == 8


class LiteralViewAtTheOutput(nn.Module):
    """A literal expand of channels that reach the model output: frozen by design, so no warning.

    (A literal view is no refusal any more: its channel count is rewritten from the kept count.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return y.expand(y.size(0), 8, y.size(2), y.size(3))


def test_a_refusal_is_silent_where_the_channels_are_frozen_by_design_anyway() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)
        # The model-level summary is expected (nothing in it is prunable); the refusal itself is not.
        warnings.filterwarnings("ignore", "nothing could be pruned", fxprune.FxPruneWarning)
        pruned = prove(LiteralViewAtTheOutput(), 0.5, X, True, strict=True)
    assert pruned.get_submodule("a").out_channels == 8
    reason = " ".join(group_of(LiteralViewAtTheOutput(), "a", example_inputs=(X,)).reasons)
    assert "reaches the model output" in reason and "literal size 8" in reason


class ExpandAs(nn.Module):
    def __init__(self, other: str) -> None:
        super().__init__()
        self.other = other
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        # Only where it is used: a dead conv's pruned channels change nothing, a vacuous proof.
        self.c = nn.Conv2d(3, 8, 1) if other == "conv" else None
        self.b = nn.Conv2d(8, 4, 1)
        self.register_buffer("canvas", torch.zeros(2, 8, 6, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        like = {"self": y, "conv": self.c(x) if self.c is not None else None, "buffer": self.canvas}[self.other]
        return self.b(y.mean((2, 3), keepdim=True).expand_as(like) + y).mean((2, 3))


@pytest.mark.parametrize("other", ["self", "conv", "buffer"])
def test_expand_as_follows_channels_only_when_they_are_tied(other: str) -> None:
    if other == "buffer":  # an untracked shape: the expanded channel count would not follow
        with pytest.warns(fxprune.FxPruneWarning, match="expand_as"):
            pruned = prove(ExpandAs(other), 0.5, X, True)
        assert pruned.get_submodule("a").out_channels == 8
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)
        pruned = prove(ExpandAs(other), 0.5, X, True, strict=True)
    assert pruned.get_submodule("a").out_channels == 4
    if other == "conv":  # the shape it expands to must keep the same count: one group
        assert pruned.get_submodule("c").out_channels == 4


# =========================================================================== item 18: Linear -> BatchNorm1d ranks


class UnsupportedThenMLP(nn.Module):
    """An op without a rule upstream; the hidden width of the Linear -> BN1d head is unrelated."""

    def __init__(self, flatten: bool) -> None:
        super().__init__()
        self.flatten = flatten
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 36 if flatten else 8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cumsum(self.a(x), 1)  # no rule: the conv's channels stay whole
        y = torch.flatten(y, 1) if self.flatten else y.mean((2, 3))
        return self.fc2(F.relu(self.bn(self.fc1(y))))


@pytest.mark.parametrize("flatten", [True, False])
def test_an_upstream_unsupported_op_leaves_the_linear_bn1d_hidden_width_prunable(flatten: bool) -> None:
    model = UnsupportedThenMLP(flatten)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = prove(model, 0.5, X, False)
    messages = [str(w.message) for w in caught if issubclass(w.category, fxprune.FxPruneWarning)]
    assert any("cumsum" in m for m in messages)
    assert not any("BatchNorm" in m for m in messages), messages
    assert pruned.get_submodule("fc1").out_features == pruned.get_submodule("bn").num_features == 8
    assert pruned.get_submodule("a").out_channels == 8


class PlainMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 12)
        self.bn = nn.BatchNorm1d(12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def test_linear_bn1d_on_the_model_input_prunes_without_example_inputs() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)
        pruned = prove(PlainMLP(), 0.5, torch.randn(4, 5), False, strict=True)
    assert pruned.get_submodule("bn").num_features == 6


class SequenceBN(nn.Module):
    """BatchNorm1d over a 3-D (N, C, L) map whose channels come from a conv: unchanged behaviour."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv1d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm1d(8)
        self.b = nn.Conv1d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.bn(self.a(x))).mean(2)


@pytest.mark.parametrize("shapes", [True, False])
def test_bn1d_over_a_sequence_still_prunes(shapes: bool) -> None:
    pruned = prove(SequenceBN(), 0.5, torch.randn(2, 3, 7), shapes, strict=True)
    assert pruned.get_submodule("bn").num_features == 4


# =========================================================================== internal errors


def test_a_pruned_model_that_cannot_run_is_an_internal_error_not_a_bad_input() -> None:
    """Were the analysis ever wrong again, the message must not blame the example inputs."""
    from fxprune.api import analyze_model
    from fxprune.planning import make_plan
    from fxprune.rewrite import rewrite

    model = PerChannelOperand("maximum").eval()
    ex = (X,)
    analysis = analyze_model(model, example_inputs=ex)
    plan = make_plan(analysis, 0.5)
    del analysis.slots[("b", "in")]  # simulate an analysis bug: a consumer it forgot
    with pytest.raises(InternalError, match="does not run on example_inputs") as info:
        rewrite(analysis, plan, ex)
    assert "example_inputs must be a tuple" not in str(info.value)
