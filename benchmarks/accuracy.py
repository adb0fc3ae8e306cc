"""Accuracy that holds up: the default recipe against an equal-training control, Torch-Pruning and scratch.

Fashion-MNIST, resnet18 built and adapted exactly as ``fxprune run`` builds it (small-image
stem), one baseline per seed, trained with the job's baseline recipe. Then, per seed and ratio,
the same data, the same training code (the workflow's ``train``, ``recalibrate_batchnorm`` and
``evaluate_accuracy``) and the same recipes for six arms:

    A  fxprune's default recipe: prune (L1, uniform ratio) -> BN recalibration -> fine-tune k epochs
    B  Torch-Pruning (MagnitudePruner, GroupMagnitudeImportance(p=1), same ratio, final fc ignored)
       on the same baseline, then the same recalibration and fine-tune; its MACs are checked
       against A's (within 1 %; otherwise its ratio is searched until they match, and the JSON says so)
    C  fxprune with global ranking at A's MACs (target_macs = A's MACs / baseline MACs), same recipe
    D  A's pruned architecture re-initialised and trained from scratch for baseline + k epochs
       with the baseline's recipe (the "is pruning better than training the small net?" arm)
    E  the equal-training control: the unpruned baseline fine-tuned k more epochs with the
       fine-tuning recipe (per seed; it does not depend on the ratio)
    F  A with knowledge distillation from the baseline (the workflow's ``--distill``)

Every arm records top-1/top-5 on the full held-out test split, top-1 after recalibration (before
fine-tuning), MACs, parameters, CPU latency at batch 1 on one thread timed interleaved with the
baseline (``fxprune.measure_latency``; ``busy`` when the machine was not quiet), training time
and the machine's load average. Results go to ``--out`` (JSON, rewritten atomically after every
arm: a rerun skips the arms already there) and ``--table`` (markdown rendered from the JSON).
Baselines are cached in ``--work`` so a resumed run does not train them again.

    python benchmarks/accuracy.py                                   # the recorded run
    python benchmarks/accuracy.py --limit 512 --eval-limit 512 --epochs 1 --baseline-epochs 1 \\
        --seeds 0 --ratios 0.5 --out /tmp/acc.json --table /tmp/ACC.md   # a smoke run (~2 min)
    python benchmarks/accuracy.py --render-only                     # re-render ACCURACY.md
    python benchmarks/accuracy.py --seeds 0 --arms A --finetune lr=0.05 warmup_epochs=0.3 \
        --out /tmp/v1.json --table /tmp/V1.md   # a fine-tuning recipe variant (recorded in the settings)
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent

__all__ = ["ARMS", "ARM_TITLES", "arm_titles", "RATIO_ARMS", "Job", "plan_jobs", "job_key", "settings_of", "baseline_settings", "parse_finetune",
           "finetune_recipe", "check_settings",
           "summarize", "goals", "render_markdown", "reinitialise", "same_weights", "main"]

ARMS = ("A", "B", "C", "D", "E", "F")
#: Arms pruned at each ratio; E (and the baseline) are once per seed.
RATIO_ARMS = ("A", "B", "C", "D", "F")
ARM_TITLES = {
    "baseline": "unpruned baseline",
    "A": "fxprune default (L1, uniform) + recal + fine-tune",
    "B": "Torch-Pruning MagnitudePruner L1 + recal + fine-tune",
    "C": "fxprune global ranking at A's MACs + recal + fine-tune",
    "D": "A's architecture from scratch (baseline + k epochs)",
    "E": "unpruned baseline + k epochs (equal-training control)",
    "F": "A + distillation from the baseline",
}
def arm_titles(settings: Mapping[str, Any]) -> Dict[str, str]:
    """:data:`ARM_TITLES` with A's criterion and allocation read from the recorded recipe.

    >>> arm_titles({"finetune": {"importance": "taylor", "global_ranking": True}})["A"]
    'fxprune default (Taylor, global ranking) + recal + fine-tune'
    >>> arm_titles({})["A"] == ARM_TITLES["A"]
    True
    """
    recipe = settings.get("finetune") or {}
    criterion = str(recipe.get("importance", "l1"))
    criterion = criterion.upper() if len(criterion) <= 3 else criterion.capitalize()
    allocation = "global ranking" if recipe.get("global_ranking") else "uniform"
    return dict(ARM_TITLES, A=f"fxprune default ({criterion}, {allocation}) + recal + fine-tune")


#: The issue's thresholds at ratio 0.5 (points of top-1).
GOAL_VS_E = -0.3
GOAL_VS_D = 0.5
GOAL_VS_B = 0.0
GOAL_RATIO = 0.5
#: The default job's schedule (``fxprune run``): a run with other epochs or a subset is labelled short.
JOB_EPOCHS = 5
JOB_BASELINE_EPOCHS = 3

Job = Tuple[int, str, Optional[float]]  # (seed, arm, ratio); ratio None for "baseline" and "E"


def job_key(seed: int, arm: str, ratio: Optional[float] = None) -> str:
    """The JSON key of one arm's result: ``seed0/E`` or ``seed0/A/r0.5``."""
    return f"seed{seed}/{arm}" if ratio is None else f"seed{seed}/{arm}/r{ratio:g}"


