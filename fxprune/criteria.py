"""Importance criteria as small objects: a criterion with its parameters and data, recorded in the plan.

``importance="taylor", calibration=loader, calibration_batches=8, loss_fn=f`` threads one
criterion's parameters through four keywords of every entry point; the object carries them::

    fxprune.prune(model, 0.5, importance=Taylor(loader, batches=8))
    fxprune.prune(model, 0.5, importance=Random(seed=3))

Each knows the keywords it stands for (:meth:`CriterionSpec.keywords`: one code path serves both
spellings), and every plan records the criterion it was made with in
``plan.policy["criterion"]`` as versioned plain data (:meth:`CriterionSpec.to_dict`; the data
itself is not recorded, only how much of it was used).

>>> from fxprune.criteria import L2, Taylor, criterion_from_dict
>>> L2().to_dict()
{'version': 1, 'name': 'l2'}
>>> Taylor([], batches=4).to_dict()
{'version': 1, 'name': 'taylor', 'batches': 4, 'loss_fn': None, 'calibration': 'given'}
>>> criterion_from_dict({'version': 1, 'name': 'fpgm'})
FPGM()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, Iterable, Mapping, Optional

from .errors import FxPruneError

__all__ = ["CRITERION_VERSION", "CriterionSpec", "L1", "L2", "FPGM", "BN", "Random", "APoZ", "Taylor",
           "criterion_from_dict", "CRITERION_KEYWORDS", "criterion_record"]

#: The version of :meth:`CriterionSpec.to_dict`'s format.
CRITERION_VERSION = 1

#: The keywords of fxprune.prune a criterion object stands for, with their defaults: an object
#: and any of these given as well is one criterion's parameters given twice.
CRITERION_KEYWORDS: Dict[str, Any] = {"calibration": None, "calibration_batches": None, "loss_fn": None, "seed": 0}


class CriterionSpec:
    """Base of the criterion objects: ``name`` (the registered criterion), :meth:`keywords`, :meth:`to_dict`."""

    name: ClassVar[str] = ""

    def keywords(self) -> Dict[str, Any]:
        """The keyword arguments of :func:`fxprune.prune` this criterion stands for."""
        return {"importance": self.name}

    def to_dict(self) -> Dict[str, Any]:
        """Versioned plain data; data sets are recorded as given or not, never stored."""
        return {"version": CRITERION_VERSION, "name": self.name}


@dataclass(frozen=True)
class L1(CriterionSpec):
    """The L1 norm of each channel's weights across its group (the default)."""

    name: ClassVar[str] = "l1"


@dataclass(frozen=True)
class L2(CriterionSpec):
    """The L2 norm of each channel's weights across its group."""

    name: ClassVar[str] = "l2"


@dataclass(frozen=True)
class FPGM(CriterionSpec):
    """Distance to the geometric median of the group's channels (redundant channels score low)."""

    name: ClassVar[str] = "fpgm"


@dataclass(frozen=True)
class BN(CriterionSpec):
    """The magnitude of the BatchNorm scale of each channel."""

    name: ClassVar[str] = "bn"


@dataclass(frozen=True)
class Random(CriterionSpec):
    """Random scores from ``seed`` (a control, not a recipe)."""

    seed: int = 0
    name: ClassVar[str] = "random"

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise FxPruneError(f"Random(seed=) must be an integer, got {self.seed!r}")

    def keywords(self) -> Dict[str, Any]:
        return {"importance": self.name, "seed": self.seed}

    def to_dict(self) -> Dict[str, Any]:
        return {"version": CRITERION_VERSION, "name": self.name, "seed": self.seed}


def _given(data: Any) -> Optional[str]:
    """How a record names calibration data: never the data itself, only whether there was any."""
    return None if data is None else "given"


def _batches(value: Any, what: str) -> Optional[int]:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise FxPruneError(f"{what}(batches=) must be a positive integer or None (all), got {value!r}")
    return value


