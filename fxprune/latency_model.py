"""Pruning to a measured latency: per-layer cost tables, a noise-tolerant search, verification.

MACs predict latency badly (irregular channel counts, depthwise layers, low utilisation), so a
latency target is met by *measuring* on the device the model will run on:

1. **Layers at their real shapes.** Every convolution and Linear of the analysed graph is a
   :class:`LayerShape`: its configuration and the input shape shape propagation recorded (the
   batch replaced by the deployment's), with the channel groups its input and output
   dimensions belong to. Layers with the same configuration share measurements.
2. **A cost table** (:class:`CostTable`): milliseconds per ``(layer, in channels, out
   channels)``, measured by a :data:`Prober` (default :class:`KernelProber`: fresh layers of
   those sizes timed with :class:`torch.utils.benchmark.Timer`, which synchronises CUDA, after
   warm-up, round-robin over a chunk of probes so that load changes hit them alike, the
   median of the rounds kept). A coarse grid of channel counts per layer is measured up front;
   counts between grid points are interpolated (bilinear), counts the search wants to decide on
   exactly (hardware-friendly rounding) are measured exactly. Caching is an injected
   :class:`CostStore` keyed by device name, dtype, threads and torch version (the shapes are in
   each entry's key); :class:`MemoryStore` is the default, ``fxprune.workflow.latency_store``
   keeps tables in JSON files.
3. **Whole-model correction** (:class:`LatencyModel`): the layers alone never add up to the
   model (norms, activations, additions, pooling, framework overhead). The original model is
   measured whole, and the difference is carried as a term that scales with the layers' output
   activations (the elementwise work that follows them); if the layers alone measure more than
   the model, they are scaled down instead.
4. **Search** (:func:`search_counts`): from the unpruned model, greedy decrements of one
   group's count by its step (``round_to``, grouped-conv blocks), ranked by importance lost per
   millisecond saved. Costs are noisy and not monotone (a count of 61 can be slower than 64), so
   each group's next move is the best of several look-ahead steps, and a move that saves
   nothing is never taken. Every constraint the planner enforces holds: ``round_to``, blocks,
   ``min_channels``, ``max_group_ratio``.
5. **Hardware-friendly counts** (:func:`refine_counts`): for each pruned group, the multiples
   of each of :data:`ROUND_CANDIDATES` next to the searched count are measured exactly with the
   layers it feeds and reads; the largest count measured no slower than the searched one wins,
   and the multiple it is of is recorded (``round_to`` chosen per group by measurement, not a
   fixed constant).
6. **Verification** (:func:`prune_to_latency`): the built model is timed against the original
   interleaved (:func:`fxprune.measure_latency`); if it misses the target, the whole-model
   correction is refitted on that measurement (:meth:`LatencyModel.correct`) and the search runs
   again from the goal, or, where that one-point refit says the goal is out of reach, the goal
   is lowered by the measured shortfall (backing off), a few tries at most. A met model that
   leaves much of the target unused (measured 0.28 for 0.5) **gives capacity back**: a
   bracketing search between the tried models (predicted vs measured) aims just under the
   target; of the tries that meet the target, the one keeping the most MACs is returned. A
   target that cannot be met raises :class:`fxprune.FxPruneError` naming the best reached;
   a model slower than the original is never returned.

The core knows nothing of files: stores are objects handed in.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Protocol, Sequence, Tuple

import torch
import torch.fx
from torch import nn

from .allocation import Policy, count_step, group_count, keep_count, normalise, ratio_keep_counts
from .cost import count_macs
from .errors import FxPruneError, InternalError
from .groups import Analysis, Group, Slot
from .importance import ScoringOptions, score_groups
from .planning import PruningPlan, make_plan
from .rewrite import rewrite
from .latency import MODES, LatencyResult, device_description, measure_latency
from .tracing import node_shape

__all__ = [
    "LatencyTarget",
    "LatencyOptions",
    "LayerShape",
    "Probe",
    "Prober",
    "CostTable",
    "CostStore",
    "MemoryStore",
    "KernelProber",
    "LatencyModel",
    "SearchResult",
    "layer_shapes",
    "search_counts",
    "uniform_counts",
    "capacity_counts",
    "refine_counts",
    "prune_to_latency",
    "plan_for_latency",
    "table_key",
    "key_digest",
    "ROUND_CANDIDATES",
    "GRID_FRACTIONS",
    "LATENCY_METHOD",
]

logger = logging.getLogger("fxprune.latency")

#: The multiples a pruned group's count may be rounded to; which one is chosen per group by measurement.
ROUND_CANDIDATES = (1, 4, 8, 16, 32)
#: Fractions of a layer dimension measured up front (the rest is interpolated).
GRID_FRACTIONS = (1.0, 0.85, 0.7, 0.55, 0.4, 0.25, 0.1)
#: What ``plan.policy["latency"]["method"]`` says, besides the measurement's own description.
LATENCY_METHOD = ("per-layer cost table (conv/linear at the model's shapes, torch.utils.benchmark, interleaved, "
                  "median) + whole-model correction; greedy per-group decrements by importance lost per ms saved; "
                  "uniform and capacity (uniform with channels moved to where a MAC costs less time) candidates; "
                  "per-group round_to from {1,4,8,16,32} by measurement; verified against the original interleaved")
_TABLE_FORMAT = 1
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_EPS_MS = 1e-9


# --------------------------------------------------------------------------- targets and options


@dataclass(frozen=True)
class LatencyTarget:
    """What to reach: a fraction of the original's measured latency, or milliseconds (one of them)."""

    fraction: Optional[float] = None
    ms: Optional[float] = None

    def validated(self) -> "LatencyTarget":
        if (self.fraction is None) == (self.ms is None):
            raise FxPruneError("give one of target_latency= (a fraction of the original's measured latency) "
                               "or target_latency_ms= (milliseconds), not both and not neither")
        if self.fraction is not None:
            if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) \
                    or not math.isfinite(self.fraction) or not 0.0 < float(self.fraction) < 1.0:
                raise FxPruneError(f"target_latency must be a fraction of the original's latency in (0, 1), got "
                                   f"{self.fraction!r}; hint: target_latency=0.5 asks for half the latency")
            return LatencyTarget(fraction=float(self.fraction))
        if isinstance(self.ms, bool) or not isinstance(self.ms, (int, float)) or not math.isfinite(self.ms) \
                or not float(self.ms) > 0:
            raise FxPruneError(f"target_latency_ms must be a positive number of milliseconds, got {self.ms!r}")
        return LatencyTarget(ms=float(self.ms))

    def goal_ms(self, base_ms: float) -> float:
        return self.fraction * base_ms if self.fraction is not None else float(self.ms)  # type: ignore[operator]

    def describe(self) -> str:
        return f"target_latency={self.fraction:g}" if self.fraction is not None else f"target_latency_ms={self.ms:g}"


