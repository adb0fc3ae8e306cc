"""Allocation: how many channels each prunable group keeps.

A :class:`Policy` says how to decide; :func:`allocate` turns it, the groups' scores and
(for targets) a :class:`CostModel` into a keep count per group. Which channels survive is
then the top of each group's scores (:func:`fxprune.planning.make_plan`).

Policies:

- ``ratio`` float: every prunable group of ``C`` channels keeps ``max(1, int(C * (1 - ratio)))``.
- ``ratio`` dict of glob patterns -> ratio: a pattern matches a group when it matches a module
  that *outputs* the group's channels (its producers, role ``out``, and the per-channel
  layers on them, role ``channelwise``: BatchNorms, depthwise convs), not the modules that
  merely consume them. So ``{"layer2.*": 0.5}`` prunes the channels layer2 makes, not the
  input columns of ``layer2.0.conv1``, which belong to layer1's group. The first matching
  pattern wins; groups no pattern matches use ``default_ratio``.
- ``global_ranking=True``: scores are normalised per group (divided by the mean absolute
  score of the group, so every group's channels average 1) and all prunable channels are
  ranked together; the best ``int(N * (1 - ratio))`` of the ``N`` prunable channels survive,
  but no group loses more than ``max_group_ratio`` of its channels.
- ``target_macs`` / ``target_params`` (fractions of the original model): the pass searches the
  most channels it can keep while meeting every target. Without global ranking it searches
  the uniform ratio (capped at ``max_group_ratio``), with it the global threshold (the number
  of channels kept). The search walks the exact steps at which keep counts change, so the
  result is within one channel-step of the target: one step less pruning would miss it.

After any policy, ``min_channels`` raises small counts and ``round_to`` rounds each pruned
group's count to the nearest multiple (see :func:`finish_count`). A group feeding a grouped
convolution also keeps a multiple of its ``blocks`` (the same count in every conv group), and a
group of whole units (GroupNorm groups, attention heads) a multiple of its ``unit``.
"""

from __future__ import annotations

import collections
import fnmatch
import math
import numbers
import operator
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .errors import FxPruneError, FxPruneWarning, InternalError, UnsupportedNodeError, describe_node, target_name
from .cost import counting
from .groups import Analysis, Group, tensor_owner
from .tracing import MutableArgsInterpreter
from .adapters import MultiheadAttentionAdapter, adapter_for, resolve_attr
from .rules import LAYOUT_META, lookup_rule, role_tensors

__all__ = [
    "Policy",
    "CostModel",
    "check_ratio",
    "keep_count",
    "finish_count",
    "count_step",
    "group_count",
    "ratio_keep_counts",
    "pattern_ratio",
    "normalise",
    "GlobalRanking",
    "allocate",
    "NOTHING_PRUNABLE",
    "NOTHING_PRUNED",
    "UNMATCHED_IGNORE",
    "requests_pruning",
    "FUNCTIONAL_LAYERS",
    "unrecognised_layers",
    "nothing_prunable_message",
    "check_prunable",
    "unpruned_message",
    "warn_unmatched_ignore",
]

RatioSpec = Union[None, float, Mapping[str, float]]
Counts = Dict[int, int]  # group index -> channels kept


