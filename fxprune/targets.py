"""Pruning targets as small objects: what to reach, with its parameters, recorded in the plan.

``fxprune.prune(model, 0.5)`` and ``fxprune.prune(model, target_macs=0.5, ...)`` spell a target
as keywords; the same targets are objects here, passed where the ratio goes::

    fxprune.prune(model, Ratio(0.5))
    fxprune.prune(model, MACs(0.25), example_inputs=(x,))
    fxprune.prune(model, Latency(0.5, batch_size=32), example_inputs=(x,))

Each knows the keywords it stands for (:meth:`keywords`, so one code path serves both
spellings) and writes itself as versioned plain data (:meth:`to_dict`, read back by
:func:`target_from_dict`); every plan records the target it was made for in
``plan.policy["target"]``, however it was given.

>>> from fxprune.targets import MACs, Ratio, target_from_dict
>>> MACs(0.25).to_dict()
{'version': 1, 'kind': 'macs', 'fraction': 0.25, 'global_ranking': False}
>>> target_from_dict(Ratio({"layer4.*": 0.7}).to_dict())
Ratio(value={'layer4.*': 0.7}, global_ranking=False)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import functools
import inspect
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, TypeVar, Union

from .criteria import CRITERION_KEYWORDS, CriterionSpec, criterion_record
from .errors import FxPruneError
from .planning import PruningPlan

__all__ = ["TARGET_VERSION", "Target", "Ratio", "Budget", "MACs", "Params", "Latency", "target_from_dict",
           "target_from_keywords", "TARGET_KEYWORDS", "accepts_objects", "record_spec"]

#: The version of :meth:`Target.to_dict`'s format (readers refuse others).
TARGET_VERSION = 1

#: The keywords of fxprune.prune a target object stands for, with their defaults: a target
#: object and any of these given as well is one target given twice.
TARGET_KEYWORDS: Dict[str, Any] = {"target_macs": None, "target_params": None, "target_latency": None,
                                   "target_latency_ms": None, "global_ranking": False}


def _fraction(value: Any, what: str, *, whole: bool = False) -> float:
    """A fraction in (0, 1); ``whole``: 1 allowed too (a budget of the whole model keeps everything)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not (0.0 < float(value) <= 1.0 if whole else 0.0 < float(value) < 1.0):
        raise FxPruneError(f"{what} must be a fraction in (0, 1{']' if whole else ')'}, got {value!r}")
    return float(value)


class Target:
    """Base of the target objects: :meth:`keywords` and :meth:`to_dict`."""

    kind: ClassVar[str] = ""

    def keywords(self) -> Dict[str, Any]:
        """The keyword arguments of :func:`fxprune.prune` this target stands for."""
        raise NotImplementedError

    def to_dict(self) -> Dict[str, Any]:
        """Versioned plain data (JSON-ready); :func:`target_from_dict` reads it back."""
        raise NotImplementedError


@dataclass(frozen=True)
class Ratio(Target):
    """Remove ``value`` of the channels of every prunable group (a dict: per module glob pattern).

    ``global_ranking=True`` ranks all groups' channels against one another instead, removing
    ``value`` of the prunable channels overall (a float only).
    """

    value: Union[float, Mapping[str, float]]
    global_ranking: bool = False
    kind: ClassVar[str] = "ratio"

    def __post_init__(self) -> None:
        if isinstance(self.value, Mapping):
            object.__setattr__(self, "value", dict(self.value))
        if not isinstance(self.global_ranking, bool):
            raise FxPruneError(f"Ratio(global_ranking=) must be True or False, got {self.global_ranking!r}")

    def keywords(self) -> Dict[str, Any]:
        value = dict(self.value) if isinstance(self.value, Mapping) else self.value
        return {"ratio": value, "global_ranking": self.global_ranking}

    def to_dict(self) -> Dict[str, Any]:
        value = dict(self.value) if isinstance(self.value, Mapping) else self.value
        return {"version": TARGET_VERSION, "kind": self.kind, "value": value, "global_ranking": self.global_ranking}