@dataclass(frozen=True)
class APoZ(CriterionSpec):
    """Average percentage of zeros after each channel's activation on ``calibration`` batches."""

    calibration: Iterable[Any] = field(repr=False)
    batches: Optional[int] = None
    name: ClassVar[str] = "apoz"

    def __post_init__(self) -> None:
        _batches(self.batches, "APoZ")

    def keywords(self) -> Dict[str, Any]:
        return {"importance": self.name, "calibration": self.calibration, "calibration_batches": self.batches}

    def to_dict(self) -> Dict[str, Any]:
        return {"version": CRITERION_VERSION, "name": self.name, "batches": self.batches,
                "calibration": _given(self.calibration)}


@dataclass(frozen=True)
class Taylor(CriterionSpec):
    """First-order Taylor importance (|weight x gradient|) on ``calibration`` batches, ``loss_fn`` (default cross-entropy)."""

    calibration: Iterable[Any] = field(repr=False)
    batches: Optional[int] = None
    loss_fn: Optional[Callable[..., Any]] = None
    name: ClassVar[str] = "taylor"

    def __post_init__(self) -> None:
        _batches(self.batches, "Taylor")
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise FxPruneError(f"Taylor(loss_fn=) must be callable (output, targets) -> loss, got {self.loss_fn!r}")

    def keywords(self) -> Dict[str, Any]:
        return {"importance": self.name, "calibration": self.calibration, "calibration_batches": self.batches,
                "loss_fn": self.loss_fn}

    def to_dict(self) -> Dict[str, Any]:
        loss = None if self.loss_fn is None else getattr(self.loss_fn, "__qualname__", type(self.loss_fn).__name__)
        return {"version": CRITERION_VERSION, "name": self.name, "batches": self.batches, "loss_fn": loss,
                "calibration": _given(self.calibration)}


_PLAIN = {cls.name: cls for cls in (L1, L2, FPGM, BN)}


def criterion_from_dict(data: Mapping[str, Any]) -> CriterionSpec:
    """The criterion :meth:`CriterionSpec.to_dict` wrote, for those that need no data (L1, L2, FPGM, BN, Random).

    A data-driven criterion's record says how it was run; its data is the caller's to give again.
    """
    if not isinstance(data, Mapping) or data.get("version") != CRITERION_VERSION:
        raise FxPruneError(f"not a fxprune criterion of version {CRITERION_VERSION}: {data!r}")
    name = data.get("name")
    if name in _PLAIN:
        return _PLAIN[name]()
    if name == Random.name:
        return Random(int(data.get("seed", 0)))
    if name in (APoZ.name, Taylor.name):
        raise FxPruneError(f"criterion {name!r} needs calibration data: build it with its class and your data "
                           f"(fxprune.criteria.{'APoZ' if name == APoZ.name else 'Taylor'}(loader, batches=...))")
    raise FxPruneError(f"criterion {name!r} is not one fxprune ships as an object (a registered name or callable "
                       "is recorded by name only)")


def criterion_record(importance: Any, keywords: Mapping[str, Any]) -> Dict[str, Any]:
    """What a plan records of ``importance`` given as an object, a name (with its ``keywords``) or a callable.

    A shipped criterion's name is recorded as the object those keywords make would record itself.
    """
    if isinstance(importance, CriterionSpec):
        return importance.to_dict()
    if isinstance(importance, str):
        if importance in _PLAIN:
            return _PLAIN[importance]().to_dict()
        if importance == Random.name:
            return Random(int(keywords.get("seed", 0) or 0)).to_dict()
        if importance == APoZ.name:
            return APoZ(keywords.get("calibration"), keywords.get("calibration_batches")).to_dict()
        if importance == Taylor.name:
            return Taylor(keywords.get("calibration"), keywords.get("calibration_batches"),
                          keywords.get("loss_fn")).to_dict()
        return {"version": CRITERION_VERSION, "name": importance, "registered": True}
    name = getattr(importance, "__qualname__", None) or type(importance).__name__
    return {"version": CRITERION_VERSION, "name": name, "callable": True}
