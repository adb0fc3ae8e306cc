"""Declarative model specs: how to rebuild an architecture from plain JSON, never from code.

An artifact (:mod:`fxprune.artifact`) records the spec of the model it was pruned from, so
:func:`fxprune.load` can rebuild that architecture with no ``model=``. A spec is::

    {"constructor": "torchvision:resnet18",            # family:name, from an allow-list
     "kwargs": {"num_classes": 10},                    # plain JSON, typed and bounded per family
     "adapt": {"in_channels": 1, "small_image_stem": true}}   # optional, fxprune's own adaptations

- ``constructor``: ``torchvision:<name>`` for a name in ``torchvision.models.list_models()``
  (built with ``weights=None``) or ``timm:<name>`` for a name in ``timm.list_models()`` when
  timm is importable (``timm.create_model(name, pretrained=False, ...)``). Nothing else: a
  ``package.module:callable`` is not a constructor a spec may name, because a file must never
  choose code to import. The families are the entries of :data:`CONSTRUCTORS`.
- ``kwargs``: only the keywords the family declares (``num_classes``; timm also ``in_chans``),
  each an integer within bounds (:data:`MAX_CLASSES`, :data:`MAX_CHANNELS`).
- ``adapt``: the adaptations ``fxprune run`` applies to fit a model to its data (see
  :func:`fxprune.workflow.models.build_model`), applied after construction in this order:
  ``in_channels`` rebuilds the first convolution (:func:`adapt_input_channels`),
  ``small_image_stem`` swaps a ResNet's 7x7 stem convolution for a 3x3 one
  (:func:`adapt_small_image_stem`). They live here, in the core, so that the workflow and a
  later :func:`fxprune.load` build exactly the same architecture.

:meth:`ModelSpec.from_dict` validates a parsed spec completely (schema, types, bounds, the
name's syntax) without importing anything; :meth:`ModelSpec.check_allowed` then checks the
name against the family's list (importing torchvision or timm, nothing named by the spec).

>>> spec = ModelSpec("torchvision:resnet18", {"num_classes": 10}, {"in_channels": 1, "small_image_stem": True})
>>> model = spec.build()
>>> model.conv1, model.fc.out_features
(Conv2d(1, 64, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), bias=False), 10)
>>> ModelSpec.from_dict(spec.to_dict()) == spec
True
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch.nn as nn

from .errors import FxPruneError

__all__ = ["ModelSpec", "ModelSpecError", "ConstructorFamily", "ConstructorRegistry", "CONSTRUCTORS",
           "MAX_CLASSES", "MAX_CHANNELS", "adapt_input_channels", "adapt_small_image_stem", "has_resnet_stem",
           "timm_available"]

#: Largest ``num_classes`` a spec may ask for (a 100k-class head is far beyond any real
#: classifier; the bound keeps a forged spec from sizing a huge layer).
MAX_CLASSES = 100_000
#: Largest input channel count (``in_chans``, ``adapt.in_channels``).
MAX_CHANNELS = 1024
# A constructor's name: a plain identifier-like word, never a dotted path or a callable.
_NAME = re.compile(r"[A-Za-z0-9_]{1,100}")
_MAX_CONSTRUCTOR_CHARS = 120


class ModelSpecError(FxPruneError):
    """A model spec that is malformed, not allowed, or cannot be built: the message says which part."""


# =========================================================================== adaptations


def adapt_input_channels(model: nn.Module, in_channels: int) -> nn.Module:
    """Rebuild the first ``Conv2d`` of ``model`` (in module order) to take ``in_channels`` channels, in place."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels != in_channels:
                    if child.groups != 1:
                        raise ModelSpecError(f"cannot adapt the grouped first convolution {child_name} to "
                                             f"{in_channels} input channels")
                    setattr(parent, child_name, nn.Conv2d(
                        in_channels, child.out_channels, child.kernel_size, child.stride,
                        child.padding, child.dilation, 1, child.bias is not None,
                        child.padding_mode))
                return model
    raise ModelSpecError(f"{type(model).__name__} has no Conv2d whose input channels can be adapted")


def has_resnet_stem(model: nn.Module) -> bool:
    """Whether ``model`` has the ResNet stem :func:`adapt_small_image_stem` swaps (torchvision's and timm's)."""
    return isinstance(getattr(model, "conv1", None), nn.Conv2d) and hasattr(model, "maxpool") \
        and hasattr(model, "layer1")


