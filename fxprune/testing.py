"""Proof tools: the masked reference a pruned model must match.

The masked reference is a deep copy of the original model in which every removed channel is
zeroed in every parameter that channel indexes (producer rows and biases, per-channel scales
and shifts, consumer columns). Removing a channel and zeroing its consumer columns compute the
same function, so a correct rewrite of an *exact* group matches the masked model up to float
rounding.

A *renormalising* group (:attr:`fxprune.Group.renormalising`: a LayerNorm/RMSNorm, or a
GroupNorm with one group, normalises over its channels) has no masking-equivalent rewrite: a removed channel, even zeroed, counts in
the norm's statistics. Its reference is defined on the original graph, independently of the
rewrite: in the masked copy each norm whose channels lose some is replaced by
:func:`masked_norm` (:func:`masked_group_norm` for a GroupNorm), which computes the
statistics over the kept positions only and outputs zero at the removed ones. The pruned model must match that.

How a role's positions map onto a module's tensors is its layer adapter's business
(:meth:`fxprune.adapters.LayerAdapter.mask`; transposed and grouped convs included); a module
without one is masked as :data:`fxprune.adapters.PLAIN_LAYER`, a conv-like ``weight``/``bias``.
:func:`register_mask` overrides a type's mask (a custom module with other per-channel tensors).
"""

from __future__ import annotations

import contextlib
import copy
import math
import operator
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from .adapters import PLAIN_LAYER, adapter_for
from .api import ModelLike, analyze_model
from .errors import FxPruneError, FxPruneWarning, PlanMismatchError
from .groups import RENORMALISING, Slot, TensorSlot
from .planning import PruningPlan, resolve, rules_for
from .registry import Registry
from .rewrite import slot_indices
from .rules import RuleTable
from .tracing import as_graph_module, cast_model, cast_value

__all__ = ["masked_reference", "assert_equivalent", "register_mask", "DEFAULT_MASKS", "randomize_norms", "randomize_constants",
           "constant_tensors", "cast_model", "VacuousProofError", "Mask", "masked_norm",
           "masked_group_norm"]

Mask = Callable[[nn.Module, str, torch.Tensor], None]
DEFAULT_MASKS: Registry[type, Mask] = Registry("masks")
"""Module type (exact) -> mask, the table :func:`register_mask` writes to; a NEW table for one
proof is ``DEFAULT_MASKS.extended({MyLayer: fn})`` (``masked_reference(..., masks=)``)."""
_MASKS: Dict[type, Mask] = DEFAULT_MASKS.own  # the default table's own entries


def register_mask(*types: type) -> Callable[[Mask], Mask]:
    """Register, in :data:`DEFAULT_MASKS`, how to zero positions of a module type: ``fn(module, role, removed)``.

    ``removed`` is a bool tensor over the role's positions (True: zero it); ``fn`` zeroes every
    tensor of ``module`` those positions index, in place, under ``torch.no_grad``.

    The table ships empty: every built-in layer is masked by its adapter
    (:meth:`fxprune.adapters.LayerAdapter.mask`), and an entry here wins over a type's adapter.

    >>> table = DEFAULT_MASKS.extended({nn.Identity: lambda module, role, removed: None})
    >>> nn.Identity in table, nn.Identity in DEFAULT_MASKS, nn.Conv2d in table
    (True, False, False)
    """
    return DEFAULT_MASKS.register(*types)


def _zero_along(t: Optional[torch.Tensor], dim: int, removed: torch.Tensor) -> None:
    if t is None:
        return
    index: list = [slice(None)] * t.dim()
    index[dim] = removed.to(t.device)
    t[tuple(index)] = 0


