"""Importance criteria: a group -> one score per channel (higher = keep).

Two kinds of criteria share one entry point, :func:`score_groups`:

- *Weight criteria* ``(group, gm) -> Tensor[C]`` look at one group's weights only
  (``l1``, ``l2``, ``fpgm``, ``bn``). A criterion sees each member's weights as a matrix whose
  rows are the parameter positions the group indexes (:func:`member_rows`), so it scores
  producer rows, consumer columns and per-channel parameters alike. Add one with
  :func:`register_criterion`. Each layer's view comes from its adapter
  (:meth:`fxprune.adapters.LayerAdapter.weights`); :func:`register_weights` overrides it for a type.
- *Model criteria* ``(analysis, groups, options) -> {group index: Tensor[C]}`` score every
  group in one go, typically by running the model (``apoz``, ``taylor``) or from a seed
  (``random``). Add one with :func:`register_model_criterion`; ``needs_data=True`` makes
  :func:`score_groups` demand ``calibration`` batches.

Scores are raw (per group, not comparable across groups); :mod:`fxprune.allocation`
normalises them when it ranks channels globally. NaN scores rank lowest.

Every criterion reads the model and never changes it: data-driven ones run the shared
modules in eval mode under ``no_grad`` and restore each module's training flag (``apoz``), or
work on a private deep copy (``taylor``, which needs gradients).
"""

from __future__ import annotations

import contextvars
import copy
import inspect
import math
import operator
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .adapters import PLAIN_LAYER, adapter_for, grouped_inputs
from .errors import FxPruneError
from .groups import Analysis, Group, Member, TensorMember
from .registry import Registry
from .tracing import MutableArgsInterpreter
from .rules import LAYOUT_META

__all__ = [
    "Criterion",
    "ModelCriterion",
    "ScoringOptions",
    "register_criterion",
    "register_model_criterion",
    "register_weights",
    "DEFAULT_WEIGHTS",
    "WeightView",
    "member_rows",
    "member_norms",
    "tensor_rows",
    "group_rows",
    "score",
    "score_groups",
    "criterion_name",
    "check_importance",
    "available_criteria",
    "CRITERIA",
    "MODEL_CRITERIA",
]

Criterion = Callable[[Group, torch.fx.GraphModule], torch.Tensor]
WeightView = Callable[[nn.Module, str], Optional[torch.Tensor]]


@dataclass
class ScoringOptions:
    """What model criteria may use besides the model.

    ``calibration``: an iterable of ``(inputs, targets)`` batches (a DataLoader works; a bare
    tensor batch is taken as inputs without targets); ``calibration_batches``: use at most
    this many; ``loss_fn(output, targets) -> scalar`` (default cross-entropy); ``seed`` for
    ``random``.
    """

    calibration: Optional[Iterable[Any]] = None
    calibration_batches: Optional[int] = None
    loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None
    seed: int = 0
    # The weight-view table to score with (None: DEFAULT_WEIGHTS), e.g. DEFAULT_WEIGHTS.extended({MyLayer: view}).
    weights: Optional[Registry[type, WeightView]] = None


ModelCriterion = Callable[[Analysis, Sequence[Group], ScoringOptions], Dict[int, torch.Tensor]]

DEFAULT_WEIGHTS: Registry[type, WeightView] = Registry("weight views")
"""Module type (exact) -> weight view, the table :func:`register_weights` writes to."""
_WEIGHT_VIEWS: Dict[type, WeightView] = DEFAULT_WEIGHTS.own  # the default table's own entries
# The table of the scoring pass under way (score_groups sets it from ScoringOptions.weights).
_VIEWS: contextvars.ContextVar[Optional[Registry[type, WeightView]]] = contextvars.ContextVar("fxprune_weight_views",
                                                                                              default=None)


def _view(module: nn.Module) -> Optional[WeightView]:
    view = (_VIEWS.get() or DEFAULT_WEIGHTS).get(type(module))
    if view is None:
        adapter = adapter_for(module)  # a layer taught by fxprune.register_layer scores its role tensors
        view = adapter.weights if adapter is not None else None
    return view
CRITERIA: Dict[str, Criterion] = {}
MODEL_CRITERIA: Dict[str, ModelCriterion] = {}
_NEEDS_DATA: Dict[str, bool] = {}