def adapt_small_image_stem(model: nn.Module) -> nn.Module:
    """Swap a ResNet's 7x7 stride-2 ``conv1`` for a 3x3 stride-2 one (in place); others unchanged.

    A 7x7 kernel spans a quarter of a 28x28 image; the stride-2 max-pool stays. See
    :func:`fxprune.workflow.models.adapt_stem` for why this stem and not a stride-1 one.
    """
    if has_resnet_stem(model):
        conv1 = model.conv1
        model.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, kernel_size=3, stride=2,
                                padding=1, bias=conv1.bias is not None)
    return model


# =========================================================================== families


def timm_available() -> bool:
    """Whether timm can be imported (the ``timm:`` family exists only then)."""
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def _torchvision_names() -> List[str]:
    import torchvision.models as tvm

    return list(tvm.list_models())


def _build_torchvision(name: str, kwargs: Mapping[str, Any]) -> nn.Module:
    import torchvision.models as tvm

    builder = tvm.get_model_builder(name)
    args: Dict[str, Any] = {"weights": None, **kwargs}
    if "weights_backbone" in inspect.signature(builder).parameters:
        args["weights_backbone"] = None  # detection/segmentation builders would download ImageNet weights
    return builder(**args)


def _timm_names() -> List[str]:
    if not timm_available():
        return []
    import timm

    return list(timm.list_models())


def _build_timm(name: str, kwargs: Mapping[str, Any]) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, **kwargs)


@dataclass(frozen=True)
class ConstructorFamily:
    """One allowed ``family:`` of constructors.

    ``kwargs``: keyword -> (low, high) integer bounds, the only arguments a spec may pass;
    ``names``: the allowed names (called only when a spec is checked); ``build(name, kwargs)``.
    """

    name: str
    kwargs: Mapping[str, Tuple[int, int]]
    names: Callable[[], List[str]]
    build: Callable[[str, Mapping[str, Any]], nn.Module]
    requires: Optional[str] = None  # the package the family needs, for messages


class ConstructorRegistry:
    """The constructor families a spec may name (default instance: :data:`CONSTRUCTORS`)."""

    def __init__(self) -> None:
        self._families: Dict[str, ConstructorFamily] = {}

    def register(self, family: ConstructorFamily) -> None:
        """Add (or replace) a family; code registers families, a file never does."""
        if not _NAME.fullmatch(family.name):
            raise ValueError(f"family name {family.name!r} must be a plain word")
        self._families[family.name] = family

    def get(self, name: str) -> Optional[ConstructorFamily]:
        return self._families.get(name)

    def names(self) -> List[str]:
        return sorted(self._families)


#: The default registry: ``torchvision`` and ``timm``.
CONSTRUCTORS = ConstructorRegistry()
CONSTRUCTORS.register(ConstructorFamily("torchvision", {"num_classes": (1, MAX_CLASSES)}, _torchvision_names,
                                        _build_torchvision, "torchvision"))
CONSTRUCTORS.register(ConstructorFamily("timm", {"num_classes": (0, MAX_CLASSES), "in_chans": (1, MAX_CHANNELS)},
                                        _timm_names, _build_timm, "timm"))

#: The adaptations a spec's ``adapt`` may ask for: key -> JSON type and bounds.
_ADAPT_KEYS: Dict[str, Any] = {"in_channels": (1, MAX_CHANNELS), "small_image_stem": bool}


