"""The main job: baseline -> prune -> recalibrate -> fine-tune -> evaluate -> benchmark -> report.

:func:`run` is ``fxprune run``; :func:`sweep` is ``fxprune sweep``: the same pipeline at
several ratios and importance criteria, sharing one baseline. Both take a :class:`RunConfig`,
whose fields are the command line's options.

Output folder (``--out``)::

    baseline/baseline_model.pt     trained baseline (reused by the next run with the same settings)
    baseline/checkpoint.pt         baseline training checkpoint (for --resume)
    control/control_model.pt       the equal-training control: the baseline fine-tuned with the
                                   pruned model's recipe (reused like the baseline; --no-control skips it)
    control/checkpoint.pt          its training checkpoint (for --resume)
    finetune_checkpoint.pt         fine-tuning checkpoint (for --resume)
    report.json, report.md         the comparison
    channels.png                   channels per layer, before and after
    pruned_model.*                 the pruned model
    run.log                        the log: one dated section per run, warnings and errors included

A sweep writes one such folder per point (``<importance>-r<ratio>/``) next to the shared
``baseline/``, plus ``sweep.json``, ``sweep.md``, ``accuracy_vs_macs.png`` and
``accuracy_vs_latency.png``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from fxprune.cost import count_macs
from fxprune.latency_model import LatencyOptions
from fxprune.modelspec import ModelSpec
from fxprune.rules import DEFAULT_RULES, RULE_OPTIONS, RuleTable
from fxprune.workflow.cli_args import LATENCY_DEVICES, LATENCY_MODES
from fxprune.workflow.data import DataBundle, example_batch, load_data, make_loader
from fxprune.workflow.distributed import (DistContext, barrier, init_distributed, resolve_device,
                                          shutdown_distributed)
from fxprune.workflow.errors import CheckpointError, ConfigError
from fxprune.workflow.evaluate import compare_latency, evaluate_accuracy, latency_target_key, model_cost
from fxprune.workflow.extras import check_run_extras
from fxprune.workflow.latency_store import JsonFileStore, default_cache_dir
from fxprune.workflow.finetune import (TrainConfig, batchnorm_layers, check_resumable, recalibrate_batchnorm, resume_fingerprint,
                                       save_checkpoint, train)
from fxprune.workflow import progress
from fxprune.workflow.models import (build_model, canonical_model_name, check_model_name, load_checkpoint_file,
                                     load_weights, model_spec)
from fxprune.workflow.report import (FILE_ONLY, WarningLog, close_logging, collect_warnings, command_line,
                                     group_summary, latency_target_summary, latency_target_warnings, layer_table,
                                     log_run_error, machine_info, plot_channels, plot_sweep, render_sweep_markdown,
                                     save_pruned, setup_logging, software_info, stage_table, utc_now, write_json,
                                     write_report)

__all__ = ["RunConfig", "run", "sweep", "prune_model", "preflight", "check_output_folder", "check_importance",
           "check_weights", "check_model_fits", "achieved_pruning", "weights_identity", "measure_latency_pair",
           "sweep_baseline_latency", "get_baseline", "get_control", "pruning_details", "train_config", "run_rules",
           "RESULT_OPTIONS", "DEFAULT_RATIO", "BASELINE_FILE", "CONTROL_FILE"]

logger = logging.getLogger("fxprune.workflow")

BASELINE_FILE = "baseline_model.pt"
_BASELINE_FORMAT = "fxprune-baseline"
CONTROL_FILE = "control_model.pt"
_CONTROL_FORMAT = "fxprune-control"
#: The ratio when neither ``ratio`` nor ``target_macs`` is given.
DEFAULT_RATIO = 0.5

#: The options that change a run's result: a checkpoint or a sweep point made under other
#: values of any of them is never resumed into this run (see ``_run_fingerprint``). The rest
#: (device, threads, workers, out, quiet, log_level, compile, latency_runs, download) change how
#: fast or where, or what is printed, not which weights come out; ``control`` adds the
#: equal-training control to the report, whose own cache and checkpoint are keyed by everything
#: that determines it (``_control_meta``), and leaves the pruned model as it is.
RESULT_OPTIONS = ("model", "adapt", "weights", "data", "limit", "image_size", "seed", "ratio", "target_macs",
                  "target_latency", "latency_device", "latency_batch", "latency_mode",
                  "importance", "ignore", "round_to", "epochs", "lr", "baseline_epochs", "baseline_lr",
                  "batch_size", "augment", "optimizer", "weight_decay", "label_smoothing", "distill",
                  "amp", "recalibration_batches", "calibration_batches", "renormalising", "global_ranking",
                  "attention")


@dataclass
class RunConfig:
    """Options of ``fxprune run`` / ``fxprune sweep`` (the CLI flags, one field each).

    The defaults are the embedded default job: resnet18 on Fashion-MNIST; Taylor importance
    ranked across groups at the MACs of ratio 0.5's uniform plan (about 1/4 of the MACs; the
    recipe benchmarks/ACCURACY_FULL.md found most accurate); the README gives the time a
    2-core CPU takes, baseline training included. The
    equal-training control (``control``, on by default) fine-tunes the unpruned baseline for
    ``epochs`` more epochs the first time (5 epochs of the full model: about 5/3 of the
    baseline's training time again); it is cached like the baseline, so a second run pays
    only its evaluation.
    """

    model: str = "resnet18"
    adapt: bool = True  # small-image ResNet stem below 64 px; False: --no-adapt keeps the ImageNet stem
    weights: Optional[str] = None  # file or torchvision weights name; None: train a baseline
    data: str = "fashion-mnist"
    ratio: Optional[float] = None  # None: DEFAULT_RATIO, unless target_macs is set
    target_macs: Optional[float] = None  # fraction of the baseline's MACs; exclusive with ratio
    target_latency: Optional[float] = None  # fraction of the baseline's measured latency; exclusive with both
    latency_device: str = "cpu"  # where target_latency measures
    latency_batch: int = 1  # the batch it measures at
    latency_mode: str = "eager"  # eager or compiled
    importance: str = "taylor"  # benchmarks/ACCURACY_FULL.md: with global_ranking, the most accurate recipe
    round_to: Optional[int] = None  # passed to fxprune.prune only when set
    ignore: tuple[str, ...] = ()
    # False (--no-renormalising): LayerNorm/RMSNorm widths stay whole, every rewrite is exact
    # (fxprune.prune's allow_renormalising).
    renormalising: bool = True
    # "heads" (the default): attention blocks lose whole heads; "head_dim" (--attention head_dim):
    # every head keeps the same dims instead (fxprune.rules.RULE_OPTIONS, recorded in the plan).
    attention: str = "heads"
    # True (the default; --no-global-ranking turns it off): channels are ranked across groups
    # at the MACs the ratio's uniform plan reaches, or at target_macs (benchmarks/ACCURACY_FULL.md
    # measures it against uniform). target_latency allocates by measured cost and ignores it.
    global_ranking: bool = True
    epochs: int = 5  # fine-tuning epochs
    lr: float = 0.1  # fine-tuning learning rate
    baseline_epochs: int = 3
    baseline_lr: float = 0.1
    batch_size: int = 256
    augment: bool = False  # random horizontal flips while training
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    distill: bool = False
    device: str = "auto"
    amp: str = "auto"
    out: str = "fxprune-out"
    resume: bool = False
    quiet: bool = False
    log_level: Optional[str] = None  # console: debug/info/warning/error (None: info, warning with quiet)
    download: bool = False
    seed: int = 0
    limit: Optional[int] = None  # samples per split, for quick trials and tests
    image_size: Optional[int] = None  # ImageFolder crop size (default 224)
    threads: Optional[int] = None  # torch CPU threads (default: torch's, split among ranks)
    workers: Optional[int] = None  # DataLoader workers (default: by data set)
    compile: bool = True  # also time torch.compile
    latency_runs: int = 20
    recalibration_batches: int = 20
    calibration_batches: int = 8  # batches fed to data-driven importance criteria
    control: bool = True  # also fine-tune the unpruned baseline with the same recipe (--no-control: skip)

    @property
    def effective_ratio(self) -> Optional[float]:
        """The ratio pruned at: ``ratio``, else :data:`DEFAULT_RATIO` (None when ``target_macs`` rules)."""
        if self.ratio is not None:
            return self.ratio
        return None if self.target_macs is not None or self.target_latency is not None else DEFAULT_RATIO

    @property
    def requested(self) -> str:
        """What was asked for, in words: ``ratio 0.5``, ``target MACs 0.3`` or ``target latency 0.5``."""
        if self.target_latency is not None:
            return f"target latency {self.target_latency:g}"
        if self.target_macs is not None and self.ratio is None:
            return f"target MACs {self.target_macs:g}"
        return f"ratio {self.effective_ratio:g}"

    def validate(self) -> None:
        """Raise :class:`ConfigError` for options that cannot work (pure: reads no file).

        Every numeric option is checked for type, finiteness and range, and the importance
        criterion against :func:`fxprune.available_criteria`, so that a typo fails in a
        second rather than after the baseline has trained.
        """
        def number(flag: str, value: Any, *, low: float, high: float = math.inf,
                   low_open: bool = False, high_open: bool = False) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{flag} must be a finite number, got {value!r}")
            if value < low or (low_open and value == low) or value > high or (high_open and value == high):
                if math.isinf(high):
                    bound = f"> {low:g}" if low_open else f">= {low:g}"
                else:
                    bound = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
                raise ConfigError(f"{flag} must be {bound}, got {value!r}")

        def integer(flag: str, value: Any, *, low: int, optional: bool = False) -> None:
            if value is None and optional:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{flag} must be an integer >= {low}, got {value!r}")

        if self.ratio is not None and self.target_macs is not None:
            raise ConfigError(f"--ratio {self.ratio} and --target-macs {self.target_macs} contradict each other: "
                              f"give one (a fixed ratio per group, or a MACs budget the ratio is searched for)")
        if self.ratio is not None:
            number("--ratio", self.ratio, low=0.0, high=1.0, high_open=True)
        if self.target_macs is not None:
            if isinstance(self.target_macs, bool) or not (isinstance(self.target_macs, (int, float))
                                                          and 0.0 < self.target_macs <= 1.0):
                raise ConfigError(f"--target-macs is a fraction of the baseline's MACs in (0, 1], "
                                  f"got {self.target_macs}")
        self._validate_latency()
        # How large a round_to can be depends on the model: checked once it is built
        # (check_model_fits), still before any training.
        integer("--round-to", self.round_to, low=1, optional=True)
        for flag, value in (("--epochs", self.epochs), ("--baseline-epochs", self.baseline_epochs)):
            integer(flag, value, low=0)
        if self.weights is None and self.baseline_epochs == 0:
            raise ConfigError("no --weights and --baseline-epochs 0: there would be no trained baseline")
        number("--lr", self.lr, low=0.0, low_open=True)
        number("--baseline-lr", self.baseline_lr, low=0.0, low_open=True)
        number("--weight-decay", self.weight_decay, low=0.0)
        number("--label-smoothing", self.label_smoothing, low=0.0, high=1.0, high_open=True)
        integer("--batch-size", self.batch_size, low=1)
        integer("--limit", self.limit, low=1, optional=True)
        integer("--image-size", self.image_size, low=1, optional=True)
        integer("--threads", self.threads, low=1, optional=True)
        integer("--workers", self.workers, low=0, optional=True)
        integer("--seed", self.seed, low=0)
        integer("--latency-runs", self.latency_runs, low=1)
        integer("recalibration_batches", self.recalibration_batches, low=0)
        integer("calibration_batches", self.calibration_batches, low=1)
        for flag, value, choices in (("--optimizer", self.optimizer, ("sgd", "adamw")),
                                     ("--amp", self.amp, ("auto", "on", "off"))):
            if value not in choices:
                raise ConfigError(f"{flag} must be one of {', '.join(choices)}; got {value!r}")
        if not isinstance(self.global_ranking, bool):
            raise ConfigError(f"global_ranking (--global-ranking) is a switch, True or False; got {self.global_ranking!r}")
        if not isinstance(self.renormalising, bool):
            raise ConfigError(f"renormalising (--no-renormalising) is a switch, True or False; got {self.renormalising!r}")
        if self.attention not in RULE_OPTIONS["attention"]:
            raise ConfigError(f"--attention must be one of {', '.join(RULE_OPTIONS['attention'])}; got {self.attention!r}")
        if not isinstance(self.control, bool):
            raise ConfigError(f"control (--no-control) is a switch, True or False; got {self.control!r}")
        check_importance(self.importance)
        if self.log_level is not None and self.log_level not in progress.LOG_LEVELS:
            raise ConfigError(f"--log-level must be one of {', '.join(progress.LOG_LEVELS)}; got {self.log_level!r}")
        if not isinstance(self.adapt, bool):
            raise ConfigError(f"adapt (--no-adapt) must be true or false, got {self.adapt!r}")
        if not isinstance(self.ignore, (tuple, list)) or not all(isinstance(n, str) and n for n in self.ignore):
            raise ConfigError(f"--ignore takes module names, got {self.ignore!r}")

    def _validate_latency(self) -> None:
        if self.target_latency is not None:
            others = [f"{flag} {value}" for flag, value in (("--ratio", self.ratio), ("--target-macs", self.target_macs))
                      if value is not None]
            if others:
                raise ConfigError(f"--target-latency {self.target_latency} and {' and '.join(others)} contradict each "
                                  "other: give one (the latency search chooses the channel counts)")
            value = self.target_latency
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not 0.0 < value < 1.0:
                raise ConfigError(f"--target-latency is a fraction of the baseline's measured latency in (0, 1), "
                                  f"got {value!r}")
        if self.latency_device not in LATENCY_DEVICES:
            raise ConfigError(f"--latency-device must be one of {', '.join(LATENCY_DEVICES)}; got {self.latency_device!r}")
        if self.latency_mode not in LATENCY_MODES:
            raise ConfigError(f"--latency-mode must be one of {', '.join(LATENCY_MODES)}; got {self.latency_mode!r}")
        if isinstance(self.latency_batch, bool) or not isinstance(self.latency_batch, int) or self.latency_batch < 1:
            raise ConfigError(f"--latency-batch must be an integer >= 1, got {self.latency_batch!r}")
        if self.target_latency is not None and self.latency_device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--latency-device cuda: torch sees no CUDA device here; measure on --latency-device cpu")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for the log and report.json), with the ratio actually used."""
        data = asdict(self)
        data["ignore"] = list(self.ignore)
        data["ratio"] = self.effective_ratio
        return data

    def result_options(self) -> dict[str, Any]:
        """The :data:`RESULT_OPTIONS` with the values the run uses (the ratio resolved)."""
        data = {name: getattr(self, name) for name in RESULT_OPTIONS}
        data["ratio"] = self.effective_ratio
        data["ignore"] = list(self.ignore)
        if data["renormalising"]:
            # The default, which every run made before the option existed used: their
            # checkpoints and sweep points keep their fingerprint and still resume.
            del data["renormalising"]
        if data["attention"] == "heads":
            del data["attention"]  # the default, as for renormalising
        if not data["global_ranking"] or data["target_latency"] is not None:
            # Uniform was the default before the option existed (likewise); a latency target
            # allocates by measured cost, so the switch does not change its result.
            del data["global_ranking"]
        return data

    def replace(self, **changes: Any) -> "RunConfig":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return RunConfig(**values)


def check_importance(name: Any, flag: str = "--importance") -> None:
    """Raise :class:`ConfigError` unless ``name`` is one of :func:`fxprune.available_criteria`."""
    import fxprune

    choices = fxprune.available_criteria()
    if not isinstance(name, str) or name not in choices:
        raise ConfigError(f"{flag} {name!r} is not an importance criterion; choose one of {', '.join(choices)}")


def check_output_folder(path: Any, flag: str = "--out", *, parent_only: bool = False) -> Path:
    """Make sure ``path`` is (or can become) a folder fxprune can write into; return it.

    Checked before any work: a folder that turns out unwritable after an hour of training
    loses the hour. ``path`` may be missing (it is created, with its parents); an existing
    file at ``path`` or at one of its parents, or a folder that refuses a new file, is a
    :class:`ConfigError`. Writability is proven by creating (and removing) a temporary file,
    since ``os.access`` says yes to root on read-only file systems. ``parent_only``: ``path``
    is a folder someone else creates (``fxprune.save``'s artifact); only its parent is made
    and probed.
    """
    folder = Path(path).expanduser()
    for ancestor in [folder, *folder.parents]:
        if ancestor.exists() or ancestor.is_symlink():
            if not ancestor.is_dir():
                where = "is" if ancestor == folder else f"is under {ancestor}, which is"
                raise ConfigError(f"{flag} {path}: {where} a file, not a folder; choose another output folder")
            break
    target = folder.parent if parent_only else folder
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=target, prefix=".fxprune-write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot write there ({exc.strerror or exc}); choose a writable "
                          f"output folder") from exc
    return folder


