"""Importance criteria: a group -> one score per channel (higher = keep).

A criterion sees each member's weights as a matrix whose rows are the parameter positions the
group indexes (:func:`member_rows`), so the same criterion scores producer rows, consumer
columns and per-channel parameters alike. Extend the weight view for a new module type with
:func:`register_weights`; add a criterion with :func:`register_criterion`.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Union

import torch
import torch.fx
import torch.nn as nn

from .errors import FxPruneError
from .groups import Group, Member

__all__ = [
    "Criterion",
    "register_criterion",
    "register_weights",
    "member_rows",
    "group_rows",
    "score",
    "CRITERIA",
]

Criterion = Callable[[Group, torch.fx.GraphModule], torch.Tensor]
WeightView = Callable[[nn.Module, str], Optional[torch.Tensor]]

_WEIGHT_VIEWS: Dict[type, WeightView] = {}
CRITERIA: Dict[str, Criterion] = {}


def register_weights(*types: type) -> Callable[[WeightView], WeightView]:
    """Register how a module type exposes the weights a role indexes, positions first."""

    def decorate(fn: WeightView) -> WeightView:
        for t in types:
            _WEIGHT_VIEWS[t] = fn
        return fn

    return decorate


def register_criterion(name: str) -> Callable[[Criterion], Criterion]:
    """Register a named criterion usable as ``importance=name``."""

    def decorate(fn: Criterion) -> Criterion:
        CRITERIA[name] = fn
        return fn

    return decorate


@register_weights(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
def _weighted_layer(module: nn.Module, role: str) -> Optional[torch.Tensor]:
    w = module.weight.detach()
    if role == "in":
        return w.transpose(0, 1)
    return w  # "out" rows, or a depthwise conv's per-channel filters


@register_weights(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _norm(module: nn.Module, role: str) -> Optional[torch.Tensor]:
    w = getattr(module, "weight", None)
    return None if w is None else w.detach().unsqueeze(1)


def member_rows(gm: torch.fx.GraphModule, group: Group, member: Member) -> Optional[torch.Tensor]:
    """The member's weights for this group as ``[group.size, k]`` (one row per channel)."""
    module = gm.get_submodule(member.module)
    view = _WEIGHT_VIEWS.get(type(module))
    if view is None:
        return None
    w = view(module, member.role)
    if w is None:
        return None
    start = member.offset * member.block
    rows = w[start : start + group.size * member.block]
    return rows.reshape(group.size, -1).float()


def member_norms(gm: torch.fx.GraphModule, group: Group, member: Member, p: float) -> Optional[torch.Tensor]:
    """The p-norm**p of each channel's weights in ``member``, as ``[group.size]``.

    Reduces the weight in place of reading it as rows: no transposed copy of large tensors,
    which is what makes scoring fast on big models.
    """
    module = gm.get_submodule(member.module)
    view = _WEIGHT_VIEWS.get(type(module))
    if view is None:
        return None
    w = view(module, "out")  # positions on dim 0 for out/channelwise, dim 1 for "in"
    if w is None:
        return None
    pos_dim = 1 if member.role == "in" else 0
    if w.dim() == 1:
        per_pos = w.abs().pow(p)
    else:
        dims = [d for d in range(w.dim()) if d != pos_dim]
        per_pos = torch.linalg.vector_norm(w, ord=p, dim=dims).pow(p)
    start = member.offset * member.block
    return per_pos[start : start + group.size * member.block].reshape(group.size, -1).sum(1).float()


def group_rows(gm: torch.fx.GraphModule, group: Group) -> List[torch.Tensor]:
    """Every member's rows (members without weights, like pooling, are skipped)."""
    out = []
    for m in group.members:
        rows = member_rows(gm, group, m)
        if rows is not None:
            out.append(rows)
    return out


@register_criterion("l1")
def l1(group: Group, gm: torch.fx.GraphModule) -> torch.Tensor:
    """Sum over every member of the L1 norm of the weights the channel indexes.

    No normalisation: a channel whose weights are all zero scores exactly 0 and ranks lowest.
    """
    total = torch.zeros(group.size)
    for m in group.members:
        norms = member_norms(gm, group, m, 1.0)
        if norms is not None:
            total += norms
    return total


def score(group: Group, gm: torch.fx.GraphModule, importance: Union[str, Criterion]) -> torch.Tensor:
    """Scores of ``group``'s channels under ``importance`` (a name or a callable)."""
    if callable(importance):
        fn: Criterion = importance
        try:
            scores = fn(group, gm)
        except TypeError:
            scores = fn(group)  # type: ignore[call-arg]
    else:
        if importance not in CRITERIA:
            raise FxPruneError(f"unknown importance {importance!r}; choose one of {sorted(CRITERIA)} or pass a callable")
        scores = CRITERIA[importance](group, gm)
    scores = torch.as_tensor(scores).detach().float().flatten().cpu()
    if scores.numel() != group.size:
        raise FxPruneError(f"importance returned {scores.numel()} scores for group {group.key} of {group.size} channels")
    # NaN scores (NaN weights) must not win: they rank lowest.
    return torch.nan_to_num(scores, nan=-float("inf"))