def register_weights(*types: type) -> Callable[[WeightView], WeightView]:
    """Register, in :data:`DEFAULT_WEIGHTS`, how a module type exposes the weights a role indexes, positions first.

    For one scoring pass only, extend the table instead and pass it as
    ``ScoringOptions(weights=...)`` to :func:`score_groups`:

    >>> table = DEFAULT_WEIGHTS.extended({nn.Embedding: lambda m, role: m.weight.detach().t()})
    >>> nn.Embedding in table, nn.Embedding in DEFAULT_WEIGHTS
    (True, False)
    """
    return DEFAULT_WEIGHTS.register(*types)


def register_criterion(name: str) -> Callable[[Criterion], Criterion]:
    """Register a weight criterion ``(group, gm) -> Tensor[C]`` usable as ``importance=name``."""

    def decorate(fn: Criterion) -> Criterion:
        MODEL_CRITERIA.pop(name, None)
        CRITERIA[name] = fn
        return fn

    return decorate


def register_model_criterion(name: str, *, needs_data: bool = False) -> Callable[[ModelCriterion], ModelCriterion]:
    """Register a criterion that scores all groups at once: ``(analysis, groups, options)``.

    It returns ``{group.index: Tensor[group.size]}`` for every group it is given. With
    ``needs_data=True``, using it without ``calibration=`` raises :class:`FxPruneError`.
    """

    def decorate(fn: ModelCriterion) -> ModelCriterion:
        CRITERIA.pop(name, None)
        MODEL_CRITERIA[name] = fn
        _NEEDS_DATA[name] = needs_data
        return fn

    return decorate


def available_criteria() -> List[str]:
    """Names usable as ``importance=``."""
    return sorted(set(CRITERIA) | set(MODEL_CRITERIA))


def check_importance(importance: Any) -> None:
    """A clear error for an ``importance=`` that is neither a known criterion name nor a callable.

    Checked before any work, so a typo is not noticed only after tracing (or never, when the
    plan happens to score nothing).
    """
    if callable(importance):
        return
    if not isinstance(importance, str):
        raise FxPruneError(
            f"importance= must be a criterion name (one of {available_criteria()}) or a callable "
            f"(group) -> Tensor[C] / (group, gm) -> Tensor[C], got {importance!r} ({type(importance).__name__})")
    if importance not in CRITERIA and importance not in MODEL_CRITERIA:
        raise FxPruneError(f"unknown importance {importance!r}; choose one of {available_criteria()} or pass a callable")


def criterion_name(importance: Any) -> str:
    """How a plan records the criterion: its name, or a callable's ``__name__``."""
    if isinstance(importance, str):
        return importance
    return str(getattr(importance, "__name__", type(importance).__name__))


# --------------------------------------------------------------------------- weight views


def member_rows(gm: torch.fx.GraphModule, group: Group, member: Member) -> Optional[torch.Tensor]:
    """The member's weights for this group as ``[group.size, k]`` (one row per channel)."""
    module = gm.get_submodule(member.module)
    view = _view(module)
    if view is None:
        return None
    w = view(module, member.role)
    if w is None:
        return None
    start = member.offset * member.block
    rows = w[start : start + group.size * member.block]
    return rows.reshape(group.size, -1).float()