def check_ratio(ratio: Any, name: str = "ratio") -> float:
    """``ratio`` as a float in [0, 1), or a ValueError naming the bad value."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise ValueError(f"{name} must be a number in [0, 1), got {ratio!r} ({type(ratio).__name__})")
    value = float(ratio)
    if math.isnan(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {ratio!r}")
    return value


def _check_target(value: Any, name: str) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(float(value)) \
            or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be a fraction of the original model in (0, 1], got {value!r}")
    return float(value)


def _check_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def keep_count(size: int, ratio: float) -> int:
    """The classic recipe: keep ``int(C * (1 - ratio))`` channels, never fewer than 1."""
    return max(1, min(size, int(size * (1.0 - ratio))))


def finish_count(size: int, n: int, round_to: int = 1, min_channels: int = 1) -> int:
    """Apply ``min_channels`` and ``round_to`` to a keep count of a group of ``size`` channels.

    - never fewer than ``min(min_channels, size)`` channels, never more than ``size``;
    - a group that is pruned at all keeps a multiple of ``round_to``: the nearest one (halves
      round up) at or above ``min_channels``, at least ``round_to`` and at most the largest
      multiple not above ``size``. A group that keeps every channel is left alone, and so is
      a group too small to hold any multiple of ``round_to`` (it keeps all its channels).
    """
    n = max(1, min(size, n), min(size, min_channels))
    if n >= size or round_to <= 1:
        return n
    hi = (size // round_to) * round_to
    lo = max(round_to, -(-min(size, min_channels) // round_to) * round_to)
    if hi < round_to or lo > hi:
        return size
    nearest = int(math.floor(n / round_to + 0.5)) * round_to
    return min(max(nearest, lo), hi)


def count_step(group: Group, round_to: int = 1) -> int:
    """The multiple a group's keep count must be: ``round_to``, and the group's constraint step.

    A group feeding a grouped convolution of G groups keeps the same number of channels in
    each of its G blocks, and a group of whole units (GroupNorm groups, heads) keeps whole
    units in each: its count is a multiple of ``blocks * unit`` as well (the least common
    multiple with ``round_to``).
    """
    step = group.constraint.step if isinstance(group, Group) else max(1, int(getattr(group, "blocks", 1) or 1))
    return round_to * step // math.gcd(round_to, step)


def group_count(group: Group, n: int, round_to: int = 1, min_channels: int = 1) -> int:
    """:func:`finish_count` for ``group``, honouring its blocks."""
    return finish_count(group.size, n, count_step(group, round_to), min_channels)


def _pruning_modules(group: Group) -> List[str]:
    """The modules that output the group's channels (what ratio patterns are matched against).

    A functional layer (``F.conv2d(x, self.weight)``, timm's ``F.batch_norm``) is named by the
    module that owns its tensor, as the module form is by its own name.
    """
    def names(roles: Tuple[str, ...]) -> List[str]:
        found = [m.module for m in group.members if m.role in roles]
        found += [tensor_owner(t.target) for t in group.tensors if t.role in roles]
        return list(dict.fromkeys(found))

    return names(("out", "channelwise")) or names(("out", "in", "channelwise"))


def pattern_ratio(group: Group, patterns: Mapping[str, float], default: float) -> float:
    """The ratio of the first pattern matching one of the group's output modules, else ``default``."""
    modules = _pruning_modules(group)
    for pattern, ratio in patterns.items():
        if any(fnmatch.fnmatchcase(name, pattern) for name in modules):
            return ratio
    return default


@dataclass
class Policy:
    """How many channels to remove; see the module docstring for each field's meaning."""

    ratio: RatioSpec = None
    default_ratio: float = 0.0
    global_ranking: bool = False
    max_group_ratio: float = 0.9
    round_to: int = 1
    min_channels: int = 1
    target_macs: Optional[float] = None
    target_params: Optional[float] = None

    @property
    def has_target(self) -> bool:
        return self.target_macs is not None or self.target_params is not None

    def validated(self) -> "Policy":
        """A checked copy (ratios as floats, dict order kept); raises ValueError/FxPruneError."""
        target_macs = _check_target(self.target_macs, "target_macs")
        target_params = _check_target(self.target_params, "target_params")
        has_target = target_macs is not None or target_params is not None
        ratio: RatioSpec
        if self.ratio is None:
            if not has_target:
                raise ValueError(
                    "a ratio or a target is required (ratio=None, the default, means none was given): give "
                    "the fraction of channels to remove from each group, e.g. fxprune.prune(model, 0.5), or a budget, e.g. fxprune.prune(model, "
                    "target_macs=0.5, example_inputs=(x,)) (target_params= likewise)")
            ratio = None
        elif isinstance(self.ratio, Mapping):
            ratio = {}
            for pattern, value in self.ratio.items():
                if not isinstance(pattern, str):
                    raise ValueError(f"ratio patterns must be strings (glob patterns on module names), got {pattern!r}")
                ratio[pattern] = check_ratio(value, f"ratio[{pattern!r}]")
            if self.global_ranking:
                raise FxPruneError("global_ranking=True ranks all groups against one ratio: give a float ratio, not a dict")
        else:
            ratio = check_ratio(self.ratio)
        if has_target and ratio is not None:
            raise FxPruneError(
                f"give either ratio= or a target (target_macs=/target_params=), not both: got ratio={self.ratio!r} "
                f"with target_macs={self.target_macs!r}, target_params={self.target_params!r}; the target search "
                "chooses the ratio")
        return replace(
            self, ratio=ratio, default_ratio=check_ratio(self.default_ratio, "default_ratio"),
            global_ranking=bool(self.global_ranking),
            max_group_ratio=check_ratio(self.max_group_ratio, "max_group_ratio"),
            round_to=_check_int(self.round_to, "round_to"), min_channels=_check_int(self.min_channels, "min_channels"),
            target_macs=target_macs, target_params=target_params)

    def to_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        if isinstance(self.ratio, Mapping):
            data["ratio"] = dict(self.ratio)
        return data


def normalise(scores: torch.Tensor) -> torch.Tensor:
    """A group's scores divided by their mean absolute (finite) value.

    Makes groups comparable for global ranking: each group's channels average 1 whatever the
    scale of its weights. A group whose finite scores are all zero scores 0 everywhere;
    ``-inf`` (NaN weights) stays ``-inf``.
    """
    finite = scores[torch.isfinite(scores)]
    mean = finite.abs().mean() if finite.numel() else torch.tensor(0.0)
    if not float(mean) > 0:
        return torch.where(torch.isfinite(scores), torch.zeros_like(scores), scores)
    return scores / mean


class GlobalRanking:
    """All prunable channels ranked together on normalised scores.

    ``counts(k)`` is how many channels each group keeps when the best ``k`` channels overall
    survive, after the ``max_group_ratio`` floor, ``min_channels`` and ``round_to``. It never
    decreases as ``k`` grows.
    """

    def __init__(self, groups: Sequence[Group], scores: Mapping[int, torch.Tensor], policy: Policy) -> None:
        self.groups = list(groups)
        self.policy = policy
        self.total = sum(g.size for g in self.groups)
        if not self.groups:
            self.ranks: Dict[int, torch.Tensor] = {}
            return
        flat = torch.cat([normalise(scores[g.index]) for g in self.groups])
        owner = torch.cat([torch.full((g.size,), i, dtype=torch.long) for i, g in enumerate(self.groups)])
        order = torch.sort(-flat, stable=True).indices  # ties: earlier group, lower channel first
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel())
        self.ranks = {g.index: torch.sort(rank[owner == i]).values for i, g in enumerate(self.groups)}
        self.floors = {g.index: keep_count(g.size, policy.max_group_ratio) for g in self.groups}

    def counts(self, k: int) -> Counts:
        k_t = torch.tensor([k])
        out = {}
        for g in self.groups:
            n = int(torch.searchsorted(self.ranks[g.index], k_t)[0])  # channels ranked < k
            n = max(n, self.floors[g.index])
            out[g.index] = group_count(g, n, self.policy.round_to, self.policy.min_channels)
        return out


