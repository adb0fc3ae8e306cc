"""The user's job around the pruning pass: data, baseline, fine-tuning, evaluation, report.

``fxprune run`` and ``fxprune sweep`` are :func:`run` and :func:`sweep` with a
:class:`RunConfig` built from the command line (see :mod:`fxprune.workflow.cli_args`). The
workflow imports the core (:func:`fxprune.prune`, :mod:`fxprune.cost`); the core never
imports the workflow.
"""

from typing import TYPE_CHECKING

from fxprune.lazy import install

# Submodule -> the names it exports, in import order. They load on first use (fxprune.lazy):
# ``fxprune run --help`` builds its parser from fxprune.workflow.cli_args without torch.
_EXPORTS = {
    ".data": ("DataBundle", "load_data"),
    ".errors": ("CheckpointError", "ConfigError", "DataError", "DataNotFoundError", "WorkflowError"),
    ".evaluate": ("evaluate_accuracy", "measure_latency", "model_cost"),
    ".finetune": ("TrainConfig", "recalibrate_batchnorm", "train"),
    ".models": ("build_model", "load_weights"),
    ".report": ("load_pruned", "save_pruned"),
    ".job": ("RunConfig", "run", "sweep"),
}

if TYPE_CHECKING:  # the same names, for type checkers (tests/test_packaging.py keeps both in sync)
    from fxprune.workflow.data import DataBundle, load_data
    from fxprune.workflow.errors import CheckpointError, ConfigError, DataError, DataNotFoundError, WorkflowError
    from fxprune.workflow.evaluate import evaluate_accuracy, measure_latency, model_cost
    from fxprune.workflow.finetune import TrainConfig, recalibrate_batchnorm, train
    from fxprune.workflow.models import build_model, load_weights
    from fxprune.workflow.report import load_pruned, save_pruned
    from fxprune.workflow.job import RunConfig, run, sweep

__all__ = [
    "RunConfig", "run", "sweep",
    "DataBundle", "load_data",
    "build_model", "load_weights",
    "TrainConfig", "train", "recalibrate_batchnorm",
    "evaluate_accuracy", "measure_latency", "model_cost",
    "save_pruned", "load_pruned",
    "WorkflowError", "DataError", "DataNotFoundError", "CheckpointError", "ConfigError",
]

install(__name__, _EXPORTS)
