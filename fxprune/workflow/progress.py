"""What a long ``fxprune run`` / ``fxprune sweep`` shows while it works.

Three separate parts:

- **the plan and the estimate** (pure, no I/O, clock injected): :class:`Stage` lists the job's
  stages; :class:`EtaEstimator` turns what has been measured so far (seconds per training
  step, seconds a stage of some kind took) and the work known to remain (epochs x batches)
  into an :class:`Estimate`, which is *unknown* rather than guessed while a remaining
  training stage has no measured epoch yet;
- **the tracker** :class:`JobProgress`: moves through the stages, logs one persistent line per
  stage (``[3/7] fine-tune: 5 epochs x 235 batches, about 4 min left``), a throughput line
  every N steps / 30 s when stderr is no terminal, and the text the progress bars show;
- **output plumbing**: :func:`bar_safe_output` makes log records and Python warnings (torch's
  included) print above the progress bars instead of through them, and :func:`apply_log_level`
  applies ``--log-level`` / ``-v`` / ``-q`` to the console.

The workflow finds the tracker of the running job with :func:`current` (a no-op tracker when
no job runs, e.g. when :func:`fxprune.workflow.finetune.train` is called as a library), so the
training loop needs no extra argument.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, TextIO

__all__ = [
    "LOG_LEVELS",
    "Stage",
    "Estimate",
    "EtaEstimator",
    "JobProgress",
    "format_duration",
    "format_eta",
    "point_label",
    "train_steps",
    "plan_run",
    "plan_sweep",
    "bar_safe_output",
    "BarSafeStream",
    "apply_log_level",
    "start_job",
    "end_job",
    "current",
    "DATA_DRIVEN_CRITERIA",
]

logger = logging.getLogger("fxprune.workflow")

#: The values of ``--log-level``.
LOG_LEVELS = ("debug", "info", "warning", "error")

#: Importance criteria that run the model on calibration batches before pruning (a phase
#: that can take a while and prints nothing of its own).
DATA_DRIVEN_CRITERIA = ("apoz", "taylor")


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------
@dataclass
class Stage:
    """One stage of a job.

    ``kind`` groups stages that cost alike (the baseline's and the pruned model's
    measurements are both ``measure``): once one has been timed, the next is estimated at
    that duration. ``steps`` is the known work of a training stage (epochs x batches);
    ``None`` for stages measured by duration only. ``point`` names the sweep point the stage
    belongs to (``"l1 r0.5"``), ``None`` for the shared ones.
    """

    kind: str
    name: str
    steps: Optional[int] = None
    point: Optional[str] = None
    epochs: int = 0
    batches: int = 0


def point_label(importance: str, ratio: Optional[float]) -> str:
    """The label of a (criterion, ratio) point: ``"l1 r0.5"`` (``"l1 target-macs"`` without a ratio)."""
    return f"{importance} r{ratio:g}" if ratio is not None else f"{importance} target-macs"


def train_steps(samples: int, batch_size: int, world_size: int = 1) -> int:
    """Batches per epoch of :func:`fxprune.workflow.data.make_loader`'s training loader.

    Mirrors its rule (a shard of ``ceil(samples / world_size)`` samples; the last partial batch
    dropped when the shard holds more than one batch). The training loop corrects the plan
    with the loader's real length when it starts, so a mismatch only costs estimate accuracy.
    """
    shard = math.ceil(max(samples, 0) / max(world_size, 1))
    if shard > batch_size:
        return shard // batch_size
    return 1 if shard else 0


def _train_stage(kind: str, name: str, epochs: int, batches: int, point: Optional[str]) -> Stage:
    return Stage(kind=kind, name=name, steps=epochs * batches, point=point, epochs=epochs, batches=batches)


def _point_stages(point: str, shown: Optional[str], epochs: int, batches: int) -> list[Stage]:
    suffix = f" ({shown})" if shown else ""
    stages = [Stage("prune", f"prune{suffix}", point=point),
              Stage("recalibrate", f"BN recalibration{suffix}", point=point)]
    if epochs > 0:
        stages.append(_train_stage("fine-tune", f"fine-tune{suffix}", epochs, batches, point))
    stages += [Stage("measure", f"measure pruned{suffix}", point=point),
               Stage("save", f"save{suffix}", point=point)]
    return stages


def _shared_stages(train_baseline: bool, baseline_epochs: int, batches: int) -> list[Stage]:
    if train_baseline and baseline_epochs > 0:
        first = _train_stage("baseline", "baseline", baseline_epochs, batches, None)
    else:
        first = Stage("baseline", "baseline")
    return [first, Stage("measure", "measure baseline")]


def _control_stage(epochs: int, batches: int) -> list[Stage]:
    # The equal-training control trains the unpruned baseline for the fine-tune's epochs.
    return [_train_stage("control", "equal-training control", epochs, batches, None)] if epochs > 0 else []


def plan_run(*, epochs: int, baseline_epochs: int, train_baseline: bool, batches: int,
             point: str, control: bool = False) -> list[Stage]:
    """The stages of ``fxprune run``: baseline, measure it, prune, recalibrate, fine-tune, measure,
    the equal-training control (``control``), save.

    ``batches`` is the number of training batches per epoch (:func:`train_steps`). A baseline
    read from the cache turns out to be quick: its stage then simply ends early.
    """
    stages = _shared_stages(train_baseline, baseline_epochs, batches) + _point_stages(point, None, epochs, batches)
    if control:
        stages[-1:-1] = _control_stage(epochs, batches)  # after the pruned arm, before saving
    return stages


def plan_sweep(*, epochs: int, baseline_epochs: int, train_baseline: bool, batches: int,
               points: Sequence[str], control: bool = False) -> list[Stage]:
    """The stages of ``fxprune sweep``: the shared baseline (and its control), then the run's
    stages per point."""
    stages = _shared_stages(train_baseline, baseline_epochs, batches)
    if control:
        stages += _control_stage(epochs, batches)
    for point in points:
        stages += _point_stages(point, point, epochs, batches)
    return stages


# --------------------------------------------------------------------------------------------
# The estimate (pure)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    """Seconds left: ``None`` when unknown; ``lower_bound`` when some remaining stage is unmeasured."""

    seconds: Optional[float]
    lower_bound: bool = False


def format_duration(seconds: float) -> str:
    """``"45 s"``, ``"4 min"``, ``"1 h 05 min"`` (rounded: an estimate is no stopwatch)."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{max(1, int(round(seconds)))} s"
    minutes = int(round(seconds / 60))
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def format_eta(estimate: Estimate) -> str:
    """``"about 4 min left"``, ``"at least 4 min left"`` or ``"ETA unknown"``."""
    if estimate.seconds is None:
        return "ETA unknown"
    return f"{'at least' if estimate.lower_bound else 'about'} {format_duration(estimate.seconds)} left"