class _NormCache:
    """Per-position p-norms**p of each layer's weight, both roles from one read of it.

    A plain conv or Linear appears in two groups (its outputs in one, its inputs in
    another). ``|w|**p`` goes once into a reused scratch buffer (no fresh pages per layer),
    rows are summed for the outputs and one matrix-vector product sums columns for the inputs.
    """

    # Why: scoring each role with its own strided reduction read every weight twice and reduced
    # the input role across dims 0, 2, 3; on resnet152 (60 M weights, one thread) this class is
    # several times faster (benchmarks/bench_pass_time.py measures the pass).

    def __init__(self) -> None:
        # Keyed by module identity; the module is kept alive with its entry so ids cannot be reused.
        self._norms: Dict[Tuple[int, float], Tuple[nn.Module, torch.Tensor, torch.Tensor]] = {}
        self._scratch: Dict[torch.device, torch.Tensor] = {}

    def _buffer(self, n: int, device: torch.device) -> torch.Tensor:
        buf = self._scratch.get(device)
        if buf is None or buf.numel() < n:
            buf = self._scratch[device] = torch.empty(n, dtype=torch.float32, device=device)
        return buf[:n]

    def roles(self, module: nn.Module, w: torch.Tensor, p: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(out, in)`` norms**p per position of ``module``'s ``[O, I, *k]`` weight ``w`` (groups == 1)."""
        key = (id(module), p)
        hit = self._norms.get(key)
        if hit is not None:
            return hit[1], hit[2]
        rows = w.reshape(w.shape[0], math.prod(w.shape[1:]))  # not -1: zero-size layers exist
        if rows.dtype == torch.float32:
            powered = self._buffer(rows.numel(), rows.device).view(rows.shape)
            if p == 2.0:
                torch.mul(rows, rows, out=powered)
            else:
                torch.abs(rows, out=powered)
                if p != 1.0:
                    powered.pow_(p)
        else:  # double: sum in float32 like the other path (member_norms upcasts half already)
            powered = rows.float().abs().pow_(p)
        out_norms = powered.sum(1)
        ones = torch.ones(rows.shape[0], dtype=powered.dtype, device=powered.device)
        in_norms = torch.mv(powered.t(), ones).view(w.shape[1], math.prod(w.shape[2:])).sum(1)
        self._norms[key] = (module, out_norms, in_norms)
        return out_norms, in_norms


# Set by score_groups for the length of one scoring pass; the cache holds ids of weights, so
# it must never outlive the pass that filled it.
_CACHE: contextvars.ContextVar[Optional[_NormCache]] = contextvars.ContextVar("fxprune_norm_cache", default=None)


def member_norms(gm: torch.fx.GraphModule, group: Group, member: Member, p: float) -> Optional[torch.Tensor]:
    """The p-norm**p of each channel's weights in ``member``, as ``[group.size]``.

    Reduces the weight in place of reading it as rows: no transposed copy of large tensors,
    which is what makes scoring fast on big models. Inside :func:`score_groups`, a plain
    conv/Linear's two roles share one pass over its weight (see :class:`_NormCache`).
    """
    module = gm.get_submodule(member.module)
    view = _view(module)
    if view is None:
        return None
    adapter = adapter_for(module)
    if adapter is not None and view == adapter.weights:
        dense = adapter.dense_weight(module) if member.role in ("out", "in") else None
        if dense is not None:
            w, pos_dim = dense, (1 if member.role == "in" else 0)  # both roles from one pass (_NormCache)
        else:
            w, pos_dim = view(module, member.role), 0  # an adapter's view is the role's own, positions first
    else:
        dense = None
        w = view(module, "out")  # a registered view: positions on dim 0 for out/channelwise, dim 1 for "in"
        pos_dim = 1 if member.role == "in" else 0
    if w is None:
        return None
    if member.role == "in" and getattr(module, "groups", 1) > 1 and pos_dim == 1:
        w, pos_dim = view(module, "in"), 0  # grouped: inputs are not weight dim 1
    if w.dtype in (torch.float16, torch.bfloat16):
        w = w.float()  # squares of half weights lose digits; every path sums in float32
    if dense is not None and w.dim() >= 2:
        # Outside score_groups a one-off cache gives the same numbers, computed the same way.
        per_pos = (_CACHE.get() or _NormCache()).roles(module, w, p)[pos_dim]
    elif w.dim() == 1:
        per_pos = w.abs().pow(p)
    else:
        dims = [d for d in range(w.dim()) if d != pos_dim]
        per_pos = torch.linalg.vector_norm(w, ord=p, dim=dims).pow(p)
    start = member.offset * member.block
    return per_pos[start : start + group.size * member.block].reshape(group.size, -1).sum(1).float()


def tensor_rows(gm: torch.fx.GraphModule, group: Group, member: TensorMember) -> Optional[torch.Tensor]:
    """A functional layer's weight for this group as ``[group.size, k]``, like :func:`member_rows`.

    Only weights are scored, as for the module forms (a conv's or Linear's ``weight``, a
    norm's scale): biases, running statistics and per-channel operands are not.
    """
    if member.kind != "weight" or member.role == "operand":
        return None
    w = operator.attrgetter(member.target)(gm)
    if not isinstance(w, torch.Tensor) or w.dim() <= member.dim:
        return None
    w = w.detach()
    if member.role == "in" and member.conv_groups > 1:
        rows = grouped_inputs(w, member.conv_groups)
    else:
        rows = w.movedim(member.dim, 0)
        rows = rows.reshape(rows.shape[0], math.prod(rows.shape[1:]))
    start = member.offset * member.block
    return rows[start : start + group.size * member.block].reshape(group.size, -1).float()


def group_rows(gm: torch.fx.GraphModule, group: Group) -> List[torch.Tensor]:
    """Every member's rows (members without weights, like pooling, are skipped)."""
    out = []
    for m in group.members:
        rows = member_rows(gm, group, m)
        if rows is not None:
            out.append(rows)
    for t in group.tensors:
        rows = tensor_rows(gm, group, t)
        if rows is not None:
            out.append(rows)
    return out


# --------------------------------------------------------------------------- weight criteria


def _norm_sum(gm: torch.fx.GraphModule, group: Group, p: float) -> torch.Tensor:
    total = torch.zeros(group.size)
    for m in group.members:
        norms = member_norms(gm, group, m, p)
        if norms is not None:
            total += norms
    for t in group.tensors:  # functional layers' weights count as their module forms' do
        rows = tensor_rows(gm, group, t)
        if rows is not None:
            total += rows.abs().pow(p).sum(1)
    return total


@register_criterion("l1")
def l1(group: Group, gm: torch.fx.GraphModule) -> torch.Tensor:
    """Sum over every member of the L1 norm of the weights the channel indexes.

    Members: producer rows, BatchNorm scales, consumer columns. No normalisation: a channel
    whose weights are all zero scores exactly 0 and ranks lowest.
    """
    return _norm_sum(gm, group, 1.0)


@register_criterion("l2")
def l2(group: Group, gm: torch.fx.GraphModule) -> torch.Tensor:
    """The L2 norm of all the weights the channel indexes, over every member.

    Reduction: ``sqrt(sum over members of ||w||_2^2)``, i.e. the Euclidean norm of the
    channel's weights concatenated across the group. No normalisation. Unlike L1 it favours
    a few large weights over many small ones.
    """
    return _norm_sum(gm, group, 2.0).sqrt()


def geometric_median(points: torch.Tensor, iters: int = 200, tol: float = 1e-7) -> torch.Tensor:
    """The point minimising the sum of Euclidean distances to the rows of ``points`` (Weiszfeld)."""
    x = points.double()
    y = x.mean(0)
    for _ in range(iters):
        d = (x - y).norm(dim=1).clamp_min(1e-12)
        w = 1.0 / d
        new = (w.unsqueeze(1) * x).sum(0) / w.sum()
        step = (new - y).norm()
        y = new
        if step <= tol * (y.norm() + 1e-12):
            break
    return y.to(points.dtype)


@register_criterion("fpgm")
def fpgm(group: Group, gm: torch.fx.GraphModule) -> torch.Tensor:
    """Filter pruning via geometric median (He et al., 2019).

    For each producer of the group (``out`` members: the convs/Linears whose filters make the
    channels; a residual group has several), the Euclidean distance of each channel's filter
    to the geometric median of that producer's filters (Weiszfeld iterations). Filters near
    the median are the most replaceable by the others, so they score lowest. Reduction: the
    sum over producers. Groups without a producer (depthwise-only chains) use their
    per-channel members instead. No normalisation. A filter with NaN/inf weights scores NaN
    (ranked lowest) and is left out of the median.
    """
    members: List[Union[Member, TensorMember]] = [m for m in group.members if m.role == "out"]
    members += [t for t in group.tensors if t.role == "out"]
    if not members:
        members = [m for m in group.members if m.role == "channelwise"] + [t for t in group.tensors if t.role == "channelwise"]
        members = members or list(group.members)
    total = torch.zeros(group.size)
    for m in members:
        rows = member_rows(gm, group, m) if isinstance(m, Member) else tensor_rows(gm, group, m)
        if rows is None:
            continue
        bad = ~torch.isfinite(rows).all(1)  # NaN/inf filters: NaN score, ranked lowest
        if bool(bad.all()):
            return torch.full((group.size,), float("nan"))
        dist = (rows - geometric_median(rows[~bad])).norm(dim=1)
        total += torch.where(bad, torch.full_like(dist, float("nan")), dist)
    return total


@register_criterion("bn")
def bn(group: Group, gm: torch.fx.GraphModule) -> torch.Tensor:
    """Network slimming (Liu et al., 2017): ``|gamma|`` of the group's BatchNorms.

    Reduction: the sum of ``|gamma|`` over the group's affine BatchNorms (a residual group has
    one per branch). A group with no affine BatchNorm (e.g. between two Linears) falls back
    to ``l1`` so that it can still be ranked. No normalisation: ``gamma = 0`` scores 0.
    """
    total = torch.zeros(group.size)
    found = False
    for m in group.members:
        module = gm.get_submodule(m.module)
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None:
            found = True
            total += module.weight.detach().float().abs()[m.offset : m.offset + group.size]
    for t in group.tensors:
        # A functional norm's scale (timm's BatchNormAct2d calls F.batch_norm): 1-D, channelwise.
        w = operator.attrgetter(t.target)(gm) if t.kind == "weight" and t.role == "channelwise" else None
        if isinstance(w, torch.Tensor) and w.dim() == 1:
            found = True
            total += w.detach().float().abs()[t.offset : t.offset + group.size]
    return total if found else l1(group, gm)


# --------------------------------------------------------------------------- model criteria


@register_model_criterion("random")
def random_scores(analysis: Analysis, groups: Sequence[Group], options: ScoringOptions) -> Dict[int, torch.Tensor]:
    """Uniform random scores: a baseline that any real criterion should beat.

    Deterministic: each group's generator is seeded from ``seed`` and the group key, so the
    same model and seed give the same plan regardless of which groups are scored.
    """
    out = {}
    for g in groups:
        gen = torch.Generator().manual_seed(zlib.crc32(f"{options.seed}:{g.key}".encode()))
        out[g.index] = torch.rand(g.size, generator=gen)
    return out


def _batches(options: ScoringOptions, name: str) -> Iterator[Tuple[Tuple[Any, ...], Any]]:
    """``(inputs tuple, targets)`` from the calibration iterable, at most ``calibration_batches``."""
    if options.calibration is None:
        raise FxPruneError(
            f"importance={name!r} is data-driven: pass calibration= (an iterable of (inputs, targets) "
            f"batches, e.g. a DataLoader over training data)")
    limit = options.calibration_batches
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"calibration_batches must be an integer >= 1 or None, got {limit!r}")
    count = 0
    for batch in options.calibration:
        if isinstance(batch, torch.Tensor):
            inputs, targets = (batch,), None
        elif isinstance(batch, (tuple, list)) and len(batch) == 2:
            inputs, targets = batch
            inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        else:
            raise FxPruneError(
                f"importance={name!r}: each calibration batch must be (inputs, targets) or an input tensor, "
                f"got {type(batch).__name__}" + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
        count += 1
        yield inputs, targets
        if limit is not None and count >= limit:
            break  # before fetching another batch (a DataLoader would load it for nothing)
    if count == 0:
        raise FxPruneError(f"importance={name!r}: calibration= yielded no batches")


def _device(module: nn.Module) -> Optional[torch.device]:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return None


def _to(x: Any, device: Optional[torch.device]) -> Any:
    if device is None:
        return x
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    return x


def _channel_positions(node: torch.fx.Node, group_index: int) -> Optional[Tuple[int, int, int]]:
    """``(dim, offset, total)`` of ``group_index``'s channels in ``node``'s output, if it holds them."""
    layout = node.meta.get(LAYOUT_META)
    if layout is None or layout.block != 1 or group_index not in layout.groups:
        return None
    pos = layout.groups.index(group_index)
    return layout.dim, sum(layout.sizes[:pos]), layout.channels


_RELU_FUNCTIONS = (F.relu, F.relu_, torch.relu, torch.relu_, F.relu6)
_RELU_METHODS = ("relu", "relu_")


def _is_relu_like(node: torch.fx.Node, modules: Dict[str, nn.Module]) -> bool:
    """Ops whose output is exactly zero where the channel is inactive."""
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), (nn.ReLU, nn.ReLU6))
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    if node.op == "call_method":
        return node.target in _RELU_METHODS
    return False


