"""The ``fxprune`` command: argument parsing only, the work happens in the library.

Subcommands: ``run`` (the main job: train/prune/fine-tune/evaluate/report), ``sweep``
(several ratios), ``prune`` (prune a model and print a before/after table, no data needed)
and ``groups`` (print the channel-coupled groups of a model).

Start-up time: this module, :func:`build_parser` and :func:`main` import nothing heavy, so
``fxprune --help`` and a misspelt option answer at once; each command's function imports
torch and the library when it runs. That is a deliberate exception to "no lazy imports"
(tests/test_packaging.py checks that building the parser imports no torch).
"""

from __future__ import annotations

import argparse
import sys
import traceback
import warnings
from typing import Any, Dict, List, Optional, Sequence

from .version import __version__

__all__ = ["main", "build_parser", "compare_models"]

PRUNE_EXAMPLES = """\
examples:
  fxprune prune                              # torchvision resnet18, half the channels of each group, L1
  fxprune prune --model resnet50 --ratio 0.3 --image-size 160
  fxprune prune --target-macs 0.25 --ignore 'layer4.*'
  fxprune prune --weights ResNet18_Weights.IMAGENET1K_V1 --save out/resnet18-p50
  fxprune prune --model mypkg.nets:build --ratio 0.4 --save out/pruned
  fxprune prune --model vit_b_16 --attention head_dim   # every head kept, each with fewer dims
"""

GROUPS_EXAMPLES = """\
examples:
  fxprune groups                             # the coupled channel groups of resnet18
  fxprune groups --model mobilenet_v2
  fxprune groups --model vit_b_16 --attention head_dim  # the heads' dims as groups instead of whole heads

Each line is one group: its channel count, whether it can be pruned (or why it is frozen),
the layers whose output rows it indexes (out=), the layers whose input columns it indexes
(in=) and the per-channel layers (channelwise=, e.g. BatchNorm) it also slices.
"""


def _model(name: str, num_classes: int, weights: Optional[str] = None) -> Any:
    from .workflow.models import build_model, load_weights

    # ImageNet-shaped models as torchvision ships them: no adaptation to a data set.
    model = build_model(name, num_classes=num_classes, adapt=False)
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def _amount(args: argparse.Namespace) -> Dict[str, Any]:
    """``ratio=`` / ``target_macs=``, ``ignore=``, ``allow_renormalising=`` and ``rules=`` of ``fxprune prune``, for fxprune.plan."""
    from .workflow.cli_args import DEFAULT_RATIO

    ratio = args.ratio if args.ratio is not None or args.target_macs is not None else DEFAULT_RATIO
    return {"ratio": ratio, "target_macs": args.target_macs, "ignore": tuple(args.ignore),
            "allow_renormalising": args.renormalising, "rules": _rules(args)}


def _rules(args: argparse.Namespace) -> Any:
    """The rule table ``--attention`` asks for (fxprune.workflow.job.run_rules)."""
    from .workflow.job import RunConfig, run_rules

    return run_rules(RunConfig(attention=args.attention))


def _amount_text(args: argparse.Namespace) -> str:
    amount = _amount(args)
    text = (f"at ratio {amount['ratio']}" if amount["target_macs"] is None
            else f"to at most {amount['target_macs']:g} of its MACs")
    text += f", ignoring {', '.join(amount['ignore'])}" if amount["ignore"] else ""
    text += ", attention head_dim pruned" if args.attention == "head_dim" else ""
    return text + ("" if amount["allow_renormalising"] else ", exact rewrites only (--no-renormalising)")