class EtaEstimator:
    """Time left in a list of stages, from what was measured so far.

    A training stage's remaining time is its remaining steps times the seconds per step
    measured on whole epochs of the same kind (the fine-tuning of a pruned model runs faster
    than the baseline's training, so the baseline's rate only stands in, as an upper bound,
    until a fine-tuning epoch is measured). Any other stage is estimated at the duration the
    last stage of its kind took. A training stage with no rate at all makes the whole
    estimate unknown; a non-training stage never measured counts as zero and makes the
    estimate a lower bound.
    """

    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = list(stages)
        self.step_seconds: dict[str, float] = {}
        self.durations: dict[str, float] = {}

    def record_epoch(self, kind: str, steps: int, seconds: float) -> None:
        """A whole training epoch of ``kind`` took ``seconds`` for ``steps`` batches."""
        if steps > 0 and seconds >= 0:
            self.step_seconds[kind] = seconds / steps

    def record_stage(self, kind: str, seconds: float) -> None:
        """A (non-training) stage of ``kind`` took ``seconds``."""
        self.durations[kind] = max(0.0, seconds)

    def _rate(self, kind: str) -> Optional[float]:
        if kind in self.step_seconds:
            return self.step_seconds[kind]
        return max(self.step_seconds.values()) if self.step_seconds else None

    def remaining(self, current: int, *, elapsed: float = 0.0, steps_done: int = 0) -> Estimate:
        """Seconds left from stage ``current`` (``elapsed`` seconds and ``steps_done`` steps into it) on.

        ``current == len(stages)`` means all done.
        """
        total, unknown, lower = 0.0, False, False
        for index in range(max(current, 0), len(self.stages)):
            stage = self.stages[index]
            if stage.steps is not None:
                left = stage.steps - (steps_done if index == current else 0)
                if left <= 0:
                    continue
                rate = self._rate(stage.kind)
                if rate is None:
                    unknown = True
                    continue
                total += left * rate
            elif stage.kind in self.durations:
                total += max(0.0, self.durations[stage.kind] - (elapsed if index == current else 0.0))
            else:
                lower = True
        if unknown:
            return Estimate(None)
        return Estimate(total, lower_bound=lower)


