"""fxprune.measure_latency: structure, interleaving, threads, wording, busy flag; the report's latency.

Speed is never asserted: the models here advance a fake clock by a chosen cost per call, and
``measure_latency(timer=clock)`` times with that clock, so every number is exact and instant.
"""

from __future__ import annotations

import doctest
import functools
import json
import logging
import random
from typing import Any, Callable, Optional

import pytest
import torch
from torch import nn

import fxprune
import fxprune.latency
from fxprune.latency import BUSY_THRESHOLD, LatencyResult, format_speedup, measure_latency, realised_fraction



class FakeClock:
    """A clock that moves only when a model says so; shared by deep copies of the models."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[str] = []
        self.threads: list[int] = []

    def __call__(self) -> float:
        return self.now

    def __deepcopy__(self, memo: dict) -> "FakeClock":
        return self  # measure_latency deep-copies the models: they must keep ticking this clock


class Ticking(nn.Module):
    """Costs ``cost()`` seconds of fake time per call, and records the call."""

    def __init__(self, name: str, clock: FakeClock, cost: Callable[[], float]) -> None:
        super().__init__()
        self.name, self.clock, self.cost = name, clock, cost
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.calls.append(self.name)
        self.clock.threads.append(torch.get_num_threads())
        self.clock.now += self.cost()
        return x * self.scale


def _fixed(seconds: float) -> Callable[[], float]:
    return lambda: seconds


def _noisy(low: float, high: float, seed: int) -> Callable[[], float]:
    rng = random.Random(seed)
    return lambda: rng.uniform(low, high)


def _measure(clock: FakeClock, *models: Any, **kwargs: Any) -> LatencyResult:
    kwargs.setdefault("rounds", 6)
    kwargs.setdefault("warmup", 1)
    return measure_latency(*models, example_inputs=(torch.ones(2, 3),), timer=clock, min_sample_s=0.0, **kwargs)


def _collapse(calls: list[str]) -> list[str]:
    out: list[str] = []
    for name in calls:
        if not out or out[-1] != name:
            out.append(name)
    return out


def test_result_structure_and_exact_speedup_from_a_fake_clock() -> None:
    clock = FakeClock()
    original, pruned = Ticking("a", clock, _fixed(2e-3)), Ticking("b", clock, _fixed(1e-3))
    result = _measure(clock, {"original": original, "pruned": pruned})
    assert list(result.models) == ["original", "pruned"] and result.reference == "original"
    a, b = result.models["original"], result.models["pruned"]
    assert a.median_ms == pytest.approx(2.0) and b.median_ms == pytest.approx(1.0)
    assert a.iqr_ms == pytest.approx(0.0, abs=1e-9) and a.samples == b.samples == 6 and len(a.times_ms) == 6
    speed = result.speedup
    assert speed is not None and (speed.reference, speed.model) == ("original", "pruned")
    assert speed.median == pytest.approx(2.0) and speed.q25 == pytest.approx(2.0) and not speed.slower
    assert result.threads == 1 and result.mode == "eager" and result.device == "cpu"
    assert result.device_name and result.torch_version == torch.__version__
    assert "interleaved" in result.method and "torch.utils.benchmark" in result.method
    assert result.busy is False and result.busy_threshold == BUSY_THRESHOLD
    data = json.loads(json.dumps(result.to_dict()))  # JSON-ready
    assert data["speedups"]["pruned"]["text"] == "2.00x faster"
    assert data["models"]["pruned"]["median_ms"] == pytest.approx(1.0)
    assert {"threads", "device_name", "torch", "method", "busy", "input_shapes", "dtype"} <= set(data)
    # The caller's modules are untouched (measured on copies).
    assert original.training and pruned.training


def test_positional_models_and_names() -> None:
    clock = FakeClock()
    result = _measure(clock, Ticking("a", clock, _fixed(1e-3)), Ticking("b", clock, _fixed(1e-3)), rounds=2)
    assert list(result.models) == ["model0", "model1"]
    result = _measure(clock, Ticking("a", clock, _fixed(1e-3)), Ticking("b", clock, _fixed(1e-3)),
                      names=["x", "y"], rounds=2)
    assert list(result.speedups) == ["y"]


def test_models_are_timed_round_robin_with_rotating_start() -> None:
    clock = FakeClock()
    models = {name: Ticking(name, clock, _fixed(1e-3)) for name in "abc"}
    _measure(clock, models, rounds=3, warmup=1)
    # Warm-up a, b, c; then round 1: a b c, round 2: b c a, round 3: c a b (never one model's
    # samples in one block, and no model always first).
    assert _collapse(clock.calls) == list("abc" "abc" "bca" "cab")


def test_slower_is_said_slower() -> None:
    clock = FakeClock()
    result = _measure(clock, {"original": Ticking("a", clock, _fixed(1e-3)),
                              "pruned": Ticking("b", clock, _fixed(3e-3))})
    assert result.speedup.median == pytest.approx(1 / 3) and result.speedup.slower
    assert result.speedup.to_dict()["text"] == "3.00x slower"


def test_threads_are_set_while_timing_and_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        clock = FakeClock()
        result = _measure(clock, Ticking("a", clock, _fixed(1e-3)), rounds=2)
        assert result.threads == 1 and set(clock.threads) == {1}  # default: 1 thread on CPU
        assert torch.get_num_threads() == 2
        clock.threads.clear()
        _measure(clock, Ticking("a", clock, _fixed(1e-3)), rounds=2, threads=2)
        assert set(clock.threads) == {2}

        class Broken(nn.Module):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            _measure(clock, Broken(), rounds=2)
        assert torch.get_num_threads() == 2  # restored after a failure too
    finally:
        torch.set_num_threads(before)


def test_busy_flag_from_the_spread() -> None:
    clock = FakeClock()
    quiet = _measure(clock, {"a": Ticking("a", clock, _fixed(2e-3)), "b": Ticking("b", clock, _fixed(1e-3))},
                     rounds=9)
    assert not quiet.busy and not quiet.warnings
    # Times uniform in [1, 3] ms: a relative IQR near 50 %, far above the 10 % threshold.
    noisy = {"a": Ticking("a", clock, _noisy(1e-3, 3e-3, 0)), "b": Ticking("b", clock, _fixed(1e-3))}
    result = _measure(clock, noisy, rounds=9)
    assert result.busy and result.models["a"].spread > BUSY_THRESHOLD
    assert any("busy" in w for w in result.warnings)
    noisy = {"a": Ticking("a", clock, _noisy(1e-3, 3e-3, 0)), "b": Ticking("b", clock, _fixed(1e-3))}
    assert not _measure(clock, noisy, rounds=9, busy_threshold=10.0).busy
    assert any("round" in w for w in _measure(clock, Ticking("a", clock, _fixed(1e-3)), rounds=2).warnings)


def test_format_speedup_wording() -> None:
    assert format_speedup(3.1234) == "3.12x faster"
    assert format_speedup(1 / 1.41) == "1.41x slower"
    assert format_speedup(0.14) == "7.14x slower"  # never "0.14x faster"
    assert format_speedup(1.0) == "1.00x faster"
    for unknown in (None, float("nan"), 0.0, -1.0, float("inf")):
        assert format_speedup(unknown) == "-"


def test_realised_fraction() -> None:
    assert realised_fraction(5.1, 9.8) == pytest.approx(0.5204, abs=1e-4)
    assert realised_fraction(4.0, 4.0) == 1.0
    for speedup, reduction in ((None, 2.0), (2.0, None), (2.0, 0.0), (float("nan"), 2.0)):
        assert realised_fraction(speedup, reduction) is None


def test_bad_arguments_are_clear_errors() -> None:
    clock = FakeClock()
    model = Ticking("a", clock, _fixed(1e-3))
    with pytest.raises(fxprune.FxPruneError, match="mode must be one of eager, compiled"):
        _measure(clock, model, mode="jit")
    with pytest.raises(fxprune.FxPruneError, match="names= has 2 names for 1 models"):
        _measure(clock, model, names=["a", "b"])
    with pytest.raises(fxprune.FxPruneError, match="rounds must be an integer >= 1"):
        _measure(clock, model, rounds=0)
    with pytest.raises(fxprune.FxPruneError, match="not an nn.Module"):
        _measure(clock, lambda x: x)
    with pytest.raises(fxprune.FxPruneError, match="example_inputs"):
        measure_latency(model, example_inputs=[])


def test_compiled_mode_says_it_compiles(monkeypatch: pytest.MonkeyPatch) -> None:
    compiled: list[Any] = []

    def fake_compile(model: nn.Module, **kwargs: Any) -> nn.Module:
        compiled.append(kwargs)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    clock, messages = FakeClock(), []
    result = _measure(clock, {"a": Ticking("a", clock, _fixed(1e-3)), "b": Ticking("b", clock, _fixed(1e-3))},
                      mode="compiled", rounds=2, progress=messages.append)
    assert result.mode == "compiled" and compiled == [{"dynamic": False}] * 2
    assert sum("compiling" in m and "torch.compile" in m for m in messages) == 2


class _Recorder(nn.Module):
    """A tiny conv net that records the dtype and layout it is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.seen: list[tuple[torch.dtype, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((x.dtype, x.is_contiguous(memory_format=torch.channels_last)))
        return self.conv(x)

    def __deepcopy__(self, memo: dict) -> "_Recorder":
        # Keep ``seen`` shared with the copy measure_latency makes, so the test can read it.
        clone = _Recorder.__new__(_Recorder)
        nn.Module.__init__(clone)
        clone.conv = nn.Conv2d(3, 4, 3)
        clone.conv.load_state_dict(self.conv.state_dict())
        clone.seen = self.seen
        return clone


def test_deployment_dtype_and_channels_last_on_cpu() -> None:
    model = _Recorder()
    result = measure_latency(model, example_inputs=(torch.randn(1, 3, 8, 8),), batch_size=2, rounds=1,
                             warmup=1, min_sample_s=0.0, dtype=torch.bfloat16, channels_last=True)
    assert set(model.seen) == {(torch.bfloat16, True)}
    assert result.dtype == "bfloat16" and result.channels_last and result.input_shapes == [[2, 3, 8, 8]]
    assert model.conv.weight.dtype == torch.float32  # the caller's model is not converted
    with pytest.raises(fxprune.FxPruneError, match="dtype"):
        measure_latency(model, example_inputs=(torch.randn(1, 3, 8, 8),), dtype=torch.int8)


def test_docstring_examples_run() -> None:
    failures, tried = doctest.testmod(fxprune.latency, optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0


def test_measure_latency_is_exported() -> None:
    for name in ("measure_latency", "LatencyResult", "format_speedup", "realised_fraction"):
        assert name in fxprune.__all__ and getattr(fxprune, name) is getattr(fxprune.latency, name)


# ----------------------------------------------------------------------------- the workflow side


def _synthetic_report(baseline_ms: float, pruned_ms: float, *, busy: bool = False,
                      macs_x: Optional[float] = 4.0) -> dict[str, Any]:
    speedup = baseline_ms / pruned_ms
    row = {"baseline_ms": baseline_ms, "baseline_iqr_ms": 0.1, "pruned_ms": pruned_ms, "pruned_iqr_ms": 0.05,
           "speedup": speedup, "speedup_q25": speedup * 0.95, "speedup_q75": speedup * 1.05,
           "speedup_text": format_speedup(speedup), "realised_fraction": realised_fraction(speedup, macs_x),
           "slower": speedup < 1, "busy": busy, "spread": 0.3 if busy else 0.02, "samples": 20, "threads": 1}
    entry = {"top1": 90.0, "top5": 99.0, "params": 1000, "macs": 4000, "size_mb": 1.0, "samples": 100}
    return {
        "baseline": {**entry, "latency_ms": {"cpu/eager/b1": baseline_ms},
                     "latency_iqr_ms": {"cpu/eager/b1": 0.1}},
        "pruned": {**entry, "macs": 1000, "latency_ms": {"cpu/eager/b1": pruned_ms},
                   "latency_iqr_ms": {"cpu/eager/b1": 0.05}},
        "reduction": {"macs_x": macs_x},
        "latency": {"settings": {"cpu/eager/b1": row}, "threads": 1, "torch": torch.__version__,
                    "method": "torch.utils.benchmark.Timer, 20 interleaved rounds", "devices": {"cpu": "Test CPU"},
                    "busy": busy},
        "config": {"model": "resnet18", "importance": "l1", "ratio": 0.5}, "machine": {"cpu": "Test CPU"},
    }


def test_report_faster_case() -> None:
    from fxprune.workflow.report import latency_rows, render_markdown

    report = _synthetic_report(2.0, 1.0)
    assert latency_rows(report) == ["| latency cpu/eager/b1 (ms) | 2.000 ± 0.100 | 1.000 ± 0.050 | 2.00x faster |"]
    md = render_markdown(report)
    assert "WARNING" not in md and "slower" not in md
    assert "| cpu/eager/b1 | 2.000 ± 0.100 | 1.000 ± 0.050 | 2.00x faster | 1.90-2.10 | 0.50 | 20 | 1 |" in md
    assert "interleaved" in md and "1 CPU thread(s)" in md


def test_report_slower_case_says_slower_and_warns() -> None:
    from fxprune.workflow.report import latency_warnings, render_markdown

    report = _synthetic_report(1.0, 1.41)
    md = render_markdown(report)
    assert "1.41x slower" in md and "faster" not in md.split("## Latency")[0].split("| metric")[1]
    assert "0.71x" not in md
    assert any("WARNING: the pruned model is SLOWER" in line for line in latency_warnings(report))
    assert md.index("WARNING: the pruned model is SLOWER") < md.index("| metric |")  # at the top, loud


def test_report_busy_case_warns() -> None:
    from fxprune.workflow.report import render_markdown

    md = render_markdown(_synthetic_report(2.0, 1.0, busy=True))
    assert "WARNING: the machine looked busy" in md and "BUSY" in md


def test_old_reports_without_the_latency_section_still_render() -> None:
    from fxprune.workflow.report import latency_rows, render_markdown

    report = _synthetic_report(1.0, 2.0)
    del report["latency"], report["baseline"]["latency_iqr_ms"], report["pruned"]["latency_iqr_ms"]
    assert latency_rows(report) == ["| latency cpu/eager/b1 (ms) | 1.000 | 2.000 | 2.00x slower |"]
    assert "WARNING: the pruned model is SLOWER" in render_markdown(report)


def test_sweep_markdown_warns_about_slower_points() -> None:
    from fxprune.workflow.report import render_sweep_markdown

    slow = _synthetic_report(1.0, 2.0)
    point = {"importance": "l1", "ratio": 0.3, **slow["pruned"], "latency": slow["latency"]}
    md = render_sweep_markdown({"baseline": slow["baseline"], "points": [point]})
    assert "WARNING: pruned models SLOWER than the baseline: l1 r=0.3 at `cpu/eager/b1` (2.00x slower)" in md


def test_compare_latency_interleaves_and_warns_when_slower(caplog: pytest.LogCaptureFixture) -> None:
    from fxprune.workflow.evaluate import compare_latency, latency_settings

    clock = FakeClock()
    baseline, pruned = Ticking("base", clock, _fixed(1e-3)), Ticking("pruned", clock, _fixed(2e-3))
    measure = functools.partial(measure_latency, timer=clock, min_sample_s=0.0, warmup=1)
    with caplog.at_level(logging.INFO, logger="fxprune"):
        out = compare_latency(baseline, pruned, torch.ones(1, 3), settings=latency_settings(batch_sizes=(1, 4),
                              compile=False), rounds=5, macs_reduction=4.0, measure=measure)
    assert set(out["baseline"]["latency_ms"]) == {"cpu/eager/b1", "cpu/eager/b4"}
    assert out["baseline"]["latency_ms"]["cpu/eager/b1"] == pytest.approx(1.0)
    assert out["pruned"]["latency_iqr_ms"]["cpu/eager/b4"] == pytest.approx(0.0, abs=1e-9)
    row = out["latency"]["settings"]["cpu/eager/b1"]
    assert row["speedup_text"] == "2.00x slower" and row["slower"] and row["threads"] == 1
    assert row["realised_fraction"] == pytest.approx(0.5 / 4.0)
    assert out["latency"]["slower"] == ["cpu/eager/b1", "cpu/eager/b4"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("SLOWER" in w and "cpu/eager/b1" in w for w in warnings)
    assert "base" in clock.calls and "pruned" in clock.calls


def test_latency_settings_add_the_gpu_deployment_layout() -> None:
    from fxprune.workflow.evaluate import DEPLOY_DTYPE, latency_settings

    keys = [s.key for s in latency_settings(["cpu", "cuda"], batch_sizes=(1,), compile=True)]
    assert keys == ["cpu/eager/b1", "cpu/compile/b1", "cuda/eager/b1", "cuda/compile/b1",
                    "cuda/eager-fp16-cl/b1", "cuda/compile-fp16-cl/b1"]
    deploy = [s for s in latency_settings(["cuda"], batch_sizes=(1,), compile=False) if s.dtype is not None]
    assert [(s.dtype, s.channels_last) for s in deploy] == [(DEPLOY_DTYPE, True)]


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fp16_channels_last() -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3)).eval()
    small = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    result = measure_latency({"original": model, "pruned": small}, example_inputs=(torch.randn(1, 3, 32, 32),),
                             device="cuda", batch_size=8, rounds=3, dtype=torch.float16, channels_last=True)
    assert result.device.startswith("cuda") and result.device_name == torch.cuda.get_device_name(0)
    assert result.dtype == "float16" and result.channels_last and "synchronised" in result.method
    assert result.models["pruned"].median_ms > 0 and result.speedup is not None
    assert next(model.parameters()).device.type == "cpu"  # the caller's model stays where it was


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compare_latency_times_the_deployment_setting() -> None:
    from fxprune.workflow.evaluate import compare_latency

    base = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3)).eval()
    pruned = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    out = compare_latency(base, pruned, torch.randn(1, 3, 32, 32), devices=["cuda"], batch_sizes=(1,),
                          compile=False, rounds=3)
    assert set(out["baseline"]["latency_ms"]) == {"cuda/eager/b1", "cuda/eager-fp16-cl/b1"}
    assert all(v is not None and v > 0 for v in out["pruned"]["latency_ms"].values()), out