_WEIGHTS_HASHES: dict[tuple[str, int, int], str] = {}


def weights_identity(weights: Optional[str]) -> Optional[str]:
    """What identifies ``--weights``: the file's SHA-256, or the torchvision weights name.

    Hashed once per file version (path, size, modification time) in a process: a run needs
    it for several fingerprints.
    """
    if weights is None:
        return None
    path = Path(weights).expanduser()
    if not path.is_file():
        return str(weights)
    try:
        stat = path.stat()
    except OSError as exc:
        raise CheckpointError(f"--weights {weights}: cannot read it ({exc.strerror or exc})") from exc
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _WEIGHTS_HASHES:
        return _WEIGHTS_HASHES[key]
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise CheckpointError(f"--weights {weights}: cannot read it ({exc.strerror or exc})") from exc
    _WEIGHTS_HASHES[key] = "sha256:" + digest.hexdigest()
    return _WEIGHTS_HASHES[key]


def preflight(config: RunConfig, *, importances: Sequence[str] = (), ratios: Sequence[float] = ()) -> None:
    """Every check that needs no data and no model: options, names, files, the output folder.

    Called by :func:`run` and :func:`sweep` before they load data or train anything.
    """
    check_run_extras()  # tqdm and matplotlib: refused now, not when the report is drawn
    config.validate()
    for ratio in ratios:
        config.replace(ratio=ratio).validate()
    for importance in importances:
        check_importance(importance, "--importances")
    check_model_name(config.model)
    check_weights(config.weights)
    check_output_folder(config.out)