def plan_jobs(seeds: Sequence[int], ratios: Sequence[float], arms: Sequence[str]) -> List[Job]:
    """The jobs in the order they run: the first ratio for every seed first, so a run cut short
    still holds the main comparison for all seeds; the baseline (and E) of a seed come before
    its pruned arms."""
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
    jobs: List[Job] = []
    for index, ratio in enumerate(ratios):
        for seed in seeds:
            if index == 0:
                jobs.append((seed, "baseline", None))
                if "E" in arms:
                    jobs.append((seed, "E", None))
            jobs.extend((seed, arm, ratio) for arm in RATIO_ARMS if arm in arms)
    if not ratios:
        for seed in seeds:
            jobs.append((seed, "baseline", None))
            if "E" in arms:
                jobs.append((seed, "E", None))
    return jobs


#: ``--finetune`` keys that are :class:`~fxprune.workflow.job.RunConfig` fields. Only options that
#: reach the fine-tuning (and the pruning) are allowed, never ones the baseline or D share
#: (``augment``, ``baseline_lr``, ...), so a variant changes the recipe under test, not the comparison.
FINETUNE_RUN_KEYS = ("lr", "distill", "importance", "label_smoothing", "weight_decay", "optimizer",
                     "recalibration_batches", "global_ranking")
#: ``--finetune`` keys that are :class:`~fxprune.workflow.finetune.TrainConfig` fields of the
#: fine-tuning recipe (``fxprune run`` has no flag for them: the benchmark replaces them directly).
FINETUNE_TRAIN_KEYS = ("warmup_epochs", "distill_alpha", "temperature", "momentum", "nesterov")
#: What the ``finetune`` settings record: the fine-tuning recipe as it resolved, flags or defaults.
FINETUNE_RECORDED = ("lr", "warmup_epochs", "optimizer", "momentum", "nesterov", "weight_decay",
                     "label_smoothing", "distill", "distill_alpha", "temperature", "importance",
                     "recalibration_batches")


def parse_finetune(pairs: Sequence[str]) -> Dict[str, Any]:
    """``["lr=0.02", "distill=1"]`` -> ``{"lr": 0.02, "distill": True}`` (values typed by the key).

    >>> parse_finetune(["lr=0.02", "warmup_epochs=0.5", "distill=1", "importance=l2"])
    {'lr': 0.02, 'warmup_epochs': 0.5, 'distill': True, 'importance': 'l2'}
    """
    known = FINETUNE_RUN_KEYS + FINETUNE_TRAIN_KEYS
    flags = ("distill", "nesterov", "global_ranking")
    texts = ("importance", "optimizer")
    integers = ("recalibration_batches",)
    changes: Dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in known:
            raise SystemExit(f"--finetune {pair!r}: expected KEY=VALUE with KEY one of {', '.join(known)}")
        if key in flags:
            if value.lower() not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
                raise SystemExit(f"--finetune {pair!r}: a switch is 0 or 1")
            changes[key] = value.lower() in ("1", "true", "yes", "on")
        elif key in texts:
            changes[key] = value
        elif key in integers:
            changes[key] = int(value)
        else:
            changes[key] = float(value)
    return changes


def finetune_recipe(args: argparse.Namespace) -> Dict[str, Any]:
    """The fine-tuning recipe the pruned arms and E train with: the job's defaults plus ``--finetune``."""
    from fxprune.workflow.job import RunConfig, train_config

    changes = parse_finetune(getattr(args, "finetune", None) or [])
    run_changes = {k: v for k, v in changes.items() if k in FINETUNE_RUN_KEYS}
    config = RunConfig(epochs=args.epochs, baseline_epochs=args.baseline_epochs, batch_size=args.batch_size,
                       quiet=True, compile=False, control=False).replace(**run_changes)
    cfg = train_config(config, baseline=False)
    resolved = {key: getattr(cfg, key) for key in FINETUNE_RECORDED if hasattr(cfg, key)}
    resolved.update({key: changes[key] for key in FINETUNE_TRAIN_KEYS if key in changes})
    resolved.update(distill=config.distill, importance=config.importance,
                    recalibration_batches=config.recalibration_batches)
    if config.global_ranking:
        # Recorded only when on: the runs made while uniform was the job's only allocation
        # recorded no such key, and they keep their settings.
        resolved["global_ranking"] = True
    return resolved


def settings_of(args: argparse.Namespace) -> Dict[str, Any]:
    """What determines every arm's result: a JSON made under other settings is never extended.

    ``finetune`` is the fine-tuning recipe as it resolved (not the flags), so a variant measured
    with ``--finetune`` and the same recipe made the default later are the same settings.
    """
    return {"model": "resnet18", "data": "fashion-mnist", "epochs": args.epochs,
            "baseline_epochs": args.baseline_epochs, "batch_size": args.batch_size, "limit": args.limit,
            "eval_limit": args.eval_limit, "subset_seed": 0, "finetune": finetune_recipe(args)}


def baseline_settings(settings: Mapping[str, Any]) -> Dict[str, Any]:
    """What determines a baseline (and D): the settings less the fine-tuning recipe, so every recipe
    variant starts from the same cached baseline."""
    return {k: v for k, v in settings.items() if k != "finetune"}


