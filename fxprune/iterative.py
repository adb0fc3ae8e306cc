"""Iterative pruning: prune a little, fine-tune, repeat.

:func:`prune_iteratively` reaches the same end point as one :func:`fxprune.prune` call in
``steps`` smaller cuts, calling the user's fine-tune function after each, so the network can
recover before the next cut and the later cuts are scored on the recovered weights.

Schedules (``i`` = 1..steps, everything relative to the *original* model):

- ``ratio`` (float or dict, uniform): step ``i`` brings every group to the keep count that
  ``ratio * i / steps`` gives on the original sizes (``default_ratio`` scales alike), so the
  last step ends exactly at ``fxprune.prune(model, ratio)``'s channel counts.
- ``ratio`` with ``global_ranking``: step ``i`` ranks the current model's channels and keeps
  ``int(N * (1 - ratio * i / steps))`` of the original ``N`` prunable channels
  (``max_group_ratio`` caps each step).
- ``target_macs`` / ``target_params``: step ``i`` aims at ``1 - (1 - target) * i / steps`` of the
  original cost, so the last step meets the target.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import replace
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Union

import torch
import torch.fx
import torch.nn as nn

from .allocation import (NOTHING_PRUNABLE, NOTHING_PRUNED, UNMATCHED_IGNORE, Policy, allocate, check_prunable,
                         requests_pruning, unpruned_message)
from .api import ModelLike, PruneRequest, RatioArg, decide, few_threads, check_ignore, as_inputs, make_policy
from .cost import count_macs, count_params
from .importance import ScoringOptions, check_importance
from .errors import FxPruneError, FxPruneWarning, InternalError
from .planning import GroupPlan, PruningPlan, model_identity
from .registry import Registry
from .rewrite import Builder
from .rules import RuleTable
from .targets import accepts_objects
from .tracing import as_graph_module

__all__ = ["prune_iteratively"]

FineTune = Callable[[torch.fx.GraphModule, int], Optional[nn.Module]]


@contextlib.contextmanager
def _steps_quiet() -> Iterator[None]:
    """Silence, inside the steps, the "nothing pruned" and unmatched-ignore warnings.

    They are about the whole run, so :func:`prune_iteratively` gives each once (on the original
    model and on the final plan); an early step whose small cut rounds away is no news.
    """
    pattern = "|".join(re.escape(p) for p in (NOTHING_PRUNABLE, NOTHING_PRUNED, UNMATCHED_IGNORE))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=f"(?:{pattern})", category=FxPruneWarning)
        yield


def _compose(composite: Dict[str, List[int]], step: PruningPlan) -> Optional[Dict[str, List[int]]]:
    """Indices into the original model after another plan (None if the groups stopped matching)."""
    out = dict(composite)
    for g in step.groups:
        if g.key not in out or len(out[g.key]) != g.size:
            return None
        out[g.key] = [out[g.key][i] for i in g.keep]
    return out


@accepts_objects
def prune_iteratively(model: ModelLike, ratio: RatioArg = None, *, steps: int = 3,
                      finetune: Optional[FineTune] = None, target_macs: Optional[float] = None,
                      target_params: Optional[float] = None, example_inputs: Any = None,
                      importance: Any = "l1", global_ranking: bool = False, max_group_ratio: float = 0.9,
                      default_ratio: float = 0.0, round_to: int = 1, min_channels: int = 1,
                      ignore: Union[str, Iterable[str]] = (), strict: bool = False,
                      calibration: Optional[Iterable[Any]] = None, calibration_batches: Optional[int] = None,
                      loss_fn: Optional[Callable[..., Any]] = None, seed: int = 0,
                      rules: Optional[RuleTable] = None, builders: Optional[Registry[type, Builder]] = None,
                      allow_renormalising: bool = True) -> nn.Module:
    """Prune ``model`` in ``steps`` steps, calling ``finetune(pruned, step)`` after each.

    ``finetune`` receives the GraphModule just pruned and the step number (1..steps, the last
    one included) and returns the model to continue with, or None to continue with the one it
    was given (trained in place). Without ``finetune`` the steps just follow each other.
    Options are those of :func:`fxprune.prune` (``rules``/``builders``: the tables every step
    analyses and rebuilds with; ``allow_renormalising=False``: every step keeps LayerNorm/RMSNorm
    widths whole, so every step's rewrite is exact); ``calibration`` is iterated once per step, so pass something
    re-iterable (a DataLoader or a list), not a one-shot generator.

    Returns the last model. When it is a GraphModule, ``meta["fxprune_plan"]`` is the single
    plan that takes the original model to the final architecture (replay it with
    :func:`fxprune.apply` on a fresh copy to rebuild the architecture) and
    ``meta["fxprune_steps"]`` the plan of each step.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if finetune is not None and not callable(finetune):
        raise FxPruneError(f"finetune must be a callable (model, step) -> model or None, got {type(finetune).__name__}")
    policy = make_policy(ratio, global_ranking=global_ranking, max_group_ratio=max_group_ratio, default_ratio=default_ratio,
                         round_to=round_to, min_channels=min_channels, target_macs=target_macs, target_params=target_params)
    inputs = as_inputs(example_inputs)
    if policy.target_macs is not None and inputs is None:
        raise FxPruneError(f"target_macs={policy.target_macs} needs example_inputs=(x,) to count MACs on")
    check_importance(importance)
    request = PruneRequest(importance, inputs, check_ignore(ignore), strict,
                           ScoringOptions(calibration=calibration, calibration_batches=calibration_batches,
                                          loss_fn=loss_fn, seed=seed), rules, builders, allow_renormalising)

    original = as_graph_module(model)
    with few_threads():
        analysis0 = request.analyse(original)
        base_macs = count_macs(original, inputs) if policy.target_macs is not None else None
    base_params = count_params(original)
    # Explained once for the whole run, here and after the last step (the steps are quiet).
    can_prune = check_prunable(analysis0, strict=strict, stacklevel=2)
    total0 = sum(g.size for g in analysis0.groups if g.prunable)
    composite: Optional[Dict[str, List[int]]] = {g.key: list(range(g.size)) for g in analysis0.groups}
    plans: List[PruningPlan] = []

    current: nn.Module = original
    with _steps_quiet():
        for step in range(1, steps + 1):
            frac = step / steps
            if policy.has_target:
                kwargs: Dict[str, Any] = dict(global_ranking=global_ranking, max_group_ratio=max_group_ratio)
                if policy.target_macs is not None:
                    goal = (1.0 - (1.0 - policy.target_macs) * frac) * float(base_macs or 0)
                    with few_threads():
                        now_macs = count_macs(current, inputs)
                    kwargs["target_macs"] = min(1.0, goal / max(1, now_macs))
                if policy.target_params is not None:
                    goal = (1.0 - (1.0 - policy.target_params) * frac) * base_params
                    kwargs["target_params"] = min(1.0, goal / max(1, count_params(current)))
                pruned = _step(current, make_policy(None, default_ratio=0.0, target_macs=kwargs.get("target_macs"),
                                                    target_params=kwargs.get("target_params"), global_ranking=global_ranking,
                                                    max_group_ratio=max_group_ratio, round_to=round_to,
                                                    min_channels=min_channels), request)
            elif policy.global_ranking:
                if not isinstance(policy.ratio, float):
                    raise InternalError(f"global ranking with ratio {policy.ratio!r} passed validation")
                with few_threads():
                    # (Without example inputs, as the step's count was always taken.)
                    now = sum(g.size for g in replace(request, inputs=None, strict=False).analyse(current).groups if g.prunable)
                want = int(total0 * (1.0 - policy.ratio * frac))
                step_ratio = min(max(0.0, 1.0 - want / max(1, now)), 0.999999)
                pruned = _step(current, make_policy(step_ratio, global_ranking=True, max_group_ratio=max_group_ratio,
                                                    default_ratio=0.0, round_to=round_to, min_channels=min_channels,
                                                    target_macs=None, target_params=None), request)
            else:
                scaled: Any
                if isinstance(policy.ratio, Mapping):
                    scaled = {k: v * frac for k, v in policy.ratio.items()}
                else:
                    scaled = float(policy.ratio or 0.0) * frac
                step_policy = Policy(ratio=scaled, default_ratio=policy.default_ratio * frac, round_to=round_to,
                                     min_channels=min_channels).validated()
                counts, _ = allocate(analysis0, step_policy)
                keep = {g.key: counts.get(g.index, g.size) for g in analysis0.groups if g.prunable}
                pruned = _step(current, Policy(ratio=0.0).validated(), request, keep)
            step_plan: PruningPlan = pruned.meta["fxprune_plan"]
            plans.append(step_plan)
            composite = _compose(composite, step_plan) if composite is not None else None
            current = pruned
            if finetune is not None:
                returned = finetune(pruned, step)
                if returned is not None:
                    if not isinstance(returned, nn.Module):
                        raise FxPruneError(f"finetune returned {type(returned).__name__}, expected an nn.Module or None")
                    current = returned

    if can_prune and not policy.has_target and requests_pruning(policy) and composite is not None \
            and all(len(composite[g.key]) == g.size for g in analysis0.groups):
        warnings.warn(FxPruneWarning(unpruned_message(analysis0, policy)), stacklevel=2)
    if isinstance(current, torch.fx.GraphModule):
        current.meta["fxprune_steps"] = plans
        if composite is not None:
            groups = [GroupPlan(g.key, g.size, sorted(composite[g.key]), sorted({m.module for m in g.members}), g.renormalising)
                      for g in analysis0.groups]
            record = dict(plans[-1].policy)
            record.update(policy.to_dict())
            record["steps"] = steps
            current.meta["fxprune_plan"] = PruningPlan(groups, plans[-1].criterion, record,
                                                       model=model_identity(analysis0),
                                                       rule_options=analysis0.rules.changed_options())
    return current


def _step(model: nn.Module, policy: Policy, request: PruneRequest,
          keep: Optional[Mapping[str, int]] = None) -> torch.fx.GraphModule:
    """One step: prune ``model`` under ``policy`` (or to the ``keep`` counts per group key), without explaining."""
    with few_threads():
        result, pruned = decide(model, request, policy, build=True, keep_counts=keep, explain=False)
    if pruned is None:
        raise InternalError("an iterative step planned without building the pruned model")
    pruned.meta["fxprune_plan"] = result
    return pruned
