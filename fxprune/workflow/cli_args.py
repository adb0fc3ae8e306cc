"""Command-line options of ``fxprune run`` and ``fxprune sweep``, and their entry points.

``fxprune/cli.py`` owns the top-level parser; it adds these subcommands with
:func:`add_run_arguments` / :func:`add_sweep_arguments` and dispatches to :func:`main_run` /
:func:`main_sweep`. ``python -m fxprune.workflow.cli_args run ...`` works on its own too
(handy under ``torchrun -m``).
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import sys
from typing import TYPE_CHECKING, Any, Mapping, NoReturn, Optional, Sequence

# Only light modules at the top: this file builds the parsers of ``fxprune run`` and ``fxprune
# sweep``, and ``fxprune --help`` must not import torch. The entry points (main_run, main_sweep,
# config_from_args) import the workflow when they run: the commented exception to "no lazy
# imports", for the command line's start-up time. Neither errors module imports torch.
from fxprune.errors import FxPruneError
from fxprune.workflow.errors import ConfigError
from fxprune.workflow.progress import LOG_LEVELS  # stdlib only: no torch

if TYPE_CHECKING:
    from fxprune.workflow.job import RunConfig

__all__ = [
    "RUN_EXAMPLES",
    "SWEEP_EXAMPLES",
    "RUN_DEFAULTS",
    "DATALESS_IMPORTANCE",
    "DEFAULT_RATIO",
    "IMPORTANCE_CHOICES",
    "RATIO_HELP",
    "TARGET_MACS_HELP",
    "TARGET_LATENCY_HELP",
    "LATENCY_DEVICES",
    "LATENCY_MODES",
    "IGNORE_HELP",
    "NO_RENORMALISING_HELP",
    "ATTENTION_MODES",
    "ATTENTION_HELP",
    "add_run_arguments",
    "add_sweep_arguments",
    "config_from_args",
    "console_log_level",
    "main_run",
    "main_sweep",
    "build_parser",
    "main",
    "Parser",
    "UsageError",
    "positive_int",
    "finite_float",
    "str_list",
    "closest",
]

#: The ratio when neither --ratio nor --target-macs is given (fxprune.workflow.job.DEFAULT_RATIO;
#: tests/test_packaging.py checks the two agree).
DEFAULT_RATIO = 0.5

#: The defaults of :class:`fxprune.workflow.job.RunConfig` the options show, as plain data so
#: that building the parser imports no torch. tests/test_packaging.py checks every entry
#: against ``RunConfig()``; a new option whose default is missing here fails at parser build.
RUN_DEFAULTS: Mapping[str, Any] = {
    "control": True,
    "model": "resnet18", "data": "fashion-mnist", "importance": "taylor", "epochs": 5, "lr": 0.1,
    "baseline_epochs": 3, "baseline_lr": 0.1, "batch_size": 256, "optimizer": "sgd",
    "weight_decay": 5e-4, "label_smoothing": 0.1, "seed": 0, "device": "auto", "amp": "auto",
    "renormalising": True, "global_ranking": True, "attention": "heads",
    "latency_runs": 20, "out": "fxprune-out",
    "latency_device": "cpu", "latency_batch": 1, "latency_mode": "eager",
}

#: ``fxprune prune``'s criterion: it has no data, so the job's data-driven default (Taylor)
#: cannot be its default.
DATALESS_IMPORTANCE = "l1"

#: Where --target-latency measures: the choices of --latency-device and --latency-mode.
LATENCY_DEVICES = ("cpu", "cuda")
LATENCY_MODES = ("eager", "compiled")  # fxprune.latency.MODES (tests/test_latency_target.py keeps them equal)
TARGET_LATENCY_HELP = ("prune until the model measured on --latency-device (at --latency-batch, --latency-mode) "
                       "takes at most this fraction of the unpruned model's latency, in (0, 1), e.g. 0.5; layer "
                       "costs are measured and cached in $FXPRUNE_CACHE/latency or ~/.cache/fxprune/latency "
                       "(give --ratio, --target-macs or --target-latency, one of them)")

#: The built-in importance criteria, listed in --help without importing torch (kept equal to
#: :func:`fxprune.available_criteria` by tests/test_packaging.py). The options are still
#: checked against the live registry before any work starts.
IMPORTANCE_CHOICES = ("apoz", "bn", "fpgm", "l1", "l2", "random", "taylor")

# One wording for the pruning amount, shared by ``fxprune run`` and ``fxprune prune``.
RATIO_HELP = (f"fraction of channels removed from each prunable group, in [0, 1) (default: {DEFAULT_RATIO} "
              "unless --target-macs is given)")
TARGET_MACS_HELP = ("prune to at most this fraction of the unpruned model's MACs, in (0, 1], e.g. 0.27; "
                    "the ratio is searched for (give --ratio or --target-macs, not both)")
IGNORE_HELP = "comma-separated module names or glob patterns (layer4.*) to leave unpruned"
NO_RENORMALISING_HELP = ("keep every LayerNorm/RMSNorm width whole (the residual width of ViTs, ConvNeXts), so "
                         "that every rewrite is exact: equal to the model with the removed channels zeroed. By "
                         "default those widths are pruned too and their norms renormalise over the kept "
                         "channels (fxprune proves them against the masked-norm reference)")
#: fxprune.rules.RULE_OPTIONS["attention"], as plain data (tests/test_head_dim.py keeps them equal).
ATTENTION_MODES = ("heads", "head_dim")
ATTENTION_HELP = ("what attention blocks lose: whole heads (head_dim stays), or head_dim (every head keeps the same "
                  "dims of q and k, and of v; the head count stays); the plan records it, and blocks the head_dim "
                  "rule does not cover lose whole heads either way (default: %(default)s)")
IMPORTANCE_HELP = (f"channel importance criterion: {', '.join(IMPORTANCE_CHOICES)} "
                   "(apoz and taylor read calibration data) (default: %(default)s)")


class _Defaults:
    """Attribute access to :data:`RUN_DEFAULTS` (``defaults.epochs``), failing clearly on a gap."""

    def __getattr__(self, name: str) -> Any:
        try:
            return RUN_DEFAULTS[name]
        except KeyError:
            raise AttributeError(f"RunConfig default {name!r} is missing from fxprune.workflow.cli_args."
                                 f"RUN_DEFAULTS: add it there (the parser is built without importing "
                                 f"RunConfig)") from None


RUN_EXAMPLES = """\
examples:
  fxprune run                                   # resnet18 on Fashion-MNIST: train, prune to 1/4 of the MACs (Taylor, ranked across layers), fine-tune, report
  fxprune run --ratio 0.3 --epochs 3 --out runs/r03
  fxprune run --weights runs/r03/baseline/baseline_model.pt --distill
  fxprune run --model resnet18 --weights ResNet18_Weights.IMAGENET1K_V1 --data /data/imagenet/val --epochs 1
  fxprune run --data /data/cifar-10-batches-py --model resnet50
  fxprune run --resume                          # continue a killed run from its last checkpoint
  torchrun --nproc_per_node=2 -m fxprune run    # data-parallel (gloo on CPU, NCCL on GPU)