def _attention_inputs(args: Sequence[Any], kwargs: Mapping[str, Any]) -> Tuple[torch.Tensor, ...]:
    """``(query, key, value)`` of a call to an attention layer (``forward(query, key, value, ...)``)."""
    names = ("query", "key", "value")
    return tuple(args[i] if i < len(args) else kwargs[n] for i, n in enumerate(names))


class _FlopRecorder(MutableArgsInterpreter):
    """Runs the graph under one FlopCounterMode and attributes the FLOPs to each node."""

    def __init__(self, gm: torch.fx.GraphModule, counter: FlopCounterMode) -> None:
        super().__init__(gm)
        self.counter = counter
        self.flops: Dict[str, int] = {}
        self.attention: Dict[str, Tuple[torch.Tensor, ...]] = {}  # an attention layer's (query, key, value)

    def run_node(self, n: torch.fx.Node) -> Any:
        before = self.counter.get_total_flops()
        if n.op == "call_module" and isinstance(adapter_for(self.module.get_submodule(str(n.target))),
                                                 MultiheadAttentionAdapter):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            self.attention[n.name] = _attention_inputs(args, kwargs)
        out = super().run_node(n)
        spent = self.counter.get_total_flops() - before
        if spent:
            self.flops[n.name] = int(spent)
        return out


