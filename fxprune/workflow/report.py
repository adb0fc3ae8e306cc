"""What the user gets in the output folder: report.json, report.md, plots, log, pruned model.

``report.json`` is the machine-readable record (``baseline`` and ``pruned`` each with
``top1``, ``top5``, ``params``, ``macs``, ``size_mb``, ``latency_ms``; plus ``config``,
``machine``, ``date``); ``report.md`` is the same as a table a person reads. Plots are PNGs
drawn with matplotlib's Agg backend (no display needed).

What else ``report.json`` holds, each also in ``report.md``:

- ``control``: the equal-training control (the baseline fine-tuned with the pruned model's
  recipe: ``top1``, ``top5``, ``epochs``, ``source`` trained/cache), or ``{"skipped": why}``;
  ``equal_training``: ``pruning_cost_top1`` (pruned - control), ``training_gain_top1``
  (control - baseline) and ``pruned_vs_baseline_top1`` (the two mixed);
- ``pruning``: ``groups`` (pruned / frozen / kept whole, the frozen groups' reasons counted,
  the pruned ``renormalising_groups`` named with their norms and proof contract),
  ``layers`` (output channels and MACs of every conv/linear layer, before and after) and
  ``stages`` (MACs per top-level child, and its share of the cut);
- ``warnings``: every :class:`fxprune.FxPruneWarning` of the run, identical ones counted once;
- ``command`` / ``argv`` (the command line), ``software`` (fxprune version and git commit,
  torch, torchvision, python).
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import json
import logging
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from fxprune.cost import module_flops
from fxprune.latency import cpu_kernels, cpu_name, format_speedup, realised_fraction
from fxprune.workflow.extras import require

__all__ = [
    "machine_info",
    "utc_now",
    "write_json",
    "write_report",
    "render_markdown",
    "layer_channels",
    "plot_channels",
    "plot_sweep",
    "render_sweep_markdown",
    "latency_rows",
    "latency_warnings",
    "latency_section",
    "latency_target_summary",
    "latency_target_lines",
    "latency_target_recheck",
    "latency_target_warnings",
    "sweep_latency_warnings",
    "save_pruned",
    "load_pruned",
    "setup_logging",
    "close_logging",
    "log_run_error",
    "LOG_NAME",
    "FILE_ONLY",
    "software_info",
    "git_commit",
    "command_line",
    "WarningLog",
    "collect_warnings",
    "warning_reason",
    "layer_macs",
    "layer_table",
    "stage_table",
    "group_summary",
    "reason_kind",
]

LOG_NAME = "run.log"
logger = logging.getLogger("fxprune.workflow")


def utc_now() -> str:
    """The current time, ISO 8601 in UTC (the ``date`` field)."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def machine_info() -> dict[str, Any]:
    """What ran the job: CPU, cores, threads, GPU, library versions."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "cpu_kernels": cpu_kernels(),  # the ISA torch dispatches to: results reproduce only on an equal one
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": None,
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["cuda"] = {"device": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                        "version": torch.version.cuda}
    return info


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become None (JSON has no NaN), paths become strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return _clean(value.tolist())
    return value


def write_json(data: Mapping[str, Any], path: Union[str, Path]) -> Path:
    """Write ``data`` as indented JSON, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(_clean(data), indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _fmt_int(value: Optional[float]) -> str:
    if value is None:
        return "-"
    value = float(value)
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f}"


def _allocation_text(config: Mapping[str, Any]) -> str:
    """How channels were spread over the groups, as the report's pruning line ends."""
    if config.get("target_latency"):
        return ", channels chosen by measured cost"
    if config.get("global_ranking"):
        where = "the target's MACs" if config.get("target_macs") else "the MACs of the ratio's uniform plan"
        return f", ranked across groups at {where} (`--no-global-ranking`: the same share of every group)"
    if "global_ranking" in config:
        return ", the same share of every group (uniform)"
    return ""


def _fmt(value: Optional[float], digits: int = 2, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}{suffix}"


def _delta(value: Optional[float]) -> str:
    """A signed change in accuracy points, e.g. ``+0.93 pts``."""
    return "-" if value is None or not math.isfinite(value) else f"{value:+.2f} pts"


def _ratio(before: Optional[float], after: Optional[float]) -> str:
    if not before or not after:
        return "-"
    return f"{before / after:.2f}x"


def _achieved_lines(achieved: Any) -> list[str]:
    """The report's statement of what pruning removed (loud when it removed nothing)."""
    if not isinstance(achieved, Mapping):
        return []
    fraction = achieved.get("channels_removed_fraction")
    groups = (f"{achieved['groups_pruned']} of {achieved['groups']} channel groups pruned, "
              if "groups" in achieved and "groups_pruned" in achieved else "")
    line = (f"- Achieved: {groups}{achieved.get('channels_removed', '-')} of {achieved.get('channels', '-')} "
            f"channels removed ({_fmt(100 * fraction if isinstance(fraction, (int, float)) else None, 1)}%), "
            f"{achieved.get('layers_pruned', '-')} of {achieved.get('layers', '-')} layers narrower")
    # Nothing pruned is said at the top of the report (_top_warnings), not only here.
    return [line + (" (**nothing was pruned**)" if achieved.get("nothing_pruned") else "")]