def check_weights(weights: Optional[str], flag: str = "--weights") -> None:
    """Raise :class:`ConfigError` unless ``weights`` is None, a file or a torchvision weights name."""
    if weights is not None and "_Weights." not in str(weights):
        if not Path(weights).expanduser().is_file():
            raise ConfigError(f"{flag} {weights}: no such file (nor a torchvision weights name such "
                              f"as ResNet18_Weights.IMAGENET1K_V1)")


def check_model_fits(model: nn.Module, data: DataBundle, config: RunConfig) -> None:
    """The model takes the data's images and returns one logit per class; --round-to can prune it.

    One forward pass on one image, before any training: a model built for other inputs or
    another class count fails here with a clear error, not in the middle of the first epoch.
    """
    from fxprune.workflow.report import layer_channels

    example = example_batch(data.train, 1)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(example)
    except Exception as exc:  # the user's model rejected the data's shape: say so plainly
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--model {config.model} cannot run on {data.name} images of shape "
                          f"{tuple(example.shape[1:])} ({type(exc).__name__}: {reason})") from exc
    finally:
        model.train(was_training)
    if not isinstance(output, torch.Tensor) or output.dim() != 2 or output.shape[1] != data.num_classes:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ConfigError(f"--model {config.model} returns {shape} for one image, but {data.name} has "
                          f"{data.num_classes} classes: it must return (batch, {data.num_classes}) logits "
                          f"(give the callable a num_classes argument)")
    if config.round_to is not None:
        widest = max(layer_channels(model).values(), default=0)
        if config.round_to >= widest:
            raise ConfigError(f"--round-to {config.round_to} is not smaller than the widest layer of "
                              f"{config.model} ({widest} channels): every layer would keep all its channels "
                              f"and nothing would be pruned. Use a hardware multiple such as 8 or 16")


def achieved_pruning(baseline: nn.Module, pruned: nn.Module) -> dict[str, Any]:
    """What pruning actually removed: groups pruned of all groups, channels removed, per the plan.

    Reported next to the requested ratio, because ``round_to``, ``ignore``, frozen ops or a
    MACs target can make the two differ (up to nothing pruned at all).
    """
    from fxprune.workflow.report import layer_channels

    before, after = layer_channels(baseline), layer_channels(pruned)
    layers_pruned = sum(1 for name, width in before.items() if after.get(name, width) < width)
    plan = getattr(pruned, "meta", {}).get("fxprune_plan") if hasattr(pruned, "meta") else None
    result: dict[str, Any] = {"layers": len(before), "layers_pruned": layers_pruned}
    groups = getattr(plan, "groups", None)
    if groups is not None:
        total = sum(g.size for g in groups)
        removed = sum(g.size - len(g.keep) for g in groups)
        result.update({"groups": len(groups), "groups_pruned": sum(1 for g in groups if g.pruned),
                       "channels": total, "channels_removed": removed,
                       "channels_removed_fraction": removed / total if total else 0.0})
    else:
        total = sum(before.values())
        removed = sum(width - after.get(name, width) for name, width in before.items())
        result.update({"channels": total, "channels_removed": removed,
                       "channels_removed_fraction": removed / total if total else 0.0})
    result["nothing_pruned"] = result["channels_removed"] == 0
    return result


@dataclass
class _Session:
    """What one invocation sets up once: process group, device, data, output folder."""

    config: RunConfig
    ctx: DistContext
    device: torch.device
    data: DataBundle
    out: Path
    timings: dict[str, float] = field(default_factory=dict)
    #: The FxPruneWarnings raised while this session's models were pruned and saved.
    warnings: WarningLog = field(default_factory=WarningLog)


@contextlib.contextmanager
def _process_settings(config: RunConfig) -> Iterator[None]:
    """Join the process group and set CPU threads for the job; undo both afterwards.

    (``run`` is also a library call: the caller's thread count and process state come back.)
    """
    threads = torch.get_num_threads()
    ctx = init_distributed(config.device)
    try:
        device = resolve_device(config.device, ctx.local_rank)
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        elif ctx.enabled and device.type == "cpu":
            # Several processes on one machine: share the cores instead of oversubscribing
            # them (OpenMP threads spinning against each other can cost several times over).
            local = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
        yield
    except BaseException as error:
        # Into run.log before the CLI prints it: the log of a failed run says how it ended.
        log_run_error(error)
        raise
    finally:
        progress.end_job()
        close_logging()
        torch.set_num_threads(threads)
        shutdown_distributed(ctx)


def _setup(config: RunConfig, command: str = "run") -> _Session:
    ctx = init_distributed(config.device)  # joined by _process_settings: returns its context
    device = resolve_device(config.device, ctx.local_rank)
    out = Path(config.out)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    setup_logging(out, quiet=config.quiet, is_main=ctx.is_main, section=f"fxprune {command}")
    progress.start_job(quiet=config.quiet, log_level=config.log_level, is_main=ctx.is_main)
    logger.info("fxprune workflow started: %s", json.dumps(config.to_dict()))
    software = software_info()
    logger.info("software: %s", json.dumps(software), extra={FILE_ONLY: True})
    started = time.perf_counter()
    progress.current().note(f"loading data: {config.data}")
    if ctx.enabled and config.download:
        # One process downloads; the others read what it wrote.
        if ctx.is_main:
            data = load_data(config.data, download=True, limit=config.limit, image_size=config.image_size)
        barrier(ctx)
        if not ctx.is_main:
            data = load_data(config.data, download=False, limit=config.limit, image_size=config.image_size)
    else:
        data = load_data(config.data, download=config.download, limit=config.limit,
                         image_size=config.image_size)
    if config.workers is not None:
        data.num_workers = config.workers
    logger.info("data: %s from %s (%d train / %d held-out samples, %d classes)", data.name,
                data.source, len(data.train), len(data.test), data.num_classes)  # type: ignore[arg-type]
    session = _Session(config=config, ctx=ctx, device=device, data=data, out=out)
    session.timings["load_data"] = time.perf_counter() - started
    return session