class CostModel:
    """Predicts the MACs and parameters left after pruning, from keep counts alone.

    Built once per analysed model. MACs: the model runs once on ``example_inputs`` under
    :class:`torch.utils.flop_counter.FlopCounterMode` (the same count as
    :func:`fxprune.cost.count_macs`, functional ops included) with the FLOPs attributed to
    each fx node. A node's MACs scale with the kept fraction of every distinct channel layout
    it reads or writes (a conv: input x output channels; a depthwise conv, whose input and
    output are the same group: once; a Linear after a flatten: its input groups). Parameters:
    each weight or bias scales with the kept fraction of each module dimension (slot) that
    indexes it. Both are exact for the convolutions, Linears and BatchNorms the rewrite
    slices; the pass still measures the rebuilt model when it checks a target.
    """

    def __init__(self, analysis: Analysis, example_inputs: Optional[Sequence[Any]] = None) -> None:
        self.sizes = {g.index: g.size for g in analysis.groups}
        gm = analysis.gm
        self.base_params = int(sum(p.numel() for p in gm.parameters()))
        # (numel, [segments of each slot indexing it])
        self._param_terms: List[Tuple[int, List[Tuple[Tuple[int, int], ...]]]] = []
        by_module: Dict[str, Dict[str, Any]] = {}
        counted: set = set()  # ids of the parameters already in a term (a tied one counts once)
        for (module, role), slot in analysis.slots.items():
            by_module.setdefault(module, {})[role] = slot
        for module_name, slots in by_module.items():
            module = gm.get_submodule(module_name)
            # Each parameter the layer's roles index (its adapter names them: a packed attention
            # projection as well as a conv's weight), scaled by every slot that indexes it.
            indexing: Dict[str, List[Tuple[Tuple[int, int], ...]]] = {}
            for role, pairs in role_tensors(module).items():
                if role in slots:
                    for name, _ in pairs:
                        indexing.setdefault(name, []).append(slots[role].segments)
            for name, segs in indexing.items():
                p = resolve_attr(module, name)
                if isinstance(p, nn.Parameter) and id(p) not in counted:
                    counted.add(id(p))
                    self._param_terms.append((p.numel(), segs))
        # Parameters the graph reads directly (a functional layer's weight, a layer scale, a
        # class token): one slot per dim the channels index.
        for target, tensor_slots in analysis.tensors.items():
            p = resolve_attr(gm, target)
            if isinstance(p, nn.Parameter) and id(p) not in counted:
                counted.add(id(p))
                self._param_terms.append((p.numel(), [slot.segments for slot in tensor_slots]))
        self.base_macs: Optional[int] = None
        self._mac_terms: List[Tuple[float, List[Tuple[Tuple[int, ...], Tuple[int, ...]]]]] = []
        if example_inputs is not None:
            self._measure_macs(analysis, example_inputs)

    def _measure_macs(self, analysis: Analysis, example_inputs: Sequence[Any]) -> None:
        gm = analysis.gm
        flags = [(m, m.training) for m in gm.modules()]
        gm.eval()
        try:
            with counting() as counter:
                recorder = _FlopRecorder(gm, counter)
                recorder.run(*example_inputs)
        except Exception as exc:
            raise FxPruneError(
                f"counting MACs on example_inputs failed: {type(exc).__name__}: {exc}. "
                "Hint: example_inputs must be a tuple of tensors the model's forward accepts") from exc
        finally:
            for m, mode in flags:
                m.training = mode
        total = 0
        nodes = {n.name: n for n in gm.graph.nodes}
        for name, flops in recorder.flops.items():
            node = nodes[name]
            layouts: Dict[Tuple[int, ...], Tuple[int, ...]] = {}
            for src in [node, *node.all_input_nodes]:
                layout = src.meta.get(LAYOUT_META)
                if layout is not None and layout.groups:
                    layouts.setdefault(tuple(layout.groups), tuple(layout.sizes))
            macs = flops / 2.0
            total += flops
            parts = self._attention_terms(analysis, node, macs, recorder.attention.get(name))
            if parts is not None:
                self._mac_terms.extend(parts)
                continue
            self._mac_terms.append((macs, list(layouts.items())))
        self.base_macs = total // 2

    @staticmethod
    def _attention_terms(analysis: Analysis, node: torch.fx.Node, macs: float, inputs: Optional[Tuple[torch.Tensor, ...]]
                         ) -> Optional[List[Tuple[float, List[Tuple[Tuple[int, ...], Tuple[int, ...]]]]]]:
        """An attention layer's MACs as three terms: projections in (inputs x heads), out (heads x outputs)
        and the attention itself (heads alone); None if it is not one or its parts do not add up."""
        if inputs is None:
            return None
        module = analysis.gm.get_submodule(str(node.target))
        adapter = adapter_for(module)
        if not isinstance(adapter, MultiheadAttentionAdapter):
            return None

        def layout(role: str) -> List[Tuple[Tuple[int, ...], Tuple[int, ...]]]:
            slot = analysis.slots.get((str(node.target), role))
            return [] if slot is None else [(tuple(g for g, _ in slot.segments), tuple(n for _, n in slot.segments))]

        proj_in, proj_out = adapter.projection_macs(module, *inputs)
        core = macs - proj_in - proj_out
        if core < 0:
            return None
        heads = layout("channelwise")
        return [(float(proj_in), layout("in") + heads), (float(proj_out), heads + layout("out")), (core, heads)]

    def _kept(self, counts: Mapping[int, int], groups: Sequence[int], sizes: Sequence[int]) -> float:
        whole = sum(sizes)
        if whole == 0:
            return 1.0
        return sum(counts.get(g, s) for g, s in zip(groups, sizes)) / whole

    def params(self, counts: Mapping[int, int]) -> int:
        """Parameters left when each group keeps ``counts[index]`` channels (others: all)."""
        removed = 0.0
        for numel, slots in self._param_terms:
            f = 1.0
            for segments in slots:
                f *= self._kept(counts, [g for g, _ in segments], [s for _, s in segments])
            removed += numel * (1.0 - f)
        return int(round(self.base_params - removed))

    def macs(self, counts: Mapping[int, int]) -> int:
        """MACs left (for the example inputs' batch) under ``counts``."""
        if self.base_macs is None:
            raise FxPruneError("MACs need example_inputs=(x,): a tensor batch the model's forward accepts")
        left = 0.0
        for macs, layouts in self._mac_terms:
            f = 1.0
            for groups, sizes in layouts:
                f *= self._kept(counts, groups, sizes)
            left += macs * f
        return int(round(left))

    def measure(self, counts: Mapping[int, int]) -> Dict[str, int]:
        out = {"params": self.params(counts)}
        if self.base_macs is not None:
            out["macs"] = self.macs(counts)
        return out