def compare_models(original: Any, pruned: Any, example: Any, *, runs: int = 10) -> Dict[str, Dict[str, Any]]:
    """Parameters, MACs, size on disk and CPU latency (batch 1, eager) of two models.

    Latency: both models timed interleaved (``runs`` rounds) by :func:`fxprune.measure_latency`
    at one CPU thread; ``rows["latency"]`` holds the speed-up with its spread, threads and the
    busy flag.
    """
    from .cost import count_macs, count_params
    from .latency import measure_latency
    from .workflow.evaluate import model_size_mb

    result = measure_latency({"original": original, "pruned": pruned}, example_inputs=(example,),
                             device="cpu", mode="eager", rounds=runs)
    rows: Dict[str, Dict[str, Any]] = {}
    for label, model in (("original", original), ("pruned", pruned)):
        timed = result.models[label]
        rows[label] = {
            "params": count_params(model),
            "macs": count_macs(model, example),
            "size_mb": model_size_mb(model),
            "latency_ms": timed.median_ms,
            "latency_iqr_ms": timed.iqr_ms,
        }
    speed = result.speedup
    rows["latency"] = {"speedup": speed.median if speed else float("nan"),
                       "speedup_q25": speed.q25 if speed else float("nan"),
                       "speedup_q75": speed.q75 if speed else float("nan"),
                       "threads": result.threads, "rounds": result.rounds, "busy": result.busy,
                       "device_name": result.device_name, "warnings": list(result.warnings)}
    return rows


def _table(rows: Dict[str, Dict[str, Any]]) -> str:
    from .latency import format_speedup, realised_fraction

    a, b = rows["original"], rows["pruned"]
    lines = [f"{'':<18}{'original':>18}{'pruned':>18}{'change':>16}"]
    fmt = {"params": ("parameters", "{:,.0f}"), "macs": ("MACs", "{:,.0f}"),
           "size_mb": ("size on disk MB", "{:.2f}")}
    for key, (name, f) in fmt.items():
        ratio = b[key] / a[key] if a[key] else float("nan")
        lines.append(f"{name:<18}{f.format(a[key]):>18}{f.format(b[key]):>18}{ratio:>15.2f}x")
    latency = rows.get("latency") or {}
    speedup = latency.get("speedup")
    if speedup is None and a.get("latency_ms") and b.get("latency_ms"):
        speedup = a["latency_ms"] / b["latency_ms"]

    def ms(row: Dict[str, Any]) -> str:
        iqr = row.get("latency_iqr_ms")
        return f"{row['latency_ms']:.2f}" + (f" ± {iqr:.2f}" if iqr is not None else "")

    lines.append(f"{'CPU latency ms':<18}{ms(a):>18}{ms(b):>18}{format_speedup(speedup):>16}")
    if latency:
        fraction = realised_fraction(speedup, a["macs"] / b["macs"] if b.get("macs") else None)
        lines.append(f"\nlatency: batch 1, eager, {latency.get('threads')} thread(s), {latency.get('rounds')} "
                     f"interleaved rounds (torch.utils.benchmark), median ± IQR; speed-up IQR "
                     f"{latency.get('speedup_q25', float('nan')):.2f}-{latency.get('speedup_q75', float('nan')):.2f}, "
                     f"realised fraction (speed-up / MACs reduction) "
                     f"{'-' if fraction is None else f'{fraction:.2f}'}")
    if speedup is not None and speedup < 1.0:
        lines.append(f"WARNING: the pruned model is SLOWER than the original here ({format_speedup(speedup)})")
    if latency.get("busy"):
        lines.append("WARNING: the machine looked busy while timing (large spread between rounds): "
                     "treat the latencies as rough")
    return "\n".join(lines)


def _check_prune_args(args: argparse.Namespace) -> None:
    """Everything ``fxprune prune`` can check before building a model (one clear error each).

    The pruning options go through the same checks as ``fxprune run``'s (RunConfig.validate),
    so both commands refuse the same values with the same words.
    """
    from .workflow.models import check_model_name
    from .workflow.job import RunConfig, check_output_folder, check_weights

    RunConfig(model=args.model, weights=args.weights, ratio=args.ratio, target_macs=args.target_macs,
              importance=args.importance, ignore=tuple(args.ignore), renormalising=args.renormalising,
              attention=args.attention).validate()
    check_model_name(args.model)
    check_weights(args.weights)
    if args.save:
        check_output_folder(args.save, "--save", parent_only=True)