def train_config(config: RunConfig, *, baseline: bool) -> TrainConfig:
    """The :class:`TrainConfig` the job trains with: the baseline's recipe, or the fine-tuning one.

    Public so that a benchmark trains its arms with exactly the job's recipes.
    """
    return TrainConfig(
        epochs=config.baseline_epochs if baseline else config.epochs,
        lr=config.baseline_lr if baseline else config.lr,
        optimizer=config.optimizer,
        weight_decay=config.weight_decay,
        label_smoothing=config.label_smoothing,
        batch_size=config.batch_size,
        # From scratch a high learning rate needs a warm-up; fine-tuning starts from a
        # trained model and does not.
        warmup_epochs=0.3 if baseline else 0.0,
        seed=config.seed,
        augment=config.augment,
        amp=config.amp,
        quiet=config.quiet,
        # --workers reaches the training loader too; without it, the main process loads (the
        # default data sets are in-memory tensors, for which workers cost more than they save).
        num_workers=config.workers if config.workers is not None else 0,
        desc="baseline" if baseline else "fine-tune",
    )


_train_config = train_config  # the module's own callers


def _baseline_meta(config: RunConfig, data: DataBundle, ctx: DistContext) -> dict[str, Any]:
    """What determines a trained baseline: a cached one is reused only if all of it matches."""
    train_cfg = _train_config(config, baseline=True)
    return {
        "format": _BASELINE_FORMAT,
        "model": config.model,
        "data": data.name,
        "data_source": data.source,
        "train_samples": len(data.train),  # type: ignore[arg-type]
        "num_classes": data.num_classes,
        "in_channels": data.in_channels,
        "image_size": data.image_size,
        **({} if config.adapt else {"adapt": False}),  # absent when adapted: older caches stay valid
        "data_identity": data.identity,
        "limit": config.limit,
        "amp": config.amp,
        "epochs": train_cfg.epochs,
        "lr": train_cfg.lr,
        "batch_size": train_cfg.batch_size,
        "optimizer": train_cfg.optimizer,
        "weight_decay": train_cfg.weight_decay,
        "label_smoothing": train_cfg.label_smoothing,
        "warmup_epochs": train_cfg.warmup_epochs,
        "augment": train_cfg.augment,
        "seed": config.seed,
        "world_size": ctx.world_size,
    }


def _baseline_identity(config: RunConfig, data: DataBundle, ctx: DistContext) -> dict[str, Any]:
    """What determines the weights that are pruned: the --weights file's hash, or the baseline's settings."""
    if config.weights is not None:
        return {"weights": weights_identity(config.weights), "model": config.model}
    return _baseline_meta(config, data, ctx)


def _run_fingerprint(session: "_Session", ratio: Optional[float], importance: str) -> dict[str, Any]:
    """Everything that determines a pruned, fine-tuned model (the fine-tune checkpoint's key).

    Every result-changing option (:data:`RESULT_OPTIONS`), the identity of the data and of
    the baseline's weights, and the process count (the batches each process sees).
    """
    config, data, ctx = session.config, session.data, session.ctx
    options = config.result_options()
    options.update({"ratio": ratio, "importance": importance})
    options["weights"] = weights_identity(config.weights)
    options["world_size"] = ctx.world_size  # each process trains on its shard: other batches
    return {"options": options, "data_identity": data.identity, "data_source": data.source,
            "baseline": _baseline_identity(config, data, ctx)}


def _finetune_fingerprint(session: "_Session", ratio: Optional[float], importance: str) -> dict[str, Any]:
    """The fine-tune checkpoint's fingerprint, as :func:`train` will record and check it."""
    return resume_fingerprint(_train_config(session.config, baseline=False), session.config.distill,
                              session.ctx.world_size, _run_fingerprint(session, ratio, importance))


def _check_resume_up_front(session: "_Session", points: Sequence[tuple[Path, Optional[float], str]]) -> None:
    """With --resume: refuse, before any training, checkpoints made with other settings.

    ``train`` checks again when it opens a checkpoint; this only makes the refusal come
    first, not after the baseline has been trained or measured.
    """
    config, data, ctx = session.config, session.data, session.ctx
    if not config.resume:
        return
    meta = _baseline_meta(config, data, ctx)
    # A valid cached baseline is used as it is: its (finished) training checkpoint is not resumed.
    if config.weights is None and _cached_baseline(session.out / "baseline" / BASELINE_FILE, meta) is None:
        check_resumable(session.out / "baseline" / "checkpoint.pt",
                        resume_fingerprint(_train_config(config, baseline=True), False, ctx.world_size,
                                           {"baseline": meta}))
    if config.epochs > 0:
        for folder, ratio, importance in points:
            check_resumable(folder / "finetune_checkpoint.pt", _finetune_fingerprint(session, ratio, importance))
    if _control_wanted(config) is None:
        control = _control_meta(session)
        if _cached_baseline(session.out / "control" / CONTROL_FILE, control, "control") is None:
            check_resumable(session.out / "control" / "checkpoint.pt", _control_fingerprint(session, control))


def _cached_baseline(cache: Path, meta: dict[str, Any], what: str = "baseline") -> Optional[dict[str, Any]]:
    """The cached ``what`` (baseline, control) at ``cache`` if trained under exactly ``meta``, else None."""
    if not cache.is_file():
        return None
    try:
        saved = load_checkpoint_file(cache)
    except CheckpointError as exc:
        logger.warning("ignoring the cached %s: %s", what, exc)
        return None
    return saved if isinstance(saved, dict) and saved.get("meta") == meta else None


def _fresh_model(config: RunConfig, data: DataBundle) -> nn.Module:
    # A fixed initialisation: the same seed gives the same baseline on every run.
    torch.manual_seed(config.seed)
    return build_model(config.model, num_classes=data.num_classes, in_channels=data.in_channels,
                       image_size=data.image_size, adapt_small_images=config.adapt)


def _model_spec(config: RunConfig, data: DataBundle) -> Optional[ModelSpec]:
    """The declarative spec of the model :func:`_fresh_model` builds (None for a callable)."""
    return model_spec(config.model, num_classes=data.num_classes, in_channels=data.in_channels,
                      image_size=data.image_size, adapt_small_images=config.adapt)


def get_baseline(session: _Session, *, on_epoch_end: Optional[Callable[[int, dict[str, float]], None]] = None
                 ) -> tuple[nn.Module, dict[str, Any]]:
    """The trained model to prune, and where it came from.

    ``--weights`` given: built and loaded from them. Otherwise the cached baseline in
    ``out/baseline/`` when its settings match, else a baseline trained now (resumable from
    ``out/baseline/checkpoint.pt``) and cached for the next run.
    """
    config, data, ctx = session.config, session.data, session.ctx
    model = _fresh_model(config, data)
    check_model_fits(model, data, config)
    if config.weights is not None:
        load_weights(model, config.weights, download=config.download, spec=_model_spec(config, data))
        return model.to(session.device).eval(), {"source": "weights", "weights": str(config.weights)}
    folder = session.out / "baseline"
    cache = folder / BASELINE_FILE
    meta = _baseline_meta(config, data, ctx)
    progress.current().note(f"looking for a cached baseline in {cache}")
    saved = _cached_baseline(cache, meta)
    if saved is not None:
        _restore_cached(model, saved, cache, "baseline", config.model)
        logger.info("baseline: reusing the trained model cached in %s", cache)
        return model.to(session.device).eval(), {"source": "cache", "path": str(cache),
                                                 "history": saved.get("history", [])}
    if cache.is_file():
        logger.info("baseline: the cache in %s was trained with other settings; training anew", cache)
    # The checkpoint carries the baseline's whole key: resuming it under another --limit, data
    # set or model is refused, so the cache below is only ever written with its own settings.
    result = _train_and_cache(session, model, _train_config(config, baseline=True), "baseline",
                              _BASELINE_FORMAT, meta, cache, on_epoch_end=on_epoch_end)
    return model.eval(), {"source": "trained", "path": str(cache), "history": result.history,
                          "seconds": result.seconds}


