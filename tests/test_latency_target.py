"""Pruning to a latency target (fxprune.latency_model): search, refinement, verification, stores, CLI.

Speed is never asserted. Layer costs come from a synthetic prober (a formula of the channel
counts, with a penalty for counts that are no multiple of 8, so that costs are non-monotone),
and whole-model latency from a synthetic measurement (MACs plus a fixed overhead), so every
number is exact, deterministic and instant.
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Optional, Sequence

import pytest
import torch
from torch import nn

import fxprune
from fxprune.allocation import Policy, count_step
from fxprune.api import analyze_model
from fxprune.cost import count_macs
from fxprune.errors import FxPruneError
from fxprune.latency import LatencyResult, ModelLatency, Speedup
from fxprune.latency_model import (CostTable, LatencyModel, LatencyOptions, LatencyTarget, MemoryStore, Probe,
                                   capacity_counts, layer_shapes, refine_counts, search_counts, table_key,
                                   uniform_counts)
from fxprune.workflow.latency_store import JsonFileStore

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """Small, with a residual add (a group of three layers) and a grouped conv (blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.a = nn.Conv2d(32, 48, 3, padding=1)
        self.b = nn.Conv2d(48, 32, 3, padding=1)
        self.g = nn.Conv2d(32, 64, 3, padding=1, groups=4)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = x + self.b(torch.relu(self.a(x)))
        x = torch.relu(self.g(x))
        return self.head(x.mean((2, 3)))


X = torch.randn(1, 3, 16, 16)


def synthetic_ms(probe: Probe) -> float:
    """A layer's cost: linear in in*out channels, plus a penalty for misaligned output counts."""
    spatial = math.prod(probe.layer.input_shape[2:]) if probe.layer.kind != "linear" else 1
    cost = 1e-5 * probe.c_in * probe.c_out * spatial / max(1, probe.layer.conv_groups(probe.c_in))
    return cost + (0.02 if probe.c_out % 8 else 0.0)


class Prober:
    def __init__(self) -> None:
        self.calls: List[int] = []

    def __call__(self, probes: Sequence[Probe]) -> List[float]:
        self.calls.append(len(probes))
        return [synthetic_ms(p) for p in probes]


def synthetic_measure(fixed_ms: float = 0.1, per_mmac: float = 1.0, *, slower: bool = False):
    """Whole-model latency: MACs (millions) * per_mmac + fixed_ms; ``slower``: every pruned model as slow as the original."""

    def measure(models: Dict[str, nn.Module]) -> LatencyResult:
        ms = {name: fixed_ms + per_mmac * count_macs(m, (X,)) / 1e6 for name, m in models.items()}
        names = list(models)
        if slower:
            ms = {name: ms[names[0]] * (1.05 if i else 1.0) for i, name in enumerate(names)}
        stats = {n: ModelLatency(n, v, 0.0, v, v, 5, 1, [v] * 5) for n, v in ms.items()}
        speedups = {n: Speedup(n, names[0], ms[names[0]] / ms[n], ms[names[0]] / ms[n], ms[names[0]] / ms[n],
                               ms[names[0]] / ms[n], 5) for n in names[1:]}
        return LatencyResult(stats, speedups, names[0], "eager", "cpu", "synthetic", 1, torch.__version__, "float32",
                             False, [list(X.shape)], 5, 1, "synthetic", False, 0.1)

    return measure


def options(**changes: Any) -> LatencyOptions:
    base = dict(prober=Prober(), measure=synthetic_measure(), store=MemoryStore())
    base.update(changes)
    return LatencyOptions(**base)


def built_model(policy: Policy) -> tuple:
    analysis = analyze_model(Net().eval(), example_inputs=(X,))
    table = CostTable(table_key(torch.device("cpu"), None, 1, False), MemoryStore())
    model = LatencyModel(layer_shapes(analysis, 1), analysis.groups, table, Prober())
    model.measure_grid()
    model.calibrate(model.layers_ms({}) + 0.1)
    scores = fxprune.importance.score_groups(analysis, "l1")
    return analysis, model, scores


def test_search_is_deterministic_given_a_synthetic_table_and_honours_every_constraint() -> None:
    torch.manual_seed(0)
    policy = Policy(ratio=0.0, round_to=2, min_channels=4, max_group_ratio=0.75).validated()
    analysis, model, scores = built_model(policy)
    goal = 0.5 * model.predict({})
    first = search_counts(model, analysis.groups, scores, policy, goal)
    second = search_counts(model, analysis.groups, scores, policy, goal)
    assert first.counts == second.counts and first.predicted_ms == second.predicted_ms
    assert first.reached and first.predicted_ms <= goal and first.moves > 0
    for g in analysis.groups:
        if not g.prunable:
            continue
        n = first.counts[g.index]
        assert n == g.size or n % count_step(g, policy.round_to) == 0  # round_to and grouped-conv blocks
        assert n >= max(4, math.ceil(g.size * 0.25) - 1)  # min_channels and max_group_ratio
    refined = refine_counts(model, analysis.groups, policy, first)
    assert refined.counts == refine_counts(model, analysis.groups, policy, first).counts
    # Never slower than the search's counts (both predicted from the exact probes refinement measured).
    assert refined.predicted_ms <= model.predict(first.counts) * (1 + 1e-9)


def test_refinement_picks_the_measured_fastest_multiple() -> None:
    policy = Policy(ratio=0.0).validated()
    analysis, model, scores = built_model(policy)
    found = search_counts(model, analysis.groups, scores, policy, 0.6 * model.predict({}))
    refined = refine_counts(model, analysis.groups, policy, found)
    # A misaligned output count costs a penalty the synthetic table measures: the refined counts avoid it.
    for g in analysis.groups:
        if g.prunable and refined.counts[g.index] < g.size and g.index in refined.round_to:
            assert refined.counts[g.index] % 8 == 0, (g.key, found.counts[g.index], refined.counts[g.index])
            assert refined.round_to[g.index] >= 8


def test_search_steps_over_a_move_that_saves_nothing() -> None:
    policy = Policy(ratio=0.0).validated()
    analysis, model, scores = built_model(policy)
    found = search_counts(model, analysis.groups, scores, policy, 0.7 * model.predict({}))
    # Steps to a count that is no multiple of 8 cost the penalty: the look-ahead reaches past them,
    # and a long move stops at the first count that meets the goal (no overshoot by a whole look-ahead).
    assert found.reached
    g = next(g for g in analysis.groups if g.prunable and found.counts[g.index] < g.size)
    step = count_step(g, policy.round_to)
    assert model.predict({**found.counts, g.index: found.counts[g.index] + step}) > 0.7 * model.predict({})


def test_prune_meets_a_target_and_records_the_measurement() -> None:
    opts = options()
    pruned = fxprune.prune(Net().eval(), target_latency=0.5, example_inputs=(X,), latency_options=opts)
    plan = pruned.meta["fxprune_plan"]
    record = plan.policy["latency"]
    assert plan.policy["search"] == "latency" and plan.policy["target_latency"] == 0.5
    assert record["fraction"] <= 0.5 and record["after_ms"] < record["before_ms"]
    for key in ("device_name", "threads", "torch", "mode", "batch_size", "method", "predicted_ms", "tries"):
        assert key in record
    assert pruned(X).shape == (1, 10)
    assert fxprune.PruningPlan.from_json(plan.to_json()).policy["latency"]["tries"] == record["tries"]  # plain data
    # Deterministic: the same table and measurement give the same plan.
    again = fxprune.prune(Net().eval(), target_latency=0.5, example_inputs=(X,), latency_options=options())
    assert again.meta["fxprune_plan"].counts() == plan.counts()


def test_second_prune_reuses_the_stored_table() -> None:
    store = MemoryStore()
    first, second = Prober(), Prober()
    fxprune.prune(Net().eval(), target_latency=0.6, example_inputs=(X,), latency_options=options(prober=first, store=store))
    pruned = fxprune.prune(Net().eval(), target_latency=0.6, example_inputs=(X,),
                           latency_options=options(prober=second, store=store))
    assert sum(first.calls) > 0 and sum(second.calls) == 0
    assert pruned.meta["fxprune_plan"].policy["latency"]["table"]["entries_from_store"] > 0


def test_unreachable_target_names_the_best_predicted() -> None:
    # A fixed overhead of 100 ms: no pruning gets near a tenth of the original.
    opts = options(measure=synthetic_measure(fixed_ms=100.0))
    with pytest.raises(FxPruneError, match=r"target_latency=0.1 was not met .* after 1 verified try: the best "
                                           r"reached measured [0-9.]+ ms.*predicted at best [0-9.]+ ms"):
        fxprune.prune(Net().eval(), target_latency=0.1, example_inputs=(X,), latency_options=opts)


def test_nothing_prunable_cannot_meet_a_latency_target() -> None:
    with pytest.raises(FxPruneError, match=r"cannot be met.*predicted at best"):
        fxprune.prune(Net().eval(), target_latency=0.5, example_inputs=(X,), latency_options=options(),
                      ignore=["stem", "a", "g"])


def test_target_missed_when_measured_names_the_best_reached_and_never_returns_a_slower_model() -> None:
    # max_tries searched models, then the uniform and capacity candidates' own tries: none meets it.
    opts = options(measure=synthetic_measure(slower=True), max_tries=2, uniform_tries=1, capacity_tries=0)
    with pytest.raises(FxPruneError, match=r"was not met .* after 3 verified tries: the best reached measured "
                                           r"[0-9.]+ ms, 1\.050 of the original"):
        fxprune.prune(Net().eval(), target_latency=0.5, example_inputs=(X,), latency_options=opts)


@pytest.mark.parametrize("kwargs, message", [
    ({"target_latency": 1.5}, "target_latency must be a fraction"),
    ({"target_latency": 0.0}, "target_latency must be a fraction"),
    ({"target_latency": 0.5, "target_latency_ms": 3.0}, "not both"),
    ({"target_latency_ms": -1.0}, "positive number of milliseconds"),
    ({"target_latency": 0.5, "ratio": 0.3}, "without ratio="),
    ({"target_latency": 0.5, "target_macs": 0.3}, "without ratio="),
    ({"target_latency": 0.5, "latency_mode": "fast"}, "latency_mode must be one of"),
    ({"target_latency": 0.5, "batch_size": 0}, "batch_size must be a positive integer"),
    ({"target_latency": 0.5, "latency_options": {"rounds": 3}}, "latency_options must be"),
])
def test_bad_latency_arguments_are_clear_errors(kwargs: Dict[str, Any], message: str) -> None:
    kwargs = {"example_inputs": (X,), "latency_options": options(), **kwargs}
    with pytest.raises(FxPruneError, match=message):
        fxprune.prune(Net().eval(), **kwargs)


def test_latency_target_needs_example_inputs() -> None:
    with pytest.raises(FxPruneError, match="needs example_inputs"):
        fxprune.prune(Net().eval(), target_latency=0.5, latency_options=options())


def test_target_ms() -> None:
    assert LatencyTarget(ms=2.0).validated().goal_ms(10.0) == 2.0
    assert LatencyTarget(fraction=0.25).validated().goal_ms(10.0) == 2.5


# --------------------------------------------------------------------------- stores


def test_json_store_round_trips_and_is_keyed(tmp_path) -> None:
    store = JsonFileStore(tmp_path / "cache")
    key = table_key(torch.device("cpu"), None, 1, False)
    assert store.load(key) is None
    store.save(key, {"a|1|2": 0.5, "b|3|4": 1.25})
    assert store.load(key) == {"a|1|2": 0.5, "b|3|4": 1.25}
    for change in ({"threads": 2}, {"dtype": "float16"}, {"torch": "0.0"}, {"device_name": "other CPU"},
                   {"channels_last": True}):
        assert store.load({**key, **change}) is None, change  # another key: another table
        assert store.path({**key, **change}) != store.path(key)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [store.path(key).name]  # no temporary left
    data = json.loads(store.path(key).read_text())
    assert data["key"] == key and data["key"]["device_name"] and data["key"]["torch"] == torch.__version__


def test_json_store_ignores_a_file_for_another_key_or_broken(tmp_path) -> None:
    store = JsonFileStore(tmp_path)
    key = table_key(torch.device("cpu"), None, 1, False)
    store.save(key, {"a|1|2": 0.5})
    path = store.path(key)
    data = json.loads(path.read_text())
    data["key"]["threads"] = 7
    path.write_text(json.dumps(data))
    assert store.load(key) is None
    path.write_text("{not json")
    assert store.load(key) is None


def test_cost_table_keys_entries_by_shape(tmp_path) -> None:
    analysis = analyze_model(Net().eval(), example_inputs=(X,))
    one, big = layer_shapes(analysis, 1), layer_shapes(analysis, 8)
    assert one[0].key != big[0].key and big[0].input_shape[0] == 8
    key = table_key(torch.device("cpu"), None, 1, False)
    table = CostTable(key, JsonFileStore(tmp_path))
    prober = Prober()
    probes = [Probe(one[0], 3, 32), Probe(big[0], 3, 32)]
    assert table.ensure(probes, prober) == 2
    again = CostTable(key, JsonFileStore(tmp_path))
    assert again.loaded == 2 and again.ensure(probes, prober) == 0


# --------------------------------------------------------------------------- command line and report


def test_cli_options_parse_into_the_config_and_are_result_options() -> None:
    from fxprune.latency import MODES
    from fxprune.workflow import cli_args
    from fxprune.workflow.job import RESULT_OPTIONS, RunConfig

    assert cli_args.LATENCY_MODES == MODES
    args = cli_args.build_parser().parse_args(["run", "--target-latency", "0.4", "--latency-batch", "4",
                                               "--latency-mode", "compiled"])
    config = cli_args.config_from_args(args)
    assert (config.target_latency, config.latency_device, config.latency_batch, config.latency_mode) == \
        (0.4, "cpu", 4, "compiled")
    assert config.effective_ratio is None and config.requested == "target latency 0.4"
    config.validate()
    for name in ("target_latency", "latency_device", "latency_batch", "latency_mode"):
        assert name in RESULT_OPTIONS  # a checkpoint made for another latency target is never resumed
    assert RunConfig().target_latency is None and RunConfig().requested == "ratio 0.5"


@pytest.mark.parametrize("changes, message", [
    ({"target_latency": 0.5, "ratio": 0.3}, "contradict"),
    ({"target_latency": 0.5, "target_macs": 0.3}, "contradict"),
    ({"target_latency": 1.0}, r"in \(0, 1\)"),
    ({"target_latency": float("nan")}, r"in \(0, 1\)"),
    ({"target_latency": 0.5, "latency_device": "tpu"}, "--latency-device must be one of"),
    ({"target_latency": 0.5, "latency_mode": "jit"}, "--latency-mode must be one of"),
    ({"target_latency": 0.5, "latency_batch": 0}, "--latency-batch must be an integer"),
])
def test_cli_validation_refuses_bad_latency_options_before_any_work(changes: Dict[str, Any], message: str) -> None:
    from fxprune.workflow.errors import ConfigError
    from fxprune.workflow.job import RunConfig

    with pytest.raises(ConfigError, match=message):
        RunConfig(**changes).validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cli_refuses_cuda_latency_without_cuda(tmp_path, capsys) -> None:
    from fxprune.workflow import cli_args

    out = tmp_path / "run"
    code = cli_args.main(["run", "--target-latency", "0.5", "--latency-device", "cuda", "--out", str(out)])
    assert code == 2 and "no CUDA device" in capsys.readouterr().err
    assert not out.exists()  # refused before any work


def test_sweep_refuses_a_latency_target(tmp_path) -> None:
    from fxprune.workflow.errors import ConfigError
    from fxprune.workflow.job import RunConfig, sweep

    with pytest.raises(ConfigError, match="--target-latency contradicts"):
        sweep(RunConfig(target_latency=0.5, out=str(tmp_path / "s")), [0.3])


def test_report_shows_predicted_and_measured_latency_and_the_realised_fraction() -> None:
    from fxprune.workflow.report import latency_target_lines, latency_target_summary

    pruned = fxprune.prune(Net().eval(), target_latency=0.5, example_inputs=(X,), latency_options=options())
    summary = latency_target_summary(pruned)
    assert summary is not None and summary["tries"] and summary["fraction"] <= 0.5
    assert {"give_back_tries", "uniform_tries", "capacity_tries"} <= set(summary)  # each candidate's count
    report = {"pruned": {"latency_target": summary}, "reduction": {"macs_x": 2.0 * summary["speedup"]}}
    text = "\n".join(latency_target_lines(report))
    assert "## Latency target" in text and "| try | phase | predicted (ms)" in text
    assert "realised fraction (speed-up / MACs reduction) 0.50" in text
    chosen = summary.get("chosen_try")
    assert "| predicted by the search |" in text and f"| measured in the search (try {chosen}) |" in text
    assert chosen is not None and summary["tries"][chosen - 1]["met"]
    assert "| re-measured for this report | - | - | - | - | not measured at the target's setting |" in text
    assert latency_target_lines({"pruned": {}}) == []
    assert latency_target_summary(nn.Linear(2, 2)) is None


@pytest.mark.slow
def test_run_prune_model_measures_for_real_and_caches_the_table(tmp_path, monkeypatch) -> None:
    # Real timing of a tiny model: the outcome depends on the machine, so either the target is met
    # (and recorded) or the error names the best reached; the cost table lands in FXPRUNE_CACHE.
    from fxprune.workflow.job import RunConfig, prune_model

    monkeypatch.setenv("FXPRUNE_CACHE", str(tmp_path))
    config = RunConfig(target_latency=0.7, latency_runs=3, importance="l1")  # no calibration data here
    try:
        pruned = prune_model(Net().eval(), config, X)
    except FxPruneError as exc:
        assert "best reached" in str(exc) or "cannot be met" in str(exc)
    else:
        assert pruned.meta["fxprune_plan"].policy["latency"]["fraction"] <= 0.7
    assert list((tmp_path / "latency").glob("latency-*.json"))


@pytest.mark.parametrize("measured_share", [0.95, 0.6, 0.2])
def test_correction_explains_a_measured_model_and_keeps_the_original(measured_share: float) -> None:
    policy = Policy(ratio=0.0).validated()
    analysis, model, scores = built_model(policy)
    base = model.predict({})
    found = search_counts(model, analysis.groups, scores, policy, 0.5 * base)
    before = model.predict(found.counts)
    model.correct(found.counts, measured_share * base)
    assert model.predict({}) == pytest.approx(base, rel=1e-6)
    after = model.predict(found.counts)
    if measured_share >= 0.5:
        assert after == pytest.approx(measured_share * base, rel=1e-6)
    else:  # faster than any non-negative fit explains: as close as one gets
        assert measured_share * base <= after < before
    assert min(model.scale, model.rest_ms, model.fixed_ms) >= 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_latency_target_same_code_path_fp16_channels_last(tmp_path) -> None:
    # The real kernel prober and measurement on the GPU: the outcome is the machine's, so only the
    # structure is checked (a met target records the card; a missed one names the best reached).
    store = JsonFileStore(tmp_path)
    opts = LatencyOptions(rounds=5, probe_rounds=3, dtype=torch.float16, channels_last=True, store=store)
    model = Net().eval()
    try:
        pruned = fxprune.prune(model, target_latency=0.8, example_inputs=(X,), device="cuda", batch_size=64,
                               latency_options=opts)
    except FxPruneError as exc:
        assert "best reached" in str(exc) or "cannot be met" in str(exc)
    else:
        record = pruned.meta["fxprune_plan"].policy["latency"]
        assert record["device_name"] == torch.cuda.get_device_name(0) and record["fraction"] <= 0.8
        assert record["dtype"] == "float16" and record["channels_last"]
    assert list(tmp_path.glob("latency-*.json"))
    assert next(model.parameters()).device.type == "cpu"


def test_kernel_prober_times_every_probe_across_chunks() -> None:
    from fxprune.latency_model import KernelProber

    analysis = analyze_model(Net().eval(), example_inputs=(X,))
    layers = layer_shapes(analysis, 1)
    probes = [Probe(layers[0], 3, c) for c in (8, 16, 32)] + [Probe(layers[-1], 64, 10)]
    times = KernelProber(torch.device("cpu"), rounds=2, warmup=1, min_sample_s=0.0, chunk=2)(probes)
    # Two chunks plus a reference probe in each: one finite, positive time per probe, in order.
    assert len(times) == len(probes) and all(math.isfinite(t) and t > 0 for t in times)


def test_refinement_never_inflates_a_count_far_upwards() -> None:
    from fxprune.latency_model import SearchResult

    policy = Policy(ratio=0.0).validated()
    analysis, model, scores = built_model(policy)
    # Every count equally fast: "no slower" holds everywhere, yet a 6-channel group must not become 32.
    flat = CostTable(model.table.key, MemoryStore())
    model.table, model.prober = flat, lambda probes: [1.0 for _ in probes]
    model.measure_grid()
    g = next(g for g in analysis.groups if g.prunable and g.blocks == 1 and g.size >= 32)
    result = SearchResult(counts={g.index: 6}, predicted_ms=0.0, goal_ms=0.0, reached=True, moves=1)
    refined = refine_counts(model, analysis.groups, policy, result)
    assert 6 <= refined.counts[g.index] <= 8


def test_search_jumps_a_wide_stretch_of_rising_cost() -> None:
    # Costs that rise over a stretch of counts below the full size (a noisy grid cell, or a slow
    # kernel) and fall below it: the search still reaches the goal, and deterministically.
    class Bumpy:
        def __call__(self, probes: Sequence[Probe]) -> List[float]:
            out = []
            for p in probes:
                full = p.layer.out_full
                bump = 0.5 if p.layer.out_slot[0] and full // 4 < p.c_out < full else 0.0
                out.append(synthetic_ms(p) * (p.c_out / full) + bump)
            return out

    policy = Policy(ratio=0.0).validated()
    analysis = analyze_model(Net().eval(), example_inputs=(X,))
    table = CostTable(table_key(torch.device("cpu"), None, 1, False), MemoryStore())
    model = LatencyModel(layer_shapes(analysis, 1), analysis.groups, table, Bumpy(), grid=(1.0, 0.97, 0.25, 0.1))
    model.measure_grid()
    model.calibrate(model.layers_ms({}) + 0.1)
    scores = fxprune.importance.score_groups(analysis, "l1")
    found = search_counts(model, analysis.groups, scores, policy, 0.5 * model.predict({}), lookahead=1)
    assert found.reached and any(found.counts[g.index] < g.size for g in analysis.groups if g.prunable)
    assert search_counts(model, analysis.groups, scores, policy, 0.5 * model.predict({}), lookahead=1).counts == found.counts


# --------------------------------------------------------------------------- overshoot: giving capacity back


class Chain(nn.Module):
    """Three convolutions whose groups prune one channel at a time (fine steps, unlike Net's blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 64, 3, padding=1)
        self.b = nn.Conv2d(64, 64, 3, padding=1)
        self.c = nn.Conv2d(64, 64, 3, padding=1)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.a(x))
        x = torch.relu(self.b(x))
        x = torch.relu(self.c(x))
        return self.head(x.mean((2, 3)))


def result_of(ms: Dict[str, float]) -> LatencyResult:
    """A LatencyResult with these medians (the first name the reference)."""
    names = list(ms)
    stats = {n: ModelLatency(n, v, 0.0, v, v, 5, 1, [v] * 5) for n, v in ms.items()}
    ratio = {n: ms[names[0]] / ms[n] for n in names[1:]}
    speedups = {n: Speedup(n, names[0], r, r, r, r, 5) for n, r in ratio.items()}
    return LatencyResult(stats, speedups, names[0], "eager", "cpu", "synthetic", 1, torch.__version__, "float32",
                         False, [list(X.shape)], 5, 1, "synthetic", False, 0.1)


def convex_measure(power: float = 2.0, fixed_ms: float = 0.1):
    """Pruned models run faster than their MACs say (ms ~ MACs**power): the search's first model overshoots."""
    base = count_macs(Chain().eval(), (X,))

    def measure(models: Dict[str, nn.Module]) -> LatencyResult:
        return result_of({n: fixed_ms + count_macs(m, (X,)) / 1e6 * (count_macs(m, (X,)) / base) ** (power - 1)
                          for n, m in models.items()})

    return measure


def test_overshoot_gives_capacity_back_and_keeps_the_met_model_with_most_macs() -> None:
    no_give_back = fxprune.prune(Chain().eval(), target_latency=0.5, example_inputs=(X,),
                                 latency_options=options(measure=convex_measure(), give_back=0))
    first = no_give_back.meta["fxprune_plan"].policy["latency"]
    assert first["fraction"] < 0.3 and len(first["tries"]) == 1  # the overshoot: 0.25 measured for 0.5 asked

    pruned = fxprune.prune(Chain().eval(), target_latency=0.5, example_inputs=(X,),
                           latency_options=options(measure=convex_measure()))
    record = pruned.meta["fxprune_plan"].policy["latency"]
    tries = record["tries"]
    assert [t["phase"] for t in tries][0] == "search" and {t["phase"] for t in tries[1:]} == {"give back"}
    assert 1 < len(tries) <= 1 + LatencyOptions().give_back and record["give_back_tries"] == len(tries) - 1
    assert any(not t["met"] for t in tries[1:])  # the bracketing overshot once upwards ...
    chosen = tries[record["chosen_try"] - 1]
    assert chosen["met"] and chosen["phase"] == "give back"  # ... and the model returned is a met one
    assert record["fraction"] <= 0.5 and record["fraction"] > first["fraction"]
    assert record["macs_fraction"] == max(t["macs_fraction"] for t in tries if t["met"]) > first["macs_fraction"]
    assert count_macs(pruned, (X,)) / count_macs(Chain().eval(), (X,)) == pytest.approx(record["macs_fraction"])
    again = fxprune.prune(Chain().eval(), target_latency=0.5, example_inputs=(X,),
                          latency_options=options(measure=convex_measure()))
    assert again.meta["fxprune_plan"].counts() == pruned.meta["fxprune_plan"].counts()  # deterministic


def test_no_give_back_when_the_target_is_nearly_used() -> None:
    # ms proportional to MACs: the first model measures just under the target, nothing to give back.
    pruned = fxprune.prune(Chain().eval(), target_latency=0.5, example_inputs=(X,),
                           latency_options=options(measure=convex_measure(power=1.0, fixed_ms=0.0)))
    record = pruned.meta["fxprune_plan"].policy["latency"]
    assert record["give_back_tries"] == 0 and len(record["tries"]) == 1 and record["fraction"] > 0.45


def test_ms_target_returns_the_met_try_even_when_a_missed_one_had_a_smaller_fraction() -> None:
    # The original measures 20 ms in the first pair and 10 ms in the second (load): try 1 is the
    # smaller fraction (0.3) but misses 5 ms; try 2 (0.45 of the original) is 4.5 ms and meets it.
    script = iter([{"original": 10.0}, {"original": 20.0, "pruned": 6.0}, {"original": 10.0, "pruned": 4.5}])

    def measure(models: Dict[str, nn.Module]) -> LatencyResult:
        ms = next(script)
        assert list(ms) == list(models)
        return result_of(ms)

    pruned = fxprune.prune(Chain().eval(), target_latency_ms=5.0, example_inputs=(X,),
                           latency_options=options(measure=measure, give_back=0))
    record = pruned.meta["fxprune_plan"].policy["latency"]
    assert [t["met"] for t in record["tries"]] == [False, True]
    assert record["chosen_try"] == 2 and record["after_ms"] == 4.5 and record["fraction"] == pytest.approx(0.45)


def scripted_give_back(give_back_fraction: float, q25_speedup: Optional[float] = None):
    """The search's try measures 0.25 of the original (an overshoot); every give-back try measures
    ``give_back_fraction`` (median), with its per-round speed-ups' lower quartile ``q25_speedup``."""

    def measure(models: Dict[str, nn.Module]) -> LatencyResult:
        if "pruned" not in models:
            return result_of({"original": 10.0})
        searched = measure.calls == 0
        measure.calls += 1
        fraction = 0.25 if searched else give_back_fraction
        result = result_of({"original": 10.0, "pruned": 10.0 * fraction})
        if q25_speedup is not None and not searched:
            s = result.speedups["pruned"]
            result.speedups["pruned"] = Speedup(s.model, s.reference, s.median, q25_speedup, s.q75, s.ratio_of_medians,
                                                s.samples)
        return result

    measure.calls = 0
    return measure


@pytest.mark.parametrize("fraction, q25, met", [
    (0.49, None, False),   # under the target, but not the margin's 3 % under it: the edge
    (0.46, 1.9, False),    # 8 % under by the median, but a quarter of the rounds measured above 0.5
    (0.46, None, True),    # the control: clear of the edge by both, so capacity is given back
])
def test_give_back_does_not_stop_on_the_edge_of_the_target(fraction: float, q25: Optional[float], met: bool) -> None:
    pruned = fxprune.prune(Chain().eval(), target_latency=0.5, example_inputs=(X,),
                           latency_options=options(measure=scripted_give_back(fraction, q25)))
    record = pruned.meta["fxprune_plan"].policy["latency"]
    tries = record["tries"]
    assert tries[0]["phase"] == "search" and tries[0]["met"] and len(tries) > 1
    assert all(t["met"] is met for t in tries[1:] if t["phase"] == "give back")
    chosen = tries[record["chosen_try"] - 1]
    assert chosen["phase"] == ("give back" if met else "search")
    assert record["fraction"] == pytest.approx(fraction if met else 0.25)


@pytest.mark.parametrize("changes, message", [({"give_back": -1}, "give_back must be an integer >= 0"),
                                              ({"margin": 0.05}, r"margin must be a fraction in \[0, overshoot / 2\)"),
                                              ({"margin": -0.01}, "margin must be"),
                                              ({"overshoot": 0.0}, r"overshoot must be a fraction in \(0, 1\)"),
                                              ({"overshoot": True}, "overshoot must be"),
                                              ({"uniform_tries": -1}, "uniform_tries must be an integer >= 0"),
                                              ({"uniform_tries": 1.5}, "uniform_tries must be")])
def test_give_back_options_are_validated(changes: Dict[str, Any], message: str) -> None:
    with pytest.raises(FxPruneError, match=message):
        options(**changes).validated()


def _target_report(speedup: float, pruned_ms: float) -> Dict[str, Any]:
    """report.json as a run writes it after a latency-target prune re-measured at ``cpu/eager/b1``."""
    from fxprune.workflow.report import latency_target_summary

    pruned = fxprune.prune(Net().eval(), target_latency=0.5, example_inputs=(X,), latency_options=options())
    summary = latency_target_summary(pruned)
    assert summary is not None
    summary["report_key"] = "cpu/eager/b1"
    key = "cpu/eager/b1"
    return {"baseline": {"latency_ms": {key: pruned_ms * speedup}}, "reduction": {"macs_x": 3.0},
            "pruned": {"latency_target": summary, "latency_ms": {key: pruned_ms}},
            "latency": {"settings": {key: {"speedup": speedup}}}}


def test_report_re_measures_the_target_per_stage_and_says_when_it_held() -> None:
    from fxprune.workflow.report import latency_target_lines, latency_target_recheck, latency_target_warnings

    report = _target_report(speedup=2.5, pruned_ms=4.0)
    assert latency_target_recheck(report) == {"key": "cpu/eager/b1", "fraction": 0.4, "ms": 4.0, "held": True}
    text = "\n".join(latency_target_lines(report))
    # stage rows: prediction, the search's measurement, the report's re-measurement (realised 2.5 / 3 = 0.83)
    assert "| re-measured for this report (`cpu/eager/b1`, after fine-tuning) | 4.000 | 0.400 | 0.333 | 0.83 | yes |" in text
    assert latency_target_warnings(report) == []


def test_report_warns_loudly_when_the_target_did_not_hold_at_the_re_measurement() -> None:
    from fxprune.workflow.report import latency_target_lines, latency_target_warnings

    report = _target_report(speedup=1.6, pruned_ms=4.0)  # 0.625 of the baseline: over 0.5
    warning = "\n".join(latency_target_warnings(report))
    assert "WARNING: the latency target (target_latency=0.5) did NOT hold" in warning and "0.625" in warning
    assert "| 4.000 | 0.625 | 0.333 | 0.53 | NO |" in "\n".join(latency_target_lines(report))
    slower = _target_report(speedup=0.8, pruned_ms=4.0)
    assert "did NOT hold" in "\n".join(latency_target_warnings(slower))


def test_report_rechecks_a_millisecond_target_by_the_pruned_median() -> None:
    from fxprune.workflow.report import latency_target_recheck

    report = _target_report(speedup=2.0, pruned_ms=4.0)
    target = report["pruned"]["latency_target"]
    target.update(target_fraction=None, target_ms=3.5, target="target_latency_ms=3.5")
    assert latency_target_recheck(report)["held"] is False
    target["target_ms"] = 4.5
    assert latency_target_recheck(report)["held"] is True


def test_run_re_measures_at_the_latency_batch_and_keys_it(monkeypatch) -> None:
    # measure_latency_pair times the target's batch too (here 8, besides 1 and 32), and the
    # summary's report_key names that setting.
    import importlib

    from fxprune.workflow.evaluate import latency_target_key

    run_module = importlib.import_module("fxprune.workflow.job")  # the package's ``run`` is the function

    seen: Dict[str, Any] = {}

    def fake_compare(baseline, pruned, sample, **kwargs):
        seen.update(kwargs)
        return {"baseline": {}, "pruned": {}, "latency": {"settings": {}}}

    class Ctx:
        is_main = True

    class Session:
        config = run_module.RunConfig(target_latency=0.5, latency_batch=8)
        ctx = Ctx()
        timings: Dict[str, float] = {}

        class data:
            test = None

    monkeypatch.setattr(run_module, "compare_latency", fake_compare)
    monkeypatch.setattr(run_module, "example_batch", lambda data, n: X)
    monkeypatch.setattr(run_module, "barrier", lambda ctx: None)
    run_module.measure_latency_pair(Session(), nn.Identity(), nn.Identity(), {"macs": 2}, {"macs": 1})
    assert seen["batch_sizes"] == [1, 8, 32]
    pruned = fxprune.prune(Net().eval(), target_latency=0.5, example_inputs=(X,), batch_size=8,
                           latency_options=options())
    assert latency_target_key(pruned.meta["fxprune_plan"].policy["latency"]) == "cpu/eager/b8"


@pytest.mark.parametrize("power", [0.8, 0.6])
def test_a_missed_first_try_is_followed_by_a_refit_that_meets_the_target(power: float) -> None:
    # Pruned models run slower than their layers predict (ms ~ MACs**power, power < 1): the first
    # model misses, the correction refitted on it makes the next one meet the target; at 0.6 that
    # one overshoots, and capacity is given back.
    pruned = fxprune.prune(Chain().eval(), target_latency=0.5, example_inputs=(X,),
                           latency_options=options(measure=convex_measure(power)))
    record = pruned.meta["fxprune_plan"].policy["latency"]
    tries = record["tries"]
    assert not tries[0]["met"] and tries[0]["measured_fraction"] > 0.5 and tries[1]["met"]
    assert tries[1]["macs_fraction"] < tries[0]["macs_fraction"]  # the refit pruned more
    assert record["fraction"] <= 0.5 and tries[record["chosen_try"] - 1]["met"]
    assert (record["give_back_tries"] > 0) == (power == 0.6)


# --------------------------------------------------------------------------- the uniform candidate


def test_uniform_candidate_wins_when_it_keeps_more_macs_at_the_target() -> None:
    # Latency proportional to MACs: the greedy search (per-layer costs, importance per ms) stops
    # at 0.38 of the original with 0.375 of the MACs; uniform pruning aimed just under the target
    # measures 0.46 with 0.457 of the MACs, and the more capacity is returned.
    without = fxprune.prune(Net().eval(), target_latency=0.5, example_inputs=(X,),
                            latency_options=options(uniform_tries=0, capacity_tries=0))
    alone = without.meta["fxprune_plan"].policy["latency"]
    assert [t["phase"] for t in alone["tries"]] == ["search"] and alone["uniform_tries"] == 0
    pruned = fxprune.prune(Net().eval(), target_latency=0.5, example_inputs=(X,),
                           latency_options=options(capacity_tries=0))
    record = pruned.meta["fxprune_plan"].policy["latency"]
    chosen = record["tries"][record["chosen_try"] - 1]
    assert chosen["phase"] == "uniform" and chosen["met"] and record["uniform_tries"] == 1
    assert record["fraction"] <= 0.5 and record["macs_fraction"] > alone["macs_fraction"]
    assert count_macs(pruned, (X,)) / count_macs(Net().eval(), (X,)) == pytest.approx(record["macs_fraction"])
    counts = pruned.meta["fxprune_plan"].counts()
    again = fxprune.prune(Net().eval(), target_latency=0.5, example_inputs=(X,),
                          latency_options=options(capacity_tries=0))
    assert again.meta["fxprune_plan"].counts() == counts  # deterministic


# --------------------------------------------------------------------------- the capacity candidate


@pytest.mark.parametrize("share", [0.5, 0.3])
def test_capacity_counts_keep_more_macs_than_uniform_at_the_same_prediction(share: float) -> None:
    # The synthetic table charges a MAC of the Linear head (no kernel) 9x a 3x3 conv's, and
    # misaligned output counts extra: moving channels keeps more MACs for the same time.
    policy = Policy(ratio=0.0).validated()
    analysis, model, _ = built_model(policy)
    goal = share * model.predict({})
    uniform = uniform_counts(model, analysis.groups, policy, goal)
    first = capacity_counts(model, analysis.groups, policy, goal, uniform)
    second = capacity_counts(model, analysis.groups, policy, goal, uniform)
    assert first.counts == second.counts and first.moves == second.moves > 0  # deterministic
    assert first.reached and model.predict(first.counts) <= goal * (1 + 1e-9)
    assert model.macs(first.counts) > model.macs(uniform.counts)
    steps = {g.index: count_step(g, policy.round_to) for g in analysis.groups if g.prunable}
    for g in analysis.groups:
        if g.prunable:
            assert 1 <= first.counts[g.index] <= g.size and first.counts[g.index] % steps[g.index] == 0
            assert first.counts[g.index] % g.blocks == 0  # the grouped conv's blocks stay equal
    # A start that misses the goal is returned as it is.
    missed = capacity_counts(model, analysis.groups, policy, 0.01 * goal, uniform)
    assert missed is uniform


def test_capacity_candidate_is_returned_when_it_keeps_the_most_macs() -> None:
    uniform = fxprune.prune(Net().eval(), target_latency=0.5, example_inputs=(X,),
                            latency_options=options(capacity_tries=0))
    pruned = fxprune.prune(Net().eval(), target_latency=0.5, example_inputs=(X,), latency_options=options())
    before, record = uniform.meta["fxprune_plan"].policy["latency"], pruned.meta["fxprune_plan"].policy["latency"]
    chosen = record["tries"][record["chosen_try"] - 1]
    assert chosen["phase"] == "capacity" and chosen["met"] and record["capacity_tries"] == 1
    assert record["fraction"] <= 0.5 and record["macs_fraction"] > before["macs_fraction"]
    assert count_macs(pruned, (X,)) / count_macs(Net().eval(), (X,)) == pytest.approx(record["macs_fraction"])
    off = fxprune.prune(Net().eval(), target_latency=0.5, example_inputs=(X,),
                        latency_options=options(capacity_tries=0, uniform_tries=0))
    assert "capacity" not in {t["phase"] for t in off.meta["fxprune_plan"].policy["latency"]["tries"]}


def test_uniform_candidate_costs_no_measurement_when_the_search_keeps_more() -> None:
    # Pruned models faster than their MACs say: the search and its give-back keep more MACs than
    # uniform pruning at the same prediction, so the uniform candidate is built but never timed.
    calls: List[int] = []
    measure = convex_measure()

    def counted(models: Dict[str, nn.Module]) -> LatencyResult:
        calls.append(len(models))
        return measure(models)

    with_uniform = fxprune.prune(Chain().eval(), target_latency=0.5, example_inputs=(X,),
                                 latency_options=options(measure=counted))
    timed_with = len(calls)
    calls.clear()
    without = fxprune.prune(Chain().eval(), target_latency=0.5, example_inputs=(X,),
                            latency_options=options(measure=counted, uniform_tries=0))
    record = with_uniform.meta["fxprune_plan"].policy["latency"]
    assert "uniform" not in {t["phase"] for t in record["tries"]} and record["uniform_tries"] == 0
    assert timed_with == len(calls)
    assert with_uniform.meta["fxprune_plan"].counts() == without.meta["fxprune_plan"].counts()


def test_uniform_counts_keep_one_share_under_the_constraints_and_meet_the_prediction() -> None:
    policy = Policy(ratio=0.0, round_to=2, min_channels=4, max_group_ratio=0.75).validated()
    analysis, model, _ = built_model(policy)
    goal = 0.6 * model.predict({})
    found = uniform_counts(model, analysis.groups, policy, goal)
    assert found.reached and found.predicted_ms <= goal * (1 + 1e-9)
    assert uniform_counts(model, analysis.groups, policy, goal).counts == found.counts
    shares = []
    for g in analysis.groups:
        if not g.prunable:
            continue
        n = found.counts[g.index]
        assert n == g.size or n % count_step(g, policy.round_to) == 0
        assert n >= max(4, math.ceil(g.size * 0.25) - 1)
        shares.append(n / g.size)
    # One share for all, up to each group's rounding step (the largest of them is 8 of 64 here).
    assert max(shares) - min(shares) <= 0.25
    # An unreachable goal (under the floors' prediction) is said so, not met by a guess.
    assert not uniform_counts(model, analysis.groups, policy, 1e-6).reached


def test_a_candidate_met_with_latency_to_spare_is_tried_again_with_the_slack_spent() -> None:
    # The searched model misses (a slow first measurement), so the uniform candidate is measured;
    # pruned models then run faster than predicted (convex), and the candidate meets the target
    # with much of its latency unused: its next try raises the aim by the slack.
    convex = convex_measure()
    calls = {"pruned": 0}

    def measure(models: Dict[str, nn.Module]) -> LatencyResult:
        result = convex(models)
        if "pruned" in models:
            calls["pruned"] += 1
            if calls["pruned"] == 1:
                ref = result.models["original"].median_ms
                return result_of({"original": ref, "pruned": 0.9 * ref})
        return result

    def run(uniform_tries: int) -> Dict[str, Any]:
        calls["pruned"] = 0
        opts = options(measure=measure, give_back=0, capacity_tries=0, max_tries=1, uniform_tries=uniform_tries)
        pruned = fxprune.prune(Chain().eval(), target_latency=0.5, example_inputs=(X,), latency_options=opts)
        return pruned.meta["fxprune_plan"].policy["latency"]

    once, more = run(1), run(3)
    uniform = [t for t in more["tries"] if t["phase"] == "uniform"]
    assert not more["tries"][0]["met"] and len(uniform) >= 2
    assert uniform[0]["met"] and uniform[0]["measured_fraction"] < 0.45
    assert uniform[1]["goal_ms"] == pytest.approx(1.5 * uniform[0]["goal_ms"])  # raised by the slack, at most 1.5x
    assert more["macs_fraction"] > once["macs_fraction"] and more["fraction"] <= 0.5 * (1 - LatencyOptions().margin)
    assert run(3)["tries"] == more["tries"]  # deterministic