@dataclass(frozen=True)
class Budget(Target):
    """A cost budget: keep at most ``fraction`` of a measure (:class:`MACs`, :class:`Params`).

    ``global_ranking=True``: reach it by ranking all groups' channels against one another.
    """

    fraction: float
    global_ranking: bool = False
    keyword: ClassVar[str] = ""  # the fxprune.prune keyword it stands for

    def __post_init__(self) -> None:
        name = type(self).__name__
        object.__setattr__(self, "fraction", _fraction(self.fraction, f"{name}(fraction)", whole=True))
        if not isinstance(self.global_ranking, bool):
            raise FxPruneError(f"{name}(global_ranking=) must be True or False, got {self.global_ranking!r}")

    def keywords(self) -> Dict[str, Any]:
        return {self.keyword: self.fraction, "global_ranking": self.global_ranking}

    def to_dict(self) -> Dict[str, Any]:
        return {"version": TARGET_VERSION, "kind": self.kind, "fraction": self.fraction,
                "global_ranking": self.global_ranking}


@dataclass(frozen=True)
class MACs(Budget):
    """Keep at most ``fraction`` of the model's multiply-accumulates (needs ``example_inputs``)."""

    kind: ClassVar[str] = "macs"
    keyword: ClassVar[str] = "target_macs"


@dataclass(frozen=True)
class Params(Budget):
    """Keep at most ``fraction`` of the model's parameters."""

    kind: ClassVar[str] = "params"
    keyword: ClassVar[str] = "target_params"