def kernel_warning(doc: Mapping[str, Any], machine: Mapping[str, Any], path: Path) -> Optional[str]:
    """A warning when ``doc`` holds arms measured on a machine with other CPU kernels than ``machine``'s.

    Not a refusal: the arms already there stay valid among themselves. But a baseline trained
    again here is not the one they started from (another ISA sums in another order), so new arms
    are paired only with arms trained from the same baseline.
    """
    before = (doc.get("meta", {}).get("machine") or {}).get("cpu_kernels")
    if not doc.get("results") or before == machine.get("cpu_kernels"):
        return None
    return (f"warning: {path} holds results from a machine with CPU kernels {before or 'unrecorded'}, this one has "
            f"{machine.get('cpu_kernels')}: a baseline trained here differs from theirs, so compare new arms only "
            "with arms trained from the same baseline")


def check_settings(doc: Mapping[str, Any], settings: Mapping[str, Any], path: Path) -> None:
    """Refuse to add results made under ``settings`` to a JSON recorded under others."""
    saved = doc.get("settings")
    if saved is not None and dict(saved) != dict(settings):
        raise SystemExit(f"{path} holds results made with other settings ({saved}); pass another --out "
                         f"or move it away to start anew")


# --------------------------------------------------------------------------------------------
# Summary and rendering (pure: no torch)
# --------------------------------------------------------------------------------------------
def _stats(values: Sequence[float]) -> Dict[str, Any]:
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values), "values": values}


