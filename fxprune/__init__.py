"""fxprune: structured channel pruning as a torch.fx pass, proven equivalent.

>>> import torch, torchvision, fxprune
>>> pruned = fxprune.prune(torchvision.models.resnet18(), 0.5)
>>> pruned.fc.in_features
256
"""

from .api import GroupList, analyze_model, apply, find_groups, plan, prune
from .errors import FxPruneError, FxPruneWarning, PlanMismatchError, UnsupportedNodeError
from .groups import Group, Member
from .importance import register_criterion
from .plan import PruningPlan
from .rules import Layout, register_rule
from .trace import trace

__version__ = "0.1.0"

__all__ = [
    "prune", "plan", "apply", "find_groups", "analyze_model", "trace", "register_rule",
    "register_criterion", "PruningPlan", "Group", "Member", "GroupList", "Layout",
    "FxPruneError", "UnsupportedNodeError", "PlanMismatchError", "FxPruneWarning", "__version__",
]
