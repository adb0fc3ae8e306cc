"""Pruning plans: which channels of each group survive. Plain data, serialisable to JSON.

A plan is the contract between deciding (criteria, ratios, targets) and doing (the rewrite):
it names each group by its key (its first producer module), lists the kept channel indices,
and records how they were chosen (``criterion``, ``policy``) and which model they were chosen
for (``model``: its class name and a fingerprint of its group structure), and the rule
options the groups were found with where they differ from the default (``rule_options``, e.g.
``{"attention": "head_dim"}``: apply analyses with them, see :func:`rules_for`). Applying a plan
to a model it does not fit raises :class:`fxprune.PlanMismatchError` naming the mismatch.

>>> import torchvision, fxprune
>>> p = fxprune.plan(torchvision.models.resnet18(), 0.5)
>>> q = fxprune.PruningPlan.from_json(p.to_json())
>>> q == p, q.model["class"]
(True, 'ResNet')
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch
import torch.fx

from .allocation import CostModel, Measure, Policy, allocate, check_ratio, group_count, keep_count
from .errors import FxPruneError, PlanMismatchError, InternalError
from .groups import Analysis, Group, select_channels
from .importance import Criterion, ScoringOptions, criterion_name, score_groups
from .rules import DEFAULT_RULES, RULE_OPTIONS, RuleTable, check_rule_options

__all__ = ["GroupPlan", "PruningPlan", "check_ratio", "keep_count", "make_plan", "resolve", "fingerprint",
           "rules_for"]

PLAN_VERSION = 2
_READABLE_VERSIONS = (1, 2)


@dataclass(frozen=True)
class GroupPlan:
    """The fate of one group: its key, size, member modules and the kept channel indices.

    ``renormalising``: the group's proof contract (:attr:`fxprune.Group.renormalising`): its
    rewrite changes the statistics of a LayerNorm/RMSNorm, so it is proven against the
    masked-norm reference, not the plain masked one. Written to JSON only when true.
    """

    key: str
    size: int
    keep: List[int]
    modules: List[str] = field(default_factory=list)
    renormalising: bool = False

    @property
    def pruned(self) -> bool:
        return len(self.keep) < self.size


@dataclass
class PruningPlan:
    """Which channels each group keeps, plus how they were chosen and for which model.

    ``criterion``: the importance name (a callable's ``__name__``). ``policy``: the allocation
    options and what a target search achieved (``achieved_macs`` / ``achieved_params`` as
    fractions of the original). ``model``: ``{"class": ..., "fingerprint": ...}``.
    ``rule_options``: the :data:`fxprune.rules.RULE_OPTIONS` the groups were found with, where
    not the default (written to JSON only when there are any).
    """

    groups: List[GroupPlan]
    criterion: str = "l1"
    policy: Dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION
    model: Dict[str, str] = field(default_factory=dict)
    rule_options: Dict[str, str] = field(default_factory=dict)

    def keep(self, key: str) -> Optional[List[int]]:
        for g in self.groups:
            if g.key == key:
                return g.keep
        return None

    def counts(self) -> Dict[str, int]:
        """Channels kept per group key."""
        return {g.key: len(g.keep) for g in self.groups}

    @property
    def pruned_groups(self) -> List[GroupPlan]:
        return [g for g in self.groups if g.pruned]

    @property
    def renormalising_groups(self) -> List[GroupPlan]:
        """The pruned groups whose rewrite renormalises (see :attr:`GroupPlan.renormalising`)."""
        return [g for g in self.pruned_groups if g.renormalising]

    def summary(self) -> str:
        """One line per pruned group: ``key: kept/size`` (``renormalising`` where it is)."""
        head = f"plan ({self.criterion}) for {self.model.get('class', '?')}: {len(self.pruned_groups)} of {len(self.groups)} groups pruned"
        return "\n".join([head] + [f"  {g.key}: {len(g.keep)}/{g.size}{' (renormalising)' if g.renormalising else ''}"
                                    for g in self.pruned_groups])

    def to_dict(self) -> Dict[str, Any]:
        """The plan as plain data (what :meth:`to_json` writes)."""
        data = asdict(self)
        for g in data["groups"]:
            if not g["renormalising"]:
                del g["renormalising"]  # exact groups: the record plans always had
        if not data["rule_options"]:
            del data["rule_options"]  # the default rules: the record plans always had
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: Union[str, bytes]) -> "PruningPlan":
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise TypeError(f"expected a JSON object, got {type(data).__name__}")
            if data.get("version") not in _READABLE_VERSIONS:
                raise PlanMismatchError(
                    f"plan version {data.get('version')!r} is not one this fxprune reads {_READABLE_VERSIONS}")
            groups = [GroupPlan(str(g["key"]), int(g["size"]), [int(i) for i in g["keep"]], [str(m) for m in g.get("modules", [])],
                                bool(g.get("renormalising", False)))
                      for g in data["groups"]]
            model = {str(k): str(v) for k, v in dict(data.get("model") or {}).items()}
            options = check_rule_options(data.get("rule_options") or {})
            return cls(groups, str(data.get("criterion", "")), dict(data.get("policy") or {}), PLAN_VERSION, model,
                       options)
        except (ValueError, KeyError, TypeError) as exc:
            raise FxPruneError(f"not a valid fxprune plan: {type(exc).__name__}: {exc}") from exc


def rules_for(plan: Any, rules: Optional[RuleTable] = None) -> Optional[RuleTable]:
    """The rule table to analyse a model with for ``plan``: ``rules`` with the plan's options.

    ``rules`` (default :data:`fxprune.rules.DEFAULT_RULES`) keeps its own rules; an option it
    does not set takes the plan's value, so a plan made with
    ``DEFAULT_RULES.with_options(attention="head_dim")`` applies without naming the table
    again. A table that sets an option to another value than the plan's is refused. Anything
    but a plan gets ``rules`` back unchanged (:func:`resolve` names that bad input).

    >>> plan = PruningPlan([], rule_options={"attention": "head_dim"})
    >>> rules_for(plan).option("attention")
    'head_dim'
    >>> rules_for(plan, DEFAULT_RULES.with_options(attention="head_dim")).option("attention")
    'head_dim'
    """
    if not isinstance(plan, PruningPlan):
        return rules
    table = DEFAULT_RULES if rules is None else rules
    if not isinstance(table, RuleTable):
        return table  # analyze names the bad input
    wanted: Dict[str, str] = {}
    asked = table.set_options()
    for name, values in RULE_OPTIONS.items():
        mine, theirs = table.option(name), plan.rule_options.get(name, values[0])
        if mine != theirs and name in asked:
            raise PlanMismatchError(
                f"the plan was made with rule option {name}={theirs!r}, the rules given set {name}={mine!r}. "
                f"Hint: apply the plan with the rules it was made with (or with rules=None)")
        if mine != theirs:
            wanted[name] = theirs
    return table.with_options(**wanted) if wanted else table


def _members(group: Group) -> List[str]:
    return sorted({m.module for m in group.members})


def fingerprint(analysis: Analysis) -> str:
    """A stable hash of the model's group structure: group keys, sizes and (module, role) members.

    Independent of weights, of ``ignore``/frozen state and of whether example inputs were
    given, so a plan made on one copy of an architecture fits every other copy.
    """
    items = [[g.key, g.size, sorted({f"{m.module}:{m.role}" for m in g.members})] for g in analysis.groups]
    return hashlib.sha256(json.dumps(items, separators=(",", ":")).encode()).hexdigest()[:16]


def model_identity(analysis: Analysis) -> Dict[str, str]:
    return {"class": analysis.gm.__class__.__name__, "fingerprint": fingerprint(analysis)}


def make_plan(analysis: Analysis, ratio: Any = None, importance: Union[str, Criterion, Callable[..., Any]] = "l1", *,
              policy: Optional[Policy] = None, options: Optional[ScoringOptions] = None,
              cost: Optional[CostModel] = None, measure: Optional[Measure] = None,
              base: Optional[Mapping[str, Optional[int]]] = None,
              scores: Optional[Dict[int, torch.Tensor]] = None,
              keep_counts: Optional[Mapping[str, int]] = None) -> PruningPlan:
    """Score the prunable groups, allocate keep counts (:mod:`fxprune.allocation`), keep the best.

    ``make_plan(analysis, 0.3)`` is the classic recipe; ``policy`` gives every other
    allocation option, ``options`` the calibration data for data-driven criteria, ``cost`` the
    cost model a target search needs. ``keep_counts`` (group key -> count) overrides the
    allocation for the groups it names (used by iterative pruning). ``scores`` is a cache by
    group index, filled as groups are scored (pass the same dict to plan again without
    re-running a data-driven criterion).
    """
    if policy is None:
        policy = Policy(ratio=ratio)
    elif ratio is not None:
        raise InternalError("give ratio inside the policy")
    policy = policy.validated()
    options = options or ScoringOptions()
    prunable = [g for g in analysis.groups if g.prunable]
    scores = {} if scores is None else scores

    if keep_counts is not None:
        counts = {g.index: group_count(g, int(keep_counts.get(g.key, g.size))) for g in prunable}
        info: Dict[str, Any] = {"keep_counts": dict(keep_counts)}
    elif policy.global_ranking and prunable and not (policy.ratio == 0.0 and not policy.has_target):
        missing = [g for g in prunable if g.index not in scores]
        if missing:
            scores.update(score_groups(analysis, importance, missing, options))
        counts, info = allocate(analysis, policy, scores, cost, measure, base)
    else:
        counts, info = allocate(analysis, policy, None, cost, measure, base)

    need = [g for g in prunable if counts.get(g.index, g.size) < g.size and g.index not in scores]
    if need:
        scores.update(score_groups(analysis, importance, need, options))

    out: List[GroupPlan] = []
    for group in analysis.groups:
        n = counts.get(group.index, group.size) if group.prunable else group.size
        keep = list(range(group.size)) if n >= group.size else select_channels(group, scores[group.index], n)
        out.append(GroupPlan(group.key, group.size, keep, _members(group), group.renormalising))
    record = policy.to_dict()
    record.update(info)
    if criterion_name(importance) == "random":
        record["seed"] = options.seed
    if options.calibration is not None:
        record["calibration_batches"] = options.calibration_batches
        if options.loss_fn is not None:
            record["loss_fn"] = criterion_name(options.loss_fn)
    return PruningPlan(out, criterion_name(importance), record, PLAN_VERSION, model_identity(analysis),
                       analysis.rules.changed_options())


def _context(analysis: Analysis, plan: PruningPlan) -> str:
    """Which model the plan was made for, when that differs from this one."""
    made_for = plan.model.get("class")
    here = analysis.gm.__class__.__name__
    if made_for and made_for != here:
        return f" (the plan was made for a {made_for}, this model is a {here})"
    return ""


def resolve(analysis: Analysis, plan: PruningPlan) -> Dict[int, List[int]]:
    """Kept indices by group index, checking the plan fits the analysed model.

    Raises :class:`PlanMismatchError` naming the first mismatch: a group of the model the
    plan lacks, a size or membership that differs, invalid kept indices, pruning a frozen
    group, pruning a group under another proof contract than the analysis gives it (the plan's
    ``renormalising`` flag differs: plan and apply always agree on which rewrites are exact),
    groups the model does not have, or a structure fingerprint that differs.
    """
    if not isinstance(plan, PruningPlan):
        raise FxPruneError(f"expected a fxprune.PruningPlan, got {type(plan).__name__}")
    keys = [g.key for g in analysis.groups]
    if len(set(keys)) != len(keys):
        raise InternalError(f"the analysis gave two groups the same key: {sorted({k for k in keys if keys.count(k) > 1})[:5]}")
    by_key = {g.key: g for g in plan.groups}
    if len(by_key) != len(plan.groups):
        twice = sorted({g.key for g in plan.groups if [h.key for h in plan.groups].count(g.key) > 1})
        raise PlanMismatchError(f"the plan lists group {twice[0]} more than once (each group has one entry); "
                                f"duplicated: {twice[:5]}")
    where = _context(analysis, plan)
    made, here = plan.rule_options, analysis.rules.changed_options()
    if made != here:
        # The groups themselves differ (whole heads or head dims): name the cause, not a size.
        show = lambda o: ", ".join(f"{k}={v!r}" for k, v in sorted(o.items())) or "the defaults"  # noqa: E731
        raise PlanMismatchError(
            f"the plan was made with rule options {show(made)}, this model was analysed with {show(here)}{where}. "
            "Hint: apply the plan with rules=None or the rules it was made with (fxprune.planning.rules_for)")
    same_structure = bool(plan.model.get("fingerprint")) and plan.model.get("fingerprint") == fingerprint(analysis)
    kept: Dict[int, List[int]] = {}
    for group in analysis.groups:
        entry = by_key.pop(group.key, None)
        if entry is None:
            raise PlanMismatchError(f"the plan has no entry for group {group.key} ({group.size} channels) of this model{where}")
        if entry.size != group.size:
            raise PlanMismatchError(f"group {group.key}: plan says {entry.size} channels, the model has {group.size}{where}")
        if not same_structure and entry.modules:
            mine = _members(group)
            if entry.modules != mine:
                missing = sorted(set(mine) - set(entry.modules))
                extra = sorted(set(entry.modules) - set(mine))
                raise PlanMismatchError(
                    f"group {group.key}: its modules differ from the plan's (in the model only: {missing[:5]}; "
                    f"in the plan only: {extra[:5]}){where}")
        if not entry.keep or len(set(entry.keep)) != len(entry.keep) or min(entry.keep) < 0 or max(entry.keep) >= group.size:
            raise PlanMismatchError(f"group {group.key}: kept indices must be distinct and in [0, {group.size})")
        if group.frozen and len(entry.keep) != group.size:
            raise PlanMismatchError(f"group {group.key} cannot be pruned ({'; '.join(group.reasons)})")
        if entry.renormalising != group.renormalising and len(entry.keep) != group.size:
            # The plan was decided under another proof contract than this analysis gives (other
            # rule tables, an edited plan): the rewrite would not be what the plan promises.
            # A group the plan keeps whole is the same function under either contract.
            said, has = (("renormalising", "exact") if entry.renormalising else ("exact", "renormalising"))
            raise PlanMismatchError(
                f"group {group.key}: the plan prunes it as {said}, but in this model it is {has} "
                f"({', '.join(group.norms) or 'no LayerNorm/RMSNorm normalises over it'}){where}. Hint: apply the "
                "plan with the rules= and allow_renormalising= it was made with")
        kept[group.index] = sorted(entry.keep)
    if by_key:
        raise PlanMismatchError(f"the plan names groups this model does not have: {sorted(by_key)[:5]}{where}")
    if plan.model.get("fingerprint") and not same_structure:
        raise PlanMismatchError(
            f"the plan's groups match by name and size but are wired differently (structure fingerprint "
            f"{plan.model['fingerprint']} in the plan, {fingerprint(analysis)} in this model){where}")
    return kept
