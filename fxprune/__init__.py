"""fxprune: structured channel pruning as a torch.fx pass, proven equivalent.

>>> import torch, torchvision, fxprune
>>> pruned = fxprune.prune(torchvision.models.resnet18(), 0.5)
>>> pruned.fc.in_features
256
"""

from .api import GroupList, analyze_model, apply, find_groups, plan, prune
from .errors import FxPruneError, FxPruneWarning, InternalError, PlanMismatchError, UnsupportedNodeError
from .groups import Group, Member
from .importance import available_criteria, register_criterion, register_model_criterion
from .iterative import prune_iteratively
from .latency import LatencyResult, format_speedup, measure_latency, realised_fraction
from .plan import GroupPlan, PruningPlan
from .rewrite import register_builder
from .rules import Layout, register_rule
from .trace import trace
from .artifact import load, save
from .modelspec import ModelSpec

__version__ = "0.1.0"

__all__ = [
    "prune", "plan", "apply", "find_groups", "analyze_model", "trace", "register_rule",
    "register_criterion", "PruningPlan", "Group", "Member", "GroupList", "Layout",
    "FxPruneError", "UnsupportedNodeError", "PlanMismatchError", "InternalError", "FxPruneWarning", "__version__",
    "save", "load", "ModelSpec", "register_builder",
    "prune_iteratively", "register_model_criterion", "available_criteria", "GroupPlan",
    "measure_latency", "LatencyResult", "format_speedup", "realised_fraction",
]