def _reads_tensor(node: torch.fx.Node, targets: Iterable[str], depth: int = 0) -> bool:
    """Whether ``node`` reads one of the ``get_attr`` ``targets``, directly or through a parameter
    expression (casts, a weight standardisation: nodes that carry no channels of their own)."""
    targets = set(targets)
    for arg in node.all_input_nodes:
        if arg.op == "get_attr":
            if str(arg.target) in targets:
                return True
        elif depth < 16 and arg.op in ("call_function", "call_method") and LAYOUT_META not in arg.meta \
                and _reads_tensor(arg, targets, depth + 1):
            return True
    return False


def _is_producer(node: torch.fx.Node, group: Group, modules: Iterable[str], tensors: Iterable[str]) -> bool:
    """Whether ``node`` outputs ``group``'s channels as their producer: a module in ``modules``,
    or a functional layer (``F.conv2d``, ``F.linear`` on a ``get_attr`` weight) whose ``out``
    tensor is one of ``tensors``."""
    if node.op == "call_module":
        return str(node.target) in modules
    return node.op in ("call_function", "call_method") and _reads_tensor(node, tensors)


class _Recorder(MutableArgsInterpreter):
    """Runs the graph and counts, per watched node, the zero entries of each channel."""

    def __init__(self, gm: torch.fx.GraphModule, watch: Dict[str, Tuple[int, int, bool]]) -> None:
        super().__init__(gm)
        self.watch = watch  # node name -> (dim, channels, count non-positive instead of zeros)
        self.zeros: Dict[str, torch.Tensor] = {}
        self.seen: Dict[str, int] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        spec = self.watch.get(n.name)
        if spec is not None and isinstance(out, torch.Tensor):
            dim, channels, nonpositive = spec
            if out.dim() >= -dim and out.shape[dim] == channels:
                flat = out.detach().movedim(dim, 0).reshape(channels, -1)
                hits = (flat <= 0) if nonpositive else (flat == 0)
                count = hits.sum(1, dtype=torch.float64).cpu()
                self.zeros[n.name] = self.zeros.get(n.name, torch.zeros(channels, dtype=torch.float64)) + count
                self.seen[n.name] = self.seen.get(n.name, 0) + flat.shape[1]
        return out