Measure = Callable[[Mapping[int, int]], Mapping[str, int]]


def ratio_keep_counts(groups: Sequence[Group], policy: Policy, ratio_of: Callable[[Group], float]) -> Counts:
    """Keep counts of ratio pruning: each group keeps ``keep_count(size, ratio_of(group))``, finished
    under ``round_to``, its blocks and ``min_channels`` (what ``prune(ratio=...)`` keeps).

    >>> import torch
    >>> from torch import nn
    >>> from fxprune.groups import analyze
    >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 3)))
    >>> groups = [g for g in analyze(gm).groups if g.prunable]
    >>> list(ratio_keep_counts(groups, Policy(ratio=0.3, round_to=4).validated(), lambda g: 0.3).values())  # 11.2 -> 12
    [12]
    """
    return {g.index: group_count(g, keep_count(g.size, ratio_of(g)), policy.round_to, policy.min_channels)
            for g in groups}


def _uniform_candidates(groups: Sequence[Group], cap: float) -> List[float]:
    """One ratio inside each interval over which every group's ``keep_count`` is constant.

    ``keep_count(C, r)`` changes where ``C * (1 - r)`` crosses an integer, i.e. at
    ``r = 1 - j / C``; the midpoints between consecutive breakpoints (plus 0 and ``cap``)
    visit every distinct allocation up to ``cap``, in order of increasing pruning.
    """
    points = {0.0}
    for g in groups:
        for j in range(1, g.size):
            r = 1.0 - j / g.size
            if 0.0 < r <= cap:
                points.add(r)
    ordered = sorted(points)
    candidates = {0.0, cap}
    candidates.update((a + b) / 2.0 for a, b in zip(ordered, ordered[1:]))
    return sorted(candidates)


def _targets(policy: Policy, base: Mapping[str, Optional[int]]) -> Dict[str, float]:
    out = {}
    if policy.target_macs is not None:
        if base.get("macs") is None:
            raise FxPruneError("target_macs needs example_inputs=(x,) to count MACs (a batch the model accepts)")
        out["macs"] = policy.target_macs * float(base["macs"])  # type: ignore[arg-type]
    if policy.target_params is not None:
        out["params"] = policy.target_params * float(base["params"])  # type: ignore[arg-type]
    return out


def _feasible(cost: Mapping[str, int], limits: Mapping[str, float]) -> bool:
    return all(cost[k] <= limits[k] * (1 + 1e-12) for k in limits)


def allocate(analysis: Analysis, policy: Policy, scores: Optional[Mapping[int, torch.Tensor]] = None,
             cost: Optional[CostModel] = None, measure: Optional[Measure] = None,
             base: Optional[Mapping[str, Optional[int]]] = None) -> Tuple[Counts, Dict[str, Any]]:
    """Keep counts for every prunable group under ``policy``, and what the search found.

    ``scores`` (per group index) are needed for global ranking. For targets, ``measure``
    (counts -> {"macs", "params"}) defaults to ``cost``'s prediction and ``base`` to the
    cost model's original counts.
    """
    policy = policy.validated()  # public: a hand-made Policy gets the same checks as prune()'s
    groups = [g for g in analysis.groups if g.prunable]
    info: Dict[str, Any] = {}

    if not policy.has_target and policy.ratio == 0.0:
        return {g.index: g.size for g in groups}, info  # nothing to remove, nothing to score
    ranking: Optional[GlobalRanking] = None
    if policy.global_ranking:
        if scores is None:
            if groups:  # the pass always scores first: only a direct caller can get here
                raise FxPruneError("allocate() with global_ranking=True needs scores= (group index -> Tensor[size], "
                                   "e.g. fxprune.importance.score_groups(analysis, 'l1'))")
            scores = {}  # no prunable group: nothing to rank (the caller explains why)
        ranking = GlobalRanking(groups, scores, policy)

    if not policy.has_target:
        if ranking is not None:
            if not isinstance(policy.ratio, float):
                raise InternalError(f"global ranking reached allocation with ratio {policy.ratio!r}, not a float")
            k = int(ranking.total * (1.0 - policy.ratio))
            info["kept_channels"] = k
            return ranking.counts(k), info
        if isinstance(policy.ratio, Mapping):
            patterns = policy.ratio
            _warn_unmatched(analysis, patterns)
            return ratio_keep_counts(groups, policy, lambda g: pattern_ratio(g, patterns, policy.default_ratio)), info
        ratio = float(policy.ratio or 0.0)
        return ratio_keep_counts(groups, policy, lambda g: ratio), info

    # allocate() is public: a caller leaving out what a target search needs made a usage
    # mistake, not fxprune (the pass itself always passes a cost model).
    if measure is None:
        if cost is None:
            raise FxPruneError("allocate() with target_macs/target_params needs cost=CostModel(analysis, example_inputs) "
                               "or measure= (counts -> {'macs': ..., 'params': ...})")
        measure = cost.measure
    if base is None:
        if cost is None:
            raise FxPruneError("allocate() with a target and measure= also needs base= (the original {'macs', 'params'}) "
                               "or cost=CostModel(...)")
        base = {"macs": cost.base_macs, "params": cost.base_params}
    limits = _targets(policy, base)

    cache: Dict[Tuple[Tuple[int, int], ...], bool] = {}

    def ok(counts: Counts) -> bool:
        key = tuple(sorted(counts.items()))
        if key not in cache:
            cache[key] = _feasible(measure(counts), limits)  # type: ignore[misc]
        return cache[key]

    if ranking is not None:
        lo, hi = 0, ranking.total
        if ok(ranking.counts(hi)):
            lo = hi
        elif not ok(ranking.counts(lo)):
            _unreachable(analysis, policy, limits, base, measure(ranking.counts(lo)), "global")
        else:
            while hi - lo > 1:  # invariant: lo meets the targets, hi does not
                mid = (lo + hi) // 2
                if ok(ranking.counts(mid)):
                    lo = mid
                else:
                    hi = mid
        counts = ranking.counts(lo)
        info.update(kept_channels=lo, prunable_channels=ranking.total, search="global threshold")
    else:
        candidates = _uniform_candidates(groups, policy.max_group_ratio)
        at = lambda i: ratio_keep_counts(groups, policy, lambda g: candidates[i])  # noqa: E731
        lo, hi = 0, len(candidates) - 1
        if ok(at(lo)):
            hi = lo
        elif not ok(at(hi)):
            _unreachable(analysis, policy, limits, base, measure(at(hi)), "uniform")
        else:
            while hi - lo > 1:  # invariant: hi meets the targets, lo does not
                mid = (lo + hi) // 2
                if ok(at(mid)):
                    hi = mid
                else:
                    lo = mid
        counts = at(hi)
        info.update(ratio=candidates[hi], search="uniform ratio")
    return counts, info