def _train_and_cache(session: _Session, model: nn.Module, train_cfg: TrainConfig, what: str, fmt: str,
                     meta: Mapping[str, Any], cache: Path, *, teacher: Optional[nn.Module] = None,
                     on_epoch_end: Optional[Callable[..., Any]] = None) -> Any:
    """Train ``model`` (resumable from ``cache``'s folder, under ``meta`` as fingerprint) and cache it.

    The baseline and the equal-training control are both cached this way: one trained model
    per folder, stored with the key that determined it, written by the main process only.
    """
    started = time.perf_counter()
    result = train(model, session.data.train, train_cfg, device=session.device, teacher=teacher,
                   checkpoint=cache.parent / "checkpoint.pt", resume=session.config.resume, ctx=session.ctx,
                   on_epoch_end=on_epoch_end, fingerprint={what: meta})
    session.timings[f"{what}_train"] = time.perf_counter() - started
    if session.ctx.is_main:
        save_checkpoint({"format": fmt, "meta": meta, "model": model.state_dict(), "history": result.history},
                        cache)
    barrier(session.ctx)
    return result


def _restore_cached(model: nn.Module, saved: Mapping[str, Any], cache: Path, what: str, model_name: str) -> None:
    """Load a cached model's weights into ``model``; a cache that does not fit is a CheckpointError."""
    try:
        model.load_state_dict(saved["model"])
    except (RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"the cached {what} {cache} does not fit {model_name}: {exc}; "
                              f"delete it to train anew") from exc


def _control_wanted(config: RunConfig) -> Optional[str]:
    """Why no equal-training control is trained (None: it is)."""
    if not config.control:
        return "skipped with --no-control"
    if config.epochs == 0:
        return "no fine-tuning (--epochs 0): the baseline is its own control"
    return None


def _control_meta(session: _Session) -> dict[str, Any]:
    """What determines the control: the baseline's weights, the data, and the fine-tuning recipe.

    The same recipe as the pruned model's fine-tuning (:func:`_train_config` with
    ``baseline=False``: epochs, learning rate and schedule, optimizer, seed, augmentation,
    distillation), so that pruned - control is the cost of pruning alone.
    """
    config, data, ctx = session.config, session.data, session.ctx
    meta = {
        "format": _CONTROL_FORMAT,
        "training": resume_fingerprint(_train_config(config, baseline=False), config.distill, ctx.world_size),
        "amp": config.amp,
        "baseline": _baseline_identity(config, data, ctx),
        "model": config.model,
        "data": data.name,
        "data_source": data.source,
        "data_identity": data.identity,
        "train_samples": len(data.train),  # type: ignore[arg-type]
        "num_classes": data.num_classes,
        "in_channels": data.in_channels,
        "image_size": data.image_size,
        "limit": config.limit,
    }
    # Plain JSON data: what the cache file holds compares equal to what a later run computes.
    return json.loads(json.dumps(meta, sort_keys=True, default=str))


def _control_fingerprint(session: _Session, meta: dict[str, Any]) -> dict[str, Any]:
    config = session.config
    return resume_fingerprint(_train_config(config, baseline=False), config.distill, session.ctx.world_size,
                              {"control": meta})


def get_control(session: _Session, baseline: nn.Module, baseline_entry: Optional[dict[str, Any]] = None, *,
                on_epoch_end: Optional[Callable[[int, dict[str, float]], None]] = None) -> dict[str, Any]:
    """The equal-training control: a copy of the unpruned baseline fine-tuned exactly as the pruned model.

    Its accuracy separates what pruning costs from what the extra epochs of fine-tuning
    gain. Trained once and cached in ``out/control/`` under :func:`_control_meta` (a second
    run with the same baseline and recipe reuses it; ``--resume`` continues a killed one);
    ``{"skipped": why}`` with ``--no-control`` or without fine-tuning. Its size and MACs are
    the baseline's (``baseline_entry``); its latency is not measured.
    """
    config, data, ctx = session.config, session.data, session.ctx
    skipped = _control_wanted(config)
    if skipped is not None:
        return {"skipped": skipped}
    progress.current().begin("control")
    folder = session.out / "control"
    cache = folder / CONTROL_FILE
    meta = _control_meta(session)
    model = copy.deepcopy(baseline)
    saved = _cached_baseline(cache, meta, "control")
    entry: dict[str, Any] = {"epochs": config.epochs, "path": str(cache)}
    if saved is not None:
        _restore_cached(model, saved, cache, "control", config.model)
        logger.info("control: reusing the baseline fine-tuned with the same recipe, cached in %s", cache)
        entry.update(source="cache", history=saved.get("history", []))
    else:
        logger.info("control: fine-tuning the unpruned baseline with the pruned model's recipe (%d epoch%s)",
                    config.epochs, "" if config.epochs == 1 else "s")
        teacher = copy.deepcopy(baseline).eval() if config.distill else None
        train_cfg = dataclasses.replace(_train_config(config, baseline=False), desc="control")
        result = _train_and_cache(session, model, train_cfg, "control", _CONTROL_FORMAT, meta, cache,
                                  teacher=teacher, on_epoch_end=on_epoch_end)
        entry.update(source="trained", history=result.history, seconds=result.seconds)
    started = time.perf_counter()
    accuracy = evaluate_accuracy(model, data.test, classes=data.classes, batch_size=max(256, config.batch_size),
                                 device=session.device, ctx=ctx, num_workers=data.num_workers,
                                 quiet=config.quiet, desc="evaluate control")
    session.timings["control_evaluate"] = time.perf_counter() - started
    entry.update(accuracy.to_dict())
    for key in ("params", "macs", "size_mb"):
        if baseline_entry is not None and key in baseline_entry:
            entry[key] = baseline_entry[key]
    logger.info("control (baseline + %d epoch%s, same recipe): top-1 %.2f%%, top-5 %.2f%%", config.epochs,
                "" if config.epochs == 1 else "s", accuracy.top1, accuracy.top5)
    return entry


def pruning_details(baseline: nn.Module, pruned: nn.Module, config: RunConfig,
                    example: torch.Tensor) -> dict[str, Any]:
    """What was pruned and what was not: groups (frozen ones with their reasons), layers, stages.

    The groups come from analysing the baseline again as :func:`prune_model` did (same
    example input and ``ignore``); its warnings were counted when the model was pruned, so
    they are not raised twice.
    """
    import fxprune
    from fxprune.errors import FxPruneError

    details: dict[str, Any] = {}
    plan = getattr(pruned, "meta", {}).get("fxprune_plan") if hasattr(pruned, "meta") else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            analysis = fxprune.analyze_model(baseline, example_inputs=(example,), ignore=tuple(config.ignore),
                                             allow_renormalising=config.renormalising, rules=run_rules(config))
        details["groups"] = group_summary(analysis.groups, plan)
    except FxPruneError as exc:  # the report says what it could; pruning itself succeeded
        logger.warning("report: could not list the channel groups (%s)", exc)
    details["layers"] = layer_table(baseline, pruned, example)
    details["stages"] = stage_table(baseline, pruned, example)
    return details


def _log_warning_summary(log: WarningLog) -> None:
    """run.log's collapsed list of the run's warnings (stderr showed each distinct one already)."""
    if not len(log):
        return
    logger.info("%d warning(s) in this run, %d distinct:", log.total, len(log), extra={FILE_ONLY: True})
    for item in log.to_list():
        logger.info("  %dx %s: %s", item["count"], item["category"], item["message"], extra={FILE_ONLY: True})