# --------------------------------------------------------------------------------------------
# The tracker
# --------------------------------------------------------------------------------------------
@dataclass
class _Epoch:
    label: str
    steps: int
    started: float
    step: int = 0
    images: int = 0
    last_log: float = 0.0
    last_log_step: int = 0
    last_log_images: int = 0


class JobProgress:
    """Moves through a job's stages and says where it is.

    ``tty``: progress bars are shown (the training loop asks :meth:`bar_description` /
    :meth:`bar_postfix` for their text); otherwise every ``log_every`` steps, and at least
    every ``log_seconds``, a training step logs a line with its throughput. ``clock``
    is injectable for tests; ``log`` is the logger lines go to.
    """

    def __init__(self, stages: Sequence[Stage] = (), *, tty: bool = False, enabled: bool = True,
                 clock: Callable[[], float] = time.monotonic, log: Optional[logging.Logger] = None,
                 log_every: int = 50, log_seconds: float = 30.0) -> None:
        self.estimator = EtaEstimator(stages)
        self.tty, self.enabled, self.clock = tty, enabled, clock
        self.log = log or logger
        self.log_every, self.log_seconds = max(1, log_every), log_seconds
        self.index = -1  # no stage begun yet
        self.stage_started = clock()
        self.steps_done = 0  # in the current stage
        self.epoch: Optional[_Epoch] = None
        self.started = clock()

    # -- the plan --------------------------------------------------------------------------
    @property
    def stages(self) -> list[Stage]:
        return self.estimator.stages

    def set_stages(self, stages: Sequence[Stage]) -> None:
        """Replace the plan (before its first stage begins)."""
        self.estimator.stages = list(stages)
        self.index = -1

    @property
    def stage(self) -> Optional[Stage]:
        return self.stages[self.index] if 0 <= self.index < len(self.stages) else None

    def counter(self) -> str:
        """``"[3/7] fine-tune"`` (empty before the first stage)."""
        stage = self.stage
        return f"[{self.index + 1}/{len(self.stages)}] {stage.name}" if stage is not None else ""

    def estimate(self) -> Estimate:
        if self.index < 0:
            return self.estimator.remaining(0)
        return self.estimator.remaining(self.index, elapsed=self.clock() - self.stage_started,
                                        steps_done=self.steps_done)

    def eta(self) -> str:
        return format_eta(self.estimate())

    # -- stages ----------------------------------------------------------------------------
    def _finish_current(self) -> None:
        stage = self.stage
        if stage is not None and stage.steps is None:
            self.estimator.record_stage(stage.kind, self.clock() - self.stage_started)
        if stage is not None and stage.steps is not None:
            stage.steps = min(stage.steps, self.steps_done)  # what is left of it: nothing
        self.epoch = None

    def begin(self, kind: str, point: Optional[str] = None, detail: str = "") -> None:
        """Start the next stage of ``kind`` (of sweep point ``point`` when given); log it.

        Stages passed over (a resumed sweep point, a baseline that needed no training) count
        as done.
        """
        if not self.enabled:
            return
        self._finish_current()
        for index in range(self.index + 1, len(self.stages)):
            candidate = self.stages[index]
            if candidate.kind == kind and (point is None or candidate.point == point):
                for skipped in self.stages[self.index + 1:index]:
                    if skipped.steps is not None:
                        skipped.steps = 0
                self.index = index
                break
        else:  # not in the plan: say it anyway, without a counter
            self.log.info("%s%s", kind, f": {detail}" if detail else "")
            return
        self.stage_started = self.clock()
        self.steps_done = 0
        stage = self.stages[self.index]
        work = (f"{stage.epochs} epoch{'s' if stage.epochs != 1 else ''} x {stage.batches} "
                f"batch{'es' if stage.batches != 1 else ''}") if stage.steps else ""
        parts = [p for p in (detail, work) if p]
        self.log.info("%s%s, %s", self.counter(), f": {', '.join(parts)}" if parts else "", self.eta())

    def note(self, message: str) -> None:
        """Say what a long silent phase is doing: ``[3/7] measure baseline: timing latency ...``."""
        if not self.enabled:
            return
        prefix = self.counter()
        self.log.info("%s%s", f"{prefix}: " if prefix else "", message)

    def finish(self) -> None:
        """The job is done: log the total time."""
        if not self.enabled:
            return
        self._finish_current()
        self.index = len(self.stages)
        self.log.info("all %d stages done in %s", len(self.stages), format_duration(self.clock() - self.started))

    # -- training --------------------------------------------------------------------------
    def training(self, epochs_left: int, batches: int) -> None:
        """The training loop's real work for the current stage (after a resume: what is left)."""
        stage = self.stage
        if not self.enabled or stage is None or stage.steps is None:
            return
        stage.steps, stage.batches = epochs_left * batches, batches
        self.steps_done = 0

    def epoch_started(self, label: str, steps: int) -> None:
        """An epoch of ``steps`` batches starts; ``label`` is e.g. ``"fine-tune 2/5"``."""
        if not self.enabled:
            return
        now = self.clock()
        self.epoch = _Epoch(label=label, steps=steps, started=now, last_log=now)

    def step(self, images: int, loss: Optional[Callable[[], float]] = None) -> Optional[str]:
        """One training step of ``images`` samples is done. Returns the line logged, if any.

        ``loss`` is called (a host sync on a GPU) only when a line is logged.
        """
        epoch = self.epoch
        if not self.enabled or epoch is None:
            return None
        epoch.step += 1
        epoch.images += images
        self.steps_done += 1
        if self.tty:
            return None
        now = self.clock()
        due = (epoch.step - epoch.last_log_step >= self.log_every or now - epoch.last_log >= self.log_seconds
               or epoch.step == epoch.steps)
        if not due:
            return None
        seconds = now - epoch.last_log
        rate = (epoch.images - epoch.last_log_images) / seconds if seconds > 0 else None
        parts = [f"step {epoch.step}/{epoch.steps}"]
        if loss is not None:
            parts.append(f"loss {loss():.4f}")
        parts.append(f"{rate:.0f} img/s" if rate is not None else "img/s unknown")
        parts.append(self.eta())
        prefix = f"[{self.index + 1}/{len(self.stages)}] " if self.stage is not None else ""
        line = f"{prefix}{epoch.label}: {', '.join(parts)}"
        self.log.info("%s", line)
        epoch.last_log, epoch.last_log_step, epoch.last_log_images = now, epoch.step, epoch.images
        return line

    def epoch_done(self) -> Optional[float]:
        """The epoch ended: its steps and time feed the estimate. Returns its throughput (images/s)."""
        epoch = self.epoch
        if not self.enabled or epoch is None:
            return None
        seconds = self.clock() - epoch.started
        stage = self.stage
        if stage is not None and epoch.step > 0:
            self.estimator.record_epoch(stage.kind, epoch.step, seconds)
        self.epoch = None
        return epoch.images / seconds if seconds > 0 else None

    def bar_description(self, label: str) -> str:
        """A progress bar's text: ``"[6/7] fine-tune 2/5"``."""
        if not self.enabled or self.stage is None:
            return label
        return f"[{self.index + 1}/{len(self.stages)}] {label}"

    def bar_postfix(self) -> str:
        """What a progress bar shows after its counter: the job's ETA."""
        return self.eta() if self.enabled and self.stage is not None else ""


