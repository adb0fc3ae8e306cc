"""The user's job around the pruning pass: data, baseline, fine-tuning, evaluation, report.

``fxprune run`` and ``fxprune sweep`` are :func:`run` and :func:`sweep` with a
:class:`RunConfig` built from the command line (see :mod:`fxprune.workflow.cli_args`). The
workflow imports the core (:func:`fxprune.prune`, :mod:`fxprune.cost`); the core never
imports the workflow.
"""

from __future__ import annotations

from fxprune.workflow.data import DataBundle, load_data
from fxprune.workflow.errors import CheckpointError, ConfigError, DataError, DataNotFoundError, WorkflowError
from fxprune.workflow.evaluate import evaluate_accuracy, measure_latency, model_cost
from fxprune.workflow.finetune import TrainConfig, recalibrate_batchnorm, train
from fxprune.workflow.models import build_model, load_weights
from fxprune.workflow.report import load_pruned, save_pruned
from fxprune.workflow.run import RunConfig, run, sweep

__all__ = [
    "RunConfig", "run", "sweep",
    "DataBundle", "load_data",
    "build_model", "load_weights",
    "TrainConfig", "train", "recalibrate_batchnorm",
    "evaluate_accuracy", "measure_latency", "model_cost",
    "save_pruned", "load_pruned",
    "WorkflowError", "DataError", "DataNotFoundError", "CheckpointError", "ConfigError",
]