def _unreachable(analysis: Analysis, policy: Policy, limits: Mapping[str, float], base: Mapping[str, Optional[int]],
                 best: Mapping[str, int], mode: str) -> None:
    parts = []
    for key in limits:
        parts.append(f"{key} {best[key] / float(base[key] or 1):.4f} of the original (target "  # type: ignore[index]
                     f"{getattr(policy, 'target_' + key)})")
    if not any(g.prunable for g in analysis.groups):
        raise FxPruneError(f"the target cannot be met: {nothing_prunable_message(analysis)}")
    raise FxPruneError(
        f"the target cannot be met: pruning every prunable group by max_group_ratio={policy.max_group_ratio} "
        f"({mode} allocation) still leaves {', '.join(parts)}. Frozen groups and layers fxprune cannot prune keep "
        "their cost; raise max_group_ratio, relax the target, or reduce ignore=")


def _warn_unmatched(analysis: Analysis, patterns: Mapping[str, float]) -> None:
    names = {m.module for g in analysis.groups for m in g.members}
    names |= {tensor_owner(t.target) for g in analysis.groups for t in g.tensors if t.role != "operand"}
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            warnings.warn(FxPruneWarning(f"ratio pattern {pattern!r} matches no module of the model"), stacklevel=5)


# --------------------------------------------------------------------------- never silent
#
# A pass that returns the model unchanged looks exactly like one that worked. Whenever nothing
# can be or was pruned, the user is told why, in words that point at the cause.

NOTHING_PRUNABLE = "nothing could be pruned"  # every message about a model with no prunable group starts so
NOTHING_PRUNED = "nothing was pruned"  # ... and about prunable groups the options left whole
UNMATCHED_IGNORE = "ignore pattern"  # ... and about an ignore= entry that names no module


def requests_pruning(policy: Policy) -> bool:
    """Whether ``policy`` asks for any channel to go (a ratio above 0 somewhere, or a target)."""
    if policy.has_target:
        return True
    if isinstance(policy.ratio, Mapping):
        return any(float(v) > 0 for v in policy.ratio.values()) or policy.default_ratio > 0
    return bool(policy.ratio)


def _functional_layers() -> FrozenSet[Any]:
    """Layer ops that, called as functions, compute channels fxprune does not track.

    A subclass of ``nn.Conv2d``/``nn.BatchNorm2d``/``nn.Linear`` that overrides ``forward`` is
    not a leaf for torch.fx, so its trace shows these calls instead of the module.
    """
    names = ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
             "linear", "bilinear", "batch_norm", "layer_norm", "group_norm", "instance_norm", "embedding", "prelu")
    found: set = set()
    for space in (torch, F, torch._C._nn):
        for name in names:
            fn = getattr(space, name, None)
            if fn is not None:
                found.add(fn)
    found.add(torch.addmm)
    return frozenset(found)


FUNCTIONAL_LAYERS = _functional_layers()