# --------------------------------------------------------------------------------------------
# Output plumbing
# --------------------------------------------------------------------------------------------
class BarSafeStream(io.TextIOBase):
    """A text stream that prints through :meth:`tqdm.write`: above the bars, which are redrawn."""

    def __init__(self, target: TextIO) -> None:
        super().__init__()
        self.target = target

    def write(self, text: str) -> int:  # type: ignore[override]
        from tqdm import tqdm  # the workflow's optional dependency: only once bars are shown

        tqdm.write(text, file=self.target, end="")
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    def isatty(self) -> bool:
        return bool(getattr(self.target, "isatty", lambda: False)())


def _console_handlers(log: logging.Logger) -> list[logging.StreamHandler]:
    return [h for h in log.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


@contextlib.contextmanager
def bar_safe_output(log: Optional[logging.Logger] = None) -> Iterator[None]:
    """While inside: console log records and Python warnings print above the progress bars.

    ``warnings.showwarning`` would write straight to stderr, through the bar; inside, a
    warning becomes a WARNING record of ``fxprune.warnings`` (so it also reaches run.log), and
    every console handler of the ``fxprune`` logger writes through :class:`BarSafeStream`.
    """
    log = log or logging.getLogger("fxprune")
    swapped = []
    for handler in _console_handlers(log):
        if not isinstance(handler.stream, BarSafeStream):
            swapped.append((handler, handler.setStream(BarSafeStream(handler.stream))))
    previous = warnings.showwarning
    warning_log = logging.getLogger(f"{log.name}.warnings")

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None,
             line: Optional[str] = None) -> None:
        warning_log.warning("%s", warnings.formatwarning(message, category, filename, lineno, line).rstrip())

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous
        for handler, stream in swapped:
            if isinstance(handler.stream, BarSafeStream):
                handler.setStream(stream)