# =========================================================================== the spec


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return repr(value[:60])
    if isinstance(value, (bool, int, float)) or value is None:
        text = repr(value)
        return text if len(text) <= 24 else text[:24] + "..."
    return f"a {type(value).__name__}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ModelSpec:
    """A constructor from the allow-list and its JSON arguments (see the module docs)."""

    constructor: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    adapt: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Validate (and copy) what code builds as strictly as what a file holds.
        checked = ModelSpec._checked(self.constructor, self.kwargs, self.adapt)
        object.__setattr__(self, "kwargs", checked[1])
        object.__setattr__(self, "adapt", checked[2])

    @property
    def family(self) -> str:
        return self.constructor.partition(":")[0]

    @property
    def name(self) -> str:
        return self.constructor.partition(":")[2]

    @staticmethod
    def _checked(constructor: Any, kwargs: Any, adapt: Any, registry: Optional[ConstructorRegistry] = None
                 ) -> Tuple[str, Dict[str, Any], Dict[str, Any]]:
        registry = registry or CONSTRUCTORS
        if not isinstance(constructor, str) or len(constructor) > _MAX_CONSTRUCTOR_CHARS:
            raise ModelSpecError(f"constructor must be a string 'family:name' such as 'torchvision:resnet18', "
                                 f"got {_describe(constructor)}")
        family_name, colon, name = constructor.partition(":")
        family = registry.get(family_name) if colon else None
        if family is None:
            raise ModelSpecError(
                f"constructor {_describe(constructor)} is not one fxprune builds: it must be "
                f"{' or '.join(repr(f + ':<name>') for f in registry.names())} (a spec never names a "
                "package.module:callable; pass such a model yourself as model=)")
        if not _NAME.fullmatch(name):
            raise ModelSpecError(f"constructor {_describe(constructor)}: the name after '{family_name}:' must be a "
                                 "plain model name (letters, digits, underscores)")
        if not isinstance(kwargs, Mapping):
            raise ModelSpecError(f"kwargs must be an object, got {_describe(kwargs)}")
        out_kwargs: Dict[str, Any] = {}
        for key, value in kwargs.items():
            bounds = family.kwargs.get(key) if isinstance(key, str) else None
            if bounds is None:
                raise ModelSpecError(f"kwargs.{str(key)[:40]} is not an argument a {family_name}: spec may pass "
                                     f"(allowed: {', '.join(sorted(family.kwargs))})")
            low, high = bounds
            if not _is_int(value) or not low <= value <= high:
                raise ModelSpecError(f"kwargs.{key} must be an integer in [{low}, {high}], got {_describe(value)}")
            out_kwargs[key] = value
        if not isinstance(adapt, Mapping):
            raise ModelSpecError(f"adapt must be an object, got {_describe(adapt)}")
        out_adapt: Dict[str, Any] = {}
        for key, value in adapt.items():
            rule = _ADAPT_KEYS.get(key) if isinstance(key, str) else None
            if rule is None:
                raise ModelSpecError(f"adapt.{str(key)[:40]} is not an adaptation fxprune knows "
                                     f"(allowed: {', '.join(sorted(_ADAPT_KEYS))})")
            if rule is bool:
                if not isinstance(value, bool):
                    raise ModelSpecError(f"adapt.{key} must be true or false, got {_describe(value)}")
            elif not _is_int(value) or not rule[0] <= value <= rule[1]:
                raise ModelSpecError(f"adapt.{key} must be an integer in [{rule[0]}, {rule[1]}], "
                                     f"got {_describe(value)}")
            out_adapt[key] = value
        return constructor, out_kwargs, out_adapt

    @classmethod
    def from_dict(cls, data: Any) -> "ModelSpec":
        """A spec from parsed JSON, validated completely; imports nothing. Raises :class:`ModelSpecError`."""
        if not isinstance(data, Mapping):
            raise ModelSpecError(f"a model spec must be an object, got {_describe(data)}")
        unknown = sorted(set(data) - {"constructor", "kwargs", "adapt"})
        if unknown:
            raise ModelSpecError(f"unknown field {str(unknown[0])[:40]!r} (a spec has constructor, kwargs, adapt)")
        return cls(data.get("constructor"), data.get("kwargs", {}), data.get("adapt", {}))

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON data (:meth:`from_dict` reads it back)."""
        data: Dict[str, Any] = {"constructor": self.constructor, "kwargs": dict(self.kwargs)}
        if self.adapt:
            data["adapt"] = dict(self.adapt)
        return data

    def check_allowed(self, registry: Optional[ConstructorRegistry] = None) -> None:
        """Raise :class:`ModelSpecError` unless the name is in its family's list (the family's package is imported)."""
        family = (registry or CONSTRUCTORS).get(self.family)
        assert family is not None  # validated at construction
        names = family.names()
        if not names and family.requires:
            raise ModelSpecError(f"{self.constructor!r} needs {family.requires}, which is not installed. "
                                 f"Hint: pip install {family.requires}")
        if self.name not in names:
            raise ModelSpecError(f"{self.name!r} is not a {self.family} model name "
                                 f"({len(names)} are; e.g. {', '.join(names[:3])})")

    def build(self, registry: Optional[ConstructorRegistry] = None) -> nn.Module:
        """The architecture with fresh (random) weights: constructor, then the adaptations in order."""
        self.check_allowed(registry)
        family = (registry or CONSTRUCTORS).get(self.family)
        assert family is not None
        try:
            model = family.build(self.name, dict(self.kwargs))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ModelSpecError(f"building {self.constructor} with {dict(self.kwargs)} failed: {exc}") from exc
        if not isinstance(model, nn.Module):
            raise ModelSpecError(f"{self.constructor} returned a {type(model).__name__}, not an nn.Module")
        if "in_channels" in self.adapt:
            adapt_input_channels(model, self.adapt["in_channels"])
        if self.adapt.get("small_image_stem"):
            adapt_small_image_stem(model)
        return model

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in {**self.kwargs, **self.adapt}.items())
        return f"{self.constructor}({args})"