def render_markdown(report: Mapping[str, Any]) -> str:
    """``report.md``: the baseline and the pruned model side by side."""
    base, pruned = report["baseline"], report["pruned"]
    config = report.get("config", {})
    machine = report.get("machine", {}) or {}
    data_name = (report.get("data") or {}).get("name", config.get("data", "-"))
    if config.get("ratio") is not None:
        requested = f"ratio {config['ratio']}"
    elif config.get("target_latency"):
        requested = (f"target latency {config['target_latency']} (on {config.get('latency_device', 'cpu')}, "
                     f"batch {config.get('latency_batch', 1)}, {config.get('latency_mode', 'eager')})")
    elif config.get("target_macs"):
        requested = f"target MACs {config['target_macs']}"
    else:
        requested = "ratio -"
    gpu = f", GPU {machine['cuda']['device']}" if machine.get("cuda") else ""
    lines = [
        "# fxprune report",
        "",
        *_top_warnings(report),
        f"- Date: {report.get('date', '-')}",
        *([f"- Command: {_code(report['command'])}"] if report.get("command") else []),
        *([f"- Software: {_software_text(report['software'])}"] if isinstance(report.get("software"), Mapping)
          else []),
        f"- Model: `{config.get('model', '-')}`; data: `{data_name}` "
        f"(accuracy on the held-out split, {base.get('samples', '-')} samples)",
        f"- Pruning: importance `{config.get('importance', '-')}`, requested {requested}{_allocation_text(config)}"
        + ("; attention blocks pruned by head_dim (`--attention head_dim`: every head kept, the same dims of each)"
           if config.get("attention") == "head_dim" else ""),
        *_achieved_lines(pruned.get("achieved")),
        f"- Machine: {machine.get('cpu', '-')} ({machine.get('cpu_count', '-')} cores){gpu}",
        *latency_warnings(report),
        *latency_target_warnings(report),
        *(_accuracy_lines(report) if "top1" in base and "top1" in pruned else []),
        "",
        "## Baseline and pruned model",
        "",
        "| metric | baseline | pruned | pruned vs baseline |",
        "|---|---:|---:|---:|",
    ]

    def change(key: str) -> Optional[float]:
        before, after = base.get(key), pruned.get(key)
        return None if before is None or after is None else after - before

    def row(label: str, key: str, fmt: Any, word: str) -> str:
        before, after = base.get(key), pruned.get(key)
        return f"| {label} | {fmt(before)} | {fmt(after)} | {_ratio(before, after)} {word} |"

    lines += [
        f"| top-1 accuracy (%) | {_fmt(base.get('top1'))} | {_fmt(pruned.get('top1'))} | {_delta(change('top1'))} |",
        f"| top-5 accuracy (%) | {_fmt(base.get('top5'))} | {_fmt(pruned.get('top5'))} | {_delta(change('top5'))} |",
        row("parameters", "params", _fmt_int, "fewer"),
        row("MACs per image", "macs", _fmt_int, "fewer"),
        row("size on disk (MB)", "size_mb", _fmt, "smaller"),
    ]
    lines += latency_rows(report)
    if config.get("epochs"):
        lines += ["", "The accuracy change against the baseline mixes pruning with the pruned model's fine-tuning; "
                      "the cost of pruning at equal training is stated above."]
    lines += latency_section(report)
    lines += latency_target_lines(report)
    lines += _pruning_lines(report.get("pruning"))
    lines += _warning_lines(report.get("warnings") or [])
    per_b, per_p = base.get("per_class", {}) or {}, pruned.get("per_class", {}) or {}
    per_c = (report.get("control") or {}).get("per_class") or {}
    if per_b and per_c:
        lines += ["", "## Per-class top-1 accuracy (%)", "", "| class | baseline | control | pruned |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {name} | {_fmt(per_b.get(name))} | {_fmt(per_c.get(name))} | {_fmt(per_p.get(name))} |"
                  for name in per_b]
    elif per_b:
        lines += ["", "## Per-class top-1 accuracy (%)", "", "| class | baseline | pruned |", "|---|---:|---:|"]
        lines += [f"| {name} | {_fmt(per_b.get(name))} | {_fmt(per_p.get(name))} |" for name in per_b]
    timings = report.get("timings_s", {})
    if timings:
        lines += ["", "## Time (s)", "", "| step | seconds |", "|---|---:|"]
        lines += [f"| {step} | {_fmt(sec, 1)} |" for step, sec in timings.items()]
    plots = report.get("plots", [])
    if plots:
        lines += [""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


_TARGET_KEYS = ("target", "target_fraction", "target_ms", "device", "device_name", "threads", "torch", "mode",
                "batch_size", "dtype", "channels_last", "before_ms",
                "after_ms", "original_ms", "fraction", "speedup", "predicted_ms", "predicted_fraction", "busy",
                "warnings", "round_to", "method", "measurement", "table", "search_s", "tries", "macs_fraction",
                "chosen_try", "give_back_tries", "uniform_tries", "capacity_tries")


def latency_target_summary(pruned: nn.Module) -> Optional[dict[str, Any]]:
    """What a latency-target prune measured (from ``pruned.meta["fxprune_plan"].policy["latency"]``), or None."""
    meta = getattr(pruned, "meta", None)
    plan = meta.get("fxprune_plan") if isinstance(meta, Mapping) else None
    record = getattr(plan, "policy", {}).get("latency") if plan is not None else None
    if not isinstance(record, Mapping):
        return None
    return {key: record.get(key) for key in _TARGET_KEYS}


def latency_target_recheck(report: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """The latency target re-measured for the report: ``{"key", "fraction", "ms", "held"}``, or None.

    The search verified its model against the original; the report times the fine-tuned pruned
    model against the baseline again (same architecture, another run, maybe another load) at
    the target's setting (``latency_target["report_key"]``, e.g. ``cpu/eager/b1``). ``held``:
    the target holds there too (a fraction target by the interleaved speed-up, a millisecond
    target by the pruned median).
    """
    target = (report.get("pruned") or {}).get("latency_target")
    if not isinstance(target, Mapping) or not target.get("report_key"):
        return None
    key = str(target["report_key"])
    if not isinstance(report.get("baseline"), Mapping) and key not in _latency_settings(report):
        return None
    speedup = _speedup_of(report, key)
    ms = (report["pruned"].get("latency_ms") or {}).get(key)
    if speedup is None or speedup <= 0:
        return None
    fraction = 1.0 / speedup
    if isinstance(target.get("target_ms"), (int, float)):
        held = isinstance(ms, (int, float)) and ms <= target["target_ms"] and fraction < 1.0
    elif isinstance(target.get("target_fraction"), (int, float)):
        held = fraction <= target["target_fraction"]
    else:
        return None
    return {"key": key, "fraction": fraction, "ms": ms, "held": bool(held)}


def latency_target_warnings(report: Mapping[str, Any]) -> list[str]:
    """A loud line for the top of report.md when the latency target did not hold at the report's re-measurement."""
    check = latency_target_recheck(report)
    if check is None or check["held"]:
        return []
    target = report["pruned"]["latency_target"]
    return ["", f"> **WARNING: the latency target ({target.get('target')}) did NOT hold when re-measured for this "
                f"report: {check['fraction']:.3f} of the baseline at `{check['key']}`** (the search measured "
                f"{_fmt(target.get('fraction'), 3)}). Noise or another load between the two runs; re-measure on a "
                "quiet machine before relying on it."]


def latency_target_lines(report: Mapping[str, Any]) -> list[str]:
    """report.md's "Latency target" section: predicted vs measured per stage and per verified try, realised fractions.

    Stages: the search's prediction for the model it returned, its verification (measured
    interleaved with the original inside the search), and the report's own re-measurement of
    the fine-tuned model against the baseline at the target's setting. The realised fraction
    is speed-up / MACs reduction.
    """
    target = (report.get("pruned") or {}).get("latency_target")
    if not isinstance(target, Mapping):
        return []
    macs_x = (report.get("reduction") or {}).get("macs_x")
    if not isinstance(macs_x, (int, float)) and isinstance(target.get("macs_fraction"), (int, float)) \
            and target["macs_fraction"] > 0:
        macs_x = 1.0 / target["macs_fraction"]
    macs_kept = 1.0 / macs_x if isinstance(macs_x, (int, float)) and macs_x > 0 else None
    realised = realised_fraction(target.get("speedup"), macs_x)
    lines = ["", "## Latency target", "",
             f"{target.get('target')} on {target.get('device_name')} ({target.get('device')}, {target.get('mode')}, "
             f"batch {target.get('batch_size')}, {target.get('threads')} thread(s), torch {target.get('torch')}): "
             f"the original measured {_fmt(target.get('before_ms'), 3)} ms, the pruned model "
             f"{_fmt(target.get('after_ms'), 3)} ms against {_fmt(target.get('original_ms'), 3)} ms in the same "
             f"interleaved run ({_fmt(target.get('fraction'), 3)} of the original, "
             f"{format_speedup(target.get('speedup'))}); realised fraction (speed-up / MACs reduction) "
             f"{_fmt(realised, 2)}." + (" The machine looked busy: treat the digits as rough." if target.get("busy") else ""),
             "", "| stage | latency (ms) | fraction of the original | MACs kept | realised fraction | target held |",
             "|---|---:|---:|---:|---:|---|"]

    def fraction_held(fraction: Any, ms: Any) -> str:
        if isinstance(target.get("target_ms"), (int, float)):
            return "yes" if isinstance(ms, (int, float)) and ms <= target["target_ms"] else "NO"
        wanted = target.get("target_fraction")
        if not isinstance(wanted, (int, float)) or not isinstance(fraction, (int, float)):
            return "-"
        return "yes" if fraction <= wanted else "NO"

    def realised_at(fraction: Any) -> Optional[float]:
        return realised_fraction(1.0 / fraction, macs_x) if isinstance(fraction, (int, float)) and fraction > 0 else None

    predicted = target.get("predicted_fraction")
    lines.append(f"| predicted by the search | {_fmt(target.get('predicted_ms'), 3)} | {_fmt(predicted, 3)} | "
                 f"{_fmt(macs_kept, 3)} | {_fmt(realised_at(predicted), 2)} | "
                 f"{fraction_held(predicted, target.get('predicted_ms'))} |")
    lines.append(f"| measured in the search (try {target.get('chosen_try') or '-'}) | {_fmt(target.get('after_ms'), 3)} | "
                 f"{_fmt(target.get('fraction'), 3)} | {_fmt(macs_kept, 3)} | {_fmt(realised, 2)} | "
                 f"{fraction_held(target.get('fraction'), target.get('after_ms'))} |")
    check = latency_target_recheck(report)
    if check is not None:
        lines.append(f"| re-measured for this report (`{check['key']}`, after fine-tuning) | {_fmt(check['ms'], 3)} | "
                     f"{_fmt(check['fraction'], 3)} | {_fmt(macs_kept, 3)} | {_fmt(realised_at(check['fraction']), 2)} | "
                     f"{'yes' if check['held'] else 'NO'} |")
    else:
        lines.append("| re-measured for this report | - | - | - | - | not measured at the target's setting |")
    lines += ["", "Verified tries (each built and measured interleaved with the original; *give back*: a met model "
              "left much of the target unused, so capacity was given back; *uniform*: every group keeping the same share, "
              "tried when it keeps more MACs than the best met model):", "",
              "| try | phase | predicted (ms) | predicted fraction | measured (ms) | measured fraction | MACs kept | met |",
              "|---:|---|---:|---:|---:|---:|---:|---|"]
    for entry in target.get("tries") or []:
        lines.append(f"| {entry.get('try')} | {entry.get('phase', 'search')} | {_fmt(entry.get('predicted_ms'), 3)} | "
                     f"{_fmt(entry.get('predicted_fraction'), 3)} | {_fmt(entry.get('measured_ms'), 3)} | "
                     f"{_fmt(entry.get('measured_fraction'), 3)} | {_fmt(entry.get('macs_fraction'), 3)} | "
                     f"{'yes' if entry.get('met') else 'no'} |")
    round_to = target.get("round_to") or {}
    if round_to:
        lines += ["", "Channel multiples chosen by measurement (group: multiple): "
                  + ", ".join(f"`{k}`: {v}" for k, v in round_to.items())]
    if target.get("method"):
        lines += ["", f"Method: {target['method']}."]
    return lines


def _latency_settings(report: Mapping[str, Any]) -> Mapping[str, Any]:
    """report.json's ``latency.settings`` (empty for reports written before interleaved timing)."""
    section = report.get("latency") or {}
    settings = section.get("settings") if isinstance(section, Mapping) else None
    return settings if isinstance(settings, Mapping) else {}


def _speedup_of(report: Mapping[str, Any], key: str) -> Optional[float]:
    row = _latency_settings(report).get(key)
    if isinstance(row, Mapping) and isinstance(row.get("speedup"), (int, float)):
        return float(row["speedup"])
    before = (report["baseline"].get("latency_ms") or {}).get(key)
    after = (report["pruned"].get("latency_ms") or {}).get(key)
    return before / after if before and after else None


def _ms(value: Any, iqr: Any) -> str:
    if not isinstance(iqr, (int, float)):
        return _fmt(value, 3)
    return f"{_fmt(value, 3)} ± {_fmt(iqr, 3)}" if isinstance(value, (int, float)) else "-"


def latency_rows(report: Mapping[str, Any]) -> list[str]:
    """The main table's latency rows: baseline and pruned median ± IQR (ms), "N.NNx faster/slower"."""
    from fxprune.latency import format_speedup

    base, pruned = report["baseline"], report["pruned"]
    base_lat, pruned_lat = base.get("latency_ms") or {}, pruned.get("latency_ms") or {}
    base_iqr, pruned_iqr = base.get("latency_iqr_ms") or {}, pruned.get("latency_iqr_ms") or {}
    lines = []
    for key in base_lat:
        speedup = _speedup_of(report, key)
        lines.append(f"| latency {key} (ms) | {_ms(base_lat.get(key), base_iqr.get(key))} | "
                     f"{_ms(pruned_lat.get(key), pruned_iqr.get(key))} | {format_speedup(speedup)} |")
    return lines


def latency_warnings(report: Mapping[str, Any]) -> list[str]:
    """Loud lines for the top of report.md: the pruned model slower anywhere, a busy measurement."""
    from fxprune.latency import format_speedup

    slower = []
    for key in report["baseline"].get("latency_ms") or {}:
        speedup = _speedup_of(report, key)
        if speedup is not None and speedup < 1.0:
            slower.append(f"`{key}` ({format_speedup(speedup)})")
    busy = [key for key, row in _latency_settings(report).items() if isinstance(row, Mapping) and row.get("busy")]
    lines = []
    if slower:
        lines += ["", f"> **WARNING: the pruned model is SLOWER than the baseline at {', '.join(slower)}.** "
                  "Fewer MACs did not make it faster there (see the latency section)."]
    if busy:
        lines += ["", f"> **WARNING: the machine looked busy while timing {', '.join(f'`{k}`' for k in busy)}** "
                  "(the spread of the interleaved rounds exceeded the threshold): treat those latencies as rough."]
    return lines


def latency_section(report: Mapping[str, Any]) -> list[str]:
    """``## Latency``: how it was measured, per setting the speed-up with its spread, the realised
    fraction (speed-up / MACs reduction), threads; and the settings that failed."""
    from fxprune.latency import format_speedup, realised_fraction

    base, pruned = report["baseline"], report["pruned"]
    settings = _latency_settings(report)
    section = report.get("latency") or {}
    macs_x = (report.get("reduction") or {}).get("macs_x")
    lines: list[str] = []
    measured = {k: v for k, v in settings.items() if isinstance(v, Mapping) and "speedup" in v}
    if measured:
        devices = section.get("devices") or {}
        lines += ["", "## Latency", "",
                  f"Baseline and pruned timed interleaved (round-robin) with torch.utils.benchmark at "
                  f"{section.get('threads', '-')} CPU thread(s), torch {section.get('torch', '-')}"
                  + (f", on {'; '.join(f'{d}: {n}' for d, n in devices.items())}" if devices else "")
                  + "; per-call median ± IQR; speed-up = median of the per-round ratios, with their IQR; "
                  f"realised fraction = speed-up / MACs reduction ({_fmt(macs_x)}x).", "",
                  "| setting | baseline (ms) | pruned (ms) | speed-up | speed-up IQR | realised fraction "
                  "| rounds | threads | spread |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for key, row in measured.items():
            fraction = row.get("realised_fraction")
            if not isinstance(fraction, (int, float)):
                fraction = realised_fraction(row.get("speedup"), macs_x)
            spread = row.get("spread")
            lines.append(
                f"| {key} | {_ms(row.get('baseline_ms'), row.get('baseline_iqr_ms'))} | "
                f"{_ms(row.get('pruned_ms'), row.get('pruned_iqr_ms'))} | {format_speedup(row.get('speedup'))} | "
                f"{_fmt(row.get('speedup_q25'))}-{_fmt(row.get('speedup_q75'))} | {_fmt(fraction)} | "
                f"{row.get('samples', '-')} | {row.get('threads', '-')} | "
                f"{_fmt(100 * spread if isinstance(spread, (int, float)) else None, 1)}%"
                f"{' BUSY' if row.get('busy') else ''} |")
        if section.get("method"):
            lines += ["", f"Method: {section['method']}."]
    failures = {**(base.get("latency_failures") or {}), **(pruned.get("latency_failures") or {})}
    if failures:
        lines += ["", "Latency settings that could not be measured:", ""]
        lines += [f"- `{key}`: {reason}" for key, reason in sorted(failures.items())]
    return lines


def sweep_latency_warnings(sweep: Mapping[str, Any]) -> list[str]:
    """Loud lines under sweep.md's table: points slower than the baseline, busy measurements."""
    from fxprune.latency import format_speedup

    slower, busy = [], []
    for point in sweep.get("points") or []:
        name = f"{point.get('importance')} r={point.get('ratio')}"
        settings = ((point.get("latency") or {}).get("settings") or {})
        for key, row in settings.items():
            if not isinstance(row, Mapping):
                continue
            speedup = row.get("speedup")
            if isinstance(speedup, (int, float)) and speedup < 1.0:
                slower.append(f"{name} at `{key}` ({format_speedup(speedup)})")
            if row.get("busy"):
                busy.append(f"{name} at `{key}`")
    lines = []
    if slower:
        lines += ["", f"> **WARNING: pruned models SLOWER than the baseline: {', '.join(slower)}.**"]
    if busy:
        lines += ["", f"> **WARNING: the machine looked busy while timing {', '.join(busy)}:** treat those "
                  "latencies as rough."]
    return lines


def write_report(report: Mapping[str, Any], out_dir: Union[str, Path]) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir``."""
    out = Path(out_dir)
    json_path = write_json(report, out / "report.json")
    md_path = out / "report.md"
    md_path.write_text(render_markdown(_clean(report)), encoding="utf-8")
    return json_path, md_path


def layer_channels(model: nn.Module) -> dict[str, int]:
    """Output channels (features) of every conv and linear layer, by qualified name."""
    channels: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            channels[name] = int(module.out_channels)
        elif isinstance(module, nn.Linear):
            channels[name] = int(module.out_features)
    return channels


def _pyplot() -> Any:
    matplotlib = require("matplotlib")  # the 'run' extra: a clear error when it is missing
    matplotlib.use("Agg")  # files only: no display on servers and CI
    return require("matplotlib.pyplot")


def plot_channels(baseline: nn.Module, pruned: nn.Module, path: Union[str, Path],
                  title: str = "Channels per layer") -> Path:
    """Bar chart of output channels per conv/linear layer, before and after pruning."""
    plt = _pyplot()
    before, after = layer_channels(baseline), layer_channels(pruned)
    names = list(before)
    x = list(range(len(names)))
    width = max(8.0, 0.28 * len(names))
    fig, ax = plt.subplots(figsize=(width, 4.5))
    ax.bar([i - 0.2 for i in x], [before[n] for n in names], width=0.4, label="baseline")
    ax.bar([i + 0.2 for i in x], [after.get(n, 0) for n in names], width=0.4, label="pruned")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylabel("output channels")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(points: Sequence[Mapping[str, Any]], baseline: Mapping[str, Any],
               out_dir: Union[str, Path], latency_setting: Optional[str] = None) -> list[Path]:
    """Accuracy vs MACs and accuracy vs latency, one line per importance criterion.

    ``points`` are sweep results with ``importance``, ``ratio``, ``top1``, ``macs`` and
    ``latency_ms``; ``latency_setting`` picks the latency key (default: the first one measured).
    """
    plt = _pyplot()
    out = Path(out_dir)
    paths = []
    if latency_setting is None:
        latency_setting = next(iter(baseline.get("latency_ms", {}) or {}), None)
    by_importance: dict[str, list[Mapping[str, Any]]] = {}
    for point in points:
        by_importance.setdefault(str(point["importance"]), []).append(point)
    axes_spec = [("macs", "MACs per image (M)", 1e-6, "accuracy_vs_macs.png")]
    if latency_setting:
        axes_spec.append(("latency", f"latency {latency_setting} (ms)", 1.0, "accuracy_vs_latency.png"))
    for kind, label, scale, filename in axes_spec:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))

        def value(entry: Mapping[str, Any]) -> Optional[float]:
            if kind == "macs":
                return entry.get("macs")
            return (entry.get("latency_ms") or {}).get(latency_setting)

        for importance, entries in sorted(by_importance.items()):
            entries = sorted((e for e in entries if value(e) is not None), key=lambda e: value(e))
            if not entries:
                continue
            xs = [value(e) * scale for e in entries]
            ax.plot(xs, [e["top1"] for e in entries], marker="o", label=importance)
            for e, xv in zip(entries, xs):
                ax.annotate(f"{e['ratio']:g}", (xv, e["top1"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
        if value(baseline) is not None:
            ax.scatter([value(baseline) * scale], [baseline["top1"]], marker="*", s=160,
                       color="black", label="baseline", zorder=5)
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(f"Accuracy vs {'MACs' if kind == 'macs' else 'latency'} (labels: ratio)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / filename
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def render_sweep_markdown(sweep: Mapping[str, Any]) -> str:
    """``sweep.md``: one row per (importance, ratio), with the baseline first."""
    base = sweep["baseline"]
    keys = list((base.get("latency_ms") or {}).keys())
    header = ("| model | importance | ratio | top-1 (%) | top-1 before fine-tuning (%) | top-5 (%) | params "
              "| MACs | size (MB) | " + " | ".join(f"{k} (ms)" for k in keys) + " |")
    lines = ["# fxprune sweep", "", f"- Date: {sweep.get('date', '-')}",
             *([f"- Command: {_code(sweep['command'])}"] if sweep.get("command") else []),
             *([f"- Software: {_software_text(sweep['software'])}"] if isinstance(sweep.get("software"), Mapping)
               else []),
             f"- Machine: {sweep.get('machine', {}).get('cpu', '-')}", "", header,
             "|" + "---|" * (9 + len(keys))]

    def row(name: str, importance: str, ratio: str, entry: Mapping[str, Any]) -> str:
        lat = entry.get("latency_ms") or {}
        return (f"| {name} | {importance} | {ratio} | {_fmt(entry.get('top1'))} | "
                f"{_fmt(entry.get('top1_before_finetune'))} | {_fmt(entry.get('top5'))} | "
                f"{_fmt_int(entry.get('params'))} | {_fmt_int(entry.get('macs'))} | {_fmt(entry.get('size_mb'))} | "
                + " | ".join(_fmt(lat.get(k), 3) for k in keys) + " |")

    lines.append(row("baseline", "-", "0", base))
    control = sweep.get("control") if isinstance(sweep.get("control"), Mapping) else {}
    if control.get("top1") is not None:
        lines.append(row(f"control (baseline + {_epochs(control.get('epochs'))}, same recipe)", "-", "0",
                         control))
    for point in sweep["points"]:
        lines.append(row("pruned", str(point["importance"]), f"{point['ratio']:g}", point))
    if control.get("top1") is not None:
        costs = [f"{p['importance']} r{p['ratio']:g}: {_delta(p['top1'] - control['top1'])}"
                 for p in sweep["points"] if p.get("top1") is not None]
        lines += ["", f"Pruning cost at equal training (top-1, pruned − control; every pruned model and the "
                      f"control trained the same {_epochs(control.get('epochs'))} more): " + "; ".join(costs)]
    elif control.get("skipped"):
        lines += ["", f"No equal-training control ({control['skipped']}): a pruned model's change against the "
                      f"baseline mixes pruning with its fine-tuning."]
    lines += sweep_latency_warnings(sweep)
    plots = sweep.get("plots", [])
    if plots:
        lines += [""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


ARTIFACT_NAME = "pruned_model.fxprune"
ARTIFACT_INFO = "pruned_model.json"


def save_pruned(pruned: nn.Module, out_dir: Union[str, Path], *,
                example_inputs: Optional[torch.Tensor] = None,
                build: Optional[Mapping[str, Any]] = None,
                extra: Optional[Mapping[str, Any]] = None) -> list[Path]:
    """Save the pruned model into ``out_dir``; returns the paths written.

    - ``pruned_model.fxprune/``: the artifact of :func:`fxprune.save` (plan + safetensors
      weights, no pickle), loadable with :func:`load_pruned` or ``fxprune.load(path, model=...)``;
    - ``pruned_model.json``: how to rebuild the original architecture (``build``: the keyword
      arguments of :func:`fxprune.workflow.models.build_model`), the channels per layer, ``extra``;
    - ``pruned_model.py``: the generated forward code, for reading.
    """
    import fxprune

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build = dict(build or {})
    source = None
    # fxprune.load can rebuild a plain torchvision model by name on its own; an adapted one
    # (other class count, input channels or stem) needs build_model's arguments.
    if (build.get("name") and ":" not in str(build["name"]) and build.get("num_classes") == 1000
            and build.get("in_channels") == 3 and int(build.get("image_size") or 0) >= 64):
        source = f"torchvision:{build['name']}"
    spec = None
    if build.get("name"):
        from fxprune.workflow.models import model_spec

        # The declarative spec (fxprune.modelspec) lets fxprune.load(path) rebuild the adapted model alone.
        spec = model_spec(str(build["name"]), num_classes=build["num_classes"], in_channels=build["in_channels"],
                          image_size=build["image_size"], adapt_small_images=build.get("adapt", True))
    if any(t.device.type != "cpu" for t in pruned.state_dict().values()):
        pruned = copy.deepcopy(pruned).cpu()  # the caller's model stays on its device
    example = None if example_inputs is None else (example_inputs[:1].cpu(),)
    try:
        artifact = fxprune.save(pruned, out / ARTIFACT_NAME, source=source, spec=spec, example_inputs=example)
    except fxprune.artifact.SpecMismatchError as exc:
        # A build description that does not fit the model must not cost the run its output:
        # save without a spec (fxprune.load then needs model=), and say why.
        logger.warning("the pruned model is saved without a model spec: %s", exc)
        artifact = fxprune.save(pruned, out / ARTIFACT_NAME, source=source, example_inputs=example)
    written = [Path(artifact)]
    code = getattr(pruned, "code", None)
    if isinstance(code, str):
        code_path = out / "pruned_model.py"
        code_path.write_text(code, encoding="utf-8")
        written.append(code_path)
    info = {"artifact": ARTIFACT_NAME, "build_model": build, "source": source,
            "layers": layer_channels(pruned), **dict(extra or {})}
    written.append(write_json(info, out / ARTIFACT_INFO))
    return written


#: Keyword arguments of :func:`fxprune.workflow.models.build_model` a ``pruned_model.json`` may
#: give, with the JSON type each must have. Anything else in the file is refused.
_BUILD_KEYS: dict[str, type] = {"num_classes": int, "in_channels": int, "image_size": int}
# Bounds that keep a tampered file from making load_pruned build an absurdly large model.
_BUILD_LIMITS = {"num_classes": 1_000_000, "in_channels": 4096, "image_size": 16384}


def _declarative_build(info: Mapping[str, Any], where: Path) -> dict[str, Any]:
    """``pruned_model.json``'s ``build_model`` entry, if it is a plain torchvision spec.

    A spec is a torchvision classification model *name* (checked against
    ``torchvision.models.list_models``, so never a ``package.module:callable``: a file in a
    folder never chooses code to import) and integer arguments within bounds.
    """
    import torchvision.models as tvm

    from fxprune.workflow.errors import CheckpointError

    build = info.get("build_model")
    if not isinstance(build, Mapping) or not isinstance(build.get("name"), str) or not build["name"]:
        raise CheckpointError(f"{where} does not say how to build the original model; pass model= "
                              f"(the unpruned nn.Module, or a callable returning it)")
    name = build["name"]
    if name not in tvm.list_models(module=tvm):
        raise CheckpointError(
            f"{where} names the model {name!r}, which is not a torchvision classification model: "
            f"load_pruned never imports code a file names. Pass model= (the unpruned nn.Module, "
            f"or a callable returning it) to load it")
    kwargs: dict[str, Any] = {}
    for key, value in build.items():
        if key == "name":
            continue
        kind = _BUILD_KEYS.get(key)
        if kind is None:
            raise CheckpointError(f"{where}: build_model has an unknown entry {key!r}")
        if isinstance(value, bool) or not isinstance(value, kind) or not 1 <= value <= _BUILD_LIMITS[key]:
            raise CheckpointError(f"{where}: build_model {key} must be an integer in [1, {_BUILD_LIMITS[key]}], "
                                  f"got {value!r}")
        kwargs[key] = value
    missing = sorted(set(_BUILD_KEYS) - set(kwargs))
    if missing:
        raise CheckpointError(f"{where}: build_model lacks {', '.join(missing)}")
    return {"name": name, **kwargs}


def load_pruned(out_dir: Union[str, Path], map_location: Union[str, torch.device] = "cpu", *,
                model: Union[nn.Module, Callable[[], nn.Module], None] = None) -> torch.fx.GraphModule:
    """Load the pruned model :func:`save_pruned` wrote into ``out_dir`` (never unpickles).

    ``model``: the original, unpruned architecture, as an ``nn.Module`` (its weights do not
    matter) or a callable returning one, like :func:`fxprune.load`. Without it the folder's
    ``pruned_model.json`` may only describe a torchvision model by name with integer
    arguments (what ``fxprune run`` writes for torchvision models); a file never names code
    to import or call, so a model built by your own ``package.module:callable`` needs
    ``model=``.
    """
    import fxprune

    from fxprune.workflow.errors import CheckpointError
    from fxprune.workflow.models import build_model

    out = Path(out_dir)
    where = out / ARTIFACT_INFO
    try:
        info = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{where} is missing or unreadable: {exc}") from exc
    if not isinstance(info, Mapping):
        raise CheckpointError(f"{where} is not a JSON object")
    artifact = info.get("artifact", ARTIFACT_NAME)
    # The artifact lives in this folder, under its own name: a path from the file is not followed.
    if artifact != ARTIFACT_NAME:
        raise CheckpointError(f"{where}: artifact must be {ARTIFACT_NAME!r}, got {artifact!r}")
    if model is None and fxprune.artifact.read_meta(out / ARTIFACT_NAME).get("model_spec") is not None:
        return fxprune.load(out / ARTIFACT_NAME, map_location=map_location)  # the artifact says how to rebuild it
    if model is None:
        spec = _declarative_build(info, where)
        original: nn.Module = build_model(spec["name"], num_classes=spec["num_classes"],
                                          in_channels=spec["in_channels"], image_size=spec["image_size"])
    elif isinstance(model, nn.Module):
        original = model
    elif callable(model):
        original = model()
        if not isinstance(original, nn.Module):
            raise CheckpointError(f"model= returned {type(original).__name__}, not an nn.Module")
    else:
        raise CheckpointError(f"model= must be an nn.Module or a callable returning one, got {type(model).__name__}")
    return fxprune.load(out / ARTIFACT_NAME, model=original, map_location=map_location)


def close_logging() -> None:
    """Detach and close the handlers :func:`setup_logging` added (the log file is complete)."""
    root = logging.getLogger("fxprune")
    for handler in list(root.handlers):
        if getattr(handler, "_fxprune_workflow", False):
            root.removeHandler(handler)
            handler.close()


def _not_file_only(record: logging.LogRecord) -> bool:
    return not getattr(record, FILE_ONLY, False)


def setup_logging(out_dir: Union[str, Path, None], *, quiet: bool = False,
                  is_main: bool = True, section: Optional[str] = None) -> Optional[Path]:
    """Log ``fxprune`` messages to ``out_dir/run.log`` (main process) and to stderr.

    Returns the log file path. Calling it again replaces the handlers it added before.
    run.log is appended to, one section per run: ``section`` (e.g. ``"fxprune run"``) opens
    it with a dated header and the command line, so that runs into the same folder stay
    apart. Records marked ``extra={FILE_ONLY: True}`` skip stderr.
    """
    root = logging.getLogger("fxprune")
    root.setLevel(logging.INFO)
    close_logging()
    stream = logging.StreamHandler(sys.stderr)
    stream.setLevel(logging.WARNING if (quiet or not is_main) else logging.INFO)
    stream.setFormatter(logging.Formatter("%(message)s"))
    stream.addFilter(_not_file_only)
    stream._fxprune_workflow = True  # type: ignore[attr-defined]
    root.addHandler(stream)
    if out_dir is None or not is_main:
        return None
    path = Path(out_dir) / LOG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    if section is not None:
        rule = "=" * 78
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(f"{rule}\n{section} started {utc_now()}\ncommand line: {command_line()}\n{rule}\n")
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setLevel(logging.INFO)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    file_handler._fxprune_workflow = True  # type: ignore[attr-defined]
    root.addHandler(file_handler)
    return path


# --------------------------------------------------------------------------------------------
# Provenance: what produced a report (command line, fxprune version and commit, library versions)
# --------------------------------------------------------------------------------------------

#: A log record carrying this attribute (``extra={FILE_ONLY: True}``) goes to run.log only, not
#: to stderr: for what stderr shows already in another form (an error the CLI prints itself).
FILE_ONLY = "fxprune_file_only"

# How ``python -m`` entry points show in sys.argv[0], and the command a user typed for them.
_ENTRY_POINTS = (("fxprune/__main__.py", "python -m fxprune"),
                 ("fxprune/workflow/cli_args.py", "python -m fxprune.workflow.cli_args"))


def command_line(argv: Optional[Sequence[str]] = None) -> str:
    """The command line of this process (``sys.argv``), shell-quoted, as the user would retype it.

    ``python -m fxprune run`` puts the path of ``fxprune/__main__.py`` in ``argv[0]``; that is
    shown as ``python -m fxprune``, and the installed script as ``fxprune``.
    """
    args = [str(a) for a in (sys.argv if argv is None else argv)]
    if not args:
        return ""
    head = args[0].replace(os.sep, "/")
    for suffix, shown in _ENTRY_POINTS:
        if head.endswith(suffix):
            return " ".join([shown, *map(shlex.quote, args[1:])])
    if Path(head).name == "fxprune":
        return shlex.join(["fxprune", *args[1:]])
    if head.endswith(".py") or head in ("-c", "-m"):
        return shlex.join(["python", *args])  # a script (or -c) the interpreter ran
    return shlex.join(args)


def git_commit(folder: Union[str, Path, None] = None) -> Optional[dict[str, Any]]:
    """``{"commit": sha, "dirty": bool}`` of the git checkout ``folder`` sits in; None if there is none.

    ``folder`` defaults to the folder above the installed ``fxprune`` package. Never raises:
    no git, no checkout (a wheel install), or a git that fails all give None. Only a
    ``.git`` entry right there counts, so an installed package inside some unrelated
    repository (a virtual environment in a project) does not report that project's commit.
    """
    if folder is None:
        folder = Path(__file__).resolve().parents[2]
    root = Path(folder)
    try:
        if not (root / ".git").exists():
            return None
        env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # a read: never take the index lock
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, env=env, check=False)
        sha = head.stdout.strip()
        if head.returncode != 0 or not re.fullmatch(r"[0-9a-f]{40,64}", sha):
            return None
        # core.fsmonitor=false: a status must not start the checkout's file-system monitor hook.
        status = subprocess.run(["git", "-C", str(root), "-c", "core.fsmonitor=false", "status", "--porcelain",
                                 "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, env=env, check=False)
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return {"commit": sha, "dirty": dirty}


def software_info() -> dict[str, Any]:
    """fxprune's version (and git commit when it runs from a checkout), torch, torchvision, python."""
    import fxprune

    info: dict[str, Any] = {"fxprune": getattr(fxprune, "__version__", None), "git": git_commit(),
                            "torch": torch.__version__, "torchvision": None, "python": sys.version.split()[0]}
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    return info


def _software_text(info: Mapping[str, Any]) -> str:
    git = info.get("git") or {}
    commit = ""
    if git.get("commit"):
        commit = f" (git {str(git['commit'])[:12]}{', with uncommitted changes' if git.get('dirty') else ''})"
    return (f"fxprune {info.get('fxprune', '-')}{commit}, torch {info.get('torch', '-')}, "
            f"torchvision {info.get('torchvision') or '-'}, python {info.get('python', '-')}")


def _code(text: str) -> str:
    """``text`` as a markdown code span, whatever backticks it holds."""
    fence = "``" if "`" in text else "`"
    return f"{fence} {text} {fence}" if fence == "``" else f"`{text}`"


# --------------------------------------------------------------------------------------------
# Warnings raised during a run: collected, counted, logged once
# --------------------------------------------------------------------------------------------

class WarningLog:
    """The :class:`fxprune.FxPruneWarning` messages of one run, identical ones counted once."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], int] = {}
        self._reasons: dict[tuple[str, str], int] = {}

    def add(self, category: str, message: str) -> bool:
        """Count one warning; True the first time this message is seen."""
        key = (category, message)
        self._counts[key] = self._counts.get(key, 0) + 1
        if self._counts[key] > 1:
            return False
        reason = (category, warning_reason(message))
        self._reasons[reason] = self._reasons.get(reason, 0) + 1
        return True

    def reason_count(self, category: str, message: str) -> int:
        """How many distinct messages so far gave the reason of ``message`` (one per node)."""
        return self._reasons.get((category, warning_reason(message)), 0)

    def reasons(self) -> list[tuple[str, str, int]]:
        """``[(category, reason, distinct messages)]`` in the order first raised (see :func:`warning_reason`)."""
        return [(c, r, n) for (c, r), n in self._reasons.items()]

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    def to_list(self) -> list[dict[str, Any]]:
        """``[{"category", "message", "count"}]`` in the order first raised."""
        return [{"category": c, "message": m, "count": n} for (c, m), n in self._counts.items()]

    def __len__(self) -> int:
        return len(self._counts)


def warning_reason(message: str) -> str:
    """The reason a warning gives, without the node it names: what repeats across nodes.

    A frozen node's warning reads ``channels left unpruned: <reason>: node %x ... at file:line``;
    one op without a rule used 34 times in a model gives 34 messages and one reason.

    >>> warning_reason("channels left unpruned: no channel rule for torch.cumsum: node %c : ... at m.py:3")
    'channels left unpruned: no channel rule for torch.cumsum'
    >>> warning_reason("ignore pattern 'x' matches no module")
    "ignore pattern 'x' matches no module"
    """
    head, sep, _ = message.partition(": node ")
    return head if sep else message


@contextlib.contextmanager
def collect_warnings(log: WarningLog) -> Iterator[WarningLog]:
    """Within the block, every :class:`fxprune.FxPruneWarning` is counted in ``log``.

    Each distinct message is logged as a WARNING to run.log. The console (stderr, even with
    ``--quiet``) shows each distinct *reason* once (:func:`warning_reason`): the first message
    that gives it, and at the end of the block, for a reason given more than once, how many
    times in all; repeats are only counted, for the report. Other warnings pass through to
    whatever displayed them before (torch's own, pytest's recorder).
    """
    from fxprune.errors import FxPruneWarning

    before = {(c, r): n for c, r, n in log.reasons()}
    try:
        with warnings.catch_warnings():  # restores the filters and showwarning on exit
            # "always": repeats from one line count too (the default shows one per location).
            warnings.simplefilter("always", FxPruneWarning)
            previous = warnings.showwarning

            def show(message: Any, category: type, filename: str, lineno: int, file: Any = None,
                     line: Optional[str] = None) -> None:
                if isinstance(category, type) and issubclass(category, FxPruneWarning):
                    name, text = category.__name__, str(message)
                    if log.add(name, text):
                        # The first message of a reason on the console too; the others in run.log only.
                        file_only = log.reason_count(name, text) > 1
                        logger.warning("%s: %s", name, text, extra={FILE_ONLY: file_only})
                    return
                previous(message, category, filename, lineno, file, line)

            warnings.showwarning = show
            yield log
    finally:
        for category, reason, count in log.reasons():
            if count > max(1, before.get((category, reason), 1)):
                logger.warning("%s: %d warnings in all for different nodes (each in run.log): %s", category, count, reason)


def _warning_lines(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    if not entries:
        return []
    total = sum(int(e.get("count", 1)) for e in entries)
    lines = ["", f"## Warnings ({total} raised, {len(entries)} distinct)", "",
             "Channels fxprune left unpruned because it could not prove pruning them safe, and other "
             "warnings of the run (also in run.log):", ""]
    for entry in entries:
        count = int(entry.get("count", 1))
        text = " ".join(str(entry.get("message", "")).split())
        lines.append(f"- {count}x {entry.get('category', 'warning')}: {text}")
    return lines


# --------------------------------------------------------------------------------------------
# What was pruned: groups (pruned, frozen and why), channels and MACs per layer and per stage
# --------------------------------------------------------------------------------------------

def reason_kind(reason: str) -> str:
    """A frozen group's reason without the node it was found at, so that reasons can be counted.

    ``"reaches the model output at output"`` -> ``"reaches the model output"``;
    ``"ignored module fc"`` -> ``"ignored module (--ignore)"``.
    """
    if reason.startswith("ignored module "):
        return "ignored module (--ignore)"
    return re.sub(r" at [^\s]+$", "", reason.strip())


def group_summary(groups: Sequence[Any], plan: Any) -> dict[str, Any]:
    """How each channel group of the model fared: pruned, frozen (with reasons), or kept whole.

    ``groups``: the :class:`fxprune.Group` objects of the unpruned model (``fxprune.analyze_model``);
    ``plan``: the :class:`fxprune.PruningPlan` that built the pruned model. A group is *frozen*
    when fxprune may not prune it (its reasons are counted, node names left out), *kept whole*
    when it could be pruned but the options left it so (``--round-to``, a small ratio, a MACs
    target), *single channel* when it has one channel only.

    ``renormalising_groups``: the pruned groups a LayerNorm/RMSNorm normalises over (key, size,
    kept, the norms): their rewrite is proven against the masked-norm reference, not the plain
    masked model (:attr:`fxprune.Group.renormalising`).
    """
    planned = {g.key: g for g in getattr(plan, "groups", [])}
    counts = {"pruned": 0, "frozen": 0, "kept_whole": 0, "single_channel": 0}
    reasons: dict[str, dict[str, Any]] = {}
    frozen_groups, whole_groups, renormalising = [], [], []
    for group in groups:
        entry = planned.get(group.key)
        if entry is not None and entry.pruned:
            counts["pruned"] += 1
            if group.renormalising:
                renormalising.append({"key": group.key, "size": group.size, "kept": len(entry.keep),
                                      "norms": list(group.norms)})
        elif group.frozen:
            counts["frozen"] += 1
            frozen_groups.append({"key": group.key, "size": group.size, "reasons": list(group.reasons)})
            for kind in dict.fromkeys(reason_kind(r) for r in group.reasons):
                slot = reasons.setdefault(kind, {"reason": kind, "groups": 0, "channels": 0, "examples": []})
                slot["groups"] += 1
                slot["channels"] += group.size
                if len(slot["examples"]) < 3:
                    slot["examples"].append(group.key)
        elif group.size <= 1:
            counts["single_channel"] += 1
        else:
            counts["kept_whole"] += 1
            whole_groups.append({"key": group.key, "size": group.size})
    ranked = sorted(reasons.values(), key=lambda r: (-r["groups"], -r["channels"], r["reason"]))
    return {"groups": len(groups), **counts, "frozen_reasons": ranked, "frozen_groups": frozen_groups,
            "kept_whole_groups": whole_groups, "renormalising_groups": renormalising}


def layer_macs(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """MACs of one forward pass on ``example_inputs``, per module (qualified name) and in all ("").

    Counted by :class:`torch.utils.flop_counter.FlopCounterMode` (PyTorch's formulas, as
    :func:`fxprune.cost.count_macs`), which attributes each op to every module it ran inside.
    A module's entry therefore includes its children's; a ``GraphModule`` calls its layers
    directly, so its containers (``layer1``) have no entry of their own. Eval mode, no autograd;
    the model's train/eval flags are restored.
    """
    return {name: flops // 2 for name, flops in module_flops(model, example_inputs).items()}


def _leaf_macs(macs: Mapping[str, int]) -> dict[str, int]:
    """The entries of :func:`layer_macs` no other entry is inside (each op counted once)."""
    names = [n for n in macs if n]
    return {n: macs[n] for n in names if not any(o.startswith(n + ".") for o in names)}


def layer_table(baseline: nn.Module, pruned: nn.Module, example_inputs: Any) -> list[dict[str, Any]]:
    """Per conv/linear layer: output channels and MACs, before and after pruning."""
    channels_before, channels_after = layer_channels(baseline), layer_channels(pruned)
    macs_before, macs_after = layer_macs(baseline, example_inputs), layer_macs(pruned, example_inputs)
    rows = []
    for name, width in channels_before.items():
        rows.append({"layer": name, "channels_before": width, "channels_after": channels_after.get(name),
                     "macs_before": macs_before.get(name), "macs_after": macs_after.get(name)})
    return rows


def stage_table(baseline: nn.Module, pruned: nn.Module, example_inputs: Any) -> list[dict[str, Any]]:
    """MACs per stage (the model's top-level children) before and after, and where the cut came from.

    A stage's MACs are those of the layers inside it; ops outside any layer (a functional
    ``torch.matmul`` in ``forward``) are the ``(outside layers)`` row. ``share_of_cut``: the
    fraction of all removed MACs that this stage gave up.
    """
    def per_stage(macs: Mapping[str, int]) -> dict[str, int]:
        stages: dict[str, int] = {}
        for name, value in _leaf_macs(macs).items():
            stage = name.split(".", 1)[0]
            stages[stage] = stages.get(stage, 0) + value
        rest = macs.get("", 0) - sum(stages.values())
        if rest > 0:
            stages["(outside layers)"] = rest
        return stages

    before, after = per_stage(layer_macs(baseline, example_inputs)), per_stage(layer_macs(pruned, example_inputs))
    order = list(before) + [name for name in after if name not in before]
    cut = sum(before.values()) - sum(after.values())
    rows = []
    for name in order:
        b, a = before.get(name, 0), after.get(name, 0)
        rows.append({"stage": name, "macs_before": b, "macs_after": a,
                     "share_of_cut": (b - a) / cut if cut > 0 else None})
    return rows


def _renormalising_lines(groups: Sequence[Mapping[str, Any]]) -> list[str]:
    """Which pruned groups renormalise, and which reference their proof contract is."""
    if not groups:
        return ["", "- Every pruned group is exact: the pruned model equals the baseline with the removed channels "
                    "zeroed (the masked reference)"]
    rows = []
    for g in groups[:8]:
        norms = list(g.get("norms") or [])
        shown = ", ".join(norms[:3]) + (f" and {len(norms) - 3} more" if len(norms) > 3 else "")
        rows.append(f"`{g['key']}` ({g['size']} -> {g['kept']} ch; {shown or 'a norm'})")
    more = f" and {len(groups) - 8} more" if len(groups) > 8 else ""
    return ["", f"- Renormalising groups ({len(groups)}): {'; '.join(rows)}{more}. A LayerNorm/RMSNorm normalises "
                "over their channels, so the pruned model is not the baseline with those channels zeroed: each such "
                "norm computes its statistics over the kept channels only. Their proof contract is the masked-norm "
                "reference (the baseline with the removed channels zeroed and each affected norm replaced by "
                "`fxprune.testing.masked_norm` over the kept channels, built from the baseline and the plan, not "
                "from the rewrite); the other pruned groups are exact (the plain masked reference). "
                "`--no-renormalising` keeps these widths whole"]


def _pruning_lines(pruning: Any) -> list[str]:
    """``## What was pruned``: groups and why some were not, MACs per stage, channels per layer."""
    if not isinstance(pruning, Mapping):
        return []
    lines = ["", "## What was pruned"]
    summary = pruning.get("groups")
    if isinstance(summary, Mapping):
        lines += ["", f"- Channel groups: {summary.get('groups', '-')}: {summary.get('pruned', '-')} pruned, "
                      f"{summary.get('frozen', '-')} frozen (fxprune may not prune them), "
                      f"{summary.get('kept_whole', '-')} prunable but kept whole by the options, "
                      f"{summary.get('single_channel', '-')} of a single channel"]
        reasons = summary.get("frozen_reasons") or []
        if reasons:
            lines += ["", "| why groups were frozen (top reasons) | groups | channels | e.g. |", "|---|---:|---:|---|"]
            for reason in reasons[:5]:
                examples = ", ".join(f"`{e}`" for e in reason.get("examples", []))
                lines.append(f"| {reason['reason']} | {reason['groups']} | {reason['channels']} | {examples} |")
            if len(reasons) > 5:
                lines.append(f"| ({len(reasons) - 5} more reasons in report.json) | | | |")
        if summary.get("pruned"):
            lines += _renormalising_lines(summary.get("renormalising_groups") or [])
        whole = summary.get("kept_whole_groups") or []
        if whole:
            shown = ", ".join(f"`{g['key']}` ({g['size']} ch)" for g in whole[:8])
            lines += ["", f"- Kept whole although prunable: {shown}{' ...' if len(whole) > 8 else ''} "
                          f"(check `--round-to`, the ratio or the MACs target)"]
    stages = pruning.get("stages") or []
    if stages:
        lines += ["", "Where the MACs went (per stage; MACs of one image):", "",
                  "| stage | MACs before | MACs after | kept | share of the cut |", "|---|---:|---:|---:|---:|"]
        for row in stages:
            b, a, share = row.get("macs_before"), row.get("macs_after"), row.get("share_of_cut")
            kept = _fmt(100 * a / b, 1, " %") if b and a is not None else "-"
            lines.append(f"| {row['stage']} | {_fmt_int(b)} | {_fmt_int(a)} | {kept} | "
                         f"{_fmt(100 * share if share is not None else None, 1, ' %')} |")
    layers = pruning.get("layers") or []
    if layers:
        narrower = sum(1 for r in layers if r.get("channels_after") is not None
                       and r["channels_after"] < r["channels_before"])
        lines += ["", f"<details><summary>Channels and MACs per layer ({narrower} of {len(layers)} layers "
                      f"narrower)</summary>", "",
                  "| layer | channels before → after | MACs before | MACs after |", "|---|---:|---:|---:|"]
        for row in layers:
            after = row.get("channels_after")
            lines.append(f"| `{row['layer']}` | {row['channels_before']} → {after if after is not None else '-'} | "
                         f"{_fmt_int(row.get('macs_before'))} | {_fmt_int(row.get('macs_after'))} |")
        lines += ["", "</details>"]
    return lines


# --------------------------------------------------------------------------------------------
# Accuracy at equal training: baseline, control (baseline + the same fine-tuning), pruned
# --------------------------------------------------------------------------------------------

def _epochs(count: Any) -> str:
    return f"{count} epoch{'' if count == 1 else 's'}" if count is not None else "- epochs"


def _accuracy_lines(report: Mapping[str, Any]) -> list[str]:
    base, pruned = report["baseline"], report["pruned"]
    control = report.get("control") if isinstance(report.get("control"), Mapping) else None
    epochs = (report.get("config") or {}).get("epochs")
    trained = control is not None and control.get("top1") is not None
    extra = _epochs(epochs) if epochs is not None else "the fine-tuning"
    head = f"control (baseline + {extra})"
    lines = ["", "## Accuracy at equal training", "",
             f"| | baseline | {head} | pruned (+ {extra} fine-tuning) |", "|---|---:|---:|---:|"]

    def cell(entry: Optional[Mapping[str, Any]], key: str) -> str:
        return _fmt(entry.get(key)) if entry is not None else "-"

    lines += [f"| top-1 accuracy (%) | {cell(base, 'top1')} | {cell(control, 'top1')} | {cell(pruned, 'top1')} |",
              f"| top-5 accuracy (%) | {cell(base, 'top5')} | {cell(control, 'top5')} | {cell(pruned, 'top5')} |"]
    if pruned.get("top1_right_after_pruning") is not None:
        lines.append(f"| top-1 right after pruning (%) | - | - | {_fmt(pruned.get('top1_right_after_pruning'))} |")
    if pruned.get("top1_before_finetune") is not None:
        # An older report (no bn_recalibrated key) always recalibrated what BatchNorms it had.
        what = "after BatchNorm recalibration" if pruned.get("bn_recalibrated", True) \
            else "right after pruning (no BatchNorm to recalibrate)"
        lines.append(f"| top-1 before fine-tuning, {what} (%) | - | - | {_fmt(pruned.get('top1_before_finetune'))} |")
    lines.append("")
    versus_base = (pruned["top1"] - base["top1"]) if pruned.get("top1") is not None and base.get("top1") is not None \
        else None
    if trained:
        cost = pruned["top1"] - control["top1"]  # type: ignore[index]
        verdict = "" if cost < 0 else "; pruning cost no accuracy here"
        lines.append(f"- **Pruning cost at equal training: {_delta(cost)} top-1** (pruned − control; both were "
                     f"trained the same {extra} with the same recipe, so this is what pruning itself costs"
                     f"{verdict}).")
        lines.append(f"- Pruned vs baseline: {_delta(versus_base)} top-1. This mixes pruning with {extra} of "
                     f"extra training the baseline never had (that training alone moved the unpruned model by "
                     f"{_delta(control['top1'] - base['top1'])}: the control).")  # type: ignore[index]
    else:
        why = control.get("skipped") if control is not None else None
        lines.append(f"- No equal-training control ({why or 'not run'}).")
        lines.append(f"- Pruned vs baseline: {_delta(versus_base)} top-1. When the pruned model is fine-tuned, "
                     f"this mixes pruning with {extra} of extra training the baseline never had; run without "
                     f"`--no-control` to separate the two.")
    return lines


def _top_warnings(report: Mapping[str, Any]) -> list[str]:
    """The banner at the very top of report.md when nothing was (or could be) pruned, or the
    pruned model could not be saved."""
    from fxprune.allocation import NOTHING_PRUNABLE, NOTHING_PRUNED

    saved = [] if not report.get("save_error") else [
        f"> **ERROR: the pruned model was not saved** (`{' '.join(str(report['save_error']).split())}`); "
        "the measurements below are the run's.", ""]
    achieved = (report.get("pruned") or {}).get("achieved")
    nothing = isinstance(achieved, Mapping) and bool(achieved.get("nothing_pruned"))
    why = [str(w.get("message", "")) for w in report.get("warnings") or []
           if str(w.get("message", "")).startswith((NOTHING_PRUNABLE, NOTHING_PRUNED))]
    if not nothing and not why:
        return saved
    lines = saved + ["> **WARNING: nothing was pruned.** Every group kept all its channels; the pruned model is the "
             "baseline's architecture (check `--round-to`, `--ignore` and the warnings below and in run.log)."]
    for text in why:
        lines += [">", f"> fxprune: {' '.join(text.split())}"]
    return lines + [""]


def log_run_error(error: BaseException) -> None:
    """Write the error that stops a run into run.log (only there: the CLI prints it on stderr itself).

    An :class:`fxprune.FxPruneError` (bad input) is one line; anything else gets its traceback,
    since it is a bug or an interruption worth reading later. Nothing happens when no run.log
    is open (the error came before the output folder was set up).
    """
    from fxprune.errors import FxPruneError

    root = logging.getLogger("fxprune")
    if not any(isinstance(h, logging.FileHandler) and getattr(h, "_fxprune_workflow", False) for h in root.handlers):
        return
    text = " ".join(str(error).split())
    if isinstance(error, FxPruneError):
        logger.error("run stopped by an error (%s): %s", type(error).__name__, text, extra={FILE_ONLY: True})
    elif isinstance(error, KeyboardInterrupt):
        logger.error("run interrupted (KeyboardInterrupt)", extra={FILE_ONLY: True})
    else:
        logger.error("run stopped by %s: %s", type(error).__name__, text, exc_info=error,
                     extra={FILE_ONLY: True})
