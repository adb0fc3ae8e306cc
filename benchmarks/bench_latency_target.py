"""Latency-target pruning vs uniform ratio pruning at the same measured latency (issue 13's acceptance).

For each model and batch size (224x224 inputs, random weights, L1 importance, CPU eager by
default, 1 thread): ``fxprune.prune(target_latency=t)`` for each target, and a ladder of uniform
ratios; then **one** interleaved measurement of the original, every latency-pruned model and
every uniform model together (:func:`fxprune.measure_latency`), so that all of them see the same
machine load. Reported per target: the measured fraction (re-measured in that run; the target
holds when it is at most ``t``), the MACs kept, the MACs uniform pruning keeps at the same
measured latency (interpolated along the ladder), and their ratio (acceptance: >= 1.2). For the
depthwise-heavy models the realised fraction (speed-up / MACs reduction) of the latency-pruned
model is reported.

Full run (a quiet machine; an hour or more on one CPU thread)::

    python benchmarks/bench_latency_target.py

Short run (what a shared machine can afford; the numbers are rough and say so)::

    nice python benchmarks/bench_latency_target.py --short

``--device cuda`` measures on the GPU (benchmarks/gpu_check.sh runs it so). Writes
``benchmarks/LATENCY.md`` (``--md``) and ``benchmarks/latency_target.json`` (``--json``) with
the machine, date and load average before and after.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torchvision

import fxprune
from fxprune.cost import count_macs
from fxprune.errors import FxPruneError
from fxprune.latency import device_description, measure_latency, realised_fraction
from fxprune.latency_model import LatencyOptions, MemoryStore

HERE = Path(__file__).resolve().parent
LADDER = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet18,resnet50")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--targets", default="0.5,0.3")
    p.add_argument("--depthwise", default="mobilenet_v3_small,efficientnet_b0",
                   help="models whose realised fraction is reported at the first target ('' for none)")
    p.add_argument("--ladder", default=",".join(str(r) for r in LADDER), help="uniform ratios to compare against")
    p.add_argument("--device", default="cpu")
    p.add_argument("--mode", default="eager", choices=("eager", "compiled"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default=None, choices=("float16", "bfloat16", "float32"),
                   help="deployment precision (e.g. float16 on a GPU; default: the model's own)")
    p.add_argument("--channels-last", action="store_true", help="deployment layout channels_last (GPUs)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=10, help="rounds of the final interleaved measurement")
    p.add_argument("--search-rounds", type=int, default=7, help="rounds of each verification inside the search")
    p.add_argument("--probe-rounds", type=int, default=5)
    p.add_argument("--short", action="store_true",
                   help="resnet18, batch 1, target 0.5, a 3-step ladder, few rounds, no depthwise models")
    p.add_argument("--md", default=str(HERE / "LATENCY.md"))
    p.add_argument("--json", default=str(HERE / "latency_target.json"))
    args = p.parse_args(argv)
    if args.short:
        args.models, args.batches, args.targets, args.depthwise = "resnet18", "1", "0.5", ""
        args.ladder, args.rounds, args.search_rounds, args.probe_rounds = "0.3,0.5,0.7", 5, 5, 3
    return args


def _floats(text: str) -> List[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _load() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _interpolate_macs(points: List[Dict[str, float]], fraction: float) -> Optional[float]:
    """The MACs uniform pruning keeps at a measured latency ``fraction``, linear between ladder rungs."""
    rungs = sorted(points, key=lambda r: r["fraction"])
    for lo, hi in zip(rungs, rungs[1:]):
        if lo["fraction"] <= fraction <= hi["fraction"] and hi["fraction"] > lo["fraction"]:
            w = (fraction - lo["fraction"]) / (hi["fraction"] - lo["fraction"])
            return lo["macs"] + w * (hi["macs"] - lo["macs"])
    return None  # outside the ladder: not extrapolated


def bench_model(arch: str, batch: int, targets: Sequence[float], ladder: Sequence[float], args: argparse.Namespace,
                store: MemoryStore, depthwise: bool = False) -> Dict[str, Any]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None).eval()
    x = torch.randn(1, 3, args.size, args.size)
    base_macs = count_macs(model, (x,))
    dtype = getattr(torch, args.dtype) if args.dtype else None
    options = LatencyOptions(rounds=args.search_rounds, probe_rounds=args.probe_rounds, threads=args.threads,
                             store=store, dtype=dtype, channels_last=args.channels_last)
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
                      "tries": len(record["tries"]), "round_to": record.get("round_to")}
    uniform: List[Dict[str, float]] = []
    if not depthwise:
        for r in ladder:
            pruned = fxprune.prune(model, r)
            models[f"uniform {r:g}"] = pruned
            uniform.append({"ratio": r, "macs": count_macs(pruned, (x,)) / base_macs})
    measured = measure_latency(models, example_inputs=(x,), device=args.device, mode=args.mode, threads=args.threads,
                               rounds=args.rounds, batch_size=batch, dtype=dtype, channels_last=args.channels_last)
    for rung in uniform:
        rung["fraction"] = 1.0 / measured.speedups[f"uniform {rung['ratio']:g}"].median
    for name, row in rows.items():
        if "error" in row:
            continue
        speedup = measured.speedups[name]
        row["fraction"] = 1.0 / speedup.median
        row["speedup_iqr"] = [speedup.q25, speedup.q75]
        row["met"] = row["fraction"] <= row["target"]
        row["realised_fraction"] = realised_fraction(speedup.median, 1.0 / row["macs"])
        if uniform:
            same = _interpolate_macs(uniform, row["fraction"])
            row["uniform_macs_same_latency"] = same
            row["macs_vs_uniform"] = row["macs"] / same if same else None
    return {"model": arch, "batch": batch, "base_ms": measured.models["original"].median_ms, "rows": rows,
            "uniform": uniform, "busy": measured.busy, "warnings": measured.warnings, "method": measured.method}


def _f(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(results: List[Dict[str, Any]], info: Dict[str, Any]) -> str:
    lines = ["# Latency-target pruning vs uniform ratio pruning", "",
             f"- Date: {info['date']}; machine: {info['device_name']} ({info['cpus']} cores), {info['device']}, "
             f"{info['mode']}, {info['threads']} thread(s), dtype {info['dtype']}, torch {info['torch']}, {info['size']}x{info['size']}",
             f"- Load average (1, 5, 15 min) before: {info['load_before']}, after: {info['load_after']}"
             + (" -- **the machine was shared with other jobs: treat every digit as rough**" if info["shared"] else ""),
             f"- Command: `{info['command']}`" + (" (the SHORT version: resnet18, batch 1, target 0.5 only)" if info["short"] else ""),
             "- Full run (resnet18/50, batch 1 and 32, targets 0.5 and 0.3, mobilenet_v3_small and efficientnet_b0), "
             "for a quiet machine: `python benchmarks/bench_latency_target.py`; on a GPU: `bash benchmarks/gpu_check.sh`.",
             "- Every model of a (model, batch) row was measured in ONE interleaved run (original, latency-pruned, "
             "uniform ladder); fractions are measured latency / the original's in that run (median of per-round ratios).",
             "- `MACs vs uniform`: MACs kept by the latency-pruned model / MACs uniform ratio pruning keeps at the same "
             "measured latency (interpolated along the ladder; acceptance >= 1.2).", "",
             "| model | batch | original (ms) | target | measured fraction | met | MACs kept | uniform MACs at same latency "
             "| MACs vs uniform | realised fraction | tries | search (s) |",
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
                f"| {_f(row['search_s'], 0)} |")
    lines += ["", "Uniform ladders (ratio: measured fraction / MACs kept):", ""]
    for res in results:
        if res["uniform"]:
            lines.append(f"- {res['model']} batch {res['batch']}: " + ", ".join(
                f"{u['ratio']:g}: {u['fraction']:.3f} / {u['macs']:.3f}" for u in res["uniform"]))
    busy = [f"{r['model']} batch {r['batch']}" for r in results if r["busy"]]
    if busy:
        lines += ["", f"Busy (a model's per-round spread above 10%): {', '.join(busy)}."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # the search's tries, as they happen
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_latency_target: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    load_before = _load()
    store = MemoryStore()  # one table for the whole run: resnet blocks of one shape are measured once
    results = []
    for arch in [m for m in args.models.split(",") if m]:
        for batch in [int(b) for b in args.batches.split(",") if b]:
            print(f"[bench] {arch} batch {batch}", flush=True)
            results.append(bench_model(arch, batch, _floats(args.targets), _floats(args.ladder), args, store))
    for arch in [m for m in args.depthwise.split(",") if m]:
        print(f"[bench] {arch} batch 1 (realised fraction)", flush=True)
        results.append(bench_model(arch, 1, _floats(args.targets)[:1], (), args, store, depthwise=True))
    load_after = _load()
    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": args.device,
            "device_name": device_description(args.device), "cpus": os.cpu_count(), "mode": args.mode,
            "threads": args.threads, "dtype": args.dtype or "model's own", "torch": torch.__version__, "size": args.size, "python": platform.python_version(),
            "load_before": load_before, "load_after": load_after, "short": args.short,
            "shared": bool(load_before and load_before[0] > 0.5 * (os.cpu_count() or 1)),
            "command": " ".join(["python", "benchmarks/bench_latency_target.py", *(argv if argv is not None else sys.argv[1:])])}
    Path(args.json).write_text(json.dumps({"info": info, "results": results}, indent=1, default=str) + "\n")
    Path(args.md).write_text(render(results, info))
    print(render(results, info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