def summarize(results: Mapping[str, Mapping[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Per ``arm`` (baseline, E) or ``arm/r<ratio>``: top-1 statistics over seeds and mean costs."""
    groups: Dict[str, List[Mapping[str, Any]]] = {}
    for entry in results.values():
        ratio = entry.get("ratio")
        name = entry["arm"] if ratio is None else f"{entry['arm']}/r{float(ratio):g}"
        groups.setdefault(name, []).append(entry)
    summary: Dict[str, Dict[str, Any]] = {}
    for name, entries in groups.items():
        entries = sorted(entries, key=lambda e: e["seed"])
        row: Dict[str, Any] = {"arm": entries[0]["arm"], "ratio": entries[0].get("ratio"),
                               "seeds": [e["seed"] for e in entries],
                               "top1": _stats([e["top1"] for e in entries])}
        for key in ("macs", "params", "train_s", "latency_ms", "speedup", "top1_before_finetune"):
            values = [e[key] for e in entries if isinstance(e.get(key), (int, float))]
            row[key] = statistics.fmean(values) if values else None
        row["busy"] = any(e.get("latency_busy") for e in entries)
        summary[name] = row
    return summary


def _paired(results: Mapping[str, Mapping[str, Any]], arm: str, other: str, ratio: float) -> Optional[Dict[str, Any]]:
    """arm - other in top-1, per seed (paired on the same baseline), over the seeds both have."""
    diffs = []
    for entry in results.values():
        if entry["arm"] != arm or entry.get("ratio") is None or abs(float(entry["ratio"]) - ratio) > 1e-9:
            continue
        seed = entry["seed"]
        partner = results.get(job_key(seed, other, None if other == "E" else ratio))
        if partner is not None:
            diffs.append(float(entry["top1"]) - float(partner["top1"]))
    return _stats(diffs) if diffs else None


def goals(results: Mapping[str, Mapping[str, Any]], ratio: float = GOAL_RATIO) -> List[Dict[str, Any]]:
    """The three targets at ``ratio`` (A vs E, D, B) and F vs A, from per-seed paired differences."""
    rows = []
    for other, threshold, text in (("E", GOAL_VS_E, "A >= E - 0.3 (no real drop at equal training)"),
                                   ("D", GOAL_VS_D, "A >= D + 0.5 (pruning beats scratch)"),
                                   ("B", GOAL_VS_B, "A >= B (as good as Torch-Pruning)")):
        diff = _paired(results, "A", other, ratio)
        rows.append({"goal": text, "other": other, "threshold": threshold, "diff": diff,
                     "met": None if diff is None else diff["mean"] >= threshold,
                     "met_every_seed": None if diff is None else diff["min"] >= threshold})
    for arm in ("F", "C"):
        diff = _paired(results, arm, "A", ratio)
        rows.append({"goal": f"{arm} vs A", "other": "A", "arm": arm, "threshold": 0.0, "diff": diff,
                     "met": None if diff is None else diff["mean"] > 0.0,
                     "met_every_seed": None if diff is None else diff["min"] > 0.0})
    return rows


def _fmt(value: Optional[float], spec: str = ".2f", unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:{spec}}{unit}"


def _fmt_count(value: Optional[float]) -> str:
    if value is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f}"


def _fmt_top1(stats: Mapping[str, Any]) -> str:
    if stats["n"] == 1:
        return f"{stats['mean']:.2f}"
    half = (stats["max"] - stats["min"]) / 2
    return f"{stats['mean']:.2f} ± {half:.2f}"


def _fmt_diff(diff: Optional[Mapping[str, Any]]) -> str:
    if diff is None:
        return "not measured"
    per_seed = ", ".join(f"{v:+.2f}" for v in diff["values"])
    return f"{diff['mean']:+.2f} pt (per seed {per_seed})"


def _duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _recipe_text(recipe: Optional[Mapping[str, Any]]) -> str:
    """The fine-tuning recipe in words (``lr 0.1, no warm-up``; older JSONs recorded none)."""
    if not recipe:
        return "lr 0.1, no warm-up"
    warmup = float(recipe.get("warmup_epochs") or 0.0)
    parts = [f"lr {recipe.get('lr'):g}", f"warm-up {warmup:g} epochs" if warmup else "no warm-up",
             f"label smoothing {recipe.get('label_smoothing'):g}", f"{recipe.get('importance')} criterion"]
    if recipe.get("distill"):
        parts.append(f"distillation from the baseline (alpha {recipe.get('distill_alpha'):g}, "
                     f"T {recipe.get('temperature'):g})")
    else:
        parts.append("no distillation")
    return ", ".join(parts)


def render_markdown(doc: Mapping[str, Any]) -> str:
    """ACCURACY.md from the JSON: setup, one table per ratio, the targets, the conclusion."""
    results: Mapping[str, Mapping[str, Any]] = doc.get("results", {})
    summary = summarize(results) if results else {}
    meta: Mapping[str, Any] = doc.get("meta", {})
    settings: Mapping[str, Any] = doc.get("settings", {})
    sessions: Sequence[Mapping[str, Any]] = doc.get("sessions", [])
    machine: Mapping[str, Any] = meta.get("machine", {})
    data: Mapping[str, Any] = meta.get("data", {})
    wall = sum(float(s.get("wall_s") or 0.0) for s in sessions)
    loads = [s.get("load_start") for s in sessions] + [s.get("load_end") for s in sessions]
    loads = [l for l in loads if l]
    lines = ["# Accuracy: the default recipe against an equal-training control, Torch-Pruning and scratch", ""]
    lines += [
        "Does pruning a trained network and fine-tuning it beat the obvious alternatives? Six arms, the same "
        "data, seeds and training code (the workflow's own `train`, `recalibrate_batchnorm` and "
        "`evaluate_accuracy`), resnet18 with the small-image stem exactly as `fxprune run` builds it:", ""]
    titles = arm_titles(settings)
    for arm in ARMS:
        lines.append(f"- **{arm}** {titles[arm]}")
    if settings and (settings.get("limit") or settings.get("epochs") != JOB_EPOCHS
                     or settings.get("baseline_epochs") != JOB_BASELINE_EPOCHS):
        # A shorter schedule or a subset answers a different question than the default job's:
        # say so before any number is read.
        lines += ["", f"**A short regime, not the default job's schedule**: {settings.get('baseline_epochs')} + "
                  f"{settings.get('epochs')} epochs on "
                  + (f"{settings.get('limit')} training images" if settings.get("limit") else "all training images")
                  + f" (the job: {JOB_BASELINE_EPOCHS} + {JOB_EPOCHS} epochs on all of them; that run is "
                  "ACCURACY_FULL.md)."]
    lines += ["", "Top-1 is on the full held-out test split" if not settings.get("eval_limit")
              else f"Top-1 is on {settings.get('eval_limit')} held-out test images (a smoke run)",
              "", "## Setup", ""]
    seeds = sorted({e["seed"] for e in results.values()}) if results else meta.get("seeds", [])
    ratios = meta.get("ratios", [])
    lines += [
        f"- Machine: {machine.get('cpu', '?')}, {machine.get('cpu_count', '?')} cores, "
        f"{meta.get('threads', '?')} torch thread(s) for training; {machine.get('platform', '')}",
        f"- Software: torch {machine.get('torch', '?')}, torchvision {machine.get('torchvision', '?')}, "
        f"Torch-Pruning {meta.get('torch_pruning', '?')}, fxprune {meta.get('fxprune', '?')}",
        f"- Date (UTC): {sessions[0].get('started', '?') if sessions else '?'} to "
        f"{sessions[-1].get('finished', '?') if sessions else '?'}",
        f"- Load average (1 min) at the start and end of each session: "
        f"{', '.join(f'{l:.2f}' for l in loads) if loads else '-'} (the machine is shared; see `busy` below)",
        f"- Command: `{sessions[-1].get('command', '') if sessions else ''}`",
        f"- Seeds: {', '.join(map(str, seeds))} (seed = baseline initialisation and data order; every arm "
        f"of a seed starts from that seed's baseline); ratios: {', '.join(f'{r:g}' for r in ratios)}",
        f"- Data: Fashion-MNIST from `{data.get('source', '?')}`: "
        + (f"a fixed subset of {settings.get('limit')} of the {data.get('train_samples_full', '?')} training "
           f"images (the same subset for every arm and seed)" if settings.get("limit")
           else f"all {data.get('train_samples_full', '?')} training images")
        + f"; {data.get('test_samples', '?')} held-out images for top-1",
        f"- Recipe: baseline {settings.get('baseline_epochs')} epochs (SGD lr 0.1, warm-up, cosine, label "
        f"smoothing 0.1, batch {settings.get('batch_size', 256)}), fine-tune k = {settings.get('epochs')} epochs "
        f"({_recipe_text(settings.get('finetune'))}) for A, B, C, E and F; "
        f"D trains {(settings.get('baseline_epochs') or 0) + (settings.get('epochs') or 0)} epochs with the "
        f"baseline recipe; F distils from the baseline"
        + (" (as every arm does under this recipe)" if (settings.get("finetune") or {}).get("distill") else ""),
        f"- Wall time: {_duration(wall)} in all ({len(sessions)} session(s))",
    ]
    if meta.get("sizing"):
        lines += ["", meta["sizing"]]
    lines += ["", "## Results", "",
              "Top-1 in %: mean ± half the range over the seeds (values per seed in the JSON this table is rendered from). "
              "Latency: batch 1, one CPU thread, eager, timed interleaved with the baseline "
              "(`fxprune.measure_latency`); speed-up over the baseline; *busy* marks a measurement whose "
              "spread exceeded 10 %. Training time: the arm's own training (mean over seeds).", ""]
    base = summary.get("baseline")
    control = summary.get("E")
    for ratio in ratios:
        lines += [f"### Ratio {ratio:g}", "",
                  "| arm | what | top-1 | before fine-tune | MACs | params | latency ms | speed-up | training |",
                  "|---|---|---|---|---|---|---|---|---|"]
        rows = [("baseline", base), ("E", control)] + [(a, summary.get(f"{a}/r{ratio:g}")) for a in RATIO_ARMS]
        for arm, row in rows:
            if row is None:
                continue
            busy = " (busy)" if row.get("busy") else ""
            lines.append(
                f"| {arm} | {titles[arm]} | {_fmt_top1(row['top1'])} | {_fmt(row.get('top1_before_finetune'))} "
                f"| {_fmt_count(row.get('macs'))} | {_fmt_count(row.get('params'))} "
                f"| {_fmt(row.get('latency_ms'), '.3f')}{busy} | {_fmt(row.get('speedup'), '.2f', 'x')} "
                f"| {_duration(row.get('train_s'))} |")
        notes = sorted({e["note"] for e in results.values()
                        if e.get("note") and e.get("ratio") is not None and abs(float(e["ratio"]) - ratio) < 1e-9})
        lines += [""] + [f"- {n}" for n in notes] + ([""] if notes else [])
    lines += ["## The targets at ratio 0.5", "",
              "Differences in top-1 points, paired per seed (both arms start from the same baseline).", "",
              "| target | A minus the other arm | met (mean) | met (every seed) |", "|---|---|---|---|"]
    for row in goals(results):
        if row["goal"].endswith("vs A"):
            continue
        met = {None: "-", True: "yes", False: "**no**"}
        lines.append(f"| {row['goal']} | {_fmt_diff(row['diff'])} | {met[row['met']]} | "
                     f"{met[row['met_every_seed']]} |")
    lines += ["", "| other arms | minus A |", "|---|---|"]
    for row in goals(results):
        if row["goal"].endswith("vs A"):
            lines.append(f"| {titles[row['arm']]} ({row['arm']}) | {_fmt_diff(row['diff'])} |")
    recipes = doc.get("recipes")
    if recipes:
        lines += ["", "## Recipes tried", "", recipes.strip()]
    conclusion = doc.get("conclusion")
    lines += ["", "## Conclusion", "",
              conclusion.strip() if conclusion else "_Not written yet: the run is incomplete._", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The arms (torch)
# --------------------------------------------------------------------------------------------
def reinitialise(model: Any, seed: int) -> Any:
    """Fresh weights for ``model``'s (pruned) shapes, as torchvision initialises a ResNet.

    Convolutions: Kaiming normal (fan-out, ReLU); BatchNorm: weight 1, bias 0, fresh running
    statistics; Linear: its own default reset. Sizes come from the pruned layers, so the
    scratch arm gets a properly scaled initialisation of the narrow network.
    """
    import torch
    from torch import nn

    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()
        elif isinstance(module, nn.Linear):
            module.reset_parameters()
    return model


def same_weights(model: Any, other: Any) -> bool:
    """Whether two pruned models hold the same tensors under the same names (the same channels were kept)."""
    import torch

    mine, theirs = model.state_dict(), other.state_dict()
    return set(mine) == set(theirs) and all(mine[k].shape == theirs[k].shape and torch.equal(mine[k], theirs[k])
                                            for k in mine)


class Bench:
    """One benchmark session: data, configs, the baselines (lazily, cached on disk) and the JSON."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from fxprune.workflow.data import example_batch, limit_dataset, load_data
        from fxprune.workflow.job import RunConfig

        self.args = args
        full = load_data("fashion-mnist")
        self.data = full
        self.train_set = limit_dataset(full.train, args.limit, seed=0) if args.limit else full.train
        self.test_set = limit_dataset(full.test, args.eval_limit, seed=0) if args.eval_limit else full.test
        self.example = example_batch(self.train_set, 1)
        self.base_config = RunConfig(epochs=args.epochs, baseline_epochs=args.baseline_epochs, quiet=True,
                                     batch_size=args.batch_size,
                                     compile=False, control=False)
        changes = parse_finetune(args.finetune or [])
        #: RunConfig changes of the fine-tuning recipe (A, B, C, E, F; the baseline and D keep the job's)
        self.run_changes = {k: v for k, v in changes.items() if k in FINETUNE_RUN_KEYS}
        #: TrainConfig fields replaced in the fine-tuning recipe
        self.train_changes = {k: v for k, v in changes.items() if k in FINETUNE_TRAIN_KEYS}
        self.baselines: Dict[int, Any] = {}
        self.results: Dict[str, Any] = {}  # the JSON's results, for arms that reuse another's
        self.torch = torch

    # -- helpers -------------------------------------------------------------------------------
    def config(self, seed: int, ratio: Optional[float] = None, **changes: Any) -> Any:
        """The job's config for the baseline and D (the job's defaults, whatever ``--finetune`` says)."""
        return self.base_config.replace(seed=seed, ratio=ratio, **changes)

    def finetune_config(self, seed: int, ratio: Optional[float] = None) -> Any:
        """The job's config with the ``--finetune`` recipe: what A, B, C, E and F prune and train with."""
        return self.base_config.replace(seed=seed, ratio=ratio, **self.run_changes)

    def finetune_train(self, config: Any) -> Any:
        """The fine-tuning TrainConfig of ``config`` with the ``--finetune`` TrainConfig fields."""
        import dataclasses

        from fxprune.workflow.job import train_config

        return dataclasses.replace(train_config(config, baseline=False), **self.train_changes)

    def evaluate(self, model: Any) -> Any:
        from fxprune.workflow.evaluate import evaluate_accuracy

        return evaluate_accuracy(model, self.test_set, classes=self.data.classes, batch_size=256, quiet=True)

    def cost(self, model: Any) -> Dict[str, Any]:
        from fxprune.workflow.evaluate import model_cost

        return model_cost(model, self.example)

    def latency(self, baseline: Any, model: Any) -> Dict[str, Any]:
        import fxprune

        result = fxprune.measure_latency({"baseline": baseline, "model": model}, example_inputs=(self.example,),
                                         rounds=self.args.latency_rounds)
        speed = result.speedups.get("model")
        return {"latency_ms": result.models["model"].median_ms, "latency_iqr_ms": result.models["model"].iqr_ms,
                "baseline_latency_ms": result.models["baseline"].median_ms,
                "speedup": speed.median if speed is not None else None,
                "latency_busy": result.busy, "latency_threads": result.threads}

    def recalibrate(self, model: Any, config: Any) -> None:
        from fxprune.workflow.finetune import recalibrate_batchnorm

        recalibrate_batchnorm(model, self.train_set, batches=config.recalibration_batches,
                              batch_size=config.batch_size, seed=config.seed, quiet=True)

    def train(self, model: Any, train_cfg: Any, teacher: Any = None) -> Any:
        from fxprune.workflow.finetune import train

        return train(model, self.train_set, train_cfg, teacher=teacher)

    def baseline(self, seed: int) -> Any:
        """The seed's trained baseline: from memory, from ``--work``, or trained now (and cached)."""
        if seed in self.baselines:
            return self.baselines[seed]
        torch = self.torch
        from fxprune.workflow.finetune import save_checkpoint
        from fxprune.workflow.models import build_model
        from fxprune.workflow.job import train_config

        config = self.config(seed)
        torch.manual_seed(seed)  # the job's fixed initialisation (run._fresh_model)
        model = build_model(config.model, num_classes=self.data.num_classes, in_channels=self.data.in_channels,
                            image_size=self.data.image_size, adapt_small_images=config.adapt)
        from fxprune.latency import cpu_kernels

        # The kernel set is part of what a baseline is: the same seed trains to other weights on
        # another ISA (seed 0: 90.24 % on the first machine, 91.20 % on an AVX2 one).
        meta = {"settings": baseline_settings(settings_of(self.args)), "seed": seed, "identity": self.data.identity,
                "cpu_kernels": cpu_kernels()}
        cache = Path(self.args.work) / f"baseline_seed{seed}.pt"
        info: Dict[str, Any] = {}
        saved = torch.load(cache, weights_only=True) if cache.is_file() else None
        if isinstance(saved, dict) and saved.get("meta") == meta:
            model.load_state_dict(saved["model"])
            info = {"train_s": saved.get("train_s"), "history": saved.get("history", []), "source": "cache"}
        else:
            result = self.train(model, train_config(config, baseline=True))
            info = {"train_s": result.seconds, "history": result.history, "source": "trained"}
            save_checkpoint({"meta": meta, "model": model.state_dict(), "train_s": result.seconds,
                             "history": result.history}, cache)
        model.eval()
        self.baselines[seed] = (model, info)
        return self.baselines[seed]

    def calibration(self, config: Any) -> Any:
        """Training batches for the data-driven criteria (taylor, apoz), made as ``fxprune run`` makes them."""
        from fxprune.workflow.data import make_loader

        return make_loader(self.train_set, config.batch_size, train=True, seed=config.seed, num_workers=0)

    def fxprune_default(self, baseline: Any, config: Any) -> Any:
        from fxprune.workflow.job import prune_model

        # The weight-based criteria ignore the batches; taylor/apoz score on them as the job does.
        return prune_model(baseline, config, self.example, calibration=self.calibration(config))

    def torch_pruning(self, baseline: Any, ratio: float) -> Any:
        import torch_pruning as tp

        model = copy.deepcopy(baseline).eval()
        importance = tp.importance.GroupMagnitudeImportance(p=1)
        pruner = tp.pruner.MagnitudePruner(model, self.example, importance=importance, pruning_ratio=ratio,
                                           ignored_layers=[model.fc])
        pruner.step()
        return model

    # -- the arms --------------------------------------------------------------------------
    def run_arm(self, seed: int, arm: str, ratio: Optional[float]) -> Dict[str, Any]:
        from fxprune.workflow.job import train_config

        baseline, base_info = self.baseline(seed)
        entry: Dict[str, Any] = {"seed": seed, "arm": arm, "ratio": ratio}
        load_start = os.getloadavg()[0]
        started = time.perf_counter()
        if arm == "baseline":
            model = baseline
            entry.update(train_s=base_info.get("train_s"), epochs=self.args.baseline_epochs,
                         baseline_source=base_info.get("source"), history=base_info.get("history"))
        elif arm == "E":
            # The control trains exactly as the pruned model does, distillation included (as the
            # job's own control: the baseline is the teacher of both).
            config = self.finetune_config(seed)
            model = copy.deepcopy(baseline)
            teacher = copy.deepcopy(baseline).eval() if config.distill else None
            result = self.train(model, self.finetune_train(config), teacher=teacher)
            entry.update(train_s=result.seconds, epochs=self.args.epochs, history=result.history)
        else:
            assert ratio is not None
            config = self.finetune_config(seed, ratio)
            base_macs = self.cost(baseline)["macs"]
            reference = self.fxprune_default(baseline, config)  # A's architecture and MACs
            macs_a = self.cost(reference)["macs"]
            if arm in ("A", "F"):
                model = reference
            elif arm == "B":
                model, note = self.matched_torch_pruning(baseline, ratio, macs_a)
                if note:
                    entry["note"] = note
            elif arm == "C":
                import fxprune

                model = fxprune.prune(baseline, target_macs=macs_a / base_macs, global_ranking=True,
                                      importance=config.importance, example_inputs=(self.example,), seed=seed,
                                      calibration=self.calibration(config),
                                      calibration_batches=config.calibration_batches)
            elif arm == "D":
                model = reinitialise(reference, seed)
            else:
                raise ValueError(arm)
            entry["macs_vs_A"] = self.cost(model)["macs"] / macs_a
            if arm in ("B", "C"):
                entry["same_weights_as_A"] = same_weights(model, reference)
            done_a = self.results.get(job_key(seed, "A", ratio))
            if arm == "B" and entry["same_weights_as_A"] and done_a is not None and self.args.reuse_identical:
                # Torch-Pruning kept exactly A's channels (every tensor equal): the same recalibration
                # and fine-tune (seeded, deterministic on CPU) would repeat A's run, so its result is A's.
                reused = {k: v for k, v in done_a.items() if k not in ("arm", "note", "load", "arm_wall_s")}
                reused.update(entry, arm="B", reused_from_A=True, load=[load_start, os.getloadavg()[0]],
                              arm_wall_s=time.perf_counter() - started,
                              note=f"B at ratio {ratio:g}: Torch-Pruning kept exactly the channels A kept "
                                   f"(every tensor equal), so its recalibration and fine-tune would repeat "
                                   f"A's deterministic run; A's result is reported for B")
                return reused
            if arm == "D":
                # The job's baseline recipe (not the fine-tune variant) for baseline + k epochs.
                cfg = train_config(self.config(seed, ratio, baseline_epochs=self.args.baseline_epochs
                                               + self.args.epochs), baseline=True)
                result = self.train(model, cfg)
                entry.update(epochs=cfg.epochs)
            else:
                self.recalibrate(model, config)
                entry["top1_before_finetune"] = self.evaluate(model).top1
                teacher = copy.deepcopy(baseline).eval() if arm == "F" or config.distill else None
                result = self.train(model, self.finetune_train(config), teacher=teacher)
                entry.update(epochs=self.args.epochs)
            entry.update(train_s=result.seconds, history=result.history)
        accuracy = self.evaluate(model)
        entry.update(top1=accuracy.top1, top5=accuracy.top5, loss=accuracy.loss, samples=accuracy.samples)
        entry.update(self.cost(model))
        entry.update(self.latency(baseline, model))
        entry["arm_wall_s"] = time.perf_counter() - started
        entry["load"] = [load_start, os.getloadavg()[0]]
        return entry

    def matched_torch_pruning(self, baseline: Any, ratio: float, macs_a: float) -> Tuple[Any, Optional[str]]:
        """TP at ``ratio``; if its MACs are not within 1 % of A's, the TP ratio that matches them."""
        model = self.torch_pruning(baseline, ratio)
        macs = self.cost(model)["macs"]
        if abs(macs / macs_a - 1.0) <= 0.01:
            return model, None
        low, high = 0.0, 0.99
        best = (abs(macs / macs_a - 1.0), ratio, model, macs)
        for _ in range(14):  # MACs fall as the ratio grows: bisect
            mid = (low + high) / 2
            candidate = self.torch_pruning(baseline, mid)
            cmacs = self.cost(candidate)["macs"]
            if abs(cmacs / macs_a - 1.0) < best[0]:
                best = (abs(cmacs / macs_a - 1.0), mid, candidate, cmacs)
            if best[0] <= 0.002:
                break
            low, high = (mid, high) if cmacs > macs_a else (low, mid)
        _, used, model, macs = best
        return model, (f"B at ratio {ratio:g}: Torch-Pruning's MACs at pruning_ratio={ratio:g} were "
                       f"{100 * (self.cost(self.torch_pruning(baseline, ratio))['macs'] / macs_a - 1):+.1f} % "
                       f"off A's; pruning_ratio={used:.4f} was used instead "
                       f"({100 * (macs / macs_a - 1):+.2f} % off)")


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.8])
    p.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS),
                   help="arms to run (none: only the seeds' baselines, e.g. to cache them ahead)")
    p.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs k (the job's default is 5)")
    p.add_argument("--baseline-epochs", type=int, default=2, help="baseline epochs (the job's default is 3)")
    p.add_argument("--limit", type=int, default=12000,
                   help="training images: a fixed subset, the same for every arm and seed (0: all 60 000)")
    p.add_argument("--batch-size", type=int, default=256, help="training batch size (the job's default 256)")
    p.add_argument("--eval-limit", type=int, default=None, help="held-out images (default: all 10 000)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for training (default: torch's)")
    p.add_argument("--latency-rounds", type=int, default=10)
    p.add_argument("--out", type=Path, default=HERE / "accuracy.json")
    p.add_argument("--table", type=Path, default=HERE / "ACCURACY.md")
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "fxprune" / "accuracy-bench",
                   help="where the trained baselines are cached (for resuming)")
    p.add_argument("--sizing", type=Path, default=None,
                   help="a markdown paragraph on how the run was sized, stored in the JSON")
    p.add_argument("--conclusion", type=Path, default=None,
                   help="a markdown file with the conclusion, stored in the JSON and rendered")
    p.add_argument("--recipes", type=Path, default=None,
                   help="a markdown file on the fine-tuning recipes tried (every variant, losers "
                        "included), stored in the JSON and rendered before the conclusion")
    p.add_argument("--no-reuse-identical", dest="reuse_identical", action="store_false",
                   help="train B even when Torch-Pruning kept exactly A's channels")
    p.add_argument("--finetune", nargs="+", default=[], metavar="KEY=VALUE",
                   help="a fine-tuning recipe variant for A, B, C, E and F (the baseline and D keep the job's "
                        "recipe): RunConfig fields " + ", ".join(FINETUNE_RUN_KEYS) + " or TrainConfig fields "
                        + ", ".join(FINETUNE_TRAIN_KEYS) + ", e.g. --finetune lr=0.02 warmup_epochs=0.5 "
                        "distill=1; the resolved recipe is recorded in the JSON's settings, so results of "
                        "different recipes never mix")
    p.add_argument("--render-only", action="store_true", help="only render --table from --out")
    args = p.parse_args(argv)
    if args.limit == 0:
        args.limit = None
    return args