@register_model_criterion("apoz", needs_data=True)
def apoz(analysis: Analysis, groups: Sequence[Group], options: ScoringOptions) -> Dict[int, torch.Tensor]:
    """Average Percentage of Zeros (Hu et al., 2016): score = ``1 - APoZ``.

    The calibration inputs run through the model (eval mode, no gradients). For each group,
    the tensors watched are the outputs of the ReLU-like ops (ReLU, ReLU6, functional and
    method forms) that carry the group's channels; the APoZ of a channel at one tensor is the
    fraction of its entries (over batch and spatial positions) that are exactly zero.
    Reduction: the mean APoZ over the group's watched tensors (a residual group passes
    several ReLUs). A group whose channels pass no ReLU-like op is scored on its producers'
    outputs (modules, or functional layers such as ``F.conv2d`` on a parameter), counting the
    entries a ReLU would zero (``<= 0``). The score is a fraction in
    [0, 1], already comparable across groups; a channel that is always zero scores 0.
    """
    gm = analysis.gm
    modules = dict(gm.named_modules())
    wanted = {g.index for g in groups}
    relu_nodes: Dict[int, List[Tuple[str, int]]] = {g: [] for g in wanted}
    producer_nodes: Dict[int, List[Tuple[str, int]]] = {g: [] for g in wanted}
    producers = {g.index: set(g.modules("out")) for g in groups}
    producer_tensors = {g.index: {t.target for t in g.tensors if t.role == "out"} for g in groups}
    by_index = {g.index: g for g in groups}
    watch: Dict[str, Tuple[int, int, bool]] = {}
    for node in gm.graph.nodes:
        layout_here = node.meta.get(LAYOUT_META)
        groups_here = layout_here.groups if layout_here is not None else ()
        if not groups_here:
            continue
        relu = _is_relu_like(node, modules)
        for gi in set(groups_here) & wanted:
            pos = _channel_positions(node, gi)
            if pos is None:
                continue
            dim, offset, total = pos
            if relu:
                relu_nodes[gi].append((node.name, offset))
                watch[node.name] = (dim, total, False)
            elif _is_producer(node, by_index[gi], producers[gi], producer_tensors[gi]):
                producer_nodes[gi].append((node.name, offset))
    nodes = {n.name: n for n in gm.graph.nodes}
    for gi in wanted:
        if not relu_nodes[gi]:
            for name, _ in producer_nodes[gi]:
                pos = _channel_positions(nodes[name], gi)
                if pos is not None and name not in watch:
                    watch[name] = (pos[0], pos[2], True)

    recorder = _Recorder(gm, watch)
    flags = [(m, m.training) for m in gm.modules()]
    device = _device(gm)
    gm.eval()
    try:
        with torch.no_grad():
            for inputs, _ in _batches(options, "apoz"):
                recorder.run(*_to(inputs, device))
    finally:
        for m, mode in flags:
            m.training = mode

    out: Dict[int, torch.Tensor] = {}
    for g in groups:
        sources = relu_nodes[g.index] or producer_nodes[g.index]
        fractions = []
        for name, offset in sources:
            if name in recorder.zeros and recorder.seen[name] > 0:
                zeros = recorder.zeros[name][offset : offset + g.size]
                fractions.append(zeros / recorder.seen[name])
        if fractions:
            out[g.index] = (1.0 - torch.stack(fractions).mean(0)).float()
        else:
            out[g.index] = torch.ones(g.size)  # nothing observable: no preference
    return out


