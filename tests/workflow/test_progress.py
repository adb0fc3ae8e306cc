"""Watching a long job: stage counter, ETA, piped step logging, warnings above the bars, --log-level.

Every timing here comes from an injected clock: nothing is asserted about the real one.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path
from typing import Iterator

import pytest

from fxprune.workflow import progress
from fxprune.workflow.cli_args import UsageError, build_parser, config_from_args
from fxprune.workflow.errors import ConfigError
from fxprune.workflow.progress import (Estimate, EtaEstimator, JobProgress, Stage, bar_safe_output, format_eta,
                                       plan_run, plan_sweep, train_steps)
from fxprune.workflow.job import RunConfig, run

TINY = "tests.workflow.helpers:TinyNet"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, ListHandler]]:
    log = logging.getLogger("fxprune.test_progress")
    log.propagate = False
    log.setLevel(logging.INFO)
    handler = ListHandler()
    log.addHandler(handler)
    yield log, handler
    log.removeHandler(handler)


def _run_plan(epochs: int = 5, batches: int = 10) -> list[Stage]:
    return plan_run(epochs=epochs, baseline_epochs=2, train_baseline=True, batches=batches, point="l1 r0.5")


# --------------------------------------------------------------------------------------------
# The plan and the ETA (pure)
# --------------------------------------------------------------------------------------------
def test_run_plan_has_seven_stages_with_known_training_work() -> None:
    stages = _run_plan()
    assert [s.name for s in stages] == ["baseline", "measure baseline", "prune", "BN recalibration",
                                        "fine-tune", "measure pruned", "save"]
    assert stages[0].steps == 2 * 10 and stages[4].steps == 5 * 10
    assert [s.steps for s in stages if s.kind not in ("baseline", "fine-tune")] == [None] * 5
    # No fine-tuning epochs: no fine-tune stage; --weights: nothing to train.
    assert "fine-tune" not in [s.kind for s in _run_plan(epochs=0)]
    assert plan_run(epochs=1, baseline_epochs=3, train_baseline=False, batches=4, point="x")[0].steps is None
    sweep = plan_sweep(epochs=1, baseline_epochs=1, train_baseline=True, batches=4, points=["l1 r0.3", "l1 r0.5"])
    assert len(sweep) == 2 + 2 * 5
    assert sweep[2].name == "prune (l1 r0.3)" and sweep[7].name == "prune (l1 r0.5)"


def test_train_steps_mirrors_the_training_loader() -> None:
    assert train_steps(512, 256) == 2
    assert train_steps(500, 256) == 1  # the partial last batch is dropped
    assert train_steps(100, 256) == 1  # ... unless it is the only one
    assert train_steps(1000, 100, world_size=2) == 5
    assert train_steps(0, 10) == 0


def test_eta_is_unknown_until_a_training_epoch_is_measured() -> None:
    estimator = EtaEstimator(_run_plan())
    assert estimator.remaining(0) == Estimate(None)
    assert format_eta(estimator.remaining(0)) == "ETA unknown"
    estimator.record_epoch("baseline", steps=10, seconds=20.0)  # 2 s per step
    # Baseline: 10 steps left; fine-tune at the baseline's rate (an upper bound): 50 steps;
    # the other stages are unmeasured, so this is a lower bound.
    estimate = estimator.remaining(0, steps_done=10)
    assert estimate == Estimate(60 * 2.0, lower_bound=True)
    assert format_eta(estimate) == "at least 2 min left"


def test_eta_uses_each_kind_of_stage_once_measured() -> None:
    estimator = EtaEstimator(_run_plan())
    estimator.record_epoch("baseline", 10, 20.0)
    for kind, seconds in (("measure", 30.0), ("prune", 5.0), ("recalibrate", 4.0), ("save", 1.0)):
        estimator.record_stage(kind, seconds)
    estimator.record_epoch("fine-tune", 10, 5.0)  # the pruned model: 0.5 s per step
    # In the fine-tune stage, 20 of 50 steps done: 30 * 0.5 + measure 30 + save 1.
    assert estimator.remaining(4, steps_done=20) == Estimate(15.0 + 30.0 + 1.0)
    assert format_eta(estimator.remaining(4, steps_done=20)) == "about 46 s left"
    # 10 s into measuring the pruned model: 20 s of it left, then saving.
    assert estimator.remaining(5, elapsed=10.0) == Estimate(21.0)
    assert estimator.remaining(len(estimator.stages)) == Estimate(0.0)


def test_format_eta_words() -> None:
    assert format_eta(Estimate(4 * 60 + 10)) == "about 4 min left"
    assert format_eta(Estimate(3 * 3600 + 5 * 60)) == "about 3 h 05 min left"
    assert format_eta(Estimate(0.2)) == "about 1 s left"
    assert format_eta(Estimate(None, lower_bound=True)) == "ETA unknown"


# --------------------------------------------------------------------------------------------
# The tracker: stage counter, piped step logging
# --------------------------------------------------------------------------------------------
def test_stage_counter_text_and_eta_from_the_clock(captured) -> None:
    log, handler = captured
    clock = FakeClock()
    tracker = JobProgress(_run_plan(epochs=5, batches=4), clock=clock, log=log, log_every=1000)
    tracker.begin("baseline")
    assert handler.lines[-1] == "[1/7] baseline: 2 epochs x 4 batches, ETA unknown"
    tracker.training(2, 4)
    for _ in range(2):
        tracker.epoch_started("baseline 1/2", 4)
        for _ in range(4):
            clock.tick(1.0)
            tracker.step(32)
        assert tracker.epoch_done() == pytest.approx(32.0)  # images per second
    tracker.begin("measure")
    # Fine-tuning: 20 steps at the baseline's 1 s/step; measure/prune/... never timed yet.
    assert handler.lines[-1] == "[2/7] measure baseline, at least 20 s left"
    clock.tick(30.0)
    tracker.note("timing latency on cpu (eager)")
    assert handler.lines[-1] == "[2/7] measure baseline: timing latency on cpu (eager)"
    tracker.begin("prune", "l1 r0.5", detail="l1, ratio 0.5")
    assert handler.lines[-1].startswith("[3/7] prune: l1, ratio 0.5, at least 50 s left")  # 20 + measure pruned 30
    tracker.begin("recalibrate", "l1 r0.5")
    tracker.begin("fine-tune", "l1 r0.5")
    assert tracker.counter() == "[5/7] fine-tune"
    assert tracker.bar_description("fine-tune 2/5") == "[5/7] fine-tune 2/5"
    assert tracker.bar_postfix() == tracker.eta()
    tracker.finish()
    assert handler.lines[-1].startswith("all 7 stages done in ")


def test_piped_output_logs_every_n_steps_with_throughput(captured) -> None:
    log, handler = captured
    clock = FakeClock()
    tracker = JobProgress(_run_plan(epochs=1, batches=25), clock=clock, log=log, log_every=10, log_seconds=30.0)
    tracker.begin("baseline")
    tracker.training(1, 25)
    tracker.epoch_started("baseline 1/1", 25)
    logged = []
    for _ in range(25):
        clock.tick(0.5)
        line = tracker.step(64, loss=lambda: 0.25)
        if line is not None:
            logged.append(line)
    # Every 10 steps, and at the epoch's last step; 64 images per 0.5 s.
    assert logged == [f"[1/7] baseline 1/1: step {n}/25, loss 0.2500, 128 img/s, ETA unknown"
                      for n in (10, 20)] + ["[1/7] baseline 1/1: step 25/25, loss 0.2500, 128 img/s, ETA unknown"]
    assert handler.lines[-3:] == logged
    assert not any("\r" in line for line in handler.lines)


def test_piped_output_logs_at_least_every_30_seconds(captured) -> None:
    log, _ = captured
    clock = FakeClock()
    tracker = JobProgress(_run_plan(epochs=1, batches=100), clock=clock, log=log, log_every=50, log_seconds=30.0)
    tracker.begin("baseline")
    tracker.epoch_started("baseline 1/1", 100)
    steps_logged = []
    for step in range(1, 11):
        clock.tick(12.0)  # slow steps: 50 of them would be 10 minutes of silence
        if tracker.step(8) is not None:
            steps_logged.append(step)
    assert steps_logged == [3, 6, 9]


def test_tty_tracker_logs_no_step_lines(captured) -> None:
    log, handler = captured
    clock = FakeClock()
    tracker = JobProgress(_run_plan(epochs=1, batches=100), tty=True, clock=clock, log=log, log_every=1)
    tracker.begin("baseline")
    tracker.epoch_started("baseline 1/1", 100)
    before = len(handler.lines)
    for _ in range(5):
        clock.tick(1.0)
        assert tracker.step(8) is None
    assert len(handler.lines) == before


def test_outside_a_job_the_tracker_does_nothing(captured) -> None:
    tracker = progress.current()
    assert not tracker.enabled
    tracker.begin("baseline")
    tracker.epoch_started("x", 3)
    assert tracker.step(10) is None and tracker.epoch_done() is None
    assert tracker.bar_description("train 1/1") == "train 1/1"


# --------------------------------------------------------------------------------------------
# Warnings and log records above the bar
# --------------------------------------------------------------------------------------------
def _visible_lines(text: str) -> list[str]:
    # What a terminal shows: within a line, a carriage return starts over.
    return [line.split("\r")[-1].rstrip() for line in text.split("\n")]


def test_warnings_and_log_records_during_a_bar_print_on_their_own_lines() -> None:
    from tqdm import tqdm

    stream = io.StringIO()
    log = logging.getLogger("fxprune.test_progress_bar")
    log.propagate = False
    log.setLevel(logging.INFO)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            with bar_safe_output(log):
                bar = tqdm(total=10, desc="fine-tune 1/1", file=stream, mininterval=0, ascii=True)
                bar.update(3)
                warnings.warn("TypedStorage is deprecated", UserWarning)
                bar.update(3)
                log.info("an info line")
                bar.update(4)
                bar.close()
            assert handler.stream is stream  # restored
    finally:
        log.removeHandler(handler)
    lines = _visible_lines(stream.getvalue())
    warning_lines = [line for line in lines if "TypedStorage is deprecated" in line]
    assert warning_lines and warning_lines[0].startswith(__file__), lines
    assert warning_lines[0].endswith("UserWarning: TypedStorage is deprecated")
    assert "an info line" in lines
    assert not any("fine-tune 1/1" in line and ("TypedStorage" in line or "info line" in line) for line in lines)


def test_bar_safe_output_restores_showwarning() -> None:
    before = warnings.showwarning
    with bar_safe_output(logging.getLogger("fxprune.test_progress_restore")):
        assert warnings.showwarning is not before
    assert warnings.showwarning is before


# --------------------------------------------------------------------------------------------
# --log-level, -v, -q
# --------------------------------------------------------------------------------------------
def _parse(*argv: str) -> RunConfig:
    return config_from_args(build_parser().parse_args(["run", *argv]))


@pytest.mark.parametrize("argv, level", [((), None), (("--log-level", "debug"), "debug"),
                                         (("--log-level", "error"), "error"), (("-v",), "debug"),
                                         (("--verbose", "--log-level", "debug"), "debug"),
                                         (("-q",), None), (("-q", "--log-level", "error"), "error")])
def test_log_level_options(argv, level) -> None:
    config = _parse(*argv)
    assert config.log_level == level
    assert config.quiet == ("-q" in argv)


@pytest.mark.parametrize("argv", [("--log-level", "loud"), ("-v", "-q"), ("-v", "--log-level", "error"),
                                  ("-q", "--log-level", "info")])
def test_contradicting_or_bad_log_options_are_usage_errors(argv) -> None:
    with pytest.raises(UsageError):
        _parse(*argv)


def test_log_level_is_in_help_for_run_and_sweep() -> None:
    parser = build_parser()
    for command in ("run", "sweep"):
        text = parser._subparsers._group_actions[0].choices[command].format_help()  # type: ignore[union-attr]
        assert "--log-level {debug,info,warning,error}" in text
        assert "-v, --verbose" in text and "-q, --quiet" in text
    assert config_from_args(parser.parse_args(["sweep", "-v"])).log_level == "debug"


def test_run_config_validates_log_level() -> None:
    RunConfig(log_level="warning").validate()
    with pytest.raises(ConfigError, match="--log-level"):
        RunConfig(log_level="verbose").validate()


def test_apply_log_level_sets_the_console_not_the_file(tmp_path: Path) -> None:
    log = logging.getLogger("fxprune.test_progress_levels")
    log.setLevel(logging.INFO)
    console = logging.StreamHandler(io.StringIO())
    file_handler = logging.FileHandler(tmp_path / "x.log")
    file_handler.setLevel(logging.INFO)
    log.addHandler(console)
    log.addHandler(file_handler)
    try:
        assert progress.apply_log_level("debug", log=log) == logging.DEBUG
        assert console.level == logging.DEBUG and log.level == logging.DEBUG
        assert file_handler.level == logging.INFO
        progress.apply_log_level(None, quiet=True, log=log)
        assert console.level == logging.WARNING
        progress.apply_log_level("info", is_main=False, log=log)
        assert console.level == logging.WARNING
    finally:
        log.removeHandler(console)
        log.removeHandler(file_handler)
        file_handler.close()


# --------------------------------------------------------------------------------------------
# A tiny run logs its stages
# --------------------------------------------------------------------------------------------
def test_tiny_run_logs_stage_lines_and_throughput(tmp_path: Path, fake_fmnist_dir: Path) -> None:
    out = tmp_path / "out"
    run(RunConfig(model=TINY, data=str(fake_fmnist_dir), baseline_epochs=1, epochs=1, batch_size=50,
                  compile=False, latency_runs=1, recalibration_batches=1, calibration_batches=1, quiet=True,
                  out=str(out), threads=1, lr=0.05, baseline_lr=0.05))
    text = (out / "run.log").read_text(encoding="utf-8")
    for expected in ("[1/8] baseline: 1 epoch x 4 batches, ETA unknown", "[2/8] measure baseline",
                     "[3/8] prune: taylor, ratio 0.5", "[4/8] BN recalibration",
                     "[5/8] fine-tune: 1 epoch x 4 batches", "[5/8] fine-tune 1/1: step 4/4",
                     "[6/8] measure pruned", "[6/8] measure pruned: timing latency on cpu (eager)",
                     "[7/8] equal-training control: 1 epoch x 4 batches", "[8/8] save", "all 8 stages done",
                     "looking for a cached baseline"):
        assert expected in text, expected
    assert "img/s" in text
    assert not progress.current().enabled  # the job's tracker is gone
