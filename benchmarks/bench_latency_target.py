"""Latency-target pruning vs uniform ratio pruning at the same measured latency: the acceptance run.

One command runs every acceptance measurement of latency-target pruning and writes
``benchmarks/LATENCY.md`` (``--md``) and ``benchmarks/latency_target.json`` (``--json``) with
the machine, date and load average before and after:

1. **resnet18 and resnet50** at 224x224 (random weights, L1 importance, CPU eager by default,
   1 thread), batch 1 and 32: ``fxprune.prune(target_latency=t)`` for t = 0.5 and 0.3, and a
   ladder of uniform ratios; then **one** interleaved measurement of the original, every
   latency-pruned model and every uniform model together (:func:`fxprune.measure_latency`),
   so that all of them see the same machine load. Per target: the measured fraction
   (re-measured in that run; the target holds when it is at most t), the MACs kept, the MACs
   uniform pruning keeps at the same measured latency (interpolated along the ladder) and their
   ratio (acceptance: >= 1.2).
2. **mobilenet_v3_small and efficientnet_b0** (depthwise-heavy), batch 1, targets 0.5 and 0.75
   (``--depthwise-targets``; on one CPU thread mobilenet_v3_small's floor is about 0.66, so 0.5
   documents the clear error that names the best reached): the realised fraction (speed-up /
   MACs reduction) and whether the target still holds.
3. **The Fashion-MNIST main job** (``fxprune run``: resnet18, same seed, same fine-tune):
   uniform ratio 0.7 first; its measured latency fraction (the run's interleaved timing at the
   latency setting) becomes the latency target of the second run, which reuses the first run's
   trained baseline. Which fraction (``--fmnist-target``): by default its upper quartile, the
   statistic a latency target is checked with (a model is accepted only when the upper quartile
   of its per-round fraction is under the target), so both runs are held to one yardstick;
   ``median`` asks the latency run to be faster than uniform's own upper quartile. Top-1 after the same fine-tune, side by side (acceptance: the latency run
   at least as good), and the two pruned models re-measured interleaved with the unpruned one.

Full run, on a quiet machine (``--estimate`` prints how long it should take, from the count of
layer probes and model measurements, without timing anything)::

    python benchmarks/bench_latency_target.py

Quick run (resnet18 batch 1 target 0.5, mobilenet_v3_small, a 2048-sample Fashion-MNIST job of
one epoch; a check that everything runs, not the acceptance numbers)::

    python benchmarks/bench_latency_target.py --quick

``--device cuda`` measures on the GPU (benchmarks/gpu_check.sh runs it so).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
import torchvision

import fxprune
from fxprune.cost import count_macs
from fxprune.errors import FxPruneError
from fxprune.latency import device_description, measure_latency, realised_fraction
from fxprune.latency_model import GRID_FRACTIONS, CostTable, LatencyModel, LatencyOptions, MemoryStore, Probe, \
    layer_shapes

HERE = Path(__file__).resolve().parent
LADDER = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
#: The uniform ratio whose measured latency the Fashion-MNIST latency run targets.
FMNIST_RATIO = 0.7
#: Fashion-MNIST training images and the default job's epochs: its documented size (<= 10 min on 2 cores).
FMNIST_SAMPLES, DEFAULT_JOB_SAMPLE_EPOCHS = 60000, 60000 * (3 + 5)
#: Assumed throughput of one CPU thread (fp32 convolutions) and of a GPU, for --estimate only.
ASSUMED_GMACS = {"cpu": 20.0, "cuda": 20000.0}
#: Per-call overhead (s) the estimate adds to every probe and model call.
CALL_OVERHEAD_S = {"cpu": 2e-5, "cuda": 1e-5}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--targets", default="0.5,0.3")
    p.add_argument("--depthwise", default="mobilenet_v3_small,efficientnet_b0",
                   help="models whose realised fraction is reported at --depthwise-targets, batch 1 ('' for none)")
    p.add_argument("--depthwise-targets", default="0.5,0.75",
                   help="latency targets of the depthwise models (an unreachable one is reported with its error)")
    p.add_argument("--ladder", default=",".join(str(r) for r in LADDER), help="uniform ratios to compare against")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--mode", default="eager", choices=("eager", "compiled"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default=None, choices=("float16", "bfloat16", "float32"),
                   help="deployment precision (e.g. float16 on a GPU; default: the model's own)")
    p.add_argument("--channels-last", action="store_true", help="deployment layout channels_last (GPUs)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=10, help="rounds of the final interleaved measurement")
    p.add_argument("--search-rounds", type=int, default=7, help="rounds of each verification inside the search")
    p.add_argument("--probe-rounds", type=int, default=5)
    p.add_argument("--no-fmnist", dest="fmnist", action="store_false",
                   help="skip the Fashion-MNIST main-job comparison (latency target vs uniform 0.7)")
    p.add_argument("--fmnist-out", default=None, help="where the two runs write (default: a folder beside --json)")
    p.add_argument("--fmnist-batch", type=int, default=1, choices=(1, 32),
                   help="the batch the Fashion-MNIST latency target is measured at (the runs time 1 and 32)")
    p.add_argument("--fmnist-target", choices=("q75", "median"), default="q75",
                   help="which of uniform 0.7's measured fractions becomes the latency target: its upper quartile "
                        "(the statistic a target is checked with; default) or its median")
    p.add_argument("--fmnist-seed", type=int, default=0)
    p.add_argument("--fmnist-limit", type=int, default=None, help="samples per split (default: all)")
    p.add_argument("--fmnist-epochs", type=int, default=5, help="fine-tuning epochs of both runs")
    p.add_argument("--fmnist-baseline-epochs", type=int, default=3)
    p.add_argument("--fmnist-threads", type=int, default=None,
                   help="torch threads of the two runs' training (default: every core; their timings use 1)")
    p.add_argument("--quick", "--short", dest="quick", action="store_true",
                   help="resnet18 batch 1 target 0.5, a 3-step ladder, mobilenet_v3_small, a 2048-sample "
                        "one-epoch Fashion-MNIST job, few rounds: checks that it all runs (numbers rough)")
    p.add_argument("--estimate", action="store_true",
                   help="print the expected run time (counted probes and model calls at an assumed throughput) "
                        "and exit; times nothing")
    p.add_argument("--gmacs-per-s", type=float, default=None,
                   help="throughput --estimate assumes (default: 20 per CPU thread, 20000 on cuda)")
    p.add_argument("--md", default=str(HERE / "LATENCY.md"))
    p.add_argument("--json", default=str(HERE / "latency_target.json"))
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The options, with ``--quick`` applied and every list checked (a bad one exits with status 2)."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.batches, args.targets, args.depthwise = "resnet18", "1", "0.5", "mobilenet_v3_small"
        args.depthwise_targets = "0.75"
        args.ladder, args.rounds, args.search_rounds, args.probe_rounds = "0.3,0.5,0.7", 5, 5, 3
        args.fmnist_limit, args.fmnist_epochs, args.fmnist_baseline_epochs = 2048, 1, 1
    try:
        targets, ladder = floats(args.targets), floats(args.ladder)
        targets += floats(args.depthwise_targets)
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError as exc:
        p.error(f"--targets, --ladder and --batches are comma-separated numbers: {exc}")
    if any(not 0 < t < 1 for t in targets) or not targets:
        p.error(f"--targets are fractions in (0, 1), got {args.targets!r}")
    if any(not 0 < r < 1 for r in ladder):
        p.error(f"--ladder ratios are in (0, 1), got {args.ladder!r}")
    if any(b < 1 for b in batches) or not batches:
        p.error(f"--batches are positive integers, got {args.batches!r}")
    known = set(torchvision.models.list_models(module=torchvision.models))
    for name in names(args.models) + names(args.depthwise):
        if name not in known:
            p.error(f"{name!r} is no torchvision classification model")
    for flag, value in (("--threads", args.threads), ("--rounds", args.rounds), ("--search-rounds", args.search_rounds),
                        ("--probe-rounds", args.probe_rounds), ("--size", args.size), ("--fmnist-batch", args.fmnist_batch),
                        ("--fmnist-epochs", args.fmnist_epochs)):
        if value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    if args.gmacs_per_s is not None and not args.gmacs_per_s > 0:
        p.error("--gmacs-per-s must be positive")
    return args


def floats(text: str) -> List[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def names(text: str) -> List[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def _load() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def interpolate_macs(points: List[Dict[str, float]], fraction: float) -> Optional[float]:
    """The MACs uniform pruning keeps at a measured latency ``fraction``, linear between ladder rungs.

    >>> interpolate_macs([{"fraction": 0.6, "macs": 0.5}, {"fraction": 0.3, "macs": 0.2}], 0.45)
    0.35
    >>> interpolate_macs([{"fraction": 0.6, "macs": 0.5}], 0.45) is None  # outside the ladder
    True
    """
    rungs = sorted(points, key=lambda r: r["fraction"])
    for lo, hi in zip(rungs, rungs[1:]):
        if lo["fraction"] <= fraction <= hi["fraction"] and hi["fraction"] > lo["fraction"]:
            w = (fraction - lo["fraction"]) / (hi["fraction"] - lo["fraction"])
            return round(lo["macs"] + w * (hi["macs"] - lo["macs"]), 12)
    return None  # outside the ladder: not extrapolated


def _options(args: argparse.Namespace, store: MemoryStore) -> LatencyOptions:
    dtype = getattr(torch, args.dtype) if args.dtype else None
    return LatencyOptions(rounds=args.search_rounds, probe_rounds=args.probe_rounds, threads=args.threads,
                          store=store, dtype=dtype, channels_last=args.channels_last)


def bench_model(arch: str, batch: int, targets: Sequence[float], ladder: Sequence[float], args: argparse.Namespace,
                store: MemoryStore, depthwise: bool = False) -> Dict[str, Any]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None).eval()
    x = torch.randn(1, 3, args.size, args.size)
    base_macs = count_macs(model, (x,))
    options = _options(args, store)
    models: Dict[str, torch.nn.Module] = {"original": model}
    rows: Dict[str, Dict[str, Any]] = {}
    for t in targets:
        name = f"latency {t:g}"
        started = time.perf_counter()
        try:
            pruned = fxprune.prune(model, target_latency=t, example_inputs=(x,), device=args.device, batch_size=batch,
                                   latency_mode=args.mode, latency_options=options)
        except FxPruneError as exc:
            rows[name] = {"target": t, "error": str(exc)}
            continue
        record = pruned.meta["fxprune_plan"].policy["latency"]
        models[name] = pruned
        rows[name] = {"target": t, "macs": count_macs(pruned, (x,)) / base_macs, "search_s": time.perf_counter() - started,
                      "search_fraction": record["fraction"], "predicted_fraction": record["predicted_fraction"],
                      "tries": len(record["tries"]), "give_back_tries": record.get("give_back_tries", 0),
                      "round_to": record.get("round_to")}
    uniform: List[Dict[str, float]] = []
    if not depthwise:
        for r in ladder:
            pruned = fxprune.prune(model, r)
            models[f"uniform {r:g}"] = pruned
            uniform.append({"ratio": r, "macs": count_macs(pruned, (x,)) / base_macs})
    measured = measure_latency(models, example_inputs=(x,), device=args.device, mode=args.mode, threads=args.threads,
                               rounds=args.rounds, batch_size=batch, dtype=options.dtype, channels_last=args.channels_last)
    for rung in uniform:
        speedup = measured.speedups[f"uniform {rung['ratio']:g}"].median
        rung["fraction"] = 1.0 / speedup
        rung["realised_fraction"] = realised_fraction(speedup, 1.0 / rung["macs"])
    for name, row in rows.items():
        if "error" in row:
            continue
        speedup = measured.speedups[name]
        row["fraction"] = 1.0 / speedup.median
        row["speedup_iqr"] = [speedup.q25, speedup.q75]
        row["met"] = row["fraction"] <= row["target"]
        row["realised_fraction"] = realised_fraction(speedup.median, 1.0 / row["macs"])
        if uniform:
            same = interpolate_macs(uniform, row["fraction"])
            row["uniform_macs_same_latency"] = same
            row["macs_vs_uniform"] = row["macs"] / same if same else None
    return {"model": arch, "batch": batch, "base_ms": measured.models["original"].median_ms, "rows": rows,
            "uniform": uniform, "busy": measured.busy, "warnings": measured.warnings, "method": measured.method,
            "depthwise": depthwise}


# --------------------------------------------------------------------------- the Fashion-MNIST main job


def fmnist_configs(args: argparse.Namespace, root: Path, target: Optional[float] = None) -> Any:
    """The RunConfig of the uniform run (``target`` None) or of the latency run: same seed, data, fine-tune."""
    from fxprune.workflow.job import RunConfig

    common = dict(model="resnet18", data="fashion-mnist", seed=args.fmnist_seed, limit=args.fmnist_limit,
                  epochs=args.fmnist_epochs, baseline_epochs=args.fmnist_baseline_epochs, control=False,
                  compile=args.mode == "compiled", latency_runs=args.rounds, quiet=True,
                  threads=args.fmnist_threads or os.cpu_count() or 1)
    if target is None:
        return RunConfig(ratio=FMNIST_RATIO, out=str(root / "uniform"), **common)
    return RunConfig(target_latency=target, latency_device=args.device, latency_batch=args.fmnist_batch,
                     latency_mode=args.mode, out=str(root / "latency"), **common)


def _arm(report: Mapping[str, Any], key: str) -> Dict[str, Any]:
    base, pruned = report["baseline"], report["pruned"]
    settings = (report.get("latency") or {}).get("settings") or {}
    speedup = (settings.get(key) or {}).get("speedup")
    low = (settings.get(key) or {}).get("speedup_q25")  # the fraction's upper quartile is 1 / the speed-up's lower

    def fraction(s: Any) -> Optional[float]:
        return 1.0 / s if isinstance(s, (int, float)) and s > 0 else None

    return {"top1": pruned.get("top1"), "top1_before_finetune": pruned.get("top1_before_finetune"),
            "baseline_top1": base.get("top1"),
            "macs": pruned["macs"] / base["macs"] if base.get("macs") and pruned.get("macs") else None,
            "fraction": fraction(speedup), "fraction_q75": fraction(low),
            "latency_target": pruned.get("latency_target")}


def bench_fmnist(args: argparse.Namespace, root: Path, *, runner: Optional[Callable[[Any], Mapping[str, Any]]] = None,
                 remeasure: Optional[Callable[[Path, Path], Dict[str, float]]] = None) -> Dict[str, Any]:
    """Uniform 0.7, then the latency target it measured, two runs of the main job (same seed, same fine-tune).

    ``runner(config) -> report`` (default :func:`fxprune.workflow.run`) and ``remeasure(uniform
    out, latency out) -> {name: fraction}`` (default: both saved pruned models timed interleaved
    with the unpruned architecture) are injectable for tests.
    """
    from fxprune.workflow.evaluate import latency_key

    if runner is None:
        from fxprune.workflow.job import run as runner  # type: ignore[no-redef]
    key = latency_key(torch.device(args.device), args.mode, args.fmnist_batch)
    out: Dict[str, Any] = {"ratio": FMNIST_RATIO, "key": key, "seed": args.fmnist_seed, "limit": args.fmnist_limit,
                           "epochs": args.fmnist_epochs, "baseline_epochs": args.fmnist_baseline_epochs,
                           "target_stat": args.fmnist_target}
    uniform_config = fmnist_configs(args, root)
    started = time.perf_counter()
    uniform = _arm(runner(uniform_config), key)
    out["uniform"] = {**uniform, "run_s": time.perf_counter() - started}
    if uniform["fraction"] is None:
        out["error"] = f"the uniform run has no latency at {key}"
        return out
    if uniform["fraction"] >= 1.0:
        out["error"] = f"uniform {FMNIST_RATIO:g} is not faster than the baseline at {key} ({uniform['fraction']:.3f})"
        return out
    at = uniform["fraction_q75"] if args.fmnist_target == "q75" and uniform.get("fraction_q75") else uniform["fraction"]
    if args.fmnist_target == "q75" and not uniform.get("fraction_q75"):
        out["target_stat"] = "median"  # the run recorded no quartile: the median, and the record says so
    target = round(min(at, 0.9999), 4)
    out["target"] = target
    latency_config = fmnist_configs(args, root, target)
    # The same trained baseline: the run's cache, copied (its settings match, so the run reuses it).
    source, dest = Path(uniform_config.out) / "baseline", Path(latency_config.out) / "baseline"
    if source.is_dir() and not dest.exists():
        shutil.copytree(source, dest)
    started = time.perf_counter()
    try:
        latency = _arm(runner(latency_config), key)
    except Exception as exc:  # the latency run's own error (an unreachable target names the best reached)
        out["latency"] = {"error": f"{type(exc).__name__}: {exc}"}
        return out
    out["latency"] = {**latency, "run_s": time.perf_counter() - started}
    if out["latency"]["top1"] is not None and uniform["top1"] is not None:
        out["top1_gain"] = out["latency"]["top1"] - uniform["top1"]
    try:
        out["remeasured"] = (remeasure or remeasure_saved(args))(Path(uniform_config.out), Path(latency_config.out))
    except Exception as exc:  # a failed re-measurement must not cost the two runs' results
        out["remeasured_error"] = f"{type(exc).__name__}: {exc}"
    return out


def remeasure_saved(args: argparse.Namespace) -> Callable[[Path, Path], Dict[str, float]]:
    """``(uniform out, latency out) -> {"uniform": fraction, "latency": fraction}``: both runs' saved
    pruned models timed interleaved with the unpruned architecture (rebuilt from pruned_model.json;
    its weights do not change its latency) at the latency target's setting."""
    def remeasure(uniform_out: Path, latency_out: Path) -> Dict[str, float]:
        from fxprune.workflow.models import build_model
        from fxprune.workflow.report import load_pruned

        build = json.loads((uniform_out / "pruned_model.json").read_text())["build_model"]
        original = build_model(**build).eval()
        x = torch.randn(1, int(build["in_channels"]), int(build["image_size"]), int(build["image_size"]))
        models = {"original": original, "uniform": load_pruned(uniform_out), "latency": load_pruned(latency_out)}
        measured = measure_latency(models, example_inputs=(x,), device=args.device, mode=args.mode,
                                   threads=args.threads, rounds=args.rounds, batch_size=args.fmnist_batch)
        return {name: 1.0 / s.median for name, s in measured.speedups.items()}

    return remeasure