def _mask(gm: torch.fx.GraphModule, plan: PruningPlan, example_inputs: Optional[Sequence[Any]],
          whole_groups: bool = False, rules: Optional[RuleTable] = None, masks: Optional[Registry[type, Mask]] = None) -> bool:
    """Zero the channels ``plan`` removes in ``gm``, in place; True if the plan removes any.

    ``whole_groups``: zero every channel of each group the plan prunes, kept ones too (what a
    rewrite that kept the wrong channels can at worst compute: the vacuity check's yardstick).
    """
    analysis = analyze_model(gm, example_inputs=example_inputs, rules=rules_for(plan, rules))
    if masks is None:
        masks = DEFAULT_MASKS
    elif not isinstance(masks, Registry):
        raise FxPruneError("masks= must be a table like fxprune.testing.DEFAULT_MASKS (e.g. "
                           f"DEFAULT_MASKS.extended({{MyLayer: fn}})), got {type(masks).__name__}")
    try:
        kept = resolve(analysis, plan)
    except PlanMismatchError as exc:
        # The usual cause: the plan was made with example_inputs (shapes tie more channels,
        # e.g. through a view) and the proof analysed the model without them, or vice versa.
        given = "without example_inputs" if example_inputs is None else "with these example_inputs"
        raise PlanMismatchError(
            f"{exc}. Hint: the model was analysed {given}; pass the same example_inputs= that "
            f"fxprune.plan/prune was given (e.g. assert_equivalent(model, pruned, plan, inputs, "
            f"example_inputs=(x,)))") from exc
    if whole_groups:
        sizes = {g: size for slot in analysis.slots.values() for g, size in slot.segments}
        sizes.update({g: size for slots in analysis.tensors.values() for slot in slots for g, size in slot.segments})
        kept = {g: ([] if len(rows) < sizes.get(g, len(rows)) else rows) for g, rows in kept.items()}
    removes = False
    with torch.no_grad():
        for slot in analysis.slots.values():
            keep = slot_indices(slot, kept)
            if keep is None:
                continue
            module = gm.get_submodule(slot.module)
            removed = torch.ones(sum(size for _, size in slot.segments) * slot.block, dtype=torch.bool)
            removed[keep] = False
            removes = removes or bool(removed.any())
            # A layer with an adapter (a built-in one, or one taught by fxprune.register_layer) is
            # masked over the tensors its adapter names.
            mask = masks.get(type(module))
            if mask is None:
                mask = (adapter_for(module) or PLAIN_LAYER).mask
            mask(module, slot.role, removed)
        removes = _mask_tensors(gm, analysis.tensors, kept) or removes
    removes = _mask_norms(gm, analysis.gm, kept) or removes
    return removes


