"""Pruning plans: which channels of each group survive. Plain data, serialisable to JSON.

A plan is the contract between deciding (criteria, ratios) and doing (the rewrite): it names
each group by its key (its first producer module) and lists the kept channel indices.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch
import torch.fx

from .errors import FxPruneError, PlanMismatchError
from .groups import Analysis, Group
from .importance import Criterion, score

__all__ = ["GroupPlan", "PruningPlan", "check_ratio", "keep_count", "make_plan"]

PLAN_VERSION = 1


@dataclass(frozen=True)
class GroupPlan:
    """The fate of one group: its key, size, member modules and the kept channel indices."""

    key: str
    size: int
    keep: List[int]
    modules: List[str] = field(default_factory=list)

    @property
    def pruned(self) -> bool:
        return len(self.keep) < self.size


@dataclass
class PruningPlan:
    """Which channels each group keeps, plus how they were chosen."""

    groups: List[GroupPlan]
    criterion: str = "l1"
    policy: Dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION

    def keep(self, key: str) -> Optional[List[int]]:
        for g in self.groups:
            if g.key == key:
                return g.keep
        return None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "PruningPlan":
        try:
            data = json.loads(text)
            if data.get("version") != PLAN_VERSION:
                raise PlanMismatchError(f"plan version {data.get('version')!r} is not {PLAN_VERSION}")
            groups = [GroupPlan(g["key"], int(g["size"]), [int(i) for i in g["keep"]], list(g.get("modules", [])))
                      for g in data["groups"]]
            return cls(groups, str(data.get("criterion", "")), dict(data.get("policy", {})), PLAN_VERSION)
        except (ValueError, KeyError, TypeError) as exc:
            raise FxPruneError(f"not a valid fxprune plan: {type(exc).__name__}: {exc}") from exc


def check_ratio(ratio: Any) -> float:
    """``ratio`` as a float in [0, 1), or a ValueError naming the bad value."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r} ({type(ratio).__name__})")
    value = float(ratio)
    if math.isnan(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio!r}")
    return value


def keep_count(size: int, ratio: float) -> int:
    """The classic recipe: keep ``int(C * (1 - ratio))`` channels, never fewer than 1."""
    return max(1, min(size, int(size * (1.0 - ratio))))


def _top(scores: torch.Tensor, n: int) -> List[int]:
    # Stable descending sort: ties keep the lower index, so plans are deterministic.
    order = torch.sort(-scores, stable=True).indices[:n]
    return sorted(int(i) for i in order)


def make_plan(analysis: Analysis, ratio: float, importance: Union[str, Criterion] = "l1") -> PruningPlan:
    """Score every prunable group and keep its best ``keep_count(C, ratio)`` channels."""
    out: List[GroupPlan] = []
    for group in analysis.groups:
        modules = sorted({m.module for m in group.members})
        if not group.prunable or ratio == 0.0:
            out.append(GroupPlan(group.key, group.size, list(range(group.size)), modules))
            continue
        n = keep_count(group.size, ratio)
        scores = score(group, analysis.gm, importance)
        out.append(GroupPlan(group.key, group.size, _top(scores, n), modules))
    name = importance if isinstance(importance, str) else getattr(importance, "__name__", "callable")
    return PruningPlan(out, name, {"ratio": ratio})


def resolve(analysis: Analysis, plan: PruningPlan) -> Dict[int, List[int]]:
    """Kept indices by group index, checking the plan fits the analysed model."""
    by_key = {g.key: g for g in plan.groups}
    kept: Dict[int, List[int]] = {}
    for group in analysis.groups:
        entry = by_key.pop(group.key, None)
        if entry is None:
            raise PlanMismatchError(f"the plan has no entry for group {group.key} ({group.size} channels) of this model")
        if entry.size != group.size:
            raise PlanMismatchError(f"group {group.key}: plan says {entry.size} channels, the model has {group.size}")
        if not entry.keep or len(set(entry.keep)) != len(entry.keep) or min(entry.keep) < 0 or max(entry.keep) >= group.size:
            raise PlanMismatchError(f"group {group.key}: kept indices must be distinct and in [0, {group.size})")
        if group.frozen and len(entry.keep) != group.size:
            raise PlanMismatchError(f"group {group.key} cannot be pruned ({'; '.join(group.reasons)})")
        kept[group.index] = sorted(entry.keep)
    if by_key:
        raise PlanMismatchError(f"the plan names groups this model does not have: {sorted(by_key)[:5]}")
    return kept