# --------------------------------------------------------------------------- run-time estimate (nothing timed)


def _probe_macs(probe: Probe) -> float:
    return probe.layer.macs(probe.c_in, probe.c_out)


def _call_s(macs: float, device: str, gmacs: float) -> float:
    return macs / (gmacs * 1e9) + CALL_OVERHEAD_S[device]


def _measure_s(call_s: float, rounds: int, warmup: int = 3, min_sample_s: float = 0.02) -> float:
    """What measure_latency spends on one model: warm-up, one calibrating call, the rounds' samples."""
    return (warmup + 1) * call_s + rounds * max(min_sample_s, call_s)


def estimate_model(model: torch.nn.Module, x: torch.Tensor, batch: int, targets: Sequence[float],
                   ladder: Sequence[float], args: argparse.Namespace, store: MemoryStore,
                   gmacs: float) -> Dict[str, Any]:
    """Expected seconds of one (model, batch) row: counted grid and refinement probes, counted model calls."""
    from fxprune.api import analyze_model

    analysis = analyze_model(model, example_inputs=(x,))
    table = CostTable({"estimate": args.device}, store)  # no device needed: nothing is measured
    counted: List[Probe] = []

    def prober(probes: Sequence[Probe]) -> List[float]:
        counted.extend(probes)
        return [0.0 for _ in probes]

    latency = LatencyModel(layer_shapes(analysis, batch), analysis.groups, table, prober, grid=GRID_FRACTIONS)
    latency.measure_grid()
    grid = list(counted)
    # Refinement measures up to 10 nearby counts per pruned group with every layer the group touches,
    # at about the size of the searched count (charged here at full size: an upper bound).
    refine = sum(10 * len(latency.by_group.get(g.index, [])) for g in analysis.groups if g.prunable) * len(targets)
    full_probe = sum(_probe_macs(Probe(layer, layer.in_full, layer.out_full)) for layer in latency.layers)
    one_probe_s = lambda macs: (3 * _call_s(macs, args.device, gmacs)  # noqa: E731 (warm-up and calibration)
                                + args.probe_rounds * max(0.005, _call_s(macs, args.device, gmacs))) * 17 / 16
    probe_s = sum(one_probe_s(_probe_macs(p)) for p in grid) + refine * one_probe_s(full_probe / max(1, len(latency.layers)))
    model_macs = float(count_macs(model, (x,))) * batch
    t0 = _call_s(model_macs, args.device, gmacs) + CALL_OVERHEAD_S[args.device] * len(latency.layers)
    search_pair = lambda t: _measure_s(t0, args.search_rounds) + _measure_s(t0 * t, args.search_rounds)  # noqa: E731
    expected_tries, worst_tries = 3, LatencyOptions().max_tries + LatencyOptions().give_back
    measure_expected = _measure_s(t0, args.search_rounds) + sum(expected_tries * search_pair(t) for t in targets)
    measure_worst = _measure_s(t0, args.search_rounds) + sum(worst_tries * search_pair(t) for t in targets)
    final = _measure_s(t0, args.rounds) + sum(_measure_s(t0 * t, args.rounds) for t in targets) \
        + sum(_measure_s(t0 * (1 - r) ** 2, args.rounds) for r in ladder)
    prune_s = 5.0 * (len(targets) + len(ladder))  # tracing, analysis and rewriting per prune (CPU)
    return {"grid_probes": len(grid), "refine_probes": refine, "probe_s": probe_s, "model_gmacs": model_macs / 1e9,
            "expected_s": probe_s + measure_expected + final + prune_s,
            "worst_s": probe_s + measure_worst + final + prune_s}