def _member_products(module: nn.Module, group: Group, member: Member) -> Optional[torch.Tensor]:
    """``sum of weight * grad`` per channel over the member's parameters (signed), or None."""
    views = (adapter_for(module) or PLAIN_LAYER).products(module, member.role)
    total = None
    start = member.offset * member.block
    for prod in views:
        rows = prod[start : start + group.size * member.block].reshape(group.size, -1).sum(1).double()
        total = rows if total is None else total + rows
    return total


def _tensor_products(gm: torch.fx.GraphModule, group: Group, member: TensorMember) -> Optional[torch.Tensor]:
    """``sum of weight * grad`` per channel over a functional layer's tensor (signed), or None.

    The tensor-member counterpart of :func:`_member_products`: a functional layer's weight,
    bias and scale count as the module form's do; buffers (running statistics) have no
    gradient, and per-channel operands are not layer tensors (nor scored by the weight criteria).
    """
    if member.role == "operand":
        return None
    p = operator.attrgetter(member.target)(gm)
    if not isinstance(p, torch.Tensor) or p.grad is None or p.dim() <= member.dim:
        return None
    prod = p.detach() * p.grad.detach()
    if member.role == "in" and member.conv_groups > 1:
        prod = grouped_inputs(prod, member.conv_groups)  # input channels spread over the conv groups
    else:
        prod = prod.movedim(member.dim, 0)
    start = member.offset * member.block
    return prod[start : start + group.size * member.block].reshape(group.size, -1).sum(1).double()


