"""Latency you can believe: several models timed interleaved, with spread, threads and device.

:func:`measure_latency` times models (typically the original and the pruned one) on the same
inputs **round-robin**: every round takes one :class:`torch.utils.benchmark.Timer` sample of
each model in turn, so that a change in machine load (another process, a frequency change)
hits all of them alike, and the per-round ratios stay meaningful even when the absolute times
drift. Each model is warmed up first (and compiled there, in ``mode="compiled"``).

Why these defaults:

- **1 thread on CPU** (``threads=None``): with several intra-op threads a shared machine's
  other processes make OpenMP threads wait for each other, and timings (and their ratios) swing
  by several times; one thread is what a speed-up ratio can be compared on. Pass ``threads=``
  to measure a deployment's thread count; the thread count is always stated in the result and
  torch's setting is restored afterwards. On CUDA the current thread count is kept.
- **Busy warning**: a sample's relative spread (IQR / median of a model's per-round times)
  above :data:`BUSY_THRESHOLD` (10 %) means the machine was not quiet enough to trust the
  digits; the result says so (``busy``) instead of printing numbers that look exact.
- Speed-ups are the median of the **per-round** ratios (reference time / model time), with
  their quartiles as the spread: a ratio of two medians taken at different loads hides the noise.

CUDA timing is synchronised by ``torch.utils.benchmark``'s default timer.

>>> import torch, fxprune
>>> big = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
>>> small = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
>>> result = fxprune.measure_latency({"original": big, "pruned": small},
...                                  example_inputs=(torch.randn(4, 64),), rounds=3, min_sample_s=0.001)
>>> sorted(result.models), result.threads, result.models["pruned"].samples
(['original', 'pruned'], 1, 3)
>>> result.speedup.reference, result.speedup.model
('original', 'pruned')
>>> fxprune.format_speedup(2.0), fxprune.format_speedup(0.5)
('2.00x faster', '2.00x slower')
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import platform
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .errors import FxPruneError

__all__ = [
    "measure_latency",
    "cpu_name",
    "cpu_kernels",
    "LatencyResult",
    "ModelLatency",
    "Speedup",
    "format_speedup",
    "realised_fraction",
    "device_description",
    "BUSY_THRESHOLD",
    "MODES",
]

logger = logging.getLogger("fxprune.latency")

#: Relative spread (IQR / median of one model's per-round times) above which a measurement is
#: flagged ``busy``. A quiet machine stays well under it (typically 1-3 %).
BUSY_THRESHOLD = 0.10
#: Fewer rounds than this give quartiles that say little; the result warns.
MIN_ROUNDS_FOR_SPREAD = 5
MODES = ("eager", "compiled")
# A sample is never more than this many calls: tiny models reach min_sample_s long before.
_MAX_NUMBER = 100_000


def format_speedup(speedup: Optional[float]) -> str:
    """``"3.12x faster"`` or ``"1.41x slower"`` (never ``"0.71x faster"``); ``"-"`` when unknown.

    >>> format_speedup(3.1234), format_speedup(1 / 1.41), format_speedup(None)
    ('3.12x faster', '1.41x slower', '-')
    """
    if speedup is None or not isinstance(speedup, (int, float)) or not math.isfinite(speedup) or speedup <= 0:
        return "-"
    if speedup >= 1.0:
        return f"{speedup:.2f}x faster"
    return f"{1.0 / speedup:.2f}x slower"


def realised_fraction(speedup: Optional[float], macs_reduction: Optional[float]) -> Optional[float]:
    """Speed-up divided by the MACs reduction (1.0: the model got as much faster as it got cheaper).

    None when either is unknown or not positive.

    >>> round(realised_fraction(5.1, 9.8), 2)
    0.52
    >>> realised_fraction(2.0, None) is None
    True
    """
    for value in (speedup, macs_reduction):
        if value is None or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            return None
    return float(speedup) / float(macs_reduction)  # type: ignore[arg-type]


def _cpuinfo(*keys: str) -> Dict[str, str]:
    """The first value of each of ``keys`` in ``/proc/cpuinfo`` (the first CPU's); empty where it cannot be read."""
    found: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in keys and key not in found:
                    found[key] = value.strip()
                    if len(found) == len(keys):
                        break
    except OSError:
        pass
    return found


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    name = _cpuinfo("model name").get("model name")
    if name:
        return name
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_kernels() -> Dict[str, Any]:
    """What decides which CPU kernels torch runs: the vector ISA it dispatches to and the CPU's family/model.

    Two machines with the same model name ("AMD EPYC" on a VM) can differ here, and then the same
    seed trains to different weights (AVX2 and AVX-512 kernels sum in other orders), so a
    result is reproducible only on a machine with the same entry.

    >>> sorted(cpu_kernels())
    ['capability', 'family', 'model']
    """
    out: Dict[str, Any] = {"capability": None, "family": None, "model": None}
    try:
        out["capability"] = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):  # older torch: no dispatch query
        pass
    info = _cpuinfo("cpu family", "model")
    out.update(family=info.get("cpu family"), model=info.get("model"))
    return out