def _cmd_prune(args: argparse.Namespace) -> int:
    import torch

    import fxprune

    _check_prune_args(args)
    model = _model(args.model, args.num_classes, args.weights)
    example = torch.randn(1, 3, args.image_size, args.image_size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", fxprune.FxPruneWarning)
        plan = fxprune.plan(model, **_amount(args), importance=args.importance, example_inputs=(example,))
        pruned = fxprune.apply(model, plan, example_inputs=(example,), allow_renormalising=args.renormalising)
    print(f"fxprune: {args.model} {_amount_text(args)} ({args.importance})\n")
    print(_table(compare_models(model, pruned, example, runs=args.runs)))
    print("\ngroups:")
    for g in plan.groups:
        state = f"{g.size:>5} -> {len(g.keep):<5}" if g.pruned else f"{g.size:>5} (kept) "
        renorm = "  (renormalising)" if g.pruned and g.renormalising else ""
        print(f"  {state} {g.key}  [{', '.join(g.modules[:4])}{', ...' if len(g.modules) > 4 else ''}]{renorm}")
    if plan.renormalising_groups:
        print(f"\n{len(plan.renormalising_groups)} renormalising group(s): a LayerNorm/RMSNorm normalises over them, "
              "so the pruned model equals the masked-norm reference (statistics over the kept channels), not the "
              "plain masked one; --no-renormalising keeps them whole")
    _print_warnings([str(w.message) for w in caught])
    if args.save:
        save = getattr(fxprune, "save", None)
        if save is None:
            raise fxprune.FxPruneError("saving needs fxprune.save (not available in this build)")
        from .workflow.models import model_spec

        # The spec of the model _model built (its num_classes): fxprune.load(path) rebuilds it alone.
        spec = model_spec(args.model, num_classes=args.num_classes, adapt=False)
        save(pruned, args.save, plan=plan, source=args.model, example_inputs=(example,), spec=spec)
        print(f"\nsaved to {args.save}")
    return 0


def _print_warnings(messages: List[str]) -> None:
    """Each distinct warning reason once on stderr: its first message, and how many gave it.

    One op without a rule, used at 34 places, is one line, not 34 (the Python API still warns
    once per node).
    """
    from .workflow.report import warning_reason

    distinct: Dict[str, List[str]] = {}
    for message in dict.fromkeys(messages):  # plan and apply analyse the model alike: same messages twice
        distinct.setdefault(warning_reason(message), []).append(message)
    for found in distinct.values():
        more = f" ({len(found)} warnings in all for different nodes)" if len(found) > 1 else ""
        print(f"warning: {found[0]}{more}", file=sys.stderr)


def _cmd_groups(args: argparse.Namespace) -> int:
    import torch

    import fxprune

    from .workflow.models import check_model_name

    check_model_name(args.model)
    # Shapes, as fxprune prune has them: without them a view's effect on channels is unknown,
    # and a ViT's heads would be listed frozen although prune prunes them.
    example = torch.randn(1, 3, args.image_size, args.image_size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", fxprune.FxPruneWarning)
        groups = fxprune.find_groups(_model(args.model, args.num_classes), example_inputs=(example,),
                                     allow_renormalising=args.renormalising, rules=_rules(args))
    print(groups)
    _print_warnings([str(w.message) for w in caught])
    return 0


def _version() -> str:
    """``fxprune X (torch Y, torchvision Z, Python W)``, read from metadata: no torch import."""
    from importlib import metadata

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    python = ".".join(str(v) for v in sys.version_info[:3])
    return (f"fxprune {__version__} (torch {installed('torch')}, torchvision {installed('torchvision')}, "
            f"Python {python})")


def build_parser() -> argparse.ArgumentParser:
    """The ``fxprune`` parser; building it (and ``--help``) imports no torch."""
    from .workflow import cli_args

    parser = cli_args.Parser(
        prog="fxprune",
        description="Structured channel pruning for PyTorch models, proven equivalent, physically smaller.",
        epilog="Run 'fxprune COMMAND --help' for each command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    fmt = argparse.RawDescriptionHelpFormatter

    run = sub.add_parser("run", help="train or load a baseline, prune, fine-tune, evaluate, report",
                         description="The main job. With no options: Fashion-MNIST, resnet18, ratio 0.5, L1.",
                         epilog=cli_args.RUN_EXAMPLES, formatter_class=fmt)
    cli_args.add_run_arguments(run)
    run.set_defaults(func=cli_args.main_run)

    sweep = sub.add_parser("sweep", help="the run pipeline at several ratios and criteria, sharing the baseline",
                           description="Accuracy vs MACs and latency curves over pruning ratios.",
                           epilog=cli_args.SWEEP_EXAMPLES, formatter_class=fmt)
    cli_args.add_sweep_arguments(sweep)
    sweep.set_defaults(func=cli_args.main_sweep)

    defaults = cli_args.RUN_DEFAULTS
    prune = sub.add_parser("prune", help="prune a model and print a before/after table (no data needed)",
                           description="Prune a torchvision model (or package.module:callable) with random "
                                       "or given weights and compare parameters, MACs, size and latency. "
                                       "The pruning options mean what they mean for 'fxprune run'.",
                           epilog=PRUNE_EXAMPLES, formatter_class=fmt)
    prune.add_argument("--model", default=defaults["model"],
                       help="torchvision model name or package.module:callable, built as it is (default: "
                            "%(default)s)")
    prune.add_argument("--weights", default=None,
                       help="weights to prune: a local state_dict/checkpoint/.safetensors file, or a "
                            "torchvision weights name already in the torch hub cache (e.g. "
                            "ResNet18_Weights.IMAGENET1K_V1). Default: random initialisation")
    prune.add_argument("--ratio", type=cli_args.finite_float, default=None, help=cli_args.RATIO_HELP)
    prune.add_argument("--target-macs", type=cli_args.finite_float, default=None, help=cli_args.TARGET_MACS_HELP)
    prune.add_argument("--importance", default=cli_args.DATALESS_IMPORTANCE, metavar="NAME",
                       help=cli_args.IMPORTANCE_HELP.replace("read calibration data", "need data: use fxprune run"))
    prune.add_argument("--ignore", type=cli_args.str_list, default=[], metavar="NAMES",
                       help=cli_args.IGNORE_HELP)
    prune.add_argument("--no-renormalising", "--exact-only", dest="renormalising", action="store_false",
                       help=cli_args.NO_RENORMALISING_HELP)
    prune.add_argument("--attention", choices=cli_args.ATTENTION_MODES, default=defaults["attention"],
                       help=cli_args.ATTENTION_HELP)
    prune.add_argument("--image-size", type=cli_args.positive_int, default=224,
                       help="input height/width (default: %(default)s)")
    prune.add_argument("--num-classes", type=cli_args.positive_int, default=1000,
                       help="classifier outputs (default: %(default)s)")
    prune.add_argument("--runs", type=cli_args.positive_int, default=10,
                       help="timed runs for latency (default: %(default)s)")
    prune.add_argument("--save", default=None, help="save the pruned model to this folder (an fxprune artifact)")
    prune.set_defaults(func=_cmd_prune)

    groups = sub.add_parser("groups", help="print the channel-coupled groups of a model",
                            description="Print the groups of channels that must be pruned together, and "
                                        "which of them cannot be pruned and why. Nothing is pruned.",
                            epilog=GROUPS_EXAMPLES, formatter_class=fmt)
    groups.add_argument("--model", default=defaults["model"],
                        help="torchvision model name or package.module:callable (default: %(default)s)")
    groups.add_argument("--num-classes", type=cli_args.positive_int, default=1000,
                        help="classifier outputs (default: %(default)s)")
    groups.add_argument("--no-renormalising", "--exact-only", dest="renormalising", action="store_false",
                        help="show LayerNorm/RMSNorm widths frozen, as --no-renormalising prunes them")
    groups.add_argument("--attention", choices=cli_args.ATTENTION_MODES, default=defaults["attention"],
                        help="show the groups --attention prunes (default: %(default)s)")
    groups.add_argument("--image-size", type=cli_args.positive_int, default=224,
                        help="input height/width the shapes are found with, as for prune (default: %(default)s)")
    groups.set_defaults(func=_cmd_groups)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``fxprune`` console script and ``python -m fxprune``."""
    from .errors import FxPruneError, InternalError

    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except InternalError as error:
        # A bug of ours, not bad input: keep the traceback for the report, and a distinct code.
        traceback.print_exc()
        print(f"fxprune: internal error: {error}", file=sys.stderr)
        return 70
    except (FxPruneError, ValueError) as error:
        # One line, always: a multi-line message would read like a traceback.
        text = " ".join(str(error).splitlines()).strip()
        print(f"fxprune: error: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