def apply_log_level(level: Optional[str], *, quiet: bool = False, is_main: bool = True,
                    log: Optional[logging.Logger] = None) -> int:
    """Set the console level of the ``fxprune`` logger: ``level`` (``--log-level``), else
    warning with ``quiet``, else info. Non-main processes print warnings and errors only.
    ``debug`` also lowers the logger's own level (run.log keeps its info level). Returns the level.
    """
    log = log or logging.getLogger("fxprune")
    name = level or ("warning" if quiet else "info")
    if name not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    value = getattr(logging, name.upper())
    if not is_main:
        value = max(value, logging.WARNING)
    if value < log.getEffectiveLevel():
        log.setLevel(value)
    for handler in _console_handlers(log):
        handler.setLevel(value)
    return value


_NULL = JobProgress(enabled=False)
_active: Optional[JobProgress] = None
_redirect: Optional[contextlib.ExitStack] = None


def current() -> JobProgress:
    """The running job's tracker; a disabled one (does nothing) outside a job or off the main process."""
    return _active if _active is not None else _NULL


def start_job(*, quiet: bool = False, log_level: Optional[str] = None, is_main: bool = True,
              tty: Optional[bool] = None, stages: Sequence[Stage] = ()) -> JobProgress:
    """Begin tracking a job (after the log handlers are set up); :func:`end_job` ends it.

    Applies the console log level; on the main process makes the tracker :func:`current`;
    when bars will be shown (``tty``: stderr is a terminal, and not ``quiet``) routes log
    records and warnings above them.
    """
    global _active, _redirect
    end_job()
    apply_log_level(log_level, quiet=quiet, is_main=is_main)
    if not is_main:
        return _NULL
    if tty is None:
        tty = not quiet and bool(getattr(sys.stderr, "isatty", lambda: False)())
    _active = JobProgress(stages, tty=tty)
    if tty:
        _redirect = contextlib.ExitStack()
        _redirect.enter_context(bar_safe_output())
    return _active


def end_job() -> None:
    """Stop tracking: restore the console streams and warnings; :func:`current` is a no-op again."""
    global _active, _redirect
    if _redirect is not None:
        _redirect.close()
    _active, _redirect = None, None