def device_description(device: Union[str, torch.device]) -> str:
    """What a device is, for a report: the CPU model name or the GPU's name."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_name(index)
    if device.type == "cpu":
        return cpu_name()
    return str(device)


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile); one value is its own quartiles."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return float(q1), float(q2), float(q3)


@dataclass
class ModelLatency:
    """One model's per-call latency over the rounds, in milliseconds."""

    name: str
    median_ms: float
    iqr_ms: float
    q25_ms: float
    q75_ms: float
    samples: int  # rounds, one Timer sample each
    calls_per_sample: int
    times_ms: list[float] = field(default_factory=list)  # per round, in round order

    @property
    def spread(self) -> float:
        """IQR / median (0 when the median is 0)."""
        return self.iqr_ms / self.median_ms if self.median_ms > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "median_ms": self.median_ms, "iqr_ms": self.iqr_ms, "q25_ms": self.q25_ms,
                "q75_ms": self.q75_ms, "samples": self.samples, "calls_per_sample": self.calls_per_sample,
                "spread": self.spread, "times_ms": list(self.times_ms)}


@dataclass
class Speedup:
    """How much faster ``model`` is than ``reference``: median and quartiles of the per-round ratios."""

    model: str
    reference: str
    median: float  # reference time / model time: > 1 faster, < 1 slower
    q25: float
    q75: float
    ratio_of_medians: float
    samples: int

    @property
    def slower(self) -> bool:
        return self.median < 1.0

    def describe(self) -> str:
        """e.g. ``"2.01x faster (IQR 1.95-2.08)"``."""
        return f"{format_speedup(self.median)} (speed-up IQR {self.q25:.2f}-{self.q75:.2f})"

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "reference": self.reference, "median": self.median, "q25": self.q25,
                "q75": self.q75, "ratio_of_medians": self.ratio_of_medians, "samples": self.samples,
                "slower": self.slower, "text": format_speedup(self.median)}


@dataclass
class LatencyResult:
    """What :func:`measure_latency` measured, and how (``to_dict`` for JSON)."""

    models: dict[str, ModelLatency]
    speedups: dict[str, Speedup]  # every model but the reference, against the reference
    reference: str
    mode: str
    device: str
    device_name: str
    threads: int
    torch_version: str
    dtype: str
    channels_last: bool
    input_shapes: list[list[int]]
    rounds: int
    warmup: int
    method: str
    busy: bool
    busy_threshold: float
    warnings: list[str] = field(default_factory=list)

    @property
    def speedup(self) -> Optional[Speedup]:
        """The speed-up of the second model over the first (the usual original/pruned pair)."""
        return next(iter(self.speedups.values()), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "models": {name: m.to_dict() for name, m in self.models.items()},
            "speedups": {name: s.to_dict() for name, s in self.speedups.items()},
            "reference": self.reference, "mode": self.mode, "device": self.device,
            "device_name": self.device_name, "threads": self.threads, "torch": self.torch_version,
            "dtype": self.dtype, "channels_last": self.channels_last, "input_shapes": self.input_shapes,
            "rounds": self.rounds, "warmup": self.warmup, "method": self.method, "busy": self.busy,
            "busy_threshold": self.busy_threshold, "warnings": list(self.warnings),
        }


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _prepare_inputs(example_inputs: Any, device: torch.device, dtype: Optional[torch.dtype],
                    channels_last: bool, batch_size: Optional[int]) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise FxPruneError(f"example_inputs must be a tensor or a non-empty tuple of inputs, got "
                           f"{type(example_inputs).__name__}; hint: example_inputs=(torch.randn(1, 3, 224, 224),)")
    prepared = []
    for value in example_inputs:
        if isinstance(value, torch.Tensor):
            value = value.detach()
            if batch_size is not None:
                if value.dim() == 0:
                    raise FxPruneError("batch_size= needs batched tensor inputs; got a 0-d tensor")
                # Repeat the first sample: every batch size sees the same data.
                value = value[:1].expand(batch_size, *value.shape[1:])
            value = value.to(device)
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            if channels_last and value.dim() == 4:
                value = value.contiguous(memory_format=torch.channels_last)
            else:
                value = value.contiguous()
        prepared.append(value)
    return tuple(prepared)


def _dtype_name(dtype: Optional[torch.dtype]) -> str:
    return "model's own" if dtype is None else str(dtype).replace("torch.", "")


