"""Coverage: fxprune on every torchvision classification model, each one proven.

For every model of ``torchvision.models.list_models(module=torchvision.models)``: can
``torch.fx.symbolic_trace`` trace it (if not: the tracer's reason and the hint), does
``fxprune`` prune it at ratio 0.5 without error, does the output keep its shape, how many
parameters and MACs remain, which groups stay frozen and why, and -- the point -- does the
pruned model compute what the masked original computes (random weights and BatchNorm
statistics, eval mode, compared in float64).

    python benchmarks/coverage.py                     # all models -> benchmarks/COVERAGE.md
    python benchmarks/coverage.py resnet18 swin_t     # just these; merged with saved results
    python benchmarks/coverage.py --table             # rewrite COVERAGE.md from saved results

Each model runs in a subprocess (a model that exhausts memory cannot take the others down);
results are kept in ``benchmarks/coverage.json`` so a partial run updates the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx
import torchvision

import fxprune
from fxprune.cost import count_macs, count_params
from fxprune.testing import masked_reference, randomize_norms

__all__ = ["SPECS", "FAMILIES", "spec", "family", "build", "trace_or_reason", "prove", "check_model", "TRACE_HINT", "reason_kind", "render", "main"]

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "coverage.json"
TABLE = HERE / "COVERAGE.md"
TORCH_PRUNING = (77, 85)  # Torch-Pruning's published torchvision count: pruned / tried

# name -> (constructor kwargs, input side). Everything else: no kwargs, 64x64. Sizes are the
# smallest convenient ones each model accepts; ViTs are built for that image size.
SPECS: Dict[str, Tuple[Dict[str, Any], int]] = {
    "inception_v3": ({"init_weights": True}, 75),  # its stride-2 stem needs 75+
    "googlenet": ({"init_weights": True}, 64),
    "maxvit_t": ({}, 224),  # 7x7 partitions at stride 32: 224 is its minimum
    "vit_b_16": ({"image_size": 32}, 32),
    "vit_l_16": ({"image_size": 32}, 32),
    "vit_b_32": ({"image_size": 64}, 64),
    "vit_l_32": ({"image_size": 64}, 64),
    "vit_h_14": ({"image_size": 28}, 28),
}

# Family by name prefix, most specific first (the table groups rows by it).
FAMILIES: Tuple[Tuple[str, str], ...] = (
    ("alexnet", "AlexNet"), ("convnext", "ConvNeXt"), ("densenet", "DenseNet"),
    ("efficientnet_v2", "EfficientNetV2"), ("efficientnet", "EfficientNet"), ("googlenet", "GoogLeNet"),
    ("inception", "Inception"), ("maxvit", "MaxViT"), ("mnasnet", "MNASNet"),
    ("mobilenet_v2", "MobileNetV2"), ("mobilenet_v3", "MobileNetV3"), ("regnet_x", "RegNetX"),
    ("regnet_y", "RegNetY"), ("resnext", "ResNeXt"), ("wide_resnet", "Wide ResNet"), ("resnet", "ResNet"),
    ("shufflenet", "ShuffleNetV2"), ("squeezenet", "SqueezeNet"), ("swin_v2", "Swin V2"), ("swin", "Swin"),
    ("vgg", "VGG"), ("vit", "ViT"),
)

# Frozen-group reasons, condensed for the table: (pattern, short label). First match wins.
_REASON_KINDS: Tuple[Tuple[str, str], ...] = (
    (r"reaches the model output", "model output"),
    (r"normalises over the channel dim", "LayerNorm over channels"),
    (r"normalises across channels", "GroupNorm/LRN"),
    (r"MultiheadAttention", "MultiheadAttention"),
    (r"is not a table gathered per head", "window attention bias from an MLP (heads)"),
    (r"channel shuffle", "channel shuffle"),
    (r"splits or interleaves the channel dim", "view splitting channels (heads)"),
    (r"split of the channel dim", "split of channels (qkv)"),
    (r"one channel per conv group", "depthwise conv of an untracked input"),
    (r"has \d+ channels of its own", "channel-sized parameter operand (layer scale, embeddings)"),
    (r"unknown channel structure", "concat/add with an untracked tensor"),
    (r"channels of a non-prunable tensor", "concat with an untracked tensor"),
    (r"no channel rule for", "op without a rule"),
    (r"tensor shared by|weights tied", "shared tensor"),
)


def spec(name: str) -> Tuple[Dict[str, Any], int]:
    return SPECS.get(name, ({}, 64))


def family(name: str) -> str:
    for prefix, label in FAMILIES:
        if name.startswith(prefix):
            return label
    return name


def build(name: str, seed: int = 0) -> Tuple[torch.nn.Module, torch.Tensor]:
    """The model with random weights and BatchNorm statistics (eval mode) and an input batch of 1."""
    kwargs, side = spec(name)
    torch.manual_seed(seed)
    model = randomize_norms(torchvision.models.get_model(name, **kwargs), seed).eval()
    return model, torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(seed + 1))


def reason_kind(reason: str) -> str:
    for pattern, label in _REASON_KINDS:
        if re.search(pattern, reason):
            return label
    return reason.split(" at ")[0][:60]


TRACE_HINT = ("mark the offending submodule as a leaf (a torch.fx.Tracer subclass whose is_leaf_module "
              "returns True for it), pass concrete_args for flag arguments, or trace the model yourself and "
              "pass the GraphModule")


def trace_or_reason(model: torch.nn.Module) -> Tuple[Optional[torch.fx.GraphModule], Optional[str]]:
    """``(GraphModule, None)``, or ``(None, the tracer's reason)`` when fx cannot trace ``model``."""
    try:
        return torch.fx.symbolic_trace(model), None
    except Exception as exc:  # fx raises TraceError, TypeError, NotImplementedError...: all "untraceable"
        return None, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"


def prove(name: str, ratio: float = 0.5, seed: int = 0, model: Optional[torch.nn.Module] = None,
          x: Optional[torch.Tensor] = None) -> Tuple[Dict[str, Any], Optional[torch.fx.GraphModule], List[fxprune.Group]]:
    """Trace, prune and prove one model: ``(record, pruned model (float64) or None, groups)``.

    ``model``/``x`` default to :func:`build` of the torchvision model ``name``.
    """
    start = time.perf_counter()
    if model is None or x is None:
        model, x = build(name, seed)
    rec: Dict[str, Any] = {"model": name, "family": family(name), "input": list(x.shape), "ratio": ratio}
    gm, reason = trace_or_reason(model)
    if gm is None:
        rec.update(traceable=False, pruned=False, error=reason, hint=TRACE_HINT, seconds=round(time.perf_counter() - start, 1))
        return rec, None, []
    rec["traceable"] = True
    del model  # the GraphModule shares its parameters; the nn.Module itself is not needed
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", fxprune.FxPruneWarning)
            groups = fxprune.analyze_model(gm, example_inputs=(x,)).groups
            plan = fxprune.plan(gm, ratio, example_inputs=(x,))
            pruned = fxprune.apply(gm, plan, example_inputs=(x,))
        with torch.no_grad():
            expected_shape = tuple(gm(x).shape)
            got_shape = tuple(pruned.eval()(x).shape)
        rec.update(
            params_before=count_params(gm), params_after=count_params(pruned),
            macs_before=count_macs(gm, (x,)), macs_after=count_macs(pruned, (x,)),
            shape_ok=expected_shape == got_shape, output_shape=list(got_shape),
            groups=len(groups), prunable=sum(g.prunable for g in groups),
            pruned_groups=len(plan.pruned_groups),
            warnings=[str(w.message)[:300] for w in caught if issubclass(w.category, fxprune.FxPruneWarning)],
        )
        frozen: Dict[str, int] = {}
        for g in groups:
            if g.frozen:
                for kind in dict.fromkeys(reason_kind(r) for r in g.reasons):
                    frozen[kind] = frozen.get(kind, 0) + 1
        rec["frozen"] = frozen
        rec["blocked_groups"] = sum(1 for g in groups if g.blocks > 1 and g.prunable)
        rec["pruned"] = rec["params_after"] < rec["params_before"] and rec["shape_ok"]
    except Exception as exc:
        rec.update(pruned=False, error=f"{type(exc).__name__}: {str(exc)[:400]}", trace=traceback.format_exc()[-1500:],
                   seconds=round(time.perf_counter() - start, 1))
        return rec, None, []
    # The proof, in float64. Built step by step rather than with assert_equivalent so the
    # largest models fit in memory: the float32 original goes before the float64 copies come.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fxprune.FxPruneWarning)  # recorded above already
            ref = masked_reference(gm, plan, example_inputs=(x,)).eval()
        del gm
        ref = ref.double()
        pruned = pruned.double().eval()
        with torch.no_grad():
            expected = ref(x.double())
            actual = pruned(x.double())
        del ref
        rec["max_abs_diff"] = float((actual - expected).abs().max())
        try:
            torch.testing.assert_close(actual, expected)  # float64 defaults: rtol 1e-7, atol 1e-7
            rec["equivalent"] = True
        except AssertionError as exc:
            rec["equivalent"] = False
            rec["error"] = str(exc).strip().splitlines()[0][:300]
    except Exception as exc:
        rec.update(equivalent=False, error=f"{type(exc).__name__}: {str(exc)[:400]}")
    rec["seconds"] = round(time.perf_counter() - start, 1)
    return rec, pruned, groups


def check_model(name: str, ratio: float = 0.5, seed: int = 0) -> Dict[str, Any]:
    """The JSON-able record of :func:`prove`."""
    return prove(name, ratio, seed)[0]


def _run_isolated(name: str, ratio: float, timeout: float) -> Dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--ratio", str(ratio)]
    # One intra-op thread: on a shared machine OpenMP's spinning threads made convolutions up
    # to 30x slower (float64 depthwise convs worst of all), and the models here are small.
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"model": name, "family": family(name), "traceable": True, "pruned": False, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return {"model": name, "family": family(name), "traceable": True, "pruned": False,
                "error": f"process failed (exit {proc.returncode}, killed for memory if -9): {tail[0][:300]}"}
    return json.loads(lines[-1])


def _fmt(n: Optional[int], unit: float, digits: int = 2) -> str:
    return "-" if n is None else f"{n / unit:.{digits}f}"


def _mark(ok: Optional[bool]) -> str:
    return {True: "yes", False: "**no**", None: "-"}[ok]


def _when(rows: Sequence[Dict[str, Any]]) -> str:
    """When and where the rows were measured (rows from before the stamp say nothing)."""
    stamps = sorted(r["when"] for r in rows if r.get("when"))
    machines = sorted({r["machine"] for r in rows if r.get("machine")})
    if not stamps:
        return ""
    span = stamps[0] if stamps[0] == stamps[-1] else f"{stamps[0]} to {stamps[-1]}"
    return f" Run {span} ({len(stamps)} of {len(rows)} rows) on {'; '.join(machines)}."


def render(results: Dict[str, Dict[str, Any]], models: Sequence[str], ratio: float) -> str:
    """The Markdown report: summary, per-model table, untraceable models with their hints."""
    rows = [results[m] for m in models if m in results]
    traceable = [r for r in rows if r.get("traceable")]
    pruned = [r for r in traceable if r.get("pruned")]
    equivalent = [r for r in pruned if r.get("equivalent")]
    lines = [
        "# fxprune coverage of torchvision classification models",
        "",
        f"Generated by `python benchmarks/coverage.py` with torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}: every model of `torchvision.models.list_models(module=torchvision.models)` "
        f"({len(models)}), random weights and BatchNorm statistics, eval mode, pruned with "
        f"`fxprune.plan(model, {ratio}, example_inputs=(x,))` + `fxprune.apply`, then compared in float64 with "
        "the masked reference (the original with every removed channel zeroed)." + _when(rows),
        "",
        "## Summary",
        "",
        f"- **{len(traceable)} of {len(rows)}** models trace with `torch.fx.symbolic_trace`.",
        f"- **{len(pruned)} of {len(traceable)}** traceable models are pruned without error, keep their output shape and lose parameters.",
        f"- **{len(equivalent)} of {len(pruned)}** pruned models are proven equivalent to their masked reference "
        "(`torch.testing.assert_close` in float64).",
        f"- Torch-Pruning publishes {TORCH_PRUNING[0]} of {TORCH_PRUNING[1]} torchvision models pruned, without "
        "an equivalence check.",
        "",
        "Frozen groups are never pruned: the reason is a fact of the architecture that fxprune will not "
        "guess around (the model output, channel shuffle). LayerNorm widths are pruned as renormalising groups, proven against the masked-norm reference. "
        "*Blocked* groups feed grouped convolutions and keep the same count in each conv group.",
        "",
        "| model | input | traced | pruned | equivalent | params (M) before → after | MACs (M) before → after | groups (prunable / blocked) | frozen groups: why (count) | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        side = "x".join(str(v) for v in r.get("input", [])[2:]) or "-"
        params = f"{_fmt(r.get('params_before'), 1e6)} → {_fmt(r.get('params_after'), 1e6)}"
        macs = f"{_fmt(r.get('macs_before'), 1e6, 1)} → {_fmt(r.get('macs_after'), 1e6, 1)}"
        groups = f"{r.get('groups', '-')} ({r.get('prunable', '-')} / {r.get('blocked_groups', '-')})"
        frozen = "; ".join(f"{k} ({v})" for k, v in sorted(r.get("frozen", {}).items(), key=lambda kv: -kv[1]))
        warned = r.get("warnings") or []
        count = warned if isinstance(warned, int) else len(warned)
        if count:
            frozen += f"; {count} warnings"
        if r.get("error"):
            frozen = (frozen + "; " if frozen else "") + f"error: {r['error'][:120]}"
        lines.append(f"| {r['model']} | {side} | {_mark(r.get('traceable'))} | {_mark(r.get('pruned'))} | "
                     f"{_mark(r.get('equivalent'))} | {params} | {macs} | {groups} | {frozen or '-'} | {r.get('seconds', '-')} |")
    untraceable = [r for r in rows if not r.get("traceable")]
    lines += ["", "## Models fx cannot trace", ""]
    if untraceable:
        for r in untraceable:
            lines.append(f"- `{r['model']}`: {r.get('error')}. Hint: {r.get('hint')}")
    else:
        lines.append("None: every model in this torchvision traces. A model that does not is listed here with the "
                     "tracer's reason and the hint (leaf modules via a `torch.fx.Tracer` subclass, `concrete_args`).")
    missing = [m for m in models if m not in results]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="model names (default: all)")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per model")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child mode: check one model, print JSON
    parser.add_argument("--table", action="store_true", help="only rewrite COVERAGE.md from saved results")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(check_model(args.one, args.ratio)), flush=True)
        return 0

    everything = torchvision.models.list_models(module=torchvision.models)
    results: Dict[str, Dict[str, Any]] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if not args.table:
        todo = args.models or everything
        for name in todo:
            rec = _run_isolated(name, args.ratio, args.timeout)
            rec["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            rec["machine"] = f"{platform.system()} {platform.machine()}, {platform.processor() or 'cpu'}, {os.cpu_count()} cores"
            results[name] = rec
            RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True))
            status = "equivalent" if rec.get("equivalent") else ("pruned, NOT equivalent" if rec.get("pruned") else "FAILED")
            print(f"{name:22s} {status:24s} params {_fmt(rec.get('params_before'), 1e6)} -> {_fmt(rec.get('params_after'), 1e6)} M"
                  f"  {rec.get('seconds', '-')} s  {rec.get('error', '')[:100]}", flush=True)
    TABLE.write_text(render(results, everything, args.ratio))
    rows = [results[m] for m in everything if m in results]
    ok = sum(1 for r in rows if r.get("equivalent"))
    print(f"{ok} of {len(rows)} models pruned and proven equivalent; table in {TABLE}")
    return 0 if ok == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