"""

SWEEP_EXAMPLES = """\
examples:
  fxprune sweep --ratios 0.3,0.5,0.7
  fxprune sweep --ratios 0.2,0.4,0.6,0.8 --importances l1,l2 --out benchmarks/sweep
"""


class UsageError(ConfigError):
    """A command line argparse refuses (unknown option, bad value): one line, exit status 2."""


_INVALID_CHOICE = re.compile(r"invalid choice: (?P<value>.+?) \(choose from (?P<choices>.+)\)$")


def _unquote(text: str) -> str:
    text = text.strip()
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" else text


def closest(word: str, candidates: Sequence[str]) -> Optional[str]:
    """The candidate closest to a misspelt ``word`` (difflib), or None when none is close."""
    found = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


def _closest_option(word: str, options: Sequence[str]) -> Optional[str]:
    # Compare without the dashes: every long option shares "--", which would make anything
    # look close to a short option name.
    bare = {option.lstrip("-"): option for option in options}
    found = closest(word.split("=", 1)[0].lstrip("-"), list(bare))
    return bare[found] if found else None


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a :class:`UsageError` instead of usage text + exit.

    ``fxprune.cli.main`` prints every error as one line on stderr and returns 2; argparse's
    own ``error`` would print two lines (usage, message) and raise ``SystemExit``.
    Subparsers made by :meth:`add_subparsers` are of this class too. A misspelt option,
    command or choice gets the closest valid one suggested (difflib: argparse itself only
    learns that in Python 3.14).
    """

    _subcommands: Optional[argparse.Action] = None

    def add_subparsers(self, **kwargs: Any) -> Any:
        action = super().add_subparsers(**kwargs)
        self._subcommands = action  # to find the chosen subcommand's options for suggestions
        return action

    def error(self, message: str) -> NoReturn:
        match = _INVALID_CHOICE.search(message)
        if match:
            choices = [_unquote(c) for c in match.group("choices").split(",")]
            suggestion = closest(_unquote(match.group("value")), choices)
            if suggestion:
                message += f"; did you mean {suggestion!r}?"
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")

    def parse_args(self, args: Optional[Sequence[str]] = None,  # type: ignore[override]
                   namespace: Optional[argparse.Namespace] = None) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            # argparse reports leftovers on the top-level parser; suggest from the options of
            # the subcommand that was chosen, and name it. (``_actions`` is argparse's list of
            # a parser's options; there is no public accessor.)
            parser = self._chosen_subparser(parsed)
            options = [o for action in parser._actions for o in action.option_strings]
            message = f"unrecognized arguments: {' '.join(extras)}"
            for extra in extras:
                suggestion = _closest_option(extra, options) if extra.startswith("-") else None
                if suggestion:
                    message += f"; did you mean {suggestion}?"
                    break
            parser.error(message)
        return parsed

    def _chosen_subparser(self, parsed: argparse.Namespace) -> "Parser":
        action = self._subcommands
        if action is not None and isinstance(action.choices, dict):
            chosen = action.choices.get(getattr(parsed, action.dest, None) or "")
            if isinstance(chosen, Parser):
                return chosen._chosen_subparser(parsed)
        return self


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from exc
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def _non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def finite_float(text: str) -> float:
    """argparse type: a finite number (``nan``/``inf`` are refused; ranges are checked by RunConfig)."""
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from exc
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def str_list(text: str) -> list[str]:
    """argparse type: comma-separated names (``fc,layer4.*``), at least one."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected at least one name")
    return values


_str_list = str_list  # the name this module used before str_list became public


def _add_common(parser: argparse.ArgumentParser) -> None:
    defaults = _Defaults()
    what = parser.add_argument_group("model and data")
    what.add_argument("--model", default=defaults.model,
                      help="torchvision model name, timm:<name> (timm installed) or package.module:callable "
                           "(default: %(default)s, adapted to the data's classes, channels and image size)")
    what.add_argument("--no-adapt", dest="adapt", action="store_false",
                      help="keep the model's ImageNet stem on images under 64 px (by default a ResNet's 7x7 "
                           "stride-2 conv1 becomes 3x3, logged and recorded in report.json's model_build); "
                           "the first convolution still takes the data's channels")
    what.add_argument("--weights", default=None,
                      help="trained weights: a local state_dict/checkpoint/.safetensors file, or a "
                           "torchvision weights name already in the torch hub cache "
                           "(e.g. ResNet18_Weights.IMAGENET1K_V1). Without it a baseline is trained "
                           "first and cached in OUT/baseline/")
    what.add_argument("--data", default=defaults.data,
                      help="'fashion-mnist' (default, from /usr/share/datasets/fashion-mnist: "
                           "apt-get install dataset-fashion-mnist), 'cifar10', or a path: a folder of "
                           "Fashion-MNIST IDX files, a CIFAR-10 python folder, or an ImageFolder tree "
                           "such as an ImageNet val/ folder")
    what.add_argument("--download", action="store_true",
                      help="allow downloading the data set or torchvision weights (never otherwise)")
    what.add_argument("--image-size", type=positive_int, default=None,
                      help="image size: the crop of ImageFolder data (default 224); Fashion-MNIST and CIFAR-10 "
                           "images are resized to it (default: their own 28 / 32 px), for models that "
                           "downsample too far for small images (ConvNeXt: --image-size 32)")
    what.add_argument("--limit", type=positive_int, default=None,
                      help="use only this many samples of each split (quick trials)")

    prune = parser.add_argument_group("pruning")
    prune.add_argument("--target-macs", type=finite_float, default=None, help=TARGET_MACS_HELP)
    prune.add_argument("--target-latency", type=finite_float, default=None, help=TARGET_LATENCY_HELP)
    prune.add_argument("--latency-device", choices=LATENCY_DEVICES, default=defaults.latency_device,
                       help="where --target-latency measures (default: %(default)s)")
    prune.add_argument("--latency-batch", type=positive_int, default=defaults.latency_batch,
                       help="batch size --target-latency measures at (default: %(default)s)")
    prune.add_argument("--latency-mode", choices=LATENCY_MODES, default=defaults.latency_mode,
                       help="eager, or torch.compile'd models, for --target-latency (default: %(default)s)")
    prune.add_argument("--round-to", type=positive_int, default=None,
                       help="pruned layers keep a multiple of this many channels (e.g. 8 for tensor cores)")
    prune.add_argument("--ignore", type=str_list, default=[], metavar="NAMES", help=IGNORE_HELP)
    prune.add_argument("--no-renormalising", "--exact-only", dest="renormalising", action="store_false",
                       default=defaults.renormalising, help=NO_RENORMALISING_HELP)
    prune.add_argument("--attention", choices=ATTENTION_MODES, default=defaults.attention, help=ATTENTION_HELP)
    prune.add_argument("--global-ranking", action=argparse.BooleanOptionalAction, default=defaults.global_ranking,
                       help="rank channels across groups, at the MACs the ratio's uniform plan reaches (or at "
                            "--target-macs); --no-global-ranking removes the same share from every group. "
                            "--target-latency allocates by measured cost instead. With --importance taylor the "
                            "most accurate recipe measured in benchmarks/ACCURACY_FULL.md (default: on)")

    tune = parser.add_argument_group("training")
    tune.add_argument("--epochs", type=_non_negative_int, default=defaults.epochs,
                      help="fine-tuning epochs (default: %(default)s)")
    tune.add_argument("--lr", type=finite_float, default=defaults.lr,
                      help="fine-tuning learning rate, cosine-decayed (default: %(default)s)")
    tune.add_argument("--baseline-epochs", type=_non_negative_int, default=defaults.baseline_epochs,
                      help="epochs to train the baseline when no --weights (default: %(default)s)")
    tune.add_argument("--baseline-lr", type=finite_float, default=defaults.baseline_lr,
                      help="baseline learning rate (default: %(default)s)")
    tune.add_argument("--batch-size", type=positive_int, default=defaults.batch_size,
                      help="batch size per process (default: %(default)s)")
    tune.add_argument("--optimizer", choices=("sgd", "adamw"), default=defaults.optimizer,
                      help="SGD with Nesterov momentum, or AdamW (default: %(default)s)")
    tune.add_argument("--weight-decay", type=finite_float, default=defaults.weight_decay,
                      help="weight decay (default: %(default)s)")
    tune.add_argument("--label-smoothing", type=finite_float, default=defaults.label_smoothing,
                      help="label smoothing (default: %(default)s)")
    tune.add_argument("--augment", action="store_true",
                      help="random horizontal flips while training (worth it for longer schedules)")
    tune.add_argument("--distill", action="store_true",
                      help="fine-tune with knowledge distillation from the unpruned model")
    tune.add_argument("--control", dest="control", action="store_true", default=defaults.control,
                      help="train the equal-training control (default: %(default)s; see --no-control)")
    tune.add_argument("--no-control", dest="control", action="store_false",
                      help="skip the equal-training control: the unpruned baseline fine-tuned with the pruned "
                           "model's recipe (same --epochs, --lr schedule, --seed, --augment, --distill), whose "
                           "accuracy separates the cost of pruning from the gain of the extra epochs. On by "
                           "default; trained once and cached in OUT/control/ (costs about --epochs epochs of "
                           "the unpruned model the first time)")
    tune.add_argument("--seed", type=_non_negative_int, default=defaults.seed,
                      help="random seed (default: %(default)s)")
    tune.add_argument("--resume", action="store_true",
                      help="continue from the last checkpoint in OUT; a checkpoint made with other settings "
                           "is refused with the options that differ (run without --resume to start over)")

    run_group = parser.add_argument_group("execution and output")
    run_group.add_argument("--device", default=defaults.device,
                           help="auto (CUDA when present), cpu, cuda, cuda:N (default: %(default)s)")
    run_group.add_argument("--amp", choices=("auto", "on", "off"), default=defaults.amp,
                           help="mixed precision for training: auto = on CUDA only (default: %(default)s)")
    run_group.add_argument("--threads", type=positive_int, default=None,
                           help="torch CPU threads (default: all cores, shared among torchrun processes)")
    run_group.add_argument("--workers", type=_non_negative_int, default=None, help="DataLoader worker processes")
    run_group.add_argument("--no-compile", dest="compile", action="store_false",
                           help="skip the torch.compile latency measurements")
    run_group.add_argument("--latency-runs", type=positive_int, default=defaults.latency_runs,
                           help="timed runs per latency setting (median reported; default: %(default)s)")
    run_group.add_argument("--out", default=defaults.out,
                           help="output folder (default: %(default)s)")
    chatter = run_group.add_mutually_exclusive_group()
    chatter.add_argument("-q", "--quiet", action="store_true",
                         help="no progress bars; warnings and errors only on the console")
    chatter.add_argument("-v", "--verbose", action="store_true",
                         help="debug messages on the console too (same as --log-level debug)")
    run_group.add_argument("--log-level", choices=LOG_LEVELS, default=None,
                           help="console messages at this level and above (default: info, warning with "
                                "--quiet); run.log always keeps info. Changes what is printed, never the result")


def add_run_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``fxprune run`` to ``parser``."""
    defaults = _Defaults()
    _add_common(parser)
    group = parser.add_argument_group("pruning amount")
    # Default None, not DEFAULT_RATIO: an explicit --ratio next to --target-macs is refused.
    group.add_argument("--ratio", type=finite_float, default=None, help=RATIO_HELP)
    group.add_argument("--importance", default=defaults.importance, metavar="NAME", help=IMPORTANCE_HELP)
    return parser