@register_model_criterion("taylor", needs_data=True)
def taylor(analysis: Analysis, groups: Sequence[Group], options: ScoringOptions) -> Dict[int, torch.Tensor]:
    """First-order Taylor expansion of the loss (Molchanov et al., 2019), per group.

    For each calibration batch, the loss (``loss_fn(output, targets)``, cross-entropy by
    default) is back-propagated through a private deep copy of the model in eval mode (the
    user's model gets no ``.grad`` and no BatchNorm update). A channel's estimate of the loss
    change when it is removed is ``|sum over every weight and bias of the group that the
    channel indexes of w * dL/dw|`` (producer rows and biases, BatchNorm scales and shifts,
    consumer columns, all signed before the absolute value; a functional layer's parameters,
    ``F.conv2d(x, self.weight)`` or timm's ``F.batch_norm``, count like the module form's). Reduction: the mean of that value
    over batches. No normalisation; a channel with zero ``w * grad`` everywhere scores 0.
    """
    loss_fn = options.loss_fn or F.cross_entropy
    work = copy.deepcopy(analysis.gm)
    work.eval()
    for p in work.parameters():
        p.requires_grad_(True)
    device = _device(work)
    modules = dict(work.named_modules())
    sums: Dict[int, torch.Tensor] = {g.index: torch.zeros(g.size, dtype=torch.float64) for g in groups}
    batches = 0
    with torch.enable_grad():
        for inputs, targets in _batches(options, "taylor"):
            if targets is None:
                raise FxPruneError("importance='taylor' needs (inputs, targets) calibration batches to compute a loss")
            work.zero_grad(set_to_none=True)
            output = work(*_to(inputs, device))
            loss = loss_fn(output, _to(targets, device))
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise FxPruneError(f"importance='taylor': loss_fn must return a scalar tensor, got {type(loss).__name__}")
            loss.backward()
            batches += 1
            for g in groups:
                acc = torch.zeros(g.size, dtype=torch.float64)
                for m in g.members:
                    prod = _member_products(modules[m.module], g, m)
                    if prod is not None:
                        acc += prod.cpu()
                for t in g.tensors:
                    prod = _tensor_products(work, g, t)
                    if prod is not None:
                        acc += prod.cpu()
                sums[g.index] += acc.abs()
    del work
    return {gi: (s / max(1, batches)).float() for gi, s in sums.items()}