def measure_model(session: _Session, model: nn.Module, label: str) -> dict[str, Any]:
    """Accuracy (all ranks), then cost and latency (main process only) of ``model``."""
    config, data = session.config, session.data
    started = time.perf_counter()
    accuracy = evaluate_accuracy(model, data.test, classes=data.classes, batch_size=max(256, config.batch_size),
                                 device=session.device, ctx=session.ctx, num_workers=data.num_workers,
                                 quiet=config.quiet, desc=f"evaluate {label}")
    session.timings[f"{label}_evaluate"] = time.perf_counter() - started
    entry: dict[str, Any] = accuracy.to_dict()
    logger.info("%s: top-1 %.2f%%, top-5 %.2f%% on %d held-out samples", label, accuracy.top1,
                accuracy.top5, accuracy.samples)
    if session.ctx.is_main:
        started = time.perf_counter()
        sample = example_batch(data.test, 1)
        entry.update(model_cost(model, sample))
        model.to(session.device)
        session.timings[f"{label}_benchmark"] = time.perf_counter() - started
        # Latency is timed later, baseline and pruned together (measure_latency_pair).
        logger.info("%s: %d params, %.1f MMACs, %.2f MB", label, entry["params"],
                    entry["macs"] / 1e6, entry["size_mb"])
    barrier(session.ctx)
    return entry


def measure_latency_pair(session: _Session, baseline: nn.Module, pruned: nn.Module,
                         baseline_entry: dict[str, Any], pruned_entry: dict[str, Any]) -> dict[str, Any]:
    """Baseline and pruned timed interleaved (main process only); returns report.json's ``latency``.

    Adds ``latency_ms`` / ``latency_iqr_ms`` / ``latency_failures`` to both entries; a slower
    pruned model or a busy machine is logged as a warning (by ``compare_latency``).
    """
    config = session.config
    section: dict[str, Any] = {}
    if session.ctx.is_main:
        started = time.perf_counter()
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        progress.current().note(_latency_note(devices, config.compile))
        macs_x = (baseline_entry["macs"] / pruned_entry["macs"]
                  if baseline_entry.get("macs") and pruned_entry.get("macs") else None)
        what = config.requested
        # The latency target's batch is timed too: the report re-checks the target there.
        batches = sorted({1, 32} | ({config.latency_batch} if config.target_latency is not None else set()))
        measured = compare_latency(baseline, pruned, example_batch(session.data.test, 1), devices=devices,
                                   batch_sizes=batches, compile=config.compile, rounds=config.latency_runs, macs_reduction=macs_x,
                                   quiet=config.quiet, label=f"{config.importance}, {what}")
        baseline_entry.update(measured["baseline"])
        pruned_entry.update(measured["pruned"])
        section = measured["latency"]
        session.timings["latency"] = time.perf_counter() - started
    barrier(session.ctx)
    return section


def _latency_note(devices: Sequence[str], compile: bool) -> str:
    # Compiling with inductor prints nothing for a minute or more: say so up front.
    return (f"timing latency on {', '.join(devices)}"
            + (" (eager, then torch.compile: the inductor compile comes first and can take minutes)"
               if compile else " (eager)"))


def _plan(session: _Session, points: Sequence[str], sweep: bool) -> list[progress.Stage]:
    # The stage list the progress display counts and estimates from (epochs x batches known).
    config = session.config
    kwargs = dict(epochs=config.epochs, baseline_epochs=config.baseline_epochs,
                  train_baseline=config.weights is None, control=_control_wanted(config) is None,
                  batches=progress.train_steps(len(session.data.train), config.batch_size,  # type: ignore[arg-type]
                                               session.ctx.world_size))
    if sweep:
        return progress.plan_sweep(points=points, **kwargs)  # type: ignore[arg-type]
    return progress.plan_run(point=points[0], **kwargs)  # type: ignore[arg-type]


class _OnDevice:
    """Re-iterable view of a loader whose batches are moved to the model's device."""

    def __init__(self, loader: Any, device: torch.device) -> None:
        self.loader, self.device = loader, device

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.loader:
            yield images.to(self.device), labels.to(self.device)

    def __len__(self) -> int:
        return len(self.loader)


def run_rules(config: RunConfig) -> RuleTable:
    """The rule table the run analyses with: the default one, with ``--attention`` when set.

    >>> run_rules(RunConfig(attention="head_dim")).option("attention")
    'head_dim'
    """
    return DEFAULT_RULES if config.attention == "heads" else DEFAULT_RULES.with_options(attention=config.attention)


def prune_model(model: nn.Module, config: RunConfig, example: torch.Tensor, *,
                calibration: Optional[Any] = None, ratio: Optional[float] = None,
                importance: Optional[str] = None) -> torch.fx.GraphModule:
    """``fxprune.prune`` with the run's options.

    ``target_macs`` (a fraction of the baseline's MACs) replaces the ratio when set;
    ``global_ranking`` ranks channels across groups at the MACs of the ratio's uniform plan (or
    at ``target_macs``; a latency target allocates by measured cost and ignores it);
    ``round_to`` is passed when set; ``renormalising`` is ``allow_renormalising``. ``calibration`` (training batches) feeds the data-driven
    criteria (``apoz``, ``taylor``); the weight-based ones ignore it.
    """
    import fxprune

    kwargs: dict[str, Any] = {"importance": importance or config.importance,
                              "example_inputs": (example,), "seed": config.seed,
                              "allow_renormalising": config.renormalising, "rules": run_rules(config)}
    if calibration is not None:
        kwargs["calibration"] = calibration
        kwargs["calibration_batches"] = config.calibration_batches
    if config.ignore:
        kwargs["ignore"] = tuple(config.ignore)
    if config.round_to is not None:
        kwargs["round_to"] = config.round_to
    if config.target_latency is not None:
        # Layer costs are cached across runs, keyed by device, dtype, threads and torch version.
        options = LatencyOptions(rounds=config.latency_runs, store=JsonFileStore(default_cache_dir()))
        return fxprune.prune(model, target_latency=config.target_latency, device=config.latency_device,
                             batch_size=config.latency_batch, latency_mode=config.latency_mode,
                             latency_options=options, **kwargs)
    if config.target_macs is not None:
        return fxprune.prune(model, target_macs=config.target_macs, global_ranking=config.global_ranking, **kwargs)
    chosen = config.effective_ratio if ratio is None else ratio
    if config.global_ranking:
        # The same MACs as the uniform plan at this ratio (its counts do not depend on the
        # criterion), ranked across groups: benchmarks/accuracy.py's arm C.
        # Its warnings are silenced: the ranked prune below raises the same ones, and the
        # report would count each twice.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            uniform = fxprune.prune(model, chosen, **{**kwargs, "importance": "l1"})
        fraction = count_macs(uniform, (example,)) / count_macs(model, (example,))
        return fxprune.prune(model, target_macs=fraction, global_ranking=True, **kwargs)
    return fxprune.prune(model, chosen, **kwargs)