@dataclass
class LatencyOptions:
    """How the latency search measures (every field has a sensible default).

    ``rounds``/``warmup``/``min_sample_s``: of the whole-model measurements
    (:func:`fxprune.measure_latency`); ``probe_rounds``/``probe_warmup``/``probe_sample_s``: of
    each layer probe. ``threads``: torch intra-op threads while timing (default 1 on CPU, the
    current count on CUDA). ``dtype``/``channels_last``: the deployment's precision and layout.
    ``grid``: the fractions of each layer dimension measured up front. ``max_tries``: built
    models verified before giving up. ``give_back``: further tries that give capacity back when
    the met model leaves more than ``overshoot`` of the target's latency unused (0.1: measured
    under 0.45 for a target of 0.5); 0 turns it off. ``margin``: how far under the target a
    give-back try must measure to count as met, both its median (by that share of the target)
    and its upper quartile (at all): the search stops short of the edge, where a re-measurement
    misses the target about half the time. ``uniform_tries``: measured tries of the uniform
    candidate (every group keeping the same share, aimed just under the target), made only when it
    keeps more MACs than the best met model so far; the more capacity wins, so a latency target
    never returns less than uniform pruning was measured to keep at the target; 0 turns it off.
    ``capacity_tries``: measured tries of the capacity candidate (:func:`capacity_counts`: the
    uniform candidate with channels moved to where a MAC costs less time), on the same terms;
    0 turns it off. ``store``: where cost tables are cached (default: a fresh
    :class:`MemoryStore`). ``prober``: replaces the kernel timer (tests inject a synthetic cost
    table). ``timer``: the clock of the whole-model measurements; ``measure``: replaces them
    altogether (``{name: model} -> LatencyResult``, the first the reference; tests use a
    synthetic one). ``progress``: called with what is happening.
    """

    rounds: int = 10
    warmup: int = 3
    min_sample_s: float = 0.02
    probe_rounds: int = 5
    probe_warmup: int = 2
    probe_sample_s: float = 0.005
    threads: Optional[int] = None
    dtype: Optional[torch.dtype] = None
    channels_last: bool = False
    grid: Sequence[float] = GRID_FRACTIONS
    max_tries: int = 4
    give_back: int = 3
    overshoot: float = 0.1
    margin: float = 0.03
    uniform_tries: int = 2
    capacity_tries: int = 2
    store: Optional["CostStore"] = None
    prober: Optional["Prober"] = None
    timer: Optional[Callable[[], float]] = None
    measure: Optional[Callable[[Dict[str, nn.Module]], LatencyResult]] = None
    progress: Optional[Callable[[str], None]] = None

    def validated(self) -> "LatencyOptions":
        for name, low in (("rounds", 1), ("warmup", 0), ("probe_rounds", 1), ("probe_warmup", 0), ("max_tries", 1),
                          ("give_back", 0), ("uniform_tries", 0), ("capacity_tries", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise FxPruneError(f"latency option {name} must be an integer >= {low}, got {value!r}")
        if isinstance(self.overshoot, bool) or not isinstance(self.overshoot, (int, float)) \
                or not 0.0 < float(self.overshoot) < 1.0:
            raise FxPruneError(f"latency option overshoot must be a fraction in (0, 1), got {self.overshoot!r}")
        if isinstance(self.margin, bool) or not isinstance(self.margin, (int, float)) \
                or not 0.0 <= float(self.margin) < float(self.overshoot) / 2:
            raise FxPruneError(f"latency option margin must be a fraction in [0, overshoot / 2), got {self.margin!r}")
        if not self.grid or any(not (isinstance(f, (int, float)) and 0 < f <= 1) for f in self.grid):
            raise FxPruneError(f"latency option grid must be fractions in (0, 1], got {list(self.grid)!r}")
        return self


# --------------------------------------------------------------------------- layers at real shapes


@dataclass(frozen=True)
class LayerShape:
    """One convolution or Linear of the model at its real input shape, its channel counts left free.

    ``in_slot`` / ``out_slot``: (group index, size) segments and the block (positions per
    channel, e.g. a flattened map's H*W) of its input and output dimension; empty for a
    dimension no group indexes (it keeps its size). A depthwise conv has one ``channelwise``
    slot for both (over its output channels: with a channel multiplier k, its input keeps
    1/k of them).
    """

    name: str
    kind: str  # "conv1d", "conv2d", "conv3d" or "linear"
    in_full: int
    out_full: int
    groups: int
    depthwise: bool
    config: Tuple[Any, ...]  # kernel, stride, padding, dilation, bias (conv); bias (linear)
    input_shape: Tuple[int, ...]  # batch first, channel dim as in the model (full size)
    out_positions: int  # output elements per output channel (batch included)
    in_slot: Tuple[Tuple[Tuple[int, int], ...], int] = ((), 1)
    out_slot: Tuple[Tuple[Tuple[int, int], ...], int] = ((), 1)

    @property
    def key(self) -> str:
        """What the cost depends on besides the channel counts (layers with equal keys share entries)."""
        return json.dumps([self.kind, self.in_full, self.out_full, self.groups, self.depthwise,
                           [repr(c) for c in self.config], list(self.input_shape)], separators=(",", ":"))

    def groups_touched(self) -> List[int]:
        return sorted({g for g, _ in self.in_slot[0]} | {g for g, _ in self.out_slot[0]})

    @staticmethod
    def _count(slot: Tuple[Tuple[Tuple[int, int], ...], int], full: int, counts: Mapping[int, int]) -> int:
        segments, block = slot
        if not segments:
            return full
        return sum(int(counts.get(g, s)) for g, s in segments) * block

    def channels(self, counts: Mapping[int, int]) -> Tuple[int, int]:
        """(in channels, out channels) under ``counts`` (group index -> kept; others whole)."""
        if self.depthwise:
            # Its one slot indexes the output channels: k per input channel with a channel
            # multiplier k = out_full / in_full (1 for a plain depthwise conv).
            c_out = self._count(self.out_slot, self.out_full, counts)
            return c_out * self.in_full // self.out_full, c_out
        return self._count(self.in_slot, self.in_full, counts), self._count(self.out_slot, self.out_full, counts)

    def conv_groups(self, c_in: int) -> int:
        return c_in if self.depthwise else self.groups

    def macs(self, c_in: int, c_out: int) -> float:
        """Multiply-accumulates of one call at these channel counts."""
        if self.kind == "linear":
            return float(c_in * c_out * self.out_positions)
        per_out = c_in // max(1, self.conv_groups(c_in))
        return float(per_out * c_out * math.prod(self.config[0]) * self.out_positions)

    def build(self, c_in: int, c_out: int, device: torch.device, dtype: Optional[torch.dtype]) -> Tuple[nn.Module, torch.Tensor]:
        """A fresh layer of these channel counts and an input for it (what a probe times)."""
        shape = list(self.input_shape)
        kind_dtype = dtype or torch.float32
        if self.kind == "linear":
            (bias,) = self.config
            layer: nn.Module = nn.Linear(c_in, c_out, bias=bias)
            shape[-1] = c_in
        else:
            kernel, stride, padding, dilation, bias, padding_mode = self.config
            cls = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}[self.kind]
            layer = cls(c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation,
                        groups=self.conv_groups(c_in), bias=bias, padding_mode=padding_mode)
            shape[1] = c_in
        layer = layer.to(device=device, dtype=kind_dtype).eval()
        return layer, torch.randn(shape, device=device, dtype=kind_dtype)


def _slot(slot: Optional[Slot]) -> Tuple[Tuple[Tuple[int, int], ...], int]:
    if slot is None:
        return ((), 1)
    return (tuple((int(g), int(s)) for g, s in slot.segments), int(slot.block or 1))


def layer_shapes(analysis: Analysis, batch_size: Optional[int] = None) -> List[LayerShape]:
    """Every conv/Linear call of the analysed graph with the shape ShapeProp recorded.

    Needs shapes (the analysis ran with ``example_inputs``); ``batch_size`` replaces the
    recorded batch. A module called twice is two layers (two calls cost twice).
    """
    gm = analysis.gm
    out: List[LayerShape] = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(str(node.target))
        if not isinstance(module, _LAYERS) or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        in_shape, out_shape = node_shape(node.args[0]), node_shape(node)
        if in_shape is None or out_shape is None or len(in_shape) < 2:
            raise FxPruneError(f"the latency model needs the shape of {node.format_node()}: pass example_inputs=(x,) "
                               "the model's forward accepts")
        shape = list(in_shape)
        scale = 1.0
        if batch_size is not None:
            scale = batch_size / max(1, shape[0])
            shape[0] = batch_size
        name = str(node.target)
        slots = {role: analysis.slots.get((name, role)) for role in ("in", "out", "channelwise")}
        if isinstance(module, nn.Linear):
            kind, groups, depthwise = "linear", 1, False
            config: Tuple[Any, ...] = (module.bias is not None,)
            in_full, out_full = module.in_features, module.out_features
            positions = int(round(math.prod(out_shape[:-1]) * scale))
        else:
            kind = f"conv{len(module.kernel_size)}d"
            groups = int(module.groups)
            # Depthwise, with or without a channel multiplier (the analysis then gives it one
            # channelwise slot over its output channels).
            depthwise = groups > 1 and groups == module.in_channels and (
                module.out_channels == module.in_channels or slots["channelwise"] is not None)
            padding = module.padding if isinstance(module.padding, str) else tuple(module.padding)
            config = (tuple(module.kernel_size), tuple(module.stride), padding, tuple(module.dilation),
                      module.bias is not None, module.padding_mode)
            in_full, out_full = module.in_channels, module.out_channels
            positions = int(round(math.prod(out_shape) / max(1, out_shape[1]) * scale))
        if depthwise:
            both = _slot(slots["channelwise"])
            in_slot = out_slot = both
        else:
            in_slot, out_slot = _slot(slots["in"]), _slot(slots["out"])
        out.append(LayerShape(name, kind, int(in_full), int(out_full), groups, depthwise, config, tuple(shape),
                              positions, in_slot, out_slot))
    return out


# --------------------------------------------------------------------------- cost table, stores, probes


@dataclass(frozen=True)
class Probe:
    """One layer at one pair of channel counts: what a prober times."""

    layer: LayerShape
    c_in: int
    c_out: int

    @property
    def entry(self) -> str:
        return f"{self.layer.key}|{self.c_in}|{self.c_out}"


#: ``prober(probes) -> milliseconds per call, one per probe`` (the default: :class:`KernelProber`).
Prober = Callable[[Sequence[Probe]], Sequence[float]]


class CostStore(Protocol):
    """Where cost tables are kept between prunes: ``load(key)`` an entries dict (or None), ``save(key, entries)``."""

    def load(self, key: Mapping[str, Any]) -> Optional[Dict[str, float]]: ...

    def save(self, key: Mapping[str, Any], entries: Mapping[str, float]) -> None: ...


def key_digest(key: Mapping[str, Any]) -> str:
    """A stable short hash of a table key (what a store files a table under)."""
    return hashlib.sha256(json.dumps(dict(key), sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:20]


class MemoryStore:
    """Cost tables in a dict, for the life of the object (the core's default)."""

    def __init__(self) -> None:
        self.tables: Dict[str, Dict[str, float]] = {}

    def load(self, key: Mapping[str, Any]) -> Optional[Dict[str, float]]:
        found = self.tables.get(key_digest(key))
        return dict(found) if found is not None else None

    def save(self, key: Mapping[str, Any], entries: Mapping[str, float]) -> None:
        self.tables[key_digest(key)] = dict(entries)


def table_key(device: torch.device, dtype: Optional[torch.dtype], threads: int, channels_last: bool) -> Dict[str, Any]:
    """What a cost table's numbers depend on besides the shapes (which are in each entry's key)."""
    return {"format": _TABLE_FORMAT, "device_type": device.type, "device_name": device_description(device),
            "dtype": str(dtype or torch.float32).replace("torch.", ""), "threads": int(threads),
            "channels_last": bool(channels_last), "torch": torch.__version__}


class CostTable:
    """Milliseconds per probe entry (``layer key|c_in|c_out``), loaded from and saved to a store."""

    def __init__(self, key: Mapping[str, Any], store: Optional[CostStore] = None) -> None:
        self.key = dict(key)
        self.store: CostStore = store if store is not None else MemoryStore()
        self.entries: Dict[str, float] = dict(self.store.load(self.key) or {})
        self.loaded = len(self.entries)
        self.measured = 0

    def get(self, probe: Probe) -> Optional[float]:
        return self.entries.get(probe.entry)

    def add(self, probe: Probe, ms: float) -> None:
        if not (isinstance(ms, (int, float)) and math.isfinite(ms) and ms >= 0):
            raise InternalError(f"a probe of {probe.layer.name} ({probe.c_in}->{probe.c_out}) measured {ms!r} ms")
        self.entries[probe.entry] = float(ms)

    def ensure(self, probes: Iterable[Probe], prober: Prober) -> int:
        """Measure the probes the table lacks (each distinct entry once); saves when any was new."""
        missing: Dict[str, Probe] = {}
        for p in probes:
            if p.entry not in self.entries and p.entry not in missing:
                missing[p.entry] = p
        if not missing:
            return 0
        todo = sorted(missing.values(), key=lambda p: p.entry)  # a fixed order: reproducible timing runs
        values = list(prober(todo))
        if len(values) != len(todo):
            raise InternalError(f"the prober returned {len(values)} times for {len(todo)} probes")
        for p, ms in zip(todo, values):
            self.add(p, ms)
        self.measured += len(todo)
        self.store.save(self.key, self.entries)
        return len(todo)


class KernelProber:
    """Times probes with :class:`torch.utils.benchmark.Timer`: warm-up, interleaved rounds, medians.

    Probes are built and timed in chunks (a chunk's layers and inputs live at once; every round
    takes one sample of each probe of the chunk in turn, starting one further each round).
    """

    def __init__(self, device: torch.device, *, dtype: Optional[torch.dtype] = None, channels_last: bool = False,
                 threads: int = 1, rounds: int = 5, warmup: int = 2, min_sample_s: float = 0.005,
                 chunk: int = 16, progress: Optional[Callable[[str], None]] = None) -> None:
        self.device, self.dtype, self.channels_last = device, dtype, channels_last
        self.threads, self.rounds, self.warmup, self.min_sample_s = threads, rounds, warmup, min_sample_s
        self.chunk = max(1, chunk)
        self.say = progress or (lambda message: logger.info("%s", message))

    def __call__(self, probes: Sequence[Probe]) -> List[float]:
        from torch.utils.benchmark import Timer

        self.say(f"latency: timing {len(probes)} layer probe(s) on {self.device} ({self.threads} thread(s))")
        out: List[float] = []
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        # Chunks are timed one after another, and a shared machine's load drifts in between: every
        # chunk also times one reference probe (the largest), and its values are scaled by how much
        # slower or faster the reference ran there than in the first chunk.
        reference = max(probes, key=lambda p: (p.c_in * p.c_out * math.prod(p.layer.input_shape[2:] or (1,)),
                                               p.entry)) if probes else None
        ref_first: Optional[float] = None
        try:
            with torch.inference_mode():
                for start in range(0, len(probes), self.chunk):
                    part = list(probes[start:start + self.chunk])
                    times = self._chunk(part + ([reference] if reference is not None and len(probes) > self.chunk else []),
                                        Timer)
                    if len(times) > len(part):
                        ref_now = times.pop()
                        ref_first = ref_now if ref_first is None else ref_first
                        factor = ref_first / ref_now if ref_now > 0 else 1.0
                        times = [t * factor for t in times]
                    out.extend(times)
        finally:
            torch.set_num_threads(before)
        return out

    def _chunk(self, probes: Sequence[Probe], timer_cls: Any) -> List[float]:
        timers, numbers = [], []
        for p in probes:
            layer, x = p.layer.build(p.c_in, p.c_out, self.device, self.dtype)
            if self.channels_last and x.dim() == 4:
                layer = layer.to(memory_format=torch.channels_last)
                x = x.contiguous(memory_format=torch.channels_last)
            for _ in range(self.warmup):
                layer(x)
            t = timer_cls(stmt="layer(x)", globals={"layer": layer, "x": x}, num_threads=self.threads)
            one = t.timeit(1).median
            numbers.append(1 if one <= 0 else max(1, min(10_000, math.ceil(self.min_sample_s / one))))
            timers.append(t)
        times: List[List[float]] = [[] for _ in probes]
        for r in range(self.rounds):
            order = list(range(len(probes)))
            order = order[r % len(order):] + order[:r % len(order)]
            for i in order:
                times[i].append(timers[i].timeit(numbers[i]).median * 1000.0)
        return [float(statistics.median(t)) for t in times]


# --------------------------------------------------------------------------- the latency model


def _grid(full: int, floor: int, step: int, fractions: Sequence[float]) -> List[int]:
    """Channel counts measured up front for a dimension of ``full`` positions (``step`` per count unit)."""
    points = {full, max(1, floor)}
    for f in fractions:
        n = int(round(full * f / step)) * step
        points.add(min(full, max(floor, n)))
    return sorted(points)


def _bracket(grid: Sequence[int], x: int) -> Tuple[int, int, float]:
    """(lower, upper, weight of upper) for ``x`` on ``grid``; clamped at the ends."""
    if x <= grid[0]:
        return grid[0], grid[0], 0.0
    if x >= grid[-1]:
        return grid[-1], grid[-1], 0.0
    i = bisect.bisect_left(grid, x)
    if grid[i] == x:
        return x, x, 0.0
    lo, hi = grid[i - 1], grid[i]
    return lo, hi, (x - lo) / (hi - lo)


class LatencyModel:
    """Predicts the model's latency (ms) from keep counts: measured layer costs plus a whole-model correction.

    ``layers``: from :func:`layer_shapes`; ``groups``: the analysis' groups; ``floors``: the
    smallest count each prunable group may keep (sets the grid's low end); ``table`` and
    ``prober``: where costs come from. Call :meth:`measure_grid`, then :meth:`calibrate` with the
    original's measured latency.
    """

    def __init__(self, layers: Sequence[LayerShape], groups: Sequence[Group], table: CostTable, prober: Prober, *,
                 floors: Optional[Mapping[int, int]] = None, steps: Optional[Mapping[int, int]] = None,
                 grid: Sequence[float] = GRID_FRACTIONS) -> None:
        self.layers = list(layers)
        self.table, self.prober = table, prober
        self.sizes = {g.index: g.size for g in groups}
        prunable = {g.index for g in groups if g.prunable}
        floors = dict(floors or {})
        steps = dict(steps or {})
        self.by_group: Dict[int, List[int]] = {}
        for i, layer in enumerate(self.layers):
            for g in layer.groups_touched():
                self.by_group.setdefault(g, []).append(i)
        low = {g: floors.get(g, 1) if g in prunable else self.sizes.get(g, 1) for g in self.sizes}
        self.grids: List[Tuple[List[int], List[int]]] = []
        for layer in self.layers:
            grids = []
            for slot, full in ((layer.in_slot, layer.in_full), (layer.out_slot, layer.out_full)):
                segments, block = slot
                if not segments or all(g not in prunable for g, _ in segments):
                    grids.append([full])
                    continue
                floor = sum(low.get(g, s) for g, s in segments) * block
                step = block * min((steps.get(g, 1) for g, _ in segments if g in prunable), default=1)
                grids.append(_grid(full, floor, step, grid))
            if layer.depthwise:
                grids[1] = grids[0]
            self.grids.append((grids[0], grids[1]))
        self.scale = 1.0  # on the layers' sum
        self.rest_ms = 0.0  # carried by the output activations
        self.fixed_ms = 0.0  # carried by nothing pruning changes
        self.base_ms: Optional[float] = None
        self._full_positions = sum(l.out_positions * l.out_full for l in self.layers) or 1
        self._cache: Dict[Tuple[int, int, int], float] = {}

    def grid_probes(self) -> List[Probe]:
        probes = []
        for layer, (gin, gout) in zip(self.layers, self.grids):
            if layer.depthwise:
                probes.extend(Probe(layer, c, c) for c in gin)
            else:
                probes.extend(Probe(layer, a, b) for a in gin for b in gout)
        return probes

    def measure_grid(self) -> int:
        """Measure (or find in the table) every grid probe; returns how many were new."""
        return self.ensure(self.grid_probes())

    def ensure(self, probes: Iterable[Probe]) -> int:
        """Measure exact probes; predictions then use them instead of interpolating."""
        self._cache.clear()  # the table may be another object than the one cached from
        return self.table.ensure(probes, self.prober)

    def layer_ms(self, i: int, c_in: int, c_out: int) -> float:
        key = (i, c_in, c_out)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        layer = self.layers[i]
        # From the grid alone, even where an exact probe exists: the grid was measured in one run
        # next to the whole model the correction is calibrated on, while exact probes come from
        # later runs at another load (they only rank counts against each other, in refine_counts).
        gin, gout = self.grids[i]
        a0, a1, wa = _bracket(gin, c_in)
        if layer.depthwise:
            value = (1 - wa) * self._entry(layer, a0, a0) + wa * self._entry(layer, a1, a1)
        else:
            b0, b1, wb = _bracket(gout, c_out)
            value = ((1 - wa) * (1 - wb) * self._entry(layer, a0, b0) + wa * (1 - wb) * self._entry(layer, a1, b0)
                     + (1 - wa) * wb * self._entry(layer, a0, b1) + wa * wb * self._entry(layer, a1, b1))
        self._cache[key] = value
        return value

    def _entry(self, layer: LayerShape, c_in: int, c_out: int) -> float:
        value = self.table.get(Probe(layer, c_in, c_out))
        if value is None:
            raise InternalError(f"the cost table has no grid entry for {layer.name} ({c_in}->{c_out}): "
                                "measure_grid() first")
        return value

    def measured_ms(self, counts: Mapping[int, int], which: Iterable[int]) -> Optional[float]:
        """The exact probes' milliseconds of ``which`` layers under ``counts`` (None if one is missing)."""
        total = 0.0
        for i in which:
            c_in, c_out = self.layers[i].channels(counts)
            value = self.table.get(Probe(self.layers[i], c_in, c_out))
            if value is None:
                return None
            total += value
        return total

    def layers_ms(self, counts: Mapping[int, int], which: Optional[Iterable[int]] = None) -> float:
        total = 0.0
        for i in (range(len(self.layers)) if which is None else which):
            c_in, c_out = self.layers[i].channels(counts)
            total += self.layer_ms(i, c_in, c_out)
        return total

    def macs(self, counts: Mapping[int, int], which: Optional[Iterable[int]] = None) -> float:
        """Multiply-accumulates of ``which`` layers (all by default) under ``counts``: the capacity kept."""
        return sum(self.layers[i].macs(*self.layers[i].channels(counts))
                   for i in (range(len(self.layers)) if which is None else which))

    def positions(self, counts: Mapping[int, int], which: Optional[Iterable[int]] = None) -> float:
        total = 0.0
        for i in (range(len(self.layers)) if which is None else which):
            total += self.layers[i].out_positions * self.layers[i].channels(counts)[1]
        return total

    def calibrate(self, base_ms: float, variable_share: float = 0.5) -> None:
        """Make the prediction of the unpruned model equal its measured latency ``base_ms``.

        What the layers alone leave unexplained is split into a fixed part (per-op overhead,
        frozen layers) and a part that scales with the layers' output activations (the norms,
        activations and additions after them); ``variable_share`` is the first guess of the
        split, which :meth:`correct` refits from a measured pruned model.
        """
        full = self.layers_ms({})
        self.base_ms = float(base_ms)
        if full <= 0:
            self.scale, rest = 1.0, float(base_ms)
        elif full <= base_ms:
            self.scale, rest = 1.0, float(base_ms) - full
        else:
            # Layers alone measured slower than the model (cache effects, isolated launches): scale them down.
            self.scale, rest = float(base_ms) / full, 0.0
        self.rest_ms = rest * variable_share
        self.fixed_ms = rest - self.rest_ms

    def correct(self, counts: Mapping[int, int], measured_ms: float) -> None:
        """Refit the correction so that ``counts`` predicts ``measured_ms`` and the unpruned model its own latency.

        The model is ``s * layers + fixed + variable * activations``. First the split of the
        unexplained time is refitted (``s`` kept); when pruning saved less than the layers alone
        predict, nothing is variable and ``s`` shrinks; when it saved more than the layers and
        all the unexplained time could, nothing is fixed and ``s`` grows. Every part stays
        non-negative.
        """
        if self.base_ms is None:
            raise InternalError("LatencyModel.correct() before calibrate()")
        base, m = self.base_ms, float(measured_ms)
        share = self.positions(counts) / self._full_positions
        lf, lc = self.layers_ms({}), self.layers_ms(counts)  # unscaled
        if share >= 1.0 - 1e-9 or lf - lc <= 1e-12:
            return
        rest = max(0.0, base - self.scale * lf)
        # base = s Lf + F + V ; m = s Lc + F + V share
        variable = (base - m - self.scale * (lf - lc)) / (1.0 - share)
        if 0.0 <= variable <= rest:
            self.rest_ms, self.fixed_ms = variable, rest - variable
        elif variable < 0.0:
            s = max(0.0, (base - m) / (lf - lc))
            self.scale, self.rest_ms, self.fixed_ms = s, 0.0, max(0.0, base - s * lf)
        else:
            denominator = lc - lf * share
            s = (m - base * share) / denominator if abs(denominator) > 1e-12 else -1.0
            if s > 0 and base - s * lf >= 0:
                self.scale, self.rest_ms, self.fixed_ms = s, base - s * lf, 0.0
            else:
                # Faster than any non-negative fit explains: all of the model in its layers comes closest.
                self.scale, self.rest_ms, self.fixed_ms = base / lf, 0.0, 0.0

    def term(self, counts: Mapping[int, int], which: Optional[Iterable[int]] = None) -> float:
        """The prediction's share from ``which`` layers (all by default, the fixed part included)."""
        which = None if which is None else list(which)
        return (self.scale * self.layers_ms(counts, which)
                + self.rest_ms * self.positions(counts, which) / self._full_positions
                + (self.fixed_ms if which is None else 0.0))

    def predict(self, counts: Mapping[int, int]) -> float:
        """Predicted milliseconds per call with each group keeping ``counts[index]`` (others whole)."""
        return self.term(counts)


# --------------------------------------------------------------------------- search


@dataclass
class SearchResult:
    """Keep counts the search chose and what it predicts for them."""

    counts: Dict[int, int]
    predicted_ms: float
    goal_ms: float
    reached: bool
    moves: int
    round_to: Dict[int, int] = field(default_factory=dict)  # group index -> chosen multiple (refine_counts)


def _floors_and_steps(groups: Sequence[Group], policy: Policy) -> Tuple[Dict[int, int], Dict[int, int]]:
    floors, steps = {}, {}
    for g in groups:
        if not g.prunable:
            continue
        steps[g.index] = count_step(g, policy.round_to)
        floors[g.index] = group_count(g, keep_count(g.size, policy.max_group_ratio), policy.round_to, policy.min_channels)
    return floors, steps


def _next_counts(group: Group, n: int, step: int, floor: int, policy: Policy) -> Optional[int]:
    """The next smaller count a group can keep, honouring every planner constraint; None at the floor."""
    if n <= floor:
        return None
    target = ((n - 1) // step) * step
    if target < floor or target <= 0:
        return None
    nxt = group_count(group, target, policy.round_to, policy.min_channels)
    return nxt if floor <= nxt < n else None


def uniform_counts(model: LatencyModel, groups: Sequence[Group], policy: Policy, goal_ms: float,
                   *, iterations: int = 40) -> SearchResult:
    """Uniform ratio pruning in the latency model's terms: the smallest ratio predicted to meet ``goal_ms``.

    Bisection on the ratio, from 0 to ``policy.max_group_ratio``; the counts at each ratio are
    the planner's own (:func:`fxprune.allocation.ratio_keep_counts`: what ``prune(ratio=r)``
    keeps), so every constraint holds. This is what the greedy search is held against: where
    per-layer costs mislead it (batch 1 on a CPU, where the work outside the layers is a large
    part), uniform pruning can keep more capacity at the same measured latency, and then the
    uniform candidate is returned instead.
    """
    prunable = [g for g in groups if g.prunable]

    def counts_at(ratio: float) -> Dict[int, int]:
        return ratio_keep_counts(prunable, policy, lambda g: ratio)

    low, high = 0.0, float(policy.max_group_ratio)
    counts = counts_at(high)
    predicted = model.predict(counts)
    if predicted > goal_ms * (1 + 1e-9):
        return SearchResult(counts=counts, predicted_ms=predicted, goal_ms=goal_ms, reached=False, moves=0)
    for _ in range(iterations):
        mid = (low + high) / 2
        if model.predict(counts_at(mid)) <= goal_ms * (1 + 1e-9):
            high = mid
        else:
            low = mid
    counts = counts_at(high)
    return SearchResult(counts=counts, predicted_ms=model.predict(counts), goal_ms=goal_ms, reached=True, moves=0)


def capacity_counts(model: LatencyModel, groups: Sequence[Group], policy: Policy, goal_ms: float,
                    start: SearchResult, *, max_moves: int = 400, reach: int = 4,
                    scales: Sequence[int] = (8, 4, 2, 1)) -> SearchResult:
    """More capacity at the same predicted latency: exchange moves from ``start`` (the uniform candidate).

    A move gives one group ``scale`` steps more channels and takes ``scale`` to ``reach * scale``
    steps from another, the fewest that keep the prediction within ``goal_ms``; of all moves the
    one that gains the most conv/Linear MACs is taken, until none gains, first with large
    ``scales`` then finer ones (coarse moves first keep the search short on deep models; at most
    ``max_moves`` moves). Uniform pruning spends the latency alike in every layer; on a CPU at
    batch 1 a MAC costs about twice as much in the last stage of a ResNet as in the first
    (measured, see benchmarks/LATENCY.md), so moving channels from the dear layers to the cheap
    ones keeps more MACs for the same time. Which channels a group keeps is still its scores'
    choice. Deterministic: ties go to the lower group indices.
    """
    prunable = [g for g in groups if g.prunable]
    floors, steps = _floors_and_steps(prunable, policy)
    counts = dict(start.counts)
    predicted = model.predict(counts)
    if predicted > goal_ms * (1 + 1e-9):
        return start
    pair_layers = {(g.index, h.index): sorted(set(model.by_group.get(g.index, [])) | set(model.by_group.get(h.index, [])))
                   for g in prunable for h in prunable if g.index != h.index}

    def stepped(group: Group, n: int, k: int) -> Optional[int]:
        for _ in range(k):
            nxt = _next_counts(group, n, steps[group.index], floors[group.index], policy)
            if nxt is None:
                return None
            n = nxt
        return n

    moves = 0
    for scale in scales:
        while moves < max_moves:
            best: Optional[Tuple[float, int, int, int, int, float]] = None
            for g in prunable:
                up = min(g.size, counts[g.index] + scale * steps[g.index])
                if up <= counts[g.index] or group_count(g, up, policy.round_to, policy.min_channels) != up:
                    continue
                for h in prunable:
                    if h.index == g.index:
                        continue
                    layers = pair_layers[(g.index, h.index)]
                    now_ms, now_macs = model.term(counts, layers), model.macs(counts, layers)
                    trial = dict(counts)
                    trial[g.index] = up
                    down: Optional[int] = counts[h.index]
                    for _k in range(reach):
                        down = stepped(h, down, scale) if down is not None else None
                        if down is None:
                            break
                        trial[h.index] = down
                        after = predicted - now_ms + model.term(trial, layers)
                        if after <= goal_ms * (1 + 1e-9):
                            gain = model.macs(trial, layers) - now_macs
                            if gain > 0 and (best is None or gain > best[0] * (1 + 1e-12)):
                                best = (gain, g.index, up, h.index, down, after)
                            break
            if best is None:
                break
            _, gi, up, hi, down, predicted = best
            counts[gi], counts[hi] = up, down
            moves += 1
    predicted = model.predict(counts)
    return SearchResult(counts=counts, predicted_ms=predicted, goal_ms=goal_ms,
                        reached=predicted <= goal_ms * (1 + 1e-9), moves=moves)


def search_counts(model: LatencyModel, groups: Sequence[Group], scores: Mapping[int, torch.Tensor], policy: Policy,
                  goal_ms: float, *, lookahead: int = 4) -> SearchResult:
    """Greedy decrements, cheapest importance per millisecond first, until the prediction meets ``goal_ms``.

    Deterministic: the same table, scores and policy give the same counts (ties go to the
    lower group index, then the shorter move). Each group's candidate moves are 1 to
    ``lookahead`` steps down, then 2, 4, 8, ... times ``lookahead`` steps, down to its floor; a move
    that saves no time is never taken, so a non-monotone cost (a stretch of smaller counts
    measuring slower) is jumped over rather than followed, and a long move stops at the first
    count that meets the goal.
    """
    prunable = [g for g in groups if g.prunable]
    floors, steps = _floors_and_steps(prunable, policy)
    by_index = {g.index: g for g in prunable}
    counts: Dict[int, int] = {g.index: g.size for g in prunable}
    # Importance lost by keeping n of a group: the sum of its normalised scores ranked below n.
    suffix: Dict[int, List[float]] = {}
    for g in prunable:
        ranked = sorted((float(v) for v in normalise(scores[g.index].detach().double().cpu())), reverse=True)
        ranked = [v if math.isfinite(v) else 0.0 for v in ranked]
        tail = [0.0] * (g.size + 1)
        for i in range(g.size - 1, -1, -1):
            tail[i] = tail[i + 1] + max(0.0, ranked[i])
        suffix[g.index] = tail
    neighbours: Dict[int, set] = {g.index: set() for g in prunable}
    for layer in model.layers:
        touched = [g for g in layer.groups_touched() if g in by_index]
        for g in touched:
            neighbours[g].update(touched)

    def best_move(gi: int) -> Optional[Tuple[float, int, int, float]]:
        """(importance per ms, group, new count, ms saved) of the group's best look-ahead move."""
        g = by_index[gi]
        layers = model.by_group.get(gi, [])
        now = model.term(counts, layers)
        n, best = counts[gi], None
        trial = dict(counts)
        k = 0
        while True:
            nxt = _next_counts(g, n, steps[gi], floors[gi], policy)
            if nxt is None:
                break
            k += 1
            n = nxt
            # 1..lookahead steps, then 2x, 4x, ... further: a measured cost that rises over a stretch
            # of counts (noise, or a slower kernel) is jumped over, however wide that stretch is.
            if k > lookahead and k & (k - 1):
                continue
            trial[gi] = nxt
            saved = now - model.term(trial, layers)
            if saved > _EPS_MS:
                lost = suffix[gi][nxt] - suffix[gi][counts[gi]]
                rate = lost / saved
                if best is None or rate < best[0] - 1e-15:
                    best = (rate, gi, nxt, saved)
        return best

    moves_cache: Dict[int, Optional[Tuple[float, int, int, float]]] = {g.index: best_move(g.index) for g in prunable}
    predicted = model.predict(counts)
    moves = 0
    while predicted > goal_ms:
        options = [m for m in moves_cache.values() if m is not None]
        if not options:
            break
        rate, gi, nxt, _ = min(options, key=lambda m: (m[0], m[1], -m[2]))
        # A long look-ahead move can overshoot the goal: stop at the first count on the way that meets it.
        layers = model.by_group.get(gi, [])
        now = model.term(counts, layers)
        n = counts[gi]
        while True:
            step_to = _next_counts(by_index[gi], n, steps[gi], floors[gi], policy)
            if step_to is None or step_to <= nxt:
                break
            if predicted - (now - model.term({**counts, gi: step_to}, layers)) <= goal_ms:
                nxt = step_to
                break
            n = step_to
        # Only the layers the group touches change: the prediction is updated by their difference.
        predicted -= now - model.term({**counts, gi: nxt}, layers)
        counts[gi] = nxt
        moves += 1
        for other in neighbours[gi] | {gi}:
            moves_cache[other] = best_move(other)
    predicted = model.predict(counts)  # once in full: no drift from the running sum
    return SearchResult(counts=counts, predicted_ms=predicted, goal_ms=goal_ms,
                        reached=predicted <= goal_ms * (1 + 1e-9), moves=moves)


def _candidates(group: Group, n: int, floor: int, policy: Policy) -> Dict[int, int]:
    """count -> the largest of :data:`ROUND_CANDIDATES` it is a multiple of, next to ``n`` (both sides)."""
    base = count_step(group, policy.round_to)
    out: Dict[int, int] = {}
    for r in ROUND_CANDIDATES:
        step = base * r // math.gcd(base, r)
        for c in ((n // step) * step, -(-n // step) * step):
            # Upwards only nearby (an eighth, or under 4 channels): on small, overhead-bound kernels a
            # much larger count can time "no slower" by noise alone, and would undo the search.
            if c > n and c - n >= 4 and c > math.ceil(n * 1.125):
                continue
            if floor <= c <= group.size and c > 0 and group_count(group, c, policy.round_to, policy.min_channels) == c:
                out[c] = max(out.get(c, 1), r)
    out.setdefault(n, 1)
    return out


def refine_counts(model: LatencyModel, groups: Sequence[Group], policy: Policy, result: SearchResult) -> SearchResult:
    """Hardware-friendly counts by measurement: per pruned group, the largest nearby multiple measured no slower.

    The counts near each searched count that are multiples of 1, 4, 8, 16 or 32 are measured
    exactly with every layer the group feeds or reads (the other groups at their searched
    counts); the largest one whose layers take no longer than at the searched count replaces it
    (more channels for no time, or fewer channels where an aligned count is faster). Groups are
    visited in index order, so the result is deterministic given the table.
    """
    floors, _ = _floors_and_steps(groups, policy)
    counts = dict(result.counts)
    pruned = [g for g in groups if g.prunable and counts.get(g.index, g.size) < g.size]
    plans = {g.index: _candidates(g, counts[g.index], floors[g.index], policy) for g in pruned}
    probes = []
    for g in pruned:
        for c in plans[g.index]:
            trial = dict(counts)
            trial[g.index] = c
            for i in model.by_group.get(g.index, []):
                c_in, c_out = model.layers[i].channels(trial)
                probes.append(Probe(model.layers[i], c_in, c_out))
    model.ensure(probes)
    chosen: Dict[int, int] = {}
    for g in pruned:
        layers = model.by_group.get(g.index, [])
        searched = counts[g.index]
        trial = dict(counts)
        # Candidates are compared on their exact probes, measured together in one run.
        at_searched = model.measured_ms(trial, layers)
        best_c, best_r = searched, plans[g.index].get(searched, 1)
        for c in sorted(plans[g.index], reverse=True):
            trial[g.index] = c
            here = model.measured_ms(trial, layers)
            if at_searched is not None and here is not None and here <= at_searched * (1 + 1e-9):
                best_c, best_r = c, plans[g.index][c]
                break
        counts[g.index] = best_c
        chosen[g.index] = best_r
    return SearchResult(counts=counts, predicted_ms=model.predict(counts), goal_ms=result.goal_ms,
                        reached=model.predict(counts) <= result.goal_ms, moves=result.moves, round_to=chosen)


# --------------------------------------------------------------------------- verification


def _pessimistic(result: LatencyResult, fraction_target: bool) -> float:
    """The upper quartile of what a target compares: pruned/original per round, or the pruned ms."""
    if fraction_target:
        speedup = result.speedups.get("pruned")
        return 1.0 / speedup.q25 if speedup is not None and speedup.q25 > 0 else math.inf
    return result.models["pruned"].q75_ms


def _measured_fraction(result: LatencyResult) -> Tuple[float, float, float]:
    """(pruned ms, original ms, pruned / original) from an interleaved pair measurement."""
    original, pruned = result.models["original"], result.models["pruned"]
    speedup = result.speedups.get("pruned")
    fraction = 1.0 / speedup.median if speedup is not None and speedup.median > 0 else math.inf
    return pruned.median_ms, original.median_ms, fraction


def prune_to_latency(analysis: Analysis, original: nn.Module, *, scores: Mapping[int, torch.Tensor], policy: Policy,
                     target: LatencyTarget, build: Callable[[Mapping[int, int]], nn.Module],
                     example_inputs: Sequence[Any], device: Any = "cpu", batch_size: Optional[int] = 1,
                     mode: str = "eager", options: Optional[LatencyOptions] = None
                     ) -> Tuple[nn.Module, Dict[int, int], Dict[str, Any]]:
    """Search, build and verify until the measured latency meets ``target``: (model, counts, record).

    ``build(counts)`` returns the pruned model for keep counts by group index; ``original``
    is what it is measured against (interleaved). ``record`` goes into ``plan.policy["latency"]``.
    """
    target = target.validated()
    options = (options or LatencyOptions()).validated()
    if mode not in MODES:
        raise FxPruneError(f"latency_mode must be one of {', '.join(MODES)}, got {mode!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise FxPruneError(f"batch_size must be a positive integer, got {batch_size!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise FxPruneError(f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FxPruneError("latency device cuda was asked for, but torch sees no CUDA device here; hint: device='cpu'")
    threads = options.threads if options.threads is not None else (1 if device.type == "cpu" else torch.get_num_threads())
    say = options.progress or (lambda message: logger.info("%s", message))
    started = time.perf_counter()

    def timed(models: Dict[str, nn.Module]) -> LatencyResult:
        if options.measure is not None:
            return options.measure(models)
        return measure_latency(models, example_inputs=tuple(example_inputs), device=device, mode=mode, threads=threads,
                               rounds=options.rounds, warmup=options.warmup, min_sample_s=options.min_sample_s,
                               batch_size=batch_size, dtype=options.dtype, channels_last=options.channels_last,
                               progress=options.progress, timer=options.timer)

    prunable = [g for g in analysis.groups if g.prunable]
    floors, steps = _floors_and_steps(prunable, policy)
    table = CostTable(table_key(device, options.dtype, threads, options.channels_last), options.store)
    prober = options.prober or KernelProber(device, dtype=options.dtype, channels_last=options.channels_last,
                                            threads=threads, rounds=options.probe_rounds, warmup=options.probe_warmup,
                                            min_sample_s=options.probe_sample_s, progress=options.progress)
    model = LatencyModel(layer_shapes(analysis, batch_size), analysis.groups, table, prober, floors=floors, steps=steps,
                         grid=options.grid)
    from_store = table.loaded
    model.measure_grid()
    # The whole model right after its layers: on a shared machine the load drifts, and the
    # correction compares the two.
    base = timed({"original": original})
    base_ms = base.models["original"].median_ms
    goal = target.goal_ms(base_ms)
    model.calibrate(base_ms)

    record: Dict[str, Any] = {
        "target": target.describe(), "target_fraction": target.fraction, "target_ms": target.ms, "goal_ms": goal,
        "device": str(device), "device_name": device_description(device), "threads": threads,
        "torch": torch.__version__, "mode": mode, "batch_size": batch_size,
        "dtype": str(options.dtype or "model's own").replace("torch.", ""), "channels_last": options.channels_last,
        "method": LATENCY_METHOD, "measurement": base.method, "before_ms": base_ms,
        "table": {"entries_from_store": from_store, "probes_measured": 0, "layers": len(model.layers)},
        "tries": [],
    }
    tries: List[Dict[str, Any]] = record["tries"]
    tried: List[Dict[int, int]] = []  # each try's counts, beside ``tries`` (which go into the plan as plain data)
    inputs = tuple(example_inputs)
    base_macs = count_macs(original, inputs)
    wanted = target.fraction if target.fraction is not None else target.ms
    assert wanted is not None
    best: Optional[Dict[str, Any]] = None

    def achieved_of(entry: Mapping[str, Any]) -> float:
        """What the target compares of a try: its measured fraction, or its milliseconds."""
        return entry["measured_fraction"] if target.fraction is not None else entry["measured_ms"]

    def verify(found: SearchResult, predict_goal: float, phase: str, more_macs_than: Optional[float] = None
               ) -> Optional[Dict[str, Any]]:
        """Build ``found``, measure it interleaved with the original and record the try (its entry).

        With ``more_macs_than``, a model keeping no more MACs than that is not measured (None):
        giving capacity back only pays for a measurement when there is capacity to gain.
        """
        nonlocal best
        pruned = build(found.counts)
        macs = count_macs(pruned, inputs) / base_macs if base_macs else 1.0
        if more_macs_than is not None and macs <= more_macs_than:
            return None
        tried.append(dict(found.counts))
        pair = timed({"original": original, "pruned": pruned})
        pruned_ms, original_ms, fraction = _measured_fraction(pair)
        achieved = fraction if target.fraction is not None else pruned_ms
        met = achieved <= wanted and fraction < 1.0
        if phase in ("give back", "uniform", "capacity"):  # aimed just under the target: must not land on its edge (margin)
            met = met and achieved <= wanted * (1.0 - options.margin) \
                and _pessimistic(pair, target.fraction is not None) <= wanted
        entry = {"try": len(tries) + 1, "phase": phase, "predicted_ms": found.predicted_ms,
                 "predicted_fraction": found.predicted_ms / base_ms, "goal_ms": predict_goal,
                 "measured_ms": pruned_ms, "original_ms": original_ms, "measured_fraction": fraction,
                 "macs_fraction": macs, "busy": pair.busy, "met": bool(met)}
        tries.append(entry)
        say(f"latency: try {entry['try']} ({phase}): predicted {found.predicted_ms:.3f} ms, measured {pruned_ms:.3f} "
            f"ms ({fraction:.3f} of the original {original_ms:.3f} ms; {target.describe()}; MACs kept {macs:.3f})")
        # The best: of the tries that met the target, the one keeping the most MACs (capacity);
        # while none has, the fastest (what the error names). A met try always beats a missed one.
        if best is None or (entry["met"] and (not best["met"] or macs > best["macs_fraction"])) \
                or (not entry["met"] and not best["met"] and fraction < best["measured_fraction"]):
            best = {**entry, "achieved": achieved, "counts": dict(found.counts), "round_to": dict(found.round_to),
                    "model": pruned, "measurement": pair}
        return entry

    predict_goal = goal
    for attempt in range(options.max_tries):
        found = search_counts(model, prunable, scores, policy, predict_goal)
        if not found.reached:
            floor_note = (f"pruning every prunable group to its floor (max_group_ratio={policy.max_group_ratio}, "
                          f"min_channels={policy.min_channels}) is predicted at best {found.predicted_ms:.3f} ms "
                          f"({found.predicted_ms / base_ms:.3f} of the original) against {goal:.3f} ms")
            if best is None and (not prunable or found.moves == 0):
                raise FxPruneError(
                    f"{target.describe()} cannot be met on {record['device_name']} ({mode}, batch {batch_size}, "
                    f"{threads} thread(s)): the original measures {base_ms:.3f} ms, and {floor_note}. Layers fxprune "
                    "cannot prune and the work outside convolutions keep their cost; relax the target, raise "
                    "max_group_ratio or reduce ignore=")
            if best is not None:
                record["unreachable"] = floor_note
                break
            # Not one measurement of a pruned model yet: the split of the unexplained time is a guess,
            # so the most-pruned model is built and measured before giving up.
            record["unreachable_predicted"] = floor_note
        found = refine_counts(model, prunable, policy, found)
        entry = verify(found, predict_goal, "search")
        if entry is None:
            raise InternalError("a search try was not measured")
        if entry["met"]:
            # Refit the correction on the met model too: an overshoot says the unexplained time
            # shrinks with the model (batch 1 on a CPU: norms and activations scale with the
            # channels), and the give-back and the uniform candidate below are aimed with this model.
            model.correct(found.counts, entry["measured_fraction"] * base_ms)
            break
        # Missed. First choice: refit the whole-model correction on this measurement (on the
        # original's scale of this run) and search afresh from the goal (it may prune less than
        # this try as well as more). A refit is one noisy point: where it says the goal is out of
        # reach, it is dropped and the goal in prediction space is lowered by the measured
        # shortfall instead (back off), which needs no model of where the time went.
        fraction = entry["measured_fraction"]
        achieved = achieved_of(entry)
        saved = (model.scale, model.rest_ms, model.fixed_ms)
        model.correct(found.counts, fraction * base_ms)
        refit = model.predict(found.counts)
        unexplained = min(1.0, refit / (fraction * base_ms)) if fraction * base_ms > 0 else 0.5
        refit_goal = goal * 0.98 ** (attempt + 1) * unexplained
        if search_counts(model, prunable, scores, policy, refit_goal).reached:
            predict_goal = refit_goal
        else:
            model.scale, model.rest_ms, model.fixed_ms = saved
            predict_goal = min(predict_goal, found.predicted_ms) * min(0.98, wanted / achieved if achieved > 0 else 0.5)
            entry["backed_off"] = True
    # Overshoot: a met target with much of its latency unused (0.28 measured for 0.5 asked) prunes
    # capacity for nothing. Give it back by a bracketing search in prediction space, which needs
    # no model of *why* the prediction was off (the one-point refit above cannot express a model
    # that speeds up faster than its layers predict): each tried model is a point (its prediction
    # under the final correction, its measured share of the target); the next try aims at a
    # little under the target, interpolated between the nearest met point below and the
    # nearest missed one above (or scaled from the met one while none is above). A try counts
    # only if it meets the target with more MACs than the best so far.
    gave_back = 0
    aim_share = 1.0 - options.overshoot / 2
    for _ in range(options.give_back):
        if best is None or not best["met"] or 1.0 - best["achieved"] / wanted <= options.overshoot:
            break
        points = []
        for counts, entry in zip(tried, tries):
            points.append((model.predict(counts), achieved_of(entry) / wanted, entry["met"]))
        low = max((p for p in points if p[2]), key=lambda p: p[0])
        above = [p for p in points if not p[2] and p[0] > low[0]]
        if above:
            high = min(above, key=lambda p: p[0])
            w = (aim_share - low[1]) / (high[1] - low[1]) if high[1] > low[1] else 0.5
            aim = low[0] + min(max(w, 0.0), 1.0) * (high[0] - low[0])
        else:
            aim = low[0] * aim_share / low[1] if low[1] > 0 else base_ms
        aim = min(aim, model.predict({}) * (1.0 - 1e-6))
        if aim <= low[0] * (1 + 1e-9):
            break
        found = search_counts(model, prunable, scores, policy, aim)
        found = refine_counts(model, prunable, policy, found)
        if found.counts in tried or verify(found, aim, "give back", more_macs_than=best["macs_fraction"]) is None:
            break  # nothing new to measure, or no capacity to gain
        gave_back += 1
    record["give_back_tries"] = gave_back
    def candidate(phase: str, tries_left: int, counts_at: Callable[[float], Optional[SearchResult]]) -> int:
        """Measured tries of a candidate aimed a little under the target in prediction space.

        ``counts_at(aim)`` gives its counts (None: nothing to try). A try is measured only when it
        keeps more MACs than the best met model (otherwise there is nothing to gain and no
        measurement is spent). A miss backs the aim off by the measured shortfall; a try that
        meets the target with more than ``overshoot`` of its latency unused raises the aim by
        the measured slack, at most 1.5 times (the prediction overstated this candidate's time,
        and by how much may grow with the model), so the next try spends it on channels. Once
        a met and a missed aim bracket the target, the next aim is their midpoint.
        """
        done, aim = 0, goal * aim_share
        ceiling = model.predict({}) * (1.0 - 1e-6)
        met_aim: Optional[float] = None
        missed_aim: Optional[float] = None
        for _ in range(tries_left):
            found = counts_at(aim)
            if found is None or found.counts in tried:
                break
            floor_macs = best["macs_fraction"] if best is not None and best["met"] else None
            entry = verify(found, aim, phase, more_macs_than=floor_macs)
            if entry is None:
                break
            done += 1
            achieved = achieved_of(entry)
            if entry["met"]:
                if achieved <= 0 or 1.0 - achieved / wanted <= options.overshoot or aim >= ceiling:
                    break
                met_aim = aim
                raised = aim * min(1.5, wanted * (1.0 - 2 * options.margin) / achieved)
                aim = min(ceiling, raised if missed_aim is None else (aim + missed_aim) / 2)
                continue
            missed_aim = aim
            backed = aim * min(0.98, wanted * (1.0 - options.margin) / achieved if achieved > 0 else 0.5)
            aim = backed if met_aim is None else (met_aim + aim) / 2
        return done

    def uniform_at(aim: float) -> Optional[SearchResult]:
        found = uniform_counts(model, prunable, policy, aim)
        return found if found.reached else None

    def capacity_at(aim: float) -> Optional[SearchResult]:
        # The uniform counts with channels moved from layers where time is dear per MAC to
        # layers where it is cheap (capacity_counts).
        start = uniform_at(aim)
        found = capacity_counts(model, prunable, policy, aim, start) if start is not None else None
        return found if found is not None and found.moves > 0 else None

    record["uniform_tries"] = candidate("uniform", options.uniform_tries, uniform_at)
    record["capacity_tries"] = candidate("capacity", options.capacity_tries, capacity_at)
    record["table"]["probes_measured"] = table.measured
    record["search_s"] = time.perf_counter() - started
    if best is None or not best["met"]:
        reached = "nothing was built" if best is None else (
            f"the best reached measured {best['measured_ms']:.3f} ms, {best['measured_fraction']:.3f} of the original "
            f"{best['original_ms']:.3f} ms (predicted {best['predicted_ms']:.3f} ms)")
        floor = record.get("unreachable") or record.get("unreachable_predicted")
        raise FxPruneError(
            f"{target.describe()} was not met on {record['device_name']} ({mode}, batch {batch_size}, {threads} "
            f"thread(s)) after {len(tries)} verified tr{'y' if len(tries) == 1 else 'ies'}: {reached}"
            + (f"; {floor}" if floor else "") + ". Hint: relax the target, measure on a quieter machine (more "
            "rounds), or raise max_group_ratio")
    pair = best["measurement"]
    record.update(after_ms=best["measured_ms"], original_ms=best["original_ms"], fraction=best["measured_fraction"],
                  speedup=pair.speedups["pruned"].median, predicted_ms=best["predicted_ms"],
                  predicted_fraction=best["predicted_fraction"], busy=pair.busy, warnings=list(pair.warnings),
                  macs_fraction=best["macs_fraction"], chosen_try=best["try"],
                  round_to={g.key: best["round_to"][g.index] for g in prunable if g.index in best["round_to"]})
    return best["model"], best["counts"], record


def plan_for_latency(analysis: Analysis, original: nn.Module, *, importance: Any, scoring: ScoringOptions,
                     policy: Policy, target: LatencyTarget, example_inputs: Sequence[Any], device: Any = "cpu",
                     batch_size: Optional[int] = 1, mode: str = "eager", options: Optional[LatencyOptions] = None,
                     builders: Any = None) -> Tuple[PruningPlan, torch.fx.GraphModule]:
    """The plan and pruned model for a latency target (what ``fxprune.prune(target_latency=...)`` runs).

    Scores the prunable groups once with ``importance``, runs :func:`prune_to_latency` with a
    builder that plans those keep counts and rewrites, and records the measurement in the
    plan's ``policy["latency"]``. ``builders``: the layer-builder table (see :func:`fxprune.rewrite.rewrite`).
    """
    target = target.validated()
    inputs = tuple(example_inputs)
    prunable = [g for g in analysis.groups if g.prunable]
    scores: Dict[int, torch.Tensor] = dict(score_groups(analysis, importance, prunable, scoring)) if prunable else {}
    by_index = {g.index: g for g in analysis.groups}
    plans: Dict[Tuple[Tuple[int, int], ...], PruningPlan] = {}

    def plan_of(counts: Mapping[int, int]) -> PruningPlan:
        key = tuple(sorted(counts.items()))
        if key not in plans:
            keep = {by_index[i].key: int(n) for i, n in counts.items()}
            plans[key] = make_plan(analysis, importance=importance, policy=policy, options=scoring, scores=scores,
                                   keep_counts=keep)
        return plans[key]

    def build(counts: Mapping[int, int]) -> nn.Module:
        return rewrite(analysis, plan_of(counts), inputs, builders=builders)

    pruned, counts, record = prune_to_latency(analysis, original, scores=scores, policy=policy, target=target,
                                              build=build, example_inputs=inputs, device=device,
                                              batch_size=batch_size, mode=mode, options=options)
    result = plan_of(counts)
    result.policy.update(target_latency=target.fraction, target_latency_ms=target.ms, latency=record,
                         achieved_latency=record["fraction"], search="latency")
    if not isinstance(pruned, torch.fx.GraphModule):
        raise InternalError(f"the latency search built a {type(pruned).__name__}, not a GraphModule")
    return result, pruned