@dataclass(frozen=True)
class Latency(Target):
    """Measured latency on ``device`` at ``batch_size`` in ``mode``: a ``fraction`` of the original's, or ``ms``.

    Give exactly one of ``fraction`` and ``ms``. The search, its measurements and the
    ``LatencyOptions`` that tune them are :mod:`fxprune.latency_model`'s.
    """

    fraction: Optional[float] = None
    ms: Optional[float] = None
    device: str = "cpu"
    batch_size: int = 1
    mode: str = "eager"
    kind: ClassVar[str] = "latency"

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.ms is None):
            raise FxPruneError("Latency() takes one of fraction= (of the original's measured latency) or ms=")
        if self.fraction is not None:
            object.__setattr__(self, "fraction", _fraction(self.fraction, "Latency(fraction)"))
        elif isinstance(self.ms, bool) or not isinstance(self.ms, (int, float)) or not self.ms > 0:
            raise FxPruneError(f"Latency(ms=) must be a positive number of milliseconds, got {self.ms!r}")
        if self.mode not in ("eager", "compiled"):
            raise FxPruneError(f"Latency(mode=) is 'eager' or 'compiled', got {self.mode!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise FxPruneError(f"Latency(batch_size=) must be a positive integer, got {self.batch_size!r}")

    def keywords(self) -> Dict[str, Any]:
        return {"target_latency": self.fraction, "target_latency_ms": self.ms, "device": self.device,
                "batch_size": self.batch_size, "latency_mode": self.mode}

    def to_dict(self) -> Dict[str, Any]:
        return {"version": TARGET_VERSION, "kind": self.kind, "fraction": self.fraction, "ms": self.ms,
                "device": str(self.device), "batch_size": self.batch_size, "mode": self.mode}


_KINDS = {cls.kind: cls for cls in (Ratio, MACs, Params, Latency)}


def target_from_dict(data: Mapping[str, Any]) -> Target:
    """The target :meth:`Target.to_dict` wrote (a plan's ``policy["target"]``)."""
    if not isinstance(data, Mapping) or data.get("version") != TARGET_VERSION or data.get("kind") not in _KINDS:
        raise FxPruneError(f"not a fxprune target of version {TARGET_VERSION}: {data!r}")
    fields = {k: v for k, v in data.items() if k not in ("version", "kind")}
    try:
        return _KINDS[data["kind"]](**fields)
    except TypeError as exc:
        raise FxPruneError(f"not a valid {data['kind']} target: {exc}") from exc


def target_from_keywords(ratio: Any = None, *, target_macs: Optional[float] = None,
                         target_params: Optional[float] = None, global_ranking: bool = False,
                         target_latency: Optional[float] = None, target_latency_ms: Optional[float] = None,
                         device: Any = "cpu", batch_size: Optional[int] = 1, latency_mode: str = "eager",
                         **_: Any) -> Optional[Target]:
    """The target object keywords spell (None where they spell none, or several: the planner says why).

    A ratio beside a budget is the planner's error to report; here it is simply not one target.
    """
    given = [t for t in (ratio is not None, target_macs is not None, target_params is not None,
                         target_latency is not None or target_latency_ms is not None) if t]
    if len(given) != 1:
        return None
    if target_latency is not None or target_latency_ms is not None:
        return Latency(target_latency, target_latency_ms, str(device), batch_size or 1, latency_mode)
    if target_macs is not None:
        return MACs(target_macs, global_ranking)
    if target_params is not None:
        return Params(target_params, global_ranking)
    return Ratio(ratio, global_ranking)


F = TypeVar("F", bound=Callable[..., Any])


def accepts_objects(fn: F) -> F:
    """Let ``fn`` (fxprune.prune, plan, prune_iteratively) take a :class:`Target` where the ratio
    goes and a :class:`fxprune.criteria.CriterionSpec` as ``importance``: each is expanded into the
    keywords it stands for before ``fn`` runs, so both spellings take one code path. Giving an
    object *and* one of the keywords it stands for is an error (one target, one criterion).
    """
    signature = inspect.signature(fn)
    defaults = {k: p.default for k, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        arguments = bound.arguments
        target = arguments.get("ratio")
        if isinstance(target, Target):
            _refuse_twice(arguments, TARGET_KEYWORDS, f"the target {target!r}")  # targets are small: shown whole
            keywords = target.keywords()
            unknown = set(keywords) - set(signature.parameters)
            if unknown:
                raise FxPruneError(f"{fn.__name__}() does not take a {type(target).__name__} target "
                                   f"(it has no {sorted(unknown)[0]}=)")
            arguments["ratio"] = keywords.pop("ratio", None)
            arguments.update(keywords)
        criterion = arguments.get("importance")
        if isinstance(criterion, CriterionSpec):
            _refuse_twice(arguments, CRITERION_KEYWORDS, f"the criterion {type(criterion).__name__}")
            arguments.update(criterion.keywords())
        result = fn(*bound.args, **bound.kwargs)
        plan = result if isinstance(result, PruningPlan) else getattr(result, "meta", {}).get("fxprune_plan")
        if isinstance(plan, PruningPlan):
            record_spec(plan.policy, {**defaults, **arguments})
        return result

    return wrapper  # type: ignore[return-value]


def _refuse_twice(arguments: Mapping[str, Any], keywords: Mapping[str, Any], what: str) -> None:
    for name, default in keywords.items():
        if name not in arguments:
            continue
        value = arguments[name]
        if value is default or (type(value) is type(default) and isinstance(value, (bool, int)) and value == default):
            continue
        shown = repr(value) if isinstance(value, (bool, int, float, str)) else f"<{type(value).__name__}>"
        raise FxPruneError(f"{what} and {name}={shown} both given: the object carries its own "
                           f"parameters; drop {name}= (or spell everything as keywords)")


def record_spec(policy: Dict[str, Any], keywords: Mapping[str, Any]) -> None:
    """Write the target and criterion ``keywords`` spell into a plan's ``policy`` (as versioned plain data).

    ``keywords``: fxprune.prune's arguments after :func:`accepts_objects` expanded any objects.
    """
    target = target_from_keywords(**{k: v for k, v in keywords.items() if k != "importance"})
    if target is not None:
        policy["target"] = target.to_dict()
    policy["criterion"] = criterion_record(keywords.get("importance", "l1"), keywords)