def _prune_finetune_measure(session: _Session, baseline: nn.Module, out: Path, ratio: Optional[float],
                            importance: str,
                            on_epoch_end: Optional[Callable[[int, dict[str, float]], None]] = None
                            ) -> tuple[nn.Module, dict[str, Any]]:
    config, data, ctx = session.config, session.data, session.ctx
    point = progress.point_label(importance, ratio)
    progress.current().begin("prune", point, detail=f"{importance}, "
                             + (f"ratio {ratio:g}" if ratio is not None else config.requested)
                             + (f", scoring on {config.calibration_batches} calibration batches"
                                if importance in progress.DATA_DRIVEN_CRITERIA else ""))
    started = time.perf_counter()
    example = example_batch(data.train, 1).to(session.device)
    baseline.eval()
    calibration = _OnDevice(make_loader(data.train, config.batch_size, train=True, seed=config.seed,
                                        num_workers=data.num_workers), session.device)
    with collect_warnings(session.warnings):
        pruned = prune_model(baseline, config, example, calibration=calibration, ratio=ratio,
                             importance=importance)
    pruned.to(session.device)
    session.timings["prune"] = time.perf_counter() - started
    details = pruning_details(baseline, pruned, config, example) if ctx.is_main else None
    achieved = achieved_pruning(baseline, pruned)
    what = f"ratio {ratio:g}" if ratio is not None else config.requested
    if achieved["nothing_pruned"]:
        logger.warning("WARNING: nothing was pruned (%s, %s): every group kept all its channels "
                       "(check --round-to, --ignore and the warnings above); the 'pruned' model is the "
                       "baseline's architecture", what, importance)
    else:
        logger.info("pruned %s of %s channels (%.1f%%; %s requested, %s)", achieved["channels_removed"],
                    achieved["channels"], 100 * achieved["channels_removed_fraction"], what, importance)

    progress.current().begin("recalibrate", point, detail=f"re-estimating BatchNorm statistics on "
                             f"{config.recalibration_batches} batches, then evaluating")

    def evaluate_pruned(desc: str) -> Any:
        return evaluate_accuracy(pruned, data.test, classes=data.classes, batch_size=max(256, config.batch_size),
                                 device=session.device, ctx=ctx, num_workers=data.num_workers,
                                 quiet=config.quiet, desc=desc)

    # Right after pruning first: the statistics a BatchNorm kept describe the unpruned network,
    # so recalibration's gain is reported apart (a model without BatchNorm has none to gain:
    # LayerNorm and GroupNorm keep no running statistics).
    has_bn = bool(batchnorm_layers(pruned)) and config.recalibration_batches > 0
    right_after = evaluate_pruned("evaluate pruned (right after pruning)") if has_bn else None
    started = time.perf_counter()
    recalibrate_batchnorm(pruned, data.train, batches=config.recalibration_batches,
                          batch_size=config.batch_size, device=session.device, seed=config.seed,
                          quiet=config.quiet)
    session.timings["bn_recalibration"] = time.perf_counter() - started
    after_recal = evaluate_pruned("evaluate pruned (before fine-tuning)")
    if right_after is None:
        logger.info("pruned (%s, %s), before fine-tuning (no BatchNorm to recalibrate): top-1 %.2f%%",
                    what, importance, after_recal.top1)
    else:
        logger.info("pruned (%s, %s): top-1 %.2f%% right after pruning, %.2f%% after BatchNorm recalibration",
                    what, importance, right_after.top1, after_recal.top1)

    history: list[dict[str, float]] = []
    if config.epochs > 0:
        teacher = copy.deepcopy(baseline).eval() if config.distill else None
        progress.current().begin("fine-tune", point)
        started = time.perf_counter()
        result = train(pruned, data.train, _train_config(config, baseline=False), device=session.device,
                       teacher=teacher, checkpoint=out / "finetune_checkpoint.pt", resume=config.resume,
                       ctx=ctx, on_epoch_end=on_epoch_end,
                       fingerprint=_run_fingerprint(session, ratio, importance))
        session.timings["finetune"] = time.perf_counter() - started
        history = result.history
    progress.current().begin("measure", point)
    entry = measure_model(session, pruned, "pruned")
    entry["achieved"] = achieved
    target = latency_target_summary(pruned)
    if target is not None:
        # Where the report re-measures the target (measure_latency_pair times that setting too).
        target["report_key"] = latency_target_key(target)
        entry["latency_target"] = target
    entry["top1_before_finetune"] = after_recal.top1
    entry["top5_before_finetune"] = after_recal.top5
    # None when the model has no BatchNorm: then top1_before_finetune *is* right after pruning.
    entry["top1_right_after_pruning"] = right_after.top1 if right_after is not None else None
    entry["bn_recalibrated"] = right_after is not None
    entry["finetune_history"] = history
    if details is not None:
        entry["details"] = details
    return pruned, entry


def _report_extras(session: _Session, baseline_entry: dict[str, Any], pruned_entry: dict[str, Any],
                   control: Optional[dict[str, Any]], pruning: Optional[dict[str, Any]]) -> dict[str, Any]:
    """report.json beyond baseline vs pruned: the control, what was pruned, warnings, provenance."""
    extras: dict[str, Any] = {}
    if control is not None:
        extras["control"] = control
        if control.get("top1") is not None:
            extras["equal_training"] = {
                "extra_epochs": session.config.epochs,
                # What pruning costs, both models trained the same extra epochs.
                "pruning_cost_top1": pruned_entry["top1"] - control["top1"],
                "pruning_cost_top5": pruned_entry["top5"] - control["top5"],
                # What the extra training alone gained the unpruned model.
                "training_gain_top1": control["top1"] - baseline_entry["top1"],
                # The old comparison: pruning and extra training mixed.
                "pruned_vs_baseline_top1": pruned_entry["top1"] - baseline_entry["top1"],
            }
    if pruning is not None:
        extras["pruning"] = pruning
    extras["warnings"] = session.warnings.to_list()
    extras["command"] = command_line()
    extras["argv"] = list(sys.argv)
    extras["software"] = software_info()
    return extras