# --------------------------------------------------------------------------- entry points


def _accepts_two(fn: Callable[..., Any]) -> bool:
    """Whether a user callable takes ``(group, gm)`` rather than ``(group)``."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    try:
        sig.bind(None, None)
        return True
    except TypeError:
        return False


def _clean(scores: Any, group: Group, what: str) -> torch.Tensor:
    expected = (f"it must return one score per channel, higher = keep: a tensor or sequence of "
                f"{group.size} numbers")
    if scores is None:
        raise FxPruneError(f"importance {what} returned None for group {group.key} ({group.size} channels): {expected}")
    try:
        scores = torch.as_tensor(scores)
    except (TypeError, ValueError, RuntimeError) as exc:  # strings, dicts, ragged lists, objects
        raise FxPruneError(f"importance {what} returned {type(scores).__name__} for group {group.key}, which is no "
                           f"tensor of scores ({exc}): {expected}") from exc
    if scores.is_complex() or not (scores.is_floating_point() or scores.dtype in (torch.bool, torch.uint8, torch.int8,
                                                                                    torch.int16, torch.int32, torch.int64)):
        raise FxPruneError(f"importance {what} returned a {scores.dtype} tensor for group {group.key}: {expected}")
    scores = scores.detach().float().flatten().cpu()
    if scores.numel() != group.size:
        raise FxPruneError(f"importance {what} returned {scores.numel()} scores for group {group.key} of {group.size} channels")
    # NaN scores (NaN weights) must not win: they rank lowest.
    return torch.nan_to_num(scores, nan=-float("inf"))


def score(group: Group, gm: torch.fx.GraphModule, importance: Union[str, Criterion, Callable[[Group], Any]]) -> torch.Tensor:
    """Scores of ``group``'s channels under a weight criterion (a name or a callable).

    A callable may take ``(group)`` or ``(group, gm)``.
    """
    if callable(importance):
        fn = importance
        scores = fn(group, gm) if _accepts_two(fn) else fn(group)  # type: ignore[call-arg]
        return _clean(scores, group, f"callable {criterion_name(fn)}")
    check_importance(importance)
    if importance in MODEL_CRITERIA:
        raise FxPruneError(f"importance {importance!r} scores whole models: use score_groups()")
    return _clean(CRITERIA[importance](group, gm), group, repr(importance))


def score_groups(analysis: Analysis, importance: Union[str, Callable[..., Any]], groups: Optional[Sequence[Group]] = None,
                 options: Optional[ScoringOptions] = None) -> Dict[int, torch.Tensor]:
    """Scores of every given group (default: the prunable ones), by group index.

    Weight criteria read each layer's weights through ``options.weights`` (default
    :data:`DEFAULT_WEIGHTS`).
    """
    options = options or ScoringOptions()
    if options.weights is not None and not isinstance(options.weights, Registry):
        raise FxPruneError("ScoringOptions.weights must be a table like fxprune.importance.DEFAULT_WEIGHTS "
                           f"(e.g. DEFAULT_WEIGHTS.extended({{MyLayer: view}})), got {type(options.weights).__name__}")
    if groups is None:
        groups = [g for g in analysis.groups if g.prunable]
    if isinstance(importance, str) and importance in MODEL_CRITERIA:
        if _NEEDS_DATA.get(importance) and options.calibration is None:
            raise FxPruneError(
                f"importance={importance!r} is data-driven: pass calibration= (an iterable of (inputs, targets) "
                f"batches, e.g. a DataLoader over training data; calibration_batches= limits how many are used)")
        if not groups:
            return {}
        raw = MODEL_CRITERIA[importance](analysis, groups, options)
        if not isinstance(raw, Mapping):
            raise FxPruneError(f"importance {importance!r} returned {type(raw).__name__}: a model criterion must "
                               "return {group.index: Tensor[group.size]} for every group it is given")
        out = {}
        for g in groups:
            if g.index not in raw:
                raise FxPruneError(f"importance {importance!r} returned no scores for group {g.key}")
            out[g.index] = _clean(raw[g.index], g, repr(importance))
        return out
    check_importance(importance)
    token = _CACHE.set(_NormCache())
    views = _VIEWS.set(options.weights)
    try:
        return {g.index: score(g, analysis.gm, importance) for g in groups}
    finally:
        _VIEWS.reset(views)
        _CACHE.reset(token)