def masked_norm(x: torch.Tensor, keep: torch.Tensor, weight: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None, eps: Optional[float] = 1e-5, rms: bool = False) -> torch.Tensor:
    """LayerNorm (``rms``: RMSNorm) over the last dim of ``x`` with statistics over the ``keep`` positions only.

    ``keep``: a bool vector over the last dim. The mean and biased variance (RMSNorm: the mean
    square) are sums over the kept positions divided by their count; a removed position's value
    never enters them (not even a NaN). The output is zero at removed positions. Written from
    the definition, on purpose not by slicing: it is the reference a renormalising rewrite is
    proven against. ``eps=None`` (RMSNorm's default): ``torch.finfo(x.dtype).eps``.

    >>> import torch, torch.nn.functional as F
    >>> x = torch.randn(2, 5, dtype=torch.float64)
    >>> keep = torch.tensor([True, False, True, True, False])
    >>> y = masked_norm(x, keep)
    >>> torch.allclose(y[:, keep], F.layer_norm(x[:, keep], (3,))), bool((y[:, ~keep] == 0).all())
    (True, True)
    """
    keep = keep.to(x.device)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    kept = torch.where(keep, x, zero)
    count = keep.sum().clamp_min(1).to(x.dtype)  # no kept position (a blanked group): output zero
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    if rms:
        y = kept * torch.rsqrt((kept * kept).sum(-1, keepdim=True) / count + eps)
    else:
        centred = torch.where(keep, kept - kept.sum(-1, keepdim=True) / count, zero)
        y = centred * torch.rsqrt((centred * centred).sum(-1, keepdim=True) / count + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return torch.where(keep, y, zero)


def masked_group_norm(x: torch.Tensor, keep: torch.Tensor, weight: Optional[torch.Tensor] = None,
                      bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    """GroupNorm with one group (``num_groups=1``) over dim 1 of ``x`` with statistics over the ``keep`` channels only.

    ``x``: ``(N, C, *)``; ``keep``: a bool vector over the C channels. Each sample's mean and
    biased variance are sums over its kept channels and every position, divided by their
    count; removed channels never enter them, and the output is zero there. Written from the
    definition (not by slicing), as the reference of a renormalising GroupNorm(1) rewrite.

    >>> import torch, torch.nn.functional as F
    >>> x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    >>> keep = torch.tensor([True, False, True, True])
    >>> y = masked_group_norm(x, keep)
    >>> torch.allclose(y[:, keep], F.group_norm(x[:, keep], 1)), bool((y[:, ~keep] == 0).all())
    (True, True)
    """
    # One sample's channels and positions flattened into one row: a LayerNorm over that row
    # with every position of a kept channel kept is the definition, so masked_norm computes it.
    per = math.prod(x.shape[2:])
    rows = masked_norm(x.reshape(x.shape[0], -1), keep.to(x.device).repeat_interleave(per), eps=eps).view_as(x)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if weight is not None:
        rows = rows * weight.view(shape)
    if bias is not None:
        rows = rows + bias.view(shape)
    return torch.where(keep.to(x.device).view(shape), rows, torch.zeros((), dtype=x.dtype, device=x.device))


def _mask_norms(gm: torch.fx.GraphModule, analysed: torch.fx.GraphModule, kept: Dict[int, List[int]]) -> bool:
    """Replace, in ``gm``, every norm a renormalising group loses channels of by :func:`masked_norm`.

    ``analysed``: the analysed copy of ``gm``'s graph (same node names), whose norms carry the
    segments of their normalised dim (``node.meta[RENORMALISING]``). True if any was replaced.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    replaced = False
    for source in analysed.graph.nodes:
        segments = source.meta.get(RENORMALISING)
        if segments is None:
            continue
        keep = slot_indices(Slot(source.name, "channelwise", segments, 1), kept)
        if keep is None:
            continue  # no channel removed: the norm computes what it always did
        mask = torch.zeros(sum(size for _, size in segments), dtype=torch.bool)
        mask[keep] = True
        _masked_norm_node(gm, nodes[source.name], mask)
        replaced = True
    if replaced:
        gm.graph.lint()
        gm.recompile()
    return replaced


def _masked_norm_node(gm: torch.fx.GraphModule, node: torch.fx.Node, mask: torch.Tensor) -> None:
    """Put a :func:`masked_norm` call keeping ``mask`` in place of the norm ``node``."""
    name = f"fxprune_keep_{node.name}"
    gm.register_buffer(name, mask)
    graph = gm.graph

    def arg(i: int, key: str, default: Any = None) -> Any:
        return node.args[i] if len(node.args) > i else node.kwargs.get(key, default)

    with graph.inserting_before(node):
        keep = graph.get_attr(name)
        x = arg(0, "input")
        if node.op == "call_module":
            norm = gm.get_submodule(str(node.target))
            weight, bias = (graph.get_attr(f"{node.target}.{t}") if getattr(norm, t, None) is not None else None
                            for t in ("weight", "bias"))
            eps, kind = norm.eps, type(norm)
        elif node.target is torch.nn.functional.group_norm:
            weight, bias, eps, kind = arg(2, "weight"), arg(3, "bias"), arg(4, "eps", 1e-5), nn.GroupNorm
        elif node.target is torch.nn.functional.layer_norm:
            weight, bias, eps, kind = arg(2, "weight"), arg(3, "bias"), arg(4, "eps", 1e-5), nn.LayerNorm
        else:  # F.rms_norm
            weight, bias, eps, kind = arg(2, "weight"), None, arg(3, "eps"), None
        if issubclass(kind or object, nn.GroupNorm):  # num_groups=1, the only renormalising GroupNorm
            new = graph.call_function(masked_group_norm, (x, keep, weight, bias, eps))
        else:
            rms = kind is None or not issubclass(kind, nn.LayerNorm)
            new = graph.call_function(masked_norm, (x, keep, weight, bias, eps, rms))
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _mask_tensors(gm: torch.fx.GraphModule, tensors: Dict[str, Tuple[TensorSlot, ...]], kept: Dict[int, List[int]]) -> bool:
    """Zero the removed positions of every functional layer's tensors, as for the module form.

    Rows (``out``) and columns (``in``) are zeroed, a grouped conv's columns within their conv
    group; running variances are set to 1 (see :func:`_mask_norm`). Per-channel ``operand``
    tensors are left alone: a removed channel's entry only ever meets a removed channel, and a
    zeroed divisor would turn it into NaN.
    """
    removes = False
    for target, slots in tensors.items():
        for slot in slots:
            if slot.role == "operand":
                continue
            keep = slot_indices(slot.as_slot(), kept)
            if keep is None:
                continue
            removed = torch.ones(sum(size for _, size in slot.segments) * slot.block, dtype=torch.bool)
            removed[keep] = False
            removes = removes or bool(removed.any())
            t = operator.attrgetter(target)(gm)
            if slot.role == "in" and slot.conv_groups > 1:
                # Input channel i is column i % (Cin/G) of the rows of conv group i // (Cin/G).
                cin_g, cout_g = t.shape[1], t.shape[0] // slot.conv_groups
                for i in torch.nonzero(removed).flatten().tolist():
                    g = i // cin_g
                    t[g * cout_g : (g + 1) * cout_g, i % cin_g] = 0
            elif slot.kind == "running_var":
                index: list = [slice(None)] * t.dim()
                index[slot.dim] = removed.to(t.device)
                t[tuple(index)] = 1
            else:
                _zero_along(t, slot.dim, removed)
    return removes


def masked_reference(model: ModelLike, plan: PruningPlan, example_inputs: Optional[Sequence[Any]] = None, *,
                     rules: Optional[RuleTable] = None, masks: Optional[Registry[type, Mask]] = None) -> torch.fx.GraphModule:
    """A deep copy of ``model`` (traced) with the channels ``plan`` removes set to zero.

    ``rules``: the rule table the plan was made with (default :data:`fxprune.rules.DEFAULT_RULES`);
    ``masks``: the mask table (default :data:`DEFAULT_MASKS`).

    BatchNorm running statistics of removed channels are reset to mean 0, variance 1, so a
    NaN or Inf statistic cannot leak into the output through ``0 * NaN``. Each LayerNorm/RMSNorm
    over a renormalising group that loses channels becomes a :func:`masked_norm` over the kept
    ones (statistics over the kept channels, zero at the removed): the reference of the
    renormalising contract. A plan of exact groups only gets the plain masked copy.

    >>> import torch, torchvision, fxprune
    >>> from fxprune.testing import masked_reference
    >>> m = torchvision.models.resnet18().eval()
    >>> p = fxprune.plan(m, 0.5)
    >>> ref = masked_reference(m, p)
    >>> int((ref.get_submodule("layer1.0.conv1").weight.abs().sum((1, 2, 3)) == 0).sum())
    32
    """
    gm = copy.deepcopy(as_graph_module(model, example_inputs))  # an untraceable model: exported from them
    _mask(gm, plan, example_inputs, rules=rules, masks=masks)
    return gm


# ------------------------------------------------------------------------------- dtype casts

# ------------------------------------------------------------------------------ the proof


class VacuousProofError(AssertionError):
    """The output does not depend on the pruned channels: matching the reference proves nothing.

    The masked reference computes bit for bit what the unmasked model computes, and so does a
    copy with every channel of the pruned groups zeroed (a zero-initialised head, gain or
    layer scale, a dead residual branch...): a wrongly sliced rewrite would match as well.
    """


_FLOAT32_RTOL = 1e-4  # float32 fallback: summation-order rounding of a pruned model, with margin
_FLOAT32_ATOL = 1e-5


def _identical(a: Any, b: Any) -> bool:
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    if len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y):
                return False
        elif isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor) or x != y:
            return False
    return True


def constant_tensors(model: nn.Module) -> List[str]:
    """Names of the floating parameters and buffers of ``model`` whose elements are all equal.

    Such tensors (a classifier initialised to zero, gains and layer scales of ones or zeros,
    fresh norm statistics) treat every channel alike, so they can hide a wrong slice.
    """
    return [name for name, t in _named_tensors(model) if _is_constant(t)]


def _vacuity_reason(base: nn.Module) -> str:
    constants = [(name, float(t.detach().reshape(-1)[0])) for name, t in _named_tensors(base) if _is_constant(t)]
    # Zero weights and gains first: they are what kills a signal (zero shifts seldom do).
    constants.sort(key=lambda item: (item[1] != 0, item[0].endswith(("bias", "running_mean"))))
    shown = ", ".join(f"{name} (all {value:g})" for name, value in constants[:6])
    more = f" and {len(constants) - 6} more" if len(constants) > 6 else ""
    found = f"; constant-valued tensors that may do that: {shown}{more}" if constants else ""
    return ("something after them multiplies them away (a zero-initialised or constant head, gain or layer "
            "scale, a dead residual branch)" + found)


def _masked_copy(source: torch.fx.GraphModule, plan: PruningPlan, example_inputs: Optional[Sequence[Any]],
                 whole_groups: bool = False, tables: Tuple[Optional[RuleTable], Optional[Registry[type, Mask]]] = (None, None),
                 ) -> Tuple[torch.fx.GraphModule, bool]:
    gm = copy.deepcopy(source)
    removes = _mask(gm, plan, example_inputs, whole_groups, rules=tables[0], masks=tables[1])
    return gm.eval(), removes


@contextlib.contextmanager
def _default_dtype(dtype: Optional[torch.dtype]) -> Iterator[None]:
    """Tensors a forward creates without a dtype (``torch.zeros(n)``) come out in ``dtype``."""
    before = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _run(models: Sequence[nn.Module], inputs: Sequence[Any], dtype: Optional[torch.dtype]) -> List[Any]:
    """Each model's output on ``inputs`` (models and inputs cast to ``dtype`` first, if given)."""
    if dtype is not None:
        # In place: Module.to releases each float32 tensor as it converts it.
        models = [cast_model(m, dtype) for m in models]
        inputs = [cast_value(x, dtype) for x in inputs]
    # set_default_dtype takes float32/float64 only.
    with torch.no_grad(), _default_dtype(dtype if dtype in (torch.float32, torch.float64) else None):
        return [m(*inputs) for m in models]


def assert_equivalent(model: ModelLike, pruned: nn.Module, plan: PruningPlan, inputs: Sequence[Any],
                      rtol: Optional[float] = None, atol: Optional[float] = None,
                      dtype: Optional[torch.dtype] = torch.float64,
                      example_inputs: Optional[Sequence[Any]] = None, allow_vacuous: bool = False, *,
                      rules: Optional[RuleTable] = None, masks: Optional[Registry[type, Mask]] = None) -> None:
    """Assert ``pruned`` computes what the masked reference of ``model`` computes (eval mode).

    Both models run on copies cast to ``dtype`` (float64 by default): removing channels changes
    the order of float sums, and in double precision that rounding is far below any real bug,
    so the comparison can use tight tolerances. Every floating tensor the models hold is cast,
    graph constants included (:func:`cast_model`). If a model still cannot run in ``dtype``
    (an op that insists on float32), the comparison falls back to the models' own dtype with
    float32 tolerances (``rtol=1e-4``, ``atol=1e-5`` unless given) and says so with an
    :class:`~fxprune.errors.FxPruneWarning`. ``dtype=None`` compares in the models' own dtype.
    Pass the same ``example_inputs`` the plan was made with (shapes can tie more channels).

    The proof must be able to fail. If the plan removes channels but the masked reference's
    output is bit-identical to the unmasked model's, the removed channels did not influence
    the output on ``inputs``; that is harmless when they were zero already, so the pruned
    groups are then zeroed entirely (kept channels too): if the output still does not move,
    it does not depend on those channels at all (a zero-initialised head, gain or layer scale,
    a dead residual branch), a wrongly sliced rewrite would pass too, and
    :class:`VacuousProofError` (an ``AssertionError``) says so, naming the constant-valued
    tensors that may be the cause. Randomise them first (:func:`randomize_constants`;
    :func:`randomize_norms` calls it), or pass ``allow_vacuous=True`` where that is expected.
    The check costs nothing unless the candidate's output is bit-identical to the reference's
    (then one or two more forward passes).

    ``rules`` / ``masks``: the rule table the plan was made with and the mask table, as for
    :func:`masked_reference`.
    """
    inputs = list(inputs)
    tables = (rules, masks)
    # Traced once (an untraceable model: exported from example_inputs); every run below is a deep copy of it.
    source = as_graph_module(model, example_inputs)
    ref, removes = _masked_copy(source, plan, example_inputs, tables=tables)
    run_dtype: Optional[torch.dtype] = dtype
    try:
        (expected,) = _run([ref], inputs, dtype)
    except Exception as exc:  # the model itself cannot run in dtype
        if dtype is None:
            raise
        rtol, atol = rtol or _FLOAT32_RTOL, atol or _FLOAT32_ATOL
        warnings.warn(
            f"the proof could not run in {dtype} ({type(exc).__name__}: {exc}); comparing in the models' own dtype "
            f"with float32 tolerances instead (rtol={rtol}, atol={atol})", FxPruneWarning, stacklevel=2)
        run_dtype = None
        ref, removes = _masked_copy(source, plan, example_inputs, tables=tables)  # the cast copy is spoilt
        (expected,) = _run([ref], inputs, None)
    (actual,) = _run([copy.deepcopy(pruned).eval()], inputs, run_dtype)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    # A proof is vacuous when the output does not depend on the pruned groups at all; then
    # the candidate, which differs from the reference only inside them, computes the very same
    # bits. Only then are the more expensive checks below needed.
    if not removes or allow_vacuous or not _identical(actual, expected):
        return
    (original,) = _run([copy.deepcopy(source).eval()], inputs, run_dtype)
    if not _identical(expected, original):
        return
    # The removed channels change nothing. That is fine if the kept ones matter (the removed
    # ones were zero already): zero the pruned groups entirely and see whether anything moves.
    blank, _ = _masked_copy(source, plan, example_inputs, whole_groups=True, tables=tables)
    (blanked,) = _run([blank], inputs, run_dtype)
    if _identical(blanked, expected):
        raise VacuousProofError(
            "vacuous proof: the masked reference's output is bit-identical to the unmasked model's on these inputs, "
            "and stays so with every channel of the pruned groups zeroed: the output does not depend on those "
            f"channels, so a wrongly sliced rewrite would pass as well. Why: {_vacuity_reason(source)}. Hint: call "
            "fxprune.testing.randomize_constants(model) (or randomize_norms) before planning, use inputs that reach "
            "the pruned channels, or pass allow_vacuous=True if this is expected")


# ------------------------------------------------------------------------------ randomisers


def _named_tensors(model: nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    """Parameters, then buffers, each tensor once (tied ones under their first name)."""
    seen = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            yield name, t


def _is_constant(t: torch.Tensor) -> bool:
    """All elements equal (and finite). A single element can only hide channels by being 0."""
    if not t.is_floating_point() or t.numel() == 0:
        return False
    first = t.detach().reshape(-1)[0]
    if t.numel() == 1:
        return bool(first == 0)
    return bool(torch.isfinite(first)) and bool((t.detach() == first).all())


def _randomize_constants(model: nn.Module, g: torch.Generator) -> List[str]:
    changed = []
    with torch.no_grad():
        for name, t in _named_tensors(model):
            if not _is_constant(t):
                continue
            value = float(t.reshape(-1)[0])
            noise = torch.rand(t.shape, generator=g, dtype=torch.float64)
            if name.rsplit(".", 1)[-1] == "running_var":
                new = noise + 0.5  # a variance must stay positive, whatever it was
            elif value != 0:
                new = value * (noise + 0.5)  # jitter keeps each element's sign and scale
            else:
                # Zero (a zero-initialised head or gain): the usual uniform init scale.
                fan_in = t[0].numel() if t.dim() >= 2 else 0
                bound = fan_in ** -0.5 if fan_in else 0.5
                new = (noise * 2 - 1) * bound
            t.copy_(new.to(t.dtype))
            changed.append(name)
    return changed


def randomize_constants(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every constant-valued floating parameter and buffer of ``model`` varied values, in place.

    A tensor whose elements are all equal treats every channel alike, so it can hide a wrong
    slice: fresh norm statistics and affine parameters (BatchNorm, LayerNorm, GroupNorm),
    gains and layer scales, a classifier or gain initialised to zero (whose output then does
    not depend on the channels at all). Non-zero constants get a per-element jitter
    (``value * U(0.5, 1.5)``: sign and scale kept, so a layer scale of 1e-6 stays small); zeros
    get ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (``U(-0.5, 0.5)`` for vectors); a running
    variance stays positive. Tensors with varied values, non-finite or integer tensors are
    left alone.

    >>> import torch
    >>> head = torch.nn.Linear(4, 2)
    >>> _ = torch.nn.init.zeros_(head.weight)
    >>> _ = randomize_constants(head)
    >>> bool(head.weight.std() > 0)
    True
    """
    _randomize_constants(model, torch.Generator().manual_seed(seed))
    return model


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm/InstanceNorm random statistics and affine parameters, then
    randomise every other constant-valued tensor (:func:`randomize_constants`), in place.

    A freshly built model has mean 0, variance 1, scale 1 and shift 0 everywhere, zero-initialised
    heads, gains and layer scales: all of these can hide a layer sliced with the wrong channels,
    and random values make equivalence checks bite.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, nn.modules.batchnorm._NormBase):
                continue
            n = m.num_features
            if m.running_mean is not None and m.running_var is not None:
                m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.weight is not None and m.bias is not None:
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    _randomize_constants(model, g)
    return model