def _read(path: Path) -> Dict[str, Any]:
    import json

    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def _write(doc: Mapping[str, Any], args: argparse.Namespace) -> None:
    from fxprune.workflow.report import write_json

    write_json(doc, args.out)
    table = args.table
    tmp = table.with_name(f".{table.name}.tmp-{os.getpid()}")
    tmp.write_text(render_markdown(doc) + "\n", encoding="utf-8")
    os.replace(tmp, table)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    doc = _read(args.out)
    for key, path in (("conclusion", args.conclusion), ("sizing", args.sizing), ("recipes", args.recipes)):
        if path is not None:
            text = path.read_text(encoding="utf-8")
            if key in ("conclusion", "recipes"):
                doc[key] = text
            else:
                doc.setdefault("meta", {})["sizing"] = text
    if args.render_only:
        _write(doc, args)
        print(f"rendered {args.table} from {args.out}")
        return 0
    settings = settings_of(args)
    check_settings(doc, settings, args.out)
    import torch
    import torch_pruning
    import fxprune
    from fxprune.workflow.report import command_line, machine_info, utc_now

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    session = {"started": utc_now(), "command": command_line(), "load_start": os.getloadavg()[0]}
    wall_started = time.perf_counter()
    bench = Bench(args)
    doc["settings"] = settings
    meta = doc.setdefault("meta", {})
    machine = machine_info()
    warning = kernel_warning(doc, machine, args.out)
    if warning is not None:
        print(warning, flush=True)
    meta.update(machine=machine, threads=torch.get_num_threads(), torch_pruning=torch_pruning.__version__,
                fxprune=getattr(fxprune, "__version__", None),
                seeds=sorted(set(meta.get("seeds", [])) | set(args.seeds)),
                ratios=sorted(set(meta.get("ratios", [])) | set(args.ratios)),
                data={"source": bench.data.source, "identity": bench.data.identity,
                      "train_samples_full": len(bench.data.train), "train_samples": len(bench.train_set),
                      "test_samples": len(bench.test_set)})
    results = doc.setdefault("results", {})
    bench.results = results
    sessions = doc.setdefault("sessions", [])
    sessions.append(session)
    jobs = plan_jobs(args.seeds, args.ratios, args.arms)
    for seed, arm, ratio in jobs:
        key = job_key(seed, arm, ratio)
        if key in results:
            print(f"{key}: done already (top-1 {results[key]['top1']:.2f} %)", flush=True)
            continue
        print(f"{key}: running ({utc_now()})", flush=True)
        entry = bench.run_arm(seed, arm, ratio)
        results[key] = entry
        session.update(finished=utc_now(), wall_s=time.perf_counter() - wall_started,
                       load_end=os.getloadavg()[0])
        _write(doc, args)
        print(f"{key}: top-1 {entry['top1']:.2f} %, {entry['macs'] / 1e6:.2f} MMACs, trained "
              f"{entry.get('train_s') or 0:.0f} s, arm {entry['arm_wall_s']:.0f} s", flush=True)
    session.update(finished=utc_now(), wall_s=time.perf_counter() - wall_started, load_end=os.getloadavg()[0])
    _write(doc, args)
    print(f"wrote {args.out} and {args.table} ({session['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
