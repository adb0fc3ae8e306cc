"""fxprune: structured channel pruning as a torch.fx pass, proven equivalent.

>>> import torch, torchvision, fxprune
>>> pruned = fxprune.prune(torchvision.models.resnet18(), 0.5)
>>> pruned.fc.in_features
256

The names below load on first use (:mod:`fxprune.lazy`): ``import fxprune`` alone imports
no torch, so the ``fxprune`` command starts in a fraction of a second.
"""

from typing import TYPE_CHECKING

from .lazy import install
from .version import __version__

# Submodule -> the names it exports, in import order (the order the eager imports had).
_EXPORTS = {
    ".adapters": ("LayerAdapter", "register_layer"),
    ".api": ("GroupList", "analyze_model", "apply", "find_groups", "plan", "prune"),
    ".errors": ("FxPruneError", "FxPruneWarning", "InternalError", "PlanMismatchError", "UnsupportedNodeError"),
    ".groups": ("Group", "Member"),
    ".importance": ("available_criteria", "register_criterion", "register_model_criterion"),
    ".iterative": ("prune_iteratively",),
    ".planning": ("GroupPlan", "PruningPlan"),
    ".rewrite": ("register_builder",),
    ".rules": ("Layout", "register_rule"),
    ".tracing": ("trace",),
    ".artifact": ("load", "save"),
    ".modelspec": ("ModelSpec",),
    ".latency": ("LatencyResult", "format_speedup", "measure_latency", "realised_fraction"),
}

if TYPE_CHECKING:  # the same names, for type checkers (tests/test_packaging.py keeps both in sync)
    from .adapters import LayerAdapter, register_layer
    from .api import GroupList, analyze_model, apply, find_groups, plan, prune
    from .errors import FxPruneError, FxPruneWarning, InternalError, PlanMismatchError, UnsupportedNodeError
    from .groups import Group, Member
    from .importance import available_criteria, register_criterion, register_model_criterion
    from .iterative import prune_iteratively
    from .planning import GroupPlan, PruningPlan
    from .rewrite import register_builder
    from .rules import Layout, register_rule
    from .tracing import trace
    from .artifact import load, save
    from .modelspec import ModelSpec
    from .latency import LatencyResult, format_speedup, measure_latency, realised_fraction

__all__ = [
    "prune", "plan", "apply", "find_groups", "analyze_model", "trace", "register_rule",
    "register_criterion", "PruningPlan", "Group", "Member", "GroupList", "Layout",
    "FxPruneError", "UnsupportedNodeError", "PlanMismatchError", "InternalError", "FxPruneWarning", "__version__",
    "save", "load", "ModelSpec", "register_builder", "register_layer", "LayerAdapter",
    "prune_iteratively", "register_model_criterion", "available_criteria", "GroupPlan",
    "measure_latency", "LatencyResult", "format_speedup", "realised_fraction",
]

install(__name__, _EXPORTS)
