"""Shared fixtures of the fxprune benchmarks (pytest-benchmark; not part of the test run).

Run (see benchmarks/RESULTS.md for the numbers and the machine)::

    pytest benchmarks/bench_latency.py benchmarks/bench_pass_time.py

Environment knobs:

- ``FXPRUNE_BENCH_THREADS`` (default ``1``): intra-op threads for every measurement. On small
  shared machines PyTorch's default (one per core) is badly contended, and 1-thread numbers
  are the stable ones; ``FXPRUNE_BENCH_THREADS=2`` measures the default of a 2-core box.
- ``FXPRUNE_BENCH_FULL=1``: compiled latency at every ratio (default: ratios 0 and 0.5 only;
  each inductor compile costs 20-50 s on 2 CPU cores).
- ``FXPRUNE_BENCH_MD=path``: also write the summary tables (Markdown) to ``path``.

Each benchmark times its variants interleaved (:func:`side_by_side`) and stores rows with
:func:`record`; at the end of the session the speed-ups against the unpruned model are printed
as Markdown tables next to the MACs reduction (``realized fraction`` = speed-up / MACs reduction).
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest
import torch

THREADS = int(os.environ.get("FXPRUNE_BENCH_THREADS", "1"))
FULL = os.environ.get("FXPRUNE_BENCH_FULL", "") not in ("", "0")

_RESULTS: Dict[str, List[Dict[str, Any]]] = defaultdict(list)


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> Any:
    # `pytest benchmarks` collects bench_*.py (explicitly named files are collected anyway).
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session", autouse=True)
def _threads() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture()
def side_by_side(benchmark: Any) -> Callable[..., Dict[str, List[float]]]:
    """``side_by_side({name: fn}, rounds, warmup=1)``: time every fn once per round, interleaved.

    On a shared machine the load changes from minute to minute; timing the variants in turn,
    round after round, exposes them to the same conditions, so their ratios are meaningful.
    pytest-benchmark times whole rounds (its table); the per-variant seconds are returned.
    ``fn`` may be ``(setup, fn)``: setup's result is passed to fn and not timed.
    """

    def run(variants: Dict[str, Any], rounds: int, warmup: int = 1) -> Dict[str, List[float]]:
        times: Dict[str, List[float]] = {name: [] for name in variants}
        state = {"n": 0}

        def one_round() -> None:
            keep = state["n"] >= warmup
            state["n"] += 1
            for name, fn in variants.items():
                arg = None
                if isinstance(fn, tuple):
                    setup, fn = fn
                    arg = setup()
                # Like timeit: collect before, no collector pauses inside. A cyclic-GC pass lands at
                # the same point of every round (allocations repeat exactly) and would be billed
                # to whichever variant happens to run there.
                gc.collect()
                gc.disable()
                try:
                    start = time.perf_counter()
                    fn() if arg is None else fn(arg)
                    elapsed = time.perf_counter() - start
                finally:
                    gc.enable()
                if keep:
                    times[name].append(elapsed)

        benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=warmup, iterations=1)
        for name, ts in times.items():
            benchmark.extra_info[f"{name} min_s"] = min(ts)
            benchmark.extra_info[f"{name} median_s"] = statistics.median(ts)
        benchmark.extra_info["threads"] = torch.get_num_threads()
        return times

    return run


def _record(table: str, times: List[float], **row: Any) -> None:
    _RESULTS[table].append({**row, "min_s": min(times), "median_s": statistics.median(times), "rounds": len(times),
                            "threads": torch.get_num_threads()})


@pytest.fixture()
def record() -> Callable[..., None]:
    """``record(table, times, **row)``: store a summary row (the variant's fastest and median round)."""
    return _record


def results() -> Dict[str, List[Dict[str, Any]]]:
    return _RESULTS


def _latency_tables(rows: List[Dict[str, Any]]) -> List[str]:
    base = {(r["arch"], r["batch"], r["mode"], r["device"]): r for r in rows if r["variant"] == "original"}
    out = ["| model | device | mode | batch | variant | MACs/img (G) | MACs reduction | latency min (ms) | "
           "median (ms) | speed-up | realized fraction |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = sorted(rows, key=lambda r: (r["arch"], r["device"], r["mode"], r["batch"], r["sort"]))
    for r in order:
        b = base.get((r["arch"], r["batch"], r["mode"], r["device"]))
        reduction = b["macs"] / r["macs"] if b else float("nan")
        speedup = b["min_s"] / r["min_s"] if b else float("nan")
        out.append(f"| {r['arch']} | {r['device']} | {r['mode']} | {r['batch']} | {r['variant']} | {r['macs'] / 1e9:.3f} | "
                   f"{reduction:.2f}x | {r['min_s'] * 1e3:.1f} | {r['median_s'] * 1e3:.1f} | {speedup:.2f}x | {speedup / reduction:.2f} |")
    return out


def _pass_tables(rows: List[Dict[str, Any]]) -> List[str]:
    out: List[str] = []
    by_arch: Dict[str, Dict[str, Dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        if r.get("kind") == "pass":
            by_arch[r["arch"]][r["tool"]] = r
    if by_arch:
        out += ["| model | fx nodes | fxprune (s) | fxprune + example_inputs (s) | Torch-Pruning DG+step (s) | "
                "fxprune / TP | fxprune+inputs / TP |", "|---|---|---|---|---|---|---|"]
        for arch in sorted(by_arch, key=lambda a: by_arch[a].get("fxprune", {}).get("nodes", 0)):
            d = by_arch[arch]
            fx, fxi, tp = d.get("fxprune"), d.get("fxprune+inputs"), d.get("torch_pruning")
            cell = lambda r: f"{r['min_s']:.3f}" if r else "-"  # noqa: E731
            ratio = lambda r: f"{r['min_s'] / tp['min_s']:.2f}" if r and tp else "-"  # noqa: E731
            nodes = (fx or fxi or {}).get("nodes", "-")
            out.append(f"| {arch} | {nodes} | {cell(fx)} | {cell(fxi)} | {cell(tp)} | {ratio(fx)} | {ratio(fxi)} |")
    scaling = sorted((r for r in rows if r.get("kind") == "scaling"), key=lambda r: r["nodes"])
    if scaling:
        first = scaling[0]["min_s"] / scaling[0]["nodes"]
        out += ["", "| residual blocks | fx nodes | fxprune (ms) | us per node | per-node cost vs smallest |",
                "|---|---|---|---|---|"]
        for r in scaling:
            per = r["min_s"] / r["nodes"]
            out.append(f"| {r['blocks']} | {r['nodes']} | {r['min_s'] * 1e3:.1f} | {per * 1e6:.1f} | {per / first:.2f} |")
    return out


def pytest_terminal_summary(terminalreporter: Any) -> None:
    lines: List[str] = []
    if _RESULTS.get("latency"):
        lines += [f"### Latency (torch {torch.__version__}, {THREADS} intra-op thread(s))", ""]
        lines += _latency_tables(_RESULTS["latency"]) + [""]
    if _RESULTS.get("pass"):
        lines += [f"### Pass time (torch {torch.__version__}, {THREADS} intra-op thread(s))", ""]
        lines += _pass_tables(_RESULTS["pass"]) + [""]
    if not lines:
        return
    terminalreporter.write_sep("=", "fxprune benchmark summary")
    for line in lines:
        terminalreporter.write_line(line)
    target = os.environ.get("FXPRUNE_BENCH_MD")
    if target:
        Path(target).write_text("\n".join(lines) + "\n")