def measure_latency(*models: Union[nn.Module, Mapping[str, nn.Module]],
                    example_inputs: Any,
                    names: Optional[Sequence[str]] = None,
                    device: Union[str, torch.device, None] = None,
                    mode: str = "eager",
                    threads: Optional[int] = None,
                    rounds: int = 10,
                    warmup: int = 3,
                    min_sample_s: float = 0.02,
                    batch_size: Optional[int] = None,
                    dtype: Optional[torch.dtype] = None,
                    channels_last: bool = False,
                    busy_threshold: float = BUSY_THRESHOLD,
                    progress: Optional[Callable[[str], None]] = None,
                    timer: Optional[Callable[[], float]] = None) -> LatencyResult:
    """Time ``models`` interleaved on the same inputs; the first is the reference of the speed-ups.

    ``models``: modules (named ``model0``, ``model1``, ... or by ``names``), or one mapping
    ``{name: module}``. They are deep-copied (moved to ``device``, set to eval, converted to
    ``dtype`` / ``channels_last`` there): the caller's modules are not changed.

    - ``example_inputs``: a tensor or tuple of positional inputs, used as given, or with the first
      sample repeated to ``batch_size``; moved to ``device`` (floating tensors to ``dtype``,
      4-D ones to channels_last when asked).
    - ``device``: default: where the first model's parameters are. ``mode``: ``"eager"`` or
      ``"compiled"`` (``torch.compile(dynamic=False)``, compiled during warm-up; ``progress``
      says so, since inductor can take a minute).
    - ``threads``: torch intra-op threads while measuring (default 1 on CPU, unchanged on CUDA);
      restored afterwards.
    - ``rounds``: samples per model. A round takes one ``Timer.timeit(number)`` sample of each
      model in turn, starting one model further each round (no model always runs first); a
      sample is the mean of ``number`` calls, ``number`` chosen in warm-up so a sample lasts
      about ``min_sample_s``. ``warmup`` untimed calls per model come first.
    - ``dtype`` / ``channels_last``: the deployment precision and layout (e.g. ``torch.float16``
      and ``True`` on a GPU); on CPU only when asked.
    - ``progress(message)``: called with what is happening (default: log at INFO on
      ``fxprune.latency``). ``timer``: the clock for ``torch.utils.benchmark.Timer`` (default:
      its own, which synchronises CUDA); tests pass a fake one.

    Errors from the models themselves (a failing compile, wrong inputs) propagate after the
    thread count is restored.
    """
    from torch.utils.benchmark import Timer

    named = _named_models(models, names)
    if mode not in MODES:
        raise FxPruneError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    for label, value, low in (("rounds", rounds, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise FxPruneError(f"{label} must be an integer >= {low}, got {value!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise FxPruneError(f"threads must be a positive integer or None, got {threads!r}")
    if not (isinstance(min_sample_s, (int, float)) and math.isfinite(min_sample_s) and min_sample_s >= 0):
        raise FxPruneError(f"min_sample_s must be a finite number >= 0, got {min_sample_s!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise FxPruneError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise FxPruneError(f"dtype must be a floating torch.dtype (e.g. torch.float16) or None, got {dtype!r}")
    first = next(iter(named.values()))
    if device is None:
        device = next((p.device for p in first.parameters()), torch.device("cpu"))
    device = torch.device(device)
    if threads is None:
        threads = 1 if device.type == "cpu" else torch.get_num_threads()
    say = progress or (lambda message: logger.info("%s", message))

    inputs = _prepare_inputs(example_inputs, device, dtype, channels_last, batch_size)
    timer_kwargs: dict[str, Any] = {} if timer is None else {"timer": timer}
    runners: dict[str, Callable[[], Any]] = {}
    timers: dict[str, Any] = {}
    numbers: dict[str, int] = {}
    times: dict[str, list[float]] = {name: [] for name in named}
    with _torch_threads(threads), torch.inference_mode():
        for name, model in named.items():
            net = copy.deepcopy(model).to(device).eval()
            if dtype is not None:
                net = net.to(dtype)
            if channels_last:
                net = net.to(memory_format=torch.channels_last)
            if mode == "compiled":
                say(f"latency: compiling {name} with torch.compile (static shapes; inductor can take a minute)")
                # One graph for these input shapes: what a deployment ships, no recompiles in the timing.
                net = torch.compile(net, dynamic=False)
            runner = _bind(net, inputs)
            say(f"latency: warming up {name} on {device} ({mode}, {threads} thread(s))")
            for _ in range(warmup):
                runner()
            measured = Timer(stmt="run()", globals={"run": runner}, num_threads=threads,
                             label=name, **timer_kwargs)
            one = measured.timeit(1).median  # also warms the Timer's own path
            numbers[name] = 1 if one <= 0 else max(1, min(_MAX_NUMBER, math.ceil(min_sample_s / one)))
            runners[name], timers[name] = runner, measured
        order = list(named)
        say(f"latency: timing {', '.join(order)} interleaved, {rounds} round(s)")
        for index in range(rounds):
            start = index % len(order)
            for name in order[start:] + order[:start]:
                sample = timers[name].timeit(numbers[name])
                times[name].append(sample.median * 1000.0)  # per call, in ms
    return _result(named, times, numbers, mode=mode, device=device, threads=threads, dtype=dtype,
                   channels_last=channels_last, inputs=inputs, rounds=rounds, warmup=warmup,
                   busy_threshold=busy_threshold, min_sample_s=min_sample_s)


def _named_models(models: Sequence[Any], names: Optional[Sequence[str]]) -> dict[str, nn.Module]:
    if len(models) == 1 and isinstance(models[0], Mapping):
        if names is not None:
            raise FxPruneError("give names= or a mapping {name: model}, not both")
        named = dict(models[0])
    else:
        if names is None:
            names = [f"model{i}" for i in range(len(models))]
        names = [str(n) for n in names]
        if len(names) != len(models):
            raise FxPruneError(f"names= has {len(names)} names for {len(models)} models")
        if len(set(names)) != len(names):
            raise FxPruneError(f"names= must be distinct, got {names}")
        named = dict(zip(names, models))
    if not named:
        raise FxPruneError("measure_latency needs at least one model; hint: measure_latency(original, pruned, "
                           "example_inputs=(x,))")
    for name, model in named.items():
        if not isinstance(model, nn.Module):
            raise FxPruneError(f"model {name!r} is a {type(model).__name__}, not an nn.Module")
    return named


def _bind(net: Callable[..., Any], inputs: tuple[Any, ...]) -> Callable[[], Any]:
    def run() -> Any:
        return net(*inputs)

    return run


def _result(named: Mapping[str, nn.Module], times: Mapping[str, list[float]], numbers: Mapping[str, int], *,
            mode: str, device: torch.device, threads: int, dtype: Optional[torch.dtype], channels_last: bool,
            inputs: tuple[Any, ...], rounds: int, warmup: int, busy_threshold: float,
            min_sample_s: float) -> LatencyResult:
    stats: dict[str, ModelLatency] = {}
    for name, values in times.items():
        q1, q2, q3 = _quartiles(values)
        stats[name] = ModelLatency(name=name, median_ms=q2, iqr_ms=q3 - q1, q25_ms=q1, q75_ms=q3,
                                   samples=len(values), calls_per_sample=numbers[name], times_ms=list(values))
    reference = next(iter(named))
    speedups: dict[str, Speedup] = {}
    for name in list(named)[1:]:
        ratios = [r / m for r, m in zip(times[reference], times[name]) if m > 0]
        if not ratios:
            continue
        q1, q2, q3 = _quartiles(ratios)
        ratio = stats[reference].median_ms / stats[name].median_ms if stats[name].median_ms > 0 else math.nan
        speedups[name] = Speedup(model=name, reference=reference, median=q2, q25=q1, q75=q3,
                                 ratio_of_medians=ratio, samples=len(ratios))
    warnings: list[str] = []
    worst = max(stats.values(), key=lambda s: s.spread)
    busy = worst.spread > busy_threshold
    if busy:
        warnings.append(f"the machine looked busy: {worst.name}'s times spread by {100 * worst.spread:.0f}% "
                        f"(IQR / median, threshold {100 * busy_threshold:.0f}%); treat the speed-ups as rough")
    if rounds < MIN_ROUNDS_FOR_SPREAD:
        warnings.append(f"only {rounds} round(s): the spread (and the busy check) says little below "
                        f"{MIN_ROUNDS_FOR_SPREAD}")
    method = (f"torch.utils.benchmark.Timer, {rounds} interleaved round(s) (one sample per model per round, "
              f"model order rotated each round), each sample the mean of enough calls to last about "
              f"{min_sample_s * 1000:g} ms (calls_per_sample per model); {warmup} warm-up call(s) per model first; torch.inference_mode; "
              f"{threads} thread(s)" + ("; CUDA synchronised by the Timer" if device.type == "cuda" else ""))
    return LatencyResult(
        models=stats, speedups=speedups, reference=reference, mode=mode, device=str(device),
        device_name=device_description(device), threads=threads, torch_version=torch.__version__,
        dtype=_dtype_name(dtype), channels_last=channels_last,
        input_shapes=[list(x.shape) for x in inputs if isinstance(x, torch.Tensor)],
        rounds=rounds, warmup=warmup, method=method, busy=busy, busy_threshold=busy_threshold,
        warnings=warnings)