def estimate(args: argparse.Namespace, *, build: Optional[Callable[[str], torch.nn.Module]] = None) -> Dict[str, Any]:
    """The run's expected and worst-case seconds, counted from probes and model calls (nothing is timed)."""
    gmacs = args.gmacs_per_s or ASSUMED_GMACS[args.device] * (args.threads if args.device == "cpu" else 1)
    build = build or (lambda arch: torchvision.models.get_model(arch, weights=None).eval())
    store = MemoryStore()
    rows: List[Dict[str, Any]] = []
    targets, ladder = floats(args.targets), floats(args.ladder)
    plan = [(arch, b, targets, ladder) for arch in names(args.models)
            for b in [int(v) for v in args.batches.split(",") if v.strip()]]
    plan += [(arch, 1, floats(args.depthwise_targets), []) for arch in names(args.depthwise)]
    for arch, batch, ts, lad in plan:
        x = torch.randn(1, 3, args.size, args.size)
        rows.append({"model": arch, "batch": batch,
                     **estimate_model(build(arch), x, batch, ts, lad, args, store, gmacs)})
    fmnist_s = 0.0
    if args.fmnist:
        samples = min(FMNIST_SAMPLES, args.fmnist_limit or FMNIST_SAMPLES)
        # Scaled from the default job's documented size (10 minutes on 2 cores for 60000 x (3 + 5)
        # sample-epochs): the uniform run trains the baseline and fine-tunes, the latency run fine-tunes.
        sample_epochs = samples * (args.fmnist_baseline_epochs + 2 * args.fmnist_epochs)
        fmnist_s = 600.0 * sample_epochs / DEFAULT_JOB_SAMPLE_EPOCHS + 120.0  # + the search and the timings
    return {"gmacs_per_s": gmacs, "rows": rows, "fmnist_s": fmnist_s,
            "expected_s": sum(r["expected_s"] for r in rows) + fmnist_s,
            "worst_s": sum(r["worst_s"] for r in rows) + fmnist_s}