def _report(session: _Session, baseline_entry: dict[str, Any], pruned_entry: dict[str, Any],
            config: RunConfig, baseline_info: dict[str, Any],
            control: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    reductions = {}
    for key in ("params", "macs", "size_mb"):
        before, after = baseline_entry.get(key), pruned_entry.get(key)
        reductions[f"{key}_x"] = (before / after) if before and after else None
    reductions["top1_delta"] = pruned_entry["top1"] - baseline_entry["top1"]
    pruned_entry = dict(pruned_entry)
    pruning = pruned_entry.pop("details", None)
    return {
        "baseline": baseline_entry,
        "pruned": pruned_entry,
        "reduction": reductions,
        **_report_extras(session, baseline_entry, pruned_entry, control, pruning),
        "config": config.to_dict(),
        "data": session.data.summary(),
        "baseline_source": {k: v for k, v in baseline_info.items() if k != "history"},
        "baseline_history": baseline_info.get("history", []),
        "machine": machine_info(),
        "distributed": {"world_size": session.ctx.world_size, "backend": session.ctx.backend},
        "device": str(session.device),
        "date": utc_now(),
        "timings_s": dict(session.timings),
    }


def _write_outputs(session: _Session, out: Path, report: dict[str, Any], baseline: nn.Module,
                   pruned: nn.Module, config: RunConfig, ratio: Optional[float], importance: str) -> dict[str, Any]:
    data = session.data
    progress.current().begin("save", progress.point_label(importance, ratio), detail=f"writing to {out}")
    # The torchvision name for torchvision.models:resnet18, so that load_pruned can rebuild it
    # from the file alone (it never resolves a callable a file names).
    build = {"name": canonical_model_name(config.model), "num_classes": data.num_classes,
             "in_channels": data.in_channels,
             "image_size": data.image_size, "adapt": config.adapt}
    spec = _model_spec(config, data)
    # report.json: what was built, so the small-image stem swap is never a surprise.
    report["model_build"] = {"model": config.model, "spec": None if spec is None else spec.to_dict(),
                             "small_image_stem": bool(spec is not None and spec.adapt.get("small_image_stem"))}
    example = example_batch(data.test, 1)
    what = f"ratio {ratio:g}" if ratio is not None else config.requested
    plots = [plot_channels(baseline, pruned, out / "channels.png",
                           title=f"Channels per layer: {config.model}, {importance}, {what}")]
    report["plots"] = [str(p.name) for p in plots]
    try:
        with collect_warnings(session.warnings):
            artifacts = save_pruned(pruned, out, example_inputs=example, build=build,
                                    extra={"ratio": ratio, "importance": importance})
    except Exception as exc:
        # The run's measurements outlive a model that could not be saved: the report is
        # written with the error (then the error stops the run as usual).
        report["artifacts"] = []
        report["save_error"] = f"{type(exc).__name__}: {exc}"
        report["warnings"] = session.warnings.to_list()
        write_report(report, out)
        logger.error("the pruned model could not be saved; report.md and report.json were written to %s", out)
        raise
    report["artifacts"] = [p.name for p in artifacts]
    report["warnings"] = session.warnings.to_list()  # with any the save raised
    _log_warning_summary(session.warnings)
    write_report(report, out)
    return report


def run(config: RunConfig, *, on_epoch_end: Optional[Callable[[int, dict[str, float]], None]] = None
        ) -> dict[str, Any]:
    """Run the whole job once and return the report (also written to ``config.out``).

    ``on_epoch_end(epoch, metrics)`` is called after every training epoch (baseline and
    fine-tuning) once its checkpoint is written; raising from it stops the run there, as a
    kill would, and ``resume=True`` continues from that checkpoint.
    """
    preflight(config)
    started = time.perf_counter()
    ratio = config.effective_ratio
    with _process_settings(config):
        session = _setup(config)
        _check_resume_up_front(session, [(session.out, ratio, config.importance)])
        progress.current().set_stages(_plan(session, [progress.point_label(config.importance, ratio)], False))
        progress.current().begin("baseline")
        baseline, info = get_baseline(session, on_epoch_end=on_epoch_end)
        progress.current().begin("measure")
        baseline_entry = measure_model(session, baseline, "baseline")
        pruned, pruned_entry = _prune_finetune_measure(session, baseline, session.out, ratio,
                                                       config.importance, on_epoch_end)
        latency = measure_latency_pair(session, baseline, pruned, baseline_entry, pruned_entry)
        # After the pruned arm: its result (and the epoch count a callback sees) is as without it.
        control = get_control(session, baseline, baseline_entry, on_epoch_end=on_epoch_end)
        session.timings["total"] = time.perf_counter() - started
        report = _report(session, baseline_entry, pruned_entry, config, info, control)
        report["latency"] = latency
        for line in latency_target_warnings(report):
            if line:
                logger.warning("%s", line.lstrip("> ").replace("**", ""))  # as loud in the log as in report.md
        report["fingerprint"] = _run_fingerprint(session, ratio, config.importance)
        if session.ctx.is_main:
            _write_outputs(session, session.out, report, baseline, pruned, config, ratio,
                           config.importance)
            logger.info("report written to %s (%.0f s in all)", session.out / "report.md",
                        session.timings["total"])
        progress.current().finish()
        barrier(session.ctx)
        return report


def _same_settings(saved: Any, current: dict[str, Any]) -> bool:
    """Whether a saved report's fingerprint is the current one (JSON round trip: lists for tuples)."""
    return isinstance(saved, dict) and saved == json.loads(json.dumps(current))


# What sweep.json keeps of each point's report.
_POINT_KEYS = ("top1", "top5", "params", "macs", "size_mb", "latency_ms", "top1_before_finetune", "achieved")


def sweep_baseline_latency(points: Sequence[dict[str, Any]]) -> dict[str, Optional[float]]:
    """The baseline's latency per setting in a sweep: the median over the points' interleaved
    measurements (each point times the baseline next to its pruned model)."""
    import statistics

    values: dict[str, list[float]] = {}
    for point in points:
        for key, row in ((point.get("latency") or {}).get("settings") or {}).items():
            values.setdefault(key, [])
            if isinstance(row, dict) and isinstance(row.get("baseline_ms"), (int, float)):
                values[key].append(float(row["baseline_ms"]))
    return {key: (statistics.median(v) if v else None) for key, v in values.items()}


def _point_dir(out: Path, importance: str, ratio: float) -> Path:
    return out / f"{importance}-r{ratio:g}"


def sweep(config: RunConfig, ratios: Sequence[float], importances: Sequence[str] = ("taylor",)) -> dict[str, Any]:
    """The pipeline at every (importance, ratio), sharing one baseline; returns ``sweep.json``'s data.

    With ``resume``, points whose ``report.json`` already exists with the same settings are
    reused rather than recomputed.
    """
    if not ratios:
        raise ConfigError("sweep needs at least one ratio")
    if not importances:
        raise ConfigError("sweep needs at least one importance criterion")
    if config.target_macs is not None:
        raise ConfigError("sweep prunes at each of --ratios; --target-macs contradicts them (run "
                          "'fxprune run --target-macs' instead)")
    if config.target_latency is not None:
        raise ConfigError("sweep prunes at each of --ratios; --target-latency contradicts them (run "
                          "'fxprune run --target-latency' instead)")
    preflight(config, importances=importances, ratios=ratios)
    started = time.perf_counter()
    with _process_settings(config):
        session = _setup(config, "sweep")
        point_sessions = {(imp, r): _Session(config=config.replace(ratio=r, importance=imp), ctx=session.ctx,
                                             device=session.device, data=session.data,
                                             out=_point_dir(session.out, imp, r))
                          for imp in importances for r in ratios}
        _check_resume_up_front(session, [(ps.out, r, imp) for (imp, r), ps in point_sessions.items()])
        progress.current().set_stages(_plan(session, [progress.point_label(imp, r) for imp, r in point_sessions],
                                            True))
        progress.current().begin("baseline")
        baseline, info = get_baseline(session)
        progress.current().begin("measure")
        baseline_entry = measure_model(session, baseline, "baseline")
        # One control for every point: it depends on the baseline and the recipe, not on the ratio.
        control = get_control(session, baseline, baseline_entry)
        points: list[dict[str, Any]] = []
        for importance in importances:
            for ratio in ratios:
                point_session = point_sessions[(importance, ratio)]
                point_config, folder = point_session.config, point_session.out
                fingerprint = _run_fingerprint(point_session, ratio, importance)
                existing = folder / "report.json"
                if config.resume and existing.is_file():
                    try:
                        saved = json.loads(existing.read_text(encoding="utf-8"))
                    except (OSError, ValueError):
                        saved = None
                    if (isinstance(saved, dict) and isinstance(saved.get("pruned"), dict)
                            and _same_settings(saved.get("fingerprint"), fingerprint)):
                        logger.info("sweep: reusing %s", existing)
                        points.append({"importance": importance, "ratio": ratio,
                                       **{k: saved["pruned"].get(k) for k in _POINT_KEYS},
                                       "latency": saved.get("latency")})
                        continue
                logger.info("sweep: importance %s, ratio %g", importance, ratio)
                if session.ctx.is_main:
                    folder.mkdir(parents=True, exist_ok=True)
                barrier(session.ctx)
                pruned, entry = _prune_finetune_measure(point_session, baseline, folder, ratio, importance)
                point_baseline = dict(baseline_entry)  # this point's interleaved baseline timings
                latency = measure_latency_pair(point_session, baseline, pruned, point_baseline, entry)
                report = _report(point_session, point_baseline, entry, point_config, info, control)
                report["latency"] = latency
                report["fingerprint"] = fingerprint
                if session.ctx.is_main:
                    _write_outputs(point_session, folder, report, baseline, pruned, point_config, ratio,
                                   importance)
                points.append({"importance": importance, "ratio": ratio,
                               **{k: entry.get(k) for k in _POINT_KEYS}, "latency": latency})
        baseline_entry["latency_ms"] = sweep_baseline_latency(points)
        session.timings["total"] = time.perf_counter() - started
        summary: dict[str, Any] = {
            "baseline": {k: baseline_entry.get(k) for k in ("top1", "top5", "params", "macs", "size_mb",
                                                             "latency_ms")},
            "control": {k: control.get(k) for k in ("top1", "top5", "params", "macs", "size_mb", "epochs",
                                                     "source", "skipped") if k in control},
            "points": points,
            "ratios": list(ratios),
            "importances": list(importances),
            "command": command_line(),
            "software": software_info(),
            "config": config.to_dict(),
            "data": session.data.summary(),
            "machine": machine_info(),
            "date": utc_now(),
            "timings_s": dict(session.timings),
        }
        if session.ctx.is_main:
            plots = plot_sweep(points, summary["baseline"], session.out)
            summary["plots"] = [p.name for p in plots]
            write_json(summary, session.out / "sweep.json")
            (session.out / "sweep.md").write_text(render_sweep_markdown(summary), encoding="utf-8")
            logger.info("sweep written to %s", session.out / "sweep.md")
        progress.current().finish()
        barrier(session.ctx)
        return summary