def unrecognised_layers(analysis: Analysis) -> List[torch.fx.Node]:
    """Nodes that hold a layer's weights but no rule: functional layer calls and unknown modules with parameters.

    Their output channels are never tracked, so they are pruned by no group (and one whose
    input comes straight from the model's input is not even frozen with a warning).
    """
    gm = analysis.gm
    modules = dict(gm.named_modules())
    found = []
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method"):
            if lookup_rule(node, None, analysis.rules) is not None:
                continue
            try:
                layer = node.op == "call_function" and node.target in FUNCTIONAL_LAYERS
            except TypeError:  # an unhashable target is no layer op
                layer = False
            # Any other op without a rule that computes with a parameter (x @ self.weight) is a
            # layer written by hand.
            if layer or any(_is_parameter(gm, n) for n in node.all_input_nodes):
                found.append(node)
        elif node.op == "call_module":
            module = modules.get(str(node.target))
            if module is not None and lookup_rule(node, module, analysis.rules) is None and any(True for _ in module.parameters()):
                found.append(node)
    return found


def _is_parameter(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op != "get_attr":
        return False
    try:
        return isinstance(operator.attrgetter(str(node.target))(gm), nn.Parameter)
    except AttributeError:
        return False


def _where(node: torch.fx.Node) -> str:
    """``torch.conv2d at file.py:12 in forward: ...`` for a hint."""
    text = describe_node(node)
    name = target_name(node)
    marker = f"target={name}) at "
    if marker in text:
        return f"{name} at {text.split(marker, 1)[1]}"
    return text


def _layer_hint(nodes: Sequence[torch.fx.Node], gm: torch.fx.GraphModule) -> List[str]:
    hints = []
    functional = [n for n in nodes if n.op != "call_module"]
    if functional:
        shown = "; ".join(_where(n) for n in functional[:3])
        more = f" (and {len(functional) - 3} more)" if len(functional) > 3 else ""
        hints.append(
            f"layers called functionally are not pruned: {shown}{more}. Call the layer module itself "
            "(nn.Conv2d, nn.Linear, nn.BatchNorm2d: a subclass that overrides forward is traced through to "
            "these calls), or trace such layers as leaf modules and teach fxprune their channels with "
            "fxprune.register_rule and fxprune.register_builder")
    modules = [n for n in nodes if n.op == "call_module"]
    if modules:
        shown = ", ".join(f"{n.target} ({type(gm.get_submodule(str(n.target))).__name__})" for n in modules[:3])
        more = f" (and {len(modules) - 3} more)" if len(modules) > 3 else ""
        hints.append(f"modules with weights but no channel rule: {shown}{more}; teach fxprune their channels "
                     "with fxprune.register_rule and fxprune.register_builder")
    return hints


def nothing_prunable_message(analysis: Analysis) -> str:
    """Why no group of ``analysis`` can be pruned: the commonest freezing reasons and a hint."""
    groups = analysis.groups
    name = analysis.gm.__class__.__name__
    if not groups:
        head = (f"{NOTHING_PRUNABLE}: fxprune found no channel group in {name} (it prunes the channels of "
                "nn.Conv*d, nn.ConvTranspose*d and nn.Linear modules, and of the layers their outputs pass)")
    else:
        head = f"{NOTHING_PRUNABLE}: none of the {len(groups)} channel groups of {name} is prunable"
    counts: "collections.Counter[str]" = collections.Counter()
    for g in groups:
        for why in (g.reasons if g.frozen else ("one channel",)):
            counts[why] += 1
    parts = [head]
    if counts:
        top = counts.most_common(5)
        text = "; ".join(f"{why} ({n} group{'s' if n > 1 else ''})" for why, n in top)
        more = f"; and {len(counts) - 5} other reasons" if len(counts) > 5 else ""
        parts.append(f"why: {text}{more}")
    hints = _layer_hint(unrecognised_layers(analysis), analysis.gm)
    if not hints and counts and all(why.startswith("reaches the model output") or why == "one channel" for why in counts):
        hints.append("the model's outputs keep their channels, so a model with no hidden layer between "
                     "two layers fxprune knows has nothing to prune")
    if any(why.startswith("ignored module") for why in counts):
        hints.append("reduce ignore=")
    if any(why.startswith("no channel rule") for why in counts):
        hints.append("teach fxprune the ops above with fxprune.register_rule, or list their modules in ignore=")
    text = ". ".join(parts)
    return f"{text}. Hint: {'; '.join(hints)}" if hints else text


def check_prunable(analysis: Analysis, *, strict: bool = False, stacklevel: int = 2) -> bool:
    """Warn (``strict``: raise on an unrecognised layer) when no group can be pruned; True if some can."""
    if any(g.prunable for g in analysis.groups):
        return True
    if strict:
        layers = unrecognised_layers(analysis)
        if layers:
            node = layers[0]
            what = (f"module {node.target} has weights but no channel rule" if node.op == "call_module"
                    else f"{target_name(node)} is a layer called functionally")
            raise UnsupportedNodeError(
                node, f"{NOTHING_PRUNABLE} and {what}, whose channels fxprune does not track",
                "; ".join(_layer_hint(layers, analysis.gm)) + "; or call with strict=False to get the model back unpruned")
    warnings.warn(FxPruneWarning(nothing_prunable_message(analysis)), stacklevel=stacklevel + 1)
    return False


def unpruned_message(analysis: Analysis, policy: Policy) -> str:
    """Why a ratio that asked for pruning left every prunable group whole (round_to, min_channels, patterns)."""
    prunable = [g for g in analysis.groups if g.prunable]
    largest = max((g.size for g in prunable), default=0)
    if isinstance(policy.ratio, Mapping):
        patterns = policy.ratio
        ratio_of: Callable[[Group], float] = lambda g: pattern_ratio(g, patterns, policy.default_ratio)  # noqa: E731
    else:
        fixed = float(policy.ratio or 0.0)
        ratio_of = lambda g: fixed  # noqa: E731
    would = [g for g in prunable if keep_count(g.size, ratio_of(g)) < g.size]
    if not would and not isinstance(policy.ratio, Mapping):
        return (f"{NOTHING_PRUNED}: ratio={policy.ratio!r} is too small to remove a channel from any group (the "
                f"largest has {largest} channels and keeps int({largest} * (1 - ratio)) = "
                f"{keep_count(largest, ratio_of(prunable[0]))} of them). Hint: raise the ratio")
    if not would:
        outputs = sorted({name for g in prunable for name in _pruning_modules(g)})
        return (f"{NOTHING_PRUNED}: no ratio pattern of {list(policy.ratio or ())} gives a prunable group a ratio "
                f"above 0 (default_ratio={policy.default_ratio}). A pattern matches the modules that output a "
                f"group's channels; the prunable groups are output by {outputs[:8]}")
    parts = []
    if policy.global_ranking and all(keep_count(g.size, policy.max_group_ratio) >= g.size for g in prunable):
        parts.append(f"max_group_ratio={policy.max_group_ratio} lets no group of global ranking lose a channel "
                     f"(the largest has {largest} channels)")
    if policy.min_channels >= largest:
        parts.append(f"min_channels={policy.min_channels} is at least the size of every prunable group "
                     f"(the largest has {largest} channels)")
    if policy.round_to > largest:
        parts.append(f"round_to={policy.round_to} is larger than every prunable group (the largest has "
                     f"{largest} channels), so none can keep a smaller multiple of it")
    if not parts:
        g = max(would, key=lambda g: g.size)
        raw = keep_count(g.size, ratio_of(g))
        step = count_step(g, policy.round_to)
        parts.append(f"round_to={policy.round_to} and min_channels={policy.min_channels} round every group's keep "
                     f"count back up to all of its channels (group {g.key}: ratio {ratio_of(g)} would keep {raw} of "
                     f"{g.size}, a multiple of {step} at or above min_channels leaves all {g.size})")
    return (f"{NOTHING_PRUNED}: {'; '.join(parts)}. Hint: lower round_to= or min_channels=, raise the ratio"
            + (" or max_group_ratio=" if policy.global_ranking else ""))


def warn_unmatched_ignore(analysis: Analysis, patterns: Sequence[str], stacklevel: int = 2) -> None:
    """Warn about each ``ignore=`` entry that protects nothing: it names no module, or none with channels.

    ``ignore`` freezes the groups of the layers it names; a typo, or the name of a container
    (``"layer4"`` rather than ``"layer4.*"``), would otherwise leave everything prunable without a word.
    """
    names = [name for name, _ in analysis.gm.named_modules() if name]
    layers = sorted({m.module for g in analysis.groups for m in g.members}
                    # a functional layer is named by the module owning its tensors (ignore= matches that too)
                    | {t.target.rpartition(".")[0] or t.target for g in analysis.groups for t in g.tensors}
                    | {t.target for g in analysis.groups for t in g.tensors})
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(n, pattern) for n in layers):
            continue
        named = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if named:
            inside = [n for n in layers if any(n.startswith(c + ".") for c in named)]
            hint = f"; to keep the layers inside, use {pattern + '.*'!r}" if inside else ""
            text = (f"names {named[:5]}, which hold no channels fxprune prunes, so it keeps nothing unpruned{hint} "
                    f"(layers with channels look like {(inside or layers)[:5]})")
        else:
            text = (f"matches no module of the model, so it keeps nothing unpruned (module names look like "
                    f"{(layers or names)[:5]}; patterns are fnmatch globs on the names of model.named_modules())")
        warnings.warn(FxPruneWarning(f"{UNMATCHED_IGNORE} {pattern!r} {text}"), stacklevel=stacklevel + 1)