def add_sweep_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``fxprune sweep`` to ``parser``."""
    _add_common(parser)
    group = parser.add_argument_group("sweep")
    group.add_argument("--ratios", type=_float_list, default=[0.3, 0.5, 0.7],
                       help="comma-separated pruning ratios (default: 0.3,0.5,0.7)")
    group.add_argument("--importances", type=str_list, default=[RUN_DEFAULTS["importance"]], metavar="NAMES",
                       help=f"comma-separated importance criteria from {', '.join(IMPORTANCE_CHOICES)} "
                            f"(default: {RUN_DEFAULTS['importance']})")
    return parser


def console_log_level(args: argparse.Namespace) -> Optional[str]:
    """``--log-level``, or ``debug`` for ``-v``; a :class:`UsageError` when they (or ``-q``) contradict."""
    level = getattr(args, "log_level", None)
    verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    if verbose:
        if level not in (None, "debug"):
            raise UsageError(f"fxprune: -v/--verbose (debug) contradicts --log-level {level}: give one")
        return "debug"
    if quiet and level in ("debug", "info"):
        raise UsageError(f"fxprune: -q/--quiet (warnings only) contradicts --log-level {level}: give one")
    return level


def config_from_args(args: argparse.Namespace) -> "RunConfig":
    """The :class:`RunConfig` an argparse namespace of these options describes."""
    from fxprune.workflow.job import RunConfig  # imports torch: only once a command runs

    values: dict[str, Any] = {}
    for name in RunConfig.__dataclass_fields__:
        if hasattr(args, name):
            values[name] = getattr(args, name)
    values["log_level"] = console_log_level(args)
    if "ignore" in values:
        values["ignore"] = tuple(values["ignore"] or ())
    # A sweep has no single ratio/importance; the first of each stands in for the config's.
    if hasattr(args, "ratios") and "ratio" not in values:
        values["ratio"] = args.ratios[0]
    if hasattr(args, "importances") and "importance" not in values:
        values["importance"] = args.importances[0]
    return RunConfig(**values)


def _fail(error: Exception) -> int:
    # One line: a message that spans lines (a wrapped worker error, say) must not look like a traceback.
    text = " ".join(str(error).split("\n")).strip()
    print(f"fxprune: error: {text}", file=sys.stderr)
    return 2


def main_run(args: argparse.Namespace) -> int:
    """``fxprune run``: returns the exit status (2 with one clear message on a user error).

    Under ``torchrun`` every process runs the job; only rank 0 prints the summary line.
    """
    from fxprune.workflow.distributed import launch_rank
    from fxprune.workflow.job import run

    try:
        report = run(config_from_args(args))
    except FxPruneError as error:
        return _fail(error)
    if not args.quiet and launch_rank() == 0:
        base, pruned = report["baseline"], report["pruned"]
        summary = {"baseline_top1": base["top1"], "pruned_top1": pruned["top1"]}
        if "equal_training" in report:
            summary["control_top1"] = report["control"]["top1"]
            summary["pruning_cost_top1"] = report["equal_training"]["pruning_cost_top1"]
        print(json.dumps({**summary, "macs_x": report["reduction"]["macs_x"], "out": args.out}))
    return 0


def main_sweep(args: argparse.Namespace) -> int:
    """``fxprune sweep``: returns the exit status (only rank 0 prints the summary under torchrun)."""
    from fxprune.workflow.distributed import launch_rank
    from fxprune.workflow.job import sweep

    try:
        summary = sweep(config_from_args(args), args.ratios, args.importances)
    except FxPruneError as error:
        return _fail(error)
    if not args.quiet and launch_rank() == 0:
        print(json.dumps({"points": [{k: p[k] for k in ("importance", "ratio", "top1", "macs")}
                                     for p in summary["points"]], "out": args.out}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser with the ``run`` and ``sweep`` subcommands."""
    parser = Parser(prog="fxprune", description="Structured channel pruning workflow.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_run_arguments(sub.add_parser("run", help="prune, fine-tune, evaluate and report",
                                     epilog=RUN_EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    add_sweep_arguments(sub.add_parser("sweep", help="the run pipeline at several ratios",
                                       epilog=SWEEP_EXAMPLES,
                                       formatter_class=argparse.RawDescriptionHelpFormatter))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m fxprune.workflow.cli_args``."""
    try:
        args = build_parser().parse_args(argv)
    except UsageError as error:
        return _fail(error)
    return main_run(args) if args.command == "run" else main_sweep(args)


if __name__ == "__main__":
    sys.exit(main())