def render_estimate(est: Mapping[str, Any]) -> str:
    lines = [f"Estimated run time (assumed {est['gmacs_per_s']:g} GMAC/s; nothing was timed):", "",
             "| model | batch | GMACs per call | grid probes | refinement probes (at most) | probes (s) | expected (s) "
             "| worst case (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in est["rows"]:
        lines.append(f"| {r['model']} | {r['batch']} | {r['model_gmacs']:.2f} | {r['grid_probes']} | {r['refine_probes']} "
                     f"| {r['probe_s']:.0f} | {r['expected_s']:.0f} | {r['worst_s']:.0f} |")
    if est["fmnist_s"]:
        lines.append(f"| Fashion-MNIST main job (two runs) | - | - | - | - | - | {est['fmnist_s']:.0f} | {est['fmnist_s']:.0f} |")
    lines += ["", f"Total: about {est['expected_s'] / 60:.0f} min expected, {est['worst_s'] / 60:.0f} min at worst "
                  "(every search using all its tries)."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the tables


def _f(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


def render(results: List[Dict[str, Any]], info: Dict[str, Any], fmnist: Optional[Dict[str, Any]] = None) -> str:
    """LATENCY.md: the machine and load, one row per (model, batch, target), the ladders, the Fashion-MNIST pair."""
    lines = ["# Latency-target pruning vs uniform ratio pruning", "",
             f"- Date: {info['date']}; machine: {info['device_name']} ({info['cpus']} cores), {info['device']}, "
             f"{info['mode']}, {info['threads']} thread(s), dtype {info['dtype']}, torch {info['torch']}, "
             f"{info['size']}x{info['size']}",
             f"- Load average (1, 5, 15 min) before: {info['load_before']}, after: {info['load_after']}"
             + (" -- **the machine was shared with other jobs: treat every digit as rough**" if info["shared"] else ""),
             f"- Command: `{info['command']}`" + (" (the QUICK version: resnet18 batch 1 target 0.5, mobilenet_v3_small, "
                                                  "a 2048-sample one-epoch Fashion-MNIST job)" if info["quick"] else ""),
             "- Full run, for a quiet machine: `python benchmarks/bench_latency_target.py` (`--estimate` prints its "
             "expected time); on a GPU: `bash benchmarks/gpu_check.sh`.",
             "- Every model of a (model, batch) row was measured in ONE interleaved run (original, latency-pruned, "
             "uniform ladder); fractions are measured latency / the original's in that run (median of per-round ratios).",
             "- `MACs vs uniform`: MACs kept by the latency-pruned model / MACs uniform ratio pruning keeps at the same "
             "measured latency (interpolated along the ladder; acceptance >= 1.2). Realised fraction: speed-up / MACs "
             "reduction.", "",
             "| model | batch | original (ms) | target | measured fraction | met | MACs kept | uniform MACs at same latency "
             "| MACs vs uniform | realised fraction | tries (give back) | search (s) |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for res in results:
        for name, row in res["rows"].items():
            if "error" in row:
                lines.append(f"| {res['model']} | {res['batch']} | {_f(res['base_ms'], 2)} | {row['target']:g} | "
                             f"error: {row['error'][:160]} | no | | | | | | |")
                continue
            lines.append(
                f"| {res['model']} | {res['batch']} | {_f(res['base_ms'], 2)} | {row['target']:g} | {_f(row.get('fraction'))} "
                f"| {'yes' if row.get('met') else 'NO'} | {_f(row['macs'])} | {_f(row.get('uniform_macs_same_latency'))} "
                f"| {_f(row.get('macs_vs_uniform'), 2)} | {_f(row.get('realised_fraction'), 2)} | {row['tries']} "
                f"({row.get('give_back_tries', 0)}) | {_f(row['search_s'], 0)} |")
    ladders = [res for res in results if res["uniform"]]
    if ladders:
        lines += ["", "Uniform ladders (ratio: measured fraction / MACs kept / realised fraction):", ""]
        for res in ladders:
            lines.append(f"- {res['model']} batch {res['batch']}: " + ", ".join(
                f"{u['ratio']:g}: {_f(u.get('fraction'))} / {_f(u['macs'])} / {_f(u.get('realised_fraction'), 2)}"
                for u in res["uniform"]))
    busy = [f"{r['model']} batch {r['batch']}" for r in results if r["busy"]]
    if busy:
        lines += ["", f"Busy (a model's per-round spread above 10%): {', '.join(busy)}."]
    if fmnist is not None:
        lines += render_fmnist(fmnist)
    return "\n".join(lines) + "\n"


_STATS = {"q75": "the upper quartile of its per-round fraction, the statistic a latency target is checked with",
          "median": "the median of its per-round fraction"}


def render_fmnist(fm: Mapping[str, Any]) -> List[str]:
    """The Fashion-MNIST pair: uniform 0.7 and the latency target it measured, same seed and fine-tune."""
    lines = ["", "## Fashion-MNIST main job: latency target = uniform 0.7's measured latency", "",
             f"`fxprune run` (resnet18, seed {fm['seed']}, {fm['baseline_epochs']} baseline epochs, {fm['epochs']} "
             f"fine-tuning epochs, {'all samples' if fm['limit'] is None else str(fm['limit']) + ' samples per split'}, no "
             f"control), twice: uniform ratio {fm['ratio']:g}, then `--target-latency` set to the fraction the first "
             f"run measured at `{fm['key']}` ({_STATS[fm.get('target_stat', 'median')]}), on the same trained "
             "baseline. Acceptance: the latency run's top-1 at least the uniform run's.", ""]
    if "error" in fm:
        return lines + [f"Not compared: {fm['error']}."]
    lines += ["| run | asked | MACs kept | fraction (own run: median, upper quartile) | fraction (re-measured "
              "together) | top-1 before fine-tune (%) | top-1 (%) |", "|---|---|---:|---:|---:|---:|---:|"]
    again = fm.get("remeasured") or {}
    u = fm["uniform"]
    lines.append(f"| uniform | ratio {fm['ratio']:g} | {_f(u['macs'])} | {_fractions(u)} | {_f(again.get('uniform'))} "
                 f"| {_pct(u['top1_before_finetune'])} | {_pct(u['top1'])} |")
    lat = fm.get("latency") or {}
    if "error" in lat:
        lines.append(f"| latency | target {fm['target']:g} | error: {lat['error'][:200]} | | | | |")
        return lines
    lines.append(f"| latency | target {fm['target']:g} | {_f(lat['macs'])} | {_fractions(lat)} | "
                 f"{_f(again.get('latency'))} | {_pct(lat['top1_before_finetune'])} | {_pct(lat['top1'])} |")
    gain = fm.get("top1_gain")
    if gain is not None:
        verdict = "met" if gain >= 0 else "NOT met"
        lines += ["", f"Top-1 latency run - uniform run: {gain:+.2f} pts (acceptance {verdict}; one seed)."]
    if fm.get("remeasured_error"):
        lines += ["", f"Re-measurement failed: {fm['remeasured_error']}"]
    return lines


def _fractions(arm: Mapping[str, Any]) -> str:
    q75 = arm.get("fraction_q75")
    return _f(arm.get("fraction")) + (f", {_f(q75)}" if q75 is not None else "")


def _write_partial(args: argparse.Namespace, results: List[Dict[str, Any]]) -> None:
    """The rows so far, beside --json: a two-hour run that dies late keeps what it measured."""
    path = Path(args.json).with_suffix(".partial.json")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"partial": True, "results": results}, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.estimate:
        print(render_estimate(estimate(args)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # the search's tries, as they happen
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_latency_target: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    load_before = _load()
    store = MemoryStore()  # one table for the whole run: resnet blocks of one shape are measured once
    results = []
    for arch in names(args.models):
        for batch in [int(b) for b in args.batches.split(",") if b.strip()]:
            print(f"[bench] {arch} batch {batch}", flush=True)
            results.append(bench_model(arch, batch, floats(args.targets), floats(args.ladder), args, store))
            _write_partial(args, results)
    for arch in names(args.depthwise):
        print(f"[bench] {arch} batch 1 (realised fraction)", flush=True)
        results.append(bench_model(arch, 1, floats(args.depthwise_targets), (), args, store, depthwise=True))
        _write_partial(args, results)
    fmnist = None
    if args.fmnist:
        print("[bench] Fashion-MNIST main job: uniform 0.7, then its measured latency as the target", flush=True)
        root = Path(args.fmnist_out) if args.fmnist_out else Path(args.json).with_suffix("").parent / "latency_fmnist"
        fmnist = bench_fmnist(args, root)
    load_after = _load()
    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": args.device,
            "device_name": device_description(args.device), "cpus": os.cpu_count(), "mode": args.mode,
            "threads": args.threads, "dtype": args.dtype or "model's own", "torch": torch.__version__, "size": args.size,
            "python": platform.python_version(), "load_before": load_before, "load_after": load_after,
            "quick": args.quick, "shared": bool(load_before and load_before[0] > 0.5 * (os.cpu_count() or 1)),
            "command": " ".join(["python", "benchmarks/bench_latency_target.py", *(argv if argv is not None else sys.argv[1:])])}
    Path(args.json).write_text(json.dumps({"info": info, "results": results, "fmnist": fmnist}, indent=1,
                                          default=str) + "\n")
    Path(args.md).write_text(render(results, info, fmnist))
    print(render(results, info, fmnist))
    return 0


if __name__ == "__main__":
    sys.exit(main())
