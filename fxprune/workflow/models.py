"""Building the model to prune, and loading its weights.

``--model`` is a torchvision classification model name (``resnet18``), a timm model
(``timm:efficientnet_b0``, when timm is installed; built with ``pretrained=False``) or a
``package.module:callable`` returning an ``nn.Module`` (resolved with
:func:`pkgutil.resolve_name`; modules in the current directory are found). torchvision and
timm models are built for the data: ``num_classes`` from the data set, the first convolution
for its number of input channels (timm: ``in_chans``), and, for small images (Fashion-MNIST
28x28, CIFAR 32x32), a ResNet stem that keeps enough resolution (see :func:`adapt_stem`;
``adapt_small_images=False``, the CLI's ``--no-adapt``, keeps the ImageNet stem). The result
is described by a declarative :class:`fxprune.modelspec.ModelSpec` (:func:`model_spec`),
which every artifact records, so ``fxprune.load(path)`` rebuilds the same architecture.

A Hugging Face (or any other) model: write a factory that takes the keywords it needs and
returns the ``nn.Module``, e.g. in ``my_hf.py`` in the current directory::

    from transformers import AutoConfig, AutoModelForImageClassification

    def build(num_classes: int = 10):
        config = AutoConfig.from_pretrained("./my-local-checkpoint", num_labels=num_classes)
        return AutoModelForImageClassification.from_config(config)

and pass ``--model my_hf:build``. Only the keywords the factory's signature declares
(``num_classes``, ``in_channels``, ``image_size``) are passed, never through ``**kwargs``.
Such a model has no spec (a file never names code to import): load its artifact with
``fxprune.load(path, model=my_hf.build())``.

``--weights`` is a local file (a state_dict, a checkpoint dict holding one, or a
``.safetensors`` file) read with ``torch.load(weights_only=True)``, or a torchvision weights
name (``ResNet18_Weights.IMAGENET1K_V1``) whose file is already in the torch hub cache.
Nothing is downloaded unless ``download=True``.
"""

from __future__ import annotations

import inspect
import logging
import os
import pkgutil
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import nn

from fxprune.modelspec import ModelSpec, ModelSpecError, adapt_small_image_stem, has_resnet_stem, timm_available
from fxprune.workflow.errors import CheckpointError, ConfigError

__all__ = [
    "build_model",
    "model_spec",
    "check_model_name",
    "canonical_model_name",
    "resolve_callable",
    "torchvision_builder_name",
    "declared_keywords",
    "adapt_input_channels",
    "adapt_stem",
    "load_weights",
    "read_state_dict",
    "load_checkpoint_file",
    "resolve_torchvision_weights",
    "SMALL_IMAGE",
    "TIMM_PREFIX",
]

logger = logging.getLogger("fxprune.workflow")

# Below this input size the ImageNet stem (7x7 stride-2 conv + stride-2 max-pool) is adapted.
SMALL_IMAGE = 64
#: ``--model timm:<name>``: a timm model.
TIMM_PREFIX = "timm:"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _with_cwd_on_path() -> bool:
    """Put the current directory on ``sys.path`` (last) if it is not there; True if it was added.

    ``python -m fxprune`` has it, the ``fxprune`` console script does not (its sys.path[0] is
    the script's folder): ``--model my_models:build`` must find ``./my_models.py`` either way.
    Appended, not prepended, so a local file never shadows an installed package.
    """
    cwd = os.getcwd()
    if any(os.path.abspath(p or ".") == cwd for p in sys.path):
        return False
    sys.path.append(cwd)
    return True


def resolve_callable(name: str) -> Callable[..., nn.Module]:
    """The callable ``package.module:callable`` names (``pkgutil.resolve_name``), or a clear error.

    Modules in the current directory are found (see :func:`_with_cwd_on_path`).
    """
    module_name = name.partition(":")[0]
    _with_cwd_on_path()
    try:
        target = pkgutil.resolve_name(name)
    except ImportError as exc:
        raise ConfigError(f"--model {name!r}: cannot import module {module_name!r} ({_first_line(exc)})") from exc
    except (AttributeError, ValueError) as exc:
        raise ConfigError(f"--model {name!r} is not a package.module:callable that exists "
                          f"({type(exc).__name__}: {_first_line(exc)})") from exc
    if not callable(target):
        raise ConfigError(f"--model {name!r} is a {type(target).__name__}, not a callable returning an nn.Module")
    return target


def torchvision_builder_name(factory: Any) -> Optional[str]:
    """The torchvision model name whose builder ``factory`` is, or None.

    ``--model torchvision.models:resnet18`` then builds (and adapts) exactly like
    ``--model resnet18``: torchvision builders take ``num_classes`` only through ``**kwargs``
    and no ``in_channels`` at all, so calling them like an arbitrary factory cannot work.
    """
    import torchvision.models as tvm

    for name in tvm.list_models(module=tvm):
        if tvm.get_model_builder(name) is factory:
            return name
    return None


def declared_keywords(factory: Callable[..., Any]) -> set[str]:
    """The keyword arguments ``factory`` names in its signature (``**kwargs`` names none)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return set()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {name for name, p in params.items() if p.kind in kinds}


def _call_with_declared(name: str, factory: Callable[..., nn.Module], **kwargs: Any) -> tuple[nn.Module, set[str]]:
    """Call ``factory`` with those of ``kwargs`` its signature declares; return what was passed.

    Never through ``**kwargs``: a factory that forwards them (torchvision's, timm's) would hand
    ``in_channels`` to a constructor that does not take it.
    """
    passed = {k: v for k, v in kwargs.items() if k in declared_keywords(factory)}
    try:
        model = factory(**passed)
    except TypeError as exc:
        raise ConfigError(f"--model {name!r}: calling it with {sorted(passed) or 'no arguments'} failed: "
                          f"{exc}") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model {name!r} returned {type(model).__name__}, not an nn.Module")
    return model, set(passed)


def canonical_model_name(name: str) -> str:
    """``resnet18`` for ``torchvision.models:resnet18`` (what a report and an artifact record); else ``name``."""
    if ":" not in name or name.startswith(TIMM_PREFIX):
        return name
    return torchvision_builder_name(resolve_callable(name)) or name


def _check_timm_name(name: str) -> str:
    model = name[len(TIMM_PREFIX):]
    if not timm_available():
        raise ConfigError(f"--model {name!r} needs timm, which is not installed (pip install timm)")
    import timm

    if model not in timm.list_models():
        close = timm.list_models(f"*{model[:6]}*")[:5] if model else []
        raise ConfigError(f"--model {name!r}: {model!r} is not a timm model name"
                          + (f" (similar: {', '.join(close)})" if close else "")
                          + "; timm.list_models() lists them")
    return model


def check_model_name(name: str) -> None:
    """Raise :class:`ConfigError` unless ``name`` is a torchvision or timm model or a resolvable callable.

    Cheap (no model is built): the job checks it before loading data or training anything.
    """
    if name.startswith(TIMM_PREFIX):
        _check_timm_name(name)
        return
    if ":" in name:
        resolve_callable(name)
        return
    import torchvision.models as tvm

    if name not in tvm.list_models(module=tvm):
        raise ConfigError(
            f"--model {name!r} is not a torchvision classification model (e.g. resnet18, "
            f"resnet50, mobilenet_v2, efficientnet_b0), a timm model ('timm:resnet18') nor a "
            f"'package.module:callable'.")


def model_spec(name: str = "resnet18", *, num_classes: int = 10, in_channels: int = 3, image_size: int = 224,
               adapt: bool = True, adapt_small_images: bool = True) -> Optional[ModelSpec]:
    """The declarative spec :func:`build_model` builds for these arguments; None for a callable.

    torchvision: ``num_classes``, and with ``adapt`` an ``in_channels`` adaptation and, on
    images below :data:`SMALL_IMAGE` pixels for a model with a ResNet stem (checked on the meta
    device, no memory) and ``adapt_small_images``, the small-image stem. timm: ``num_classes``
    and ``in_chans`` through ``timm.create_model`` (timm adapts the first convolution itself),
    and the same stem rule. A ``package.module:callable`` naming a torchvision builder is that
    builder's name.
    """
    if name.startswith(TIMM_PREFIX):
        _check_timm_name(name)
        kwargs: dict[str, Any] = {"num_classes": num_classes}
        if adapt:
            kwargs["in_chans"] = in_channels
        base = ModelSpec(name, kwargs)
    else:
        if ":" in name:
            name = canonical_model_name(name)
            if ":" in name:
                return None
        check_model_name(name)
        base = ModelSpec(f"torchvision:{name}", {"num_classes": num_classes},
                         {"in_channels": in_channels} if adapt else {})
    if not (adapt and adapt_small_images and image_size < SMALL_IMAGE):
        return base
    try:
        with torch.device("meta"):
            skeleton = base.build()
    except Exception:  # a constructor that cannot run on meta: decide on a real (unused) build
        skeleton = base.build()
    if not has_resnet_stem(skeleton) or skeleton.conv1.kernel_size == (3, 3):
        return base
    return ModelSpec(base.constructor, base.kwargs, {**base.adapt, "small_image_stem": True})


def build_model(name: str = "resnet18", *, num_classes: int = 10, in_channels: int = 3,
                image_size: int = 224, adapt: bool = True, adapt_small_images: bool = True) -> nn.Module:
    """Build ``name`` (torchvision name, ``timm:<name>`` or ``pkg.module:callable``) for the data.

    A torchvision or timm model is built from its :func:`model_spec`: ``num_classes`` through
    its constructor; with ``adapt`` its first convolution takes ``in_channels`` and, for
    ResNet stems on images smaller than 64 pixels, the stem is shrunk (:func:`adapt_stem`,
    logged; ``adapt_small_images=False`` keeps it). A ``pkg.module:callable`` (resolved with
    :func:`pkgutil.resolve_name`) naming a torchvision builder is the same as its name; any
    other is called with those of ``num_classes``/``in_channels``/``image_size`` its signature
    declares, and with ``adapt`` its first convolution is rebuilt when it did not take
    ``in_channels``. Weights are freshly initialised (seed the global RNG for a fixed init).
    """
    spec = model_spec(name, num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                      adapt=adapt, adapt_small_images=adapt_small_images)
    if spec is None:
        factory = resolve_callable(name)
        model, passed = _call_with_declared(name, factory, num_classes=num_classes,
                                            in_channels=in_channels, image_size=image_size)
        if adapt and "in_channels" not in passed:
            first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
            if first is not None and first.in_channels != in_channels:
                adapt_input_channels(model, in_channels)
        return model
    try:
        model = spec.build()
    except ModelSpecError as exc:
        raise ConfigError(f"--model {name!r}: {exc}") from exc
    if spec.adapt.get("small_image_stem"):
        logger.info("model: %s adapted to %d px images: conv1 7x7 stride 2 -> 3x3 stride 2 (small-image stem; "
                    "--no-adapt keeps the ImageNet stem)", name, image_size)
    elif adapt and image_size < SMALL_IMAGE and not adapt_small_images and has_resnet_stem(model):
        logger.info("model: %s keeps its ImageNet stem on %d px images (--no-adapt)", name, image_size)
    return model


def adapt_input_channels(model: nn.Module, in_channels: int) -> nn.Module:
    """Rebuild the first ``Conv2d`` of ``model`` to take ``in_channels`` channels (in place)."""
    from fxprune.modelspec import adapt_input_channels as adapt_first

    try:
        return adapt_first(model, in_channels)
    except ModelSpecError as exc:
        raise ConfigError(str(exc)) from exc


def adapt_stem(model: nn.Module) -> nn.Module:
    """Shrink a ResNet's ImageNet stem for small images (in place).

    The 7x7 stride-2 ``conv1`` becomes a 3x3 stride-2 convolution (a 7x7 kernel spans a
    quarter of a 28x28 image); the stride-2 max-pool stays. On 28x28 inputs the residual
    stages then run at 7, 4, 2 and 1 pixels: 32.5 MMACs per image, which is what lets the
    default pipeline train a real baseline in minutes on a 2-core CPU (a stride-1 stem would
    put the stages at 14 pixels, 122 MMACs: several times the training time, for accuracy the
    default job does not need). Models without a ResNet
    stem (``conv1``, ``maxpool``, ``layer1``) are left unchanged. The swap itself is
    :func:`fxprune.modelspec.adapt_small_image_stem`, so an artifact's spec rebuilds it.
    """
    return adapt_small_image_stem(model)


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------
def load_checkpoint_file(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with errors that say what is wrong.

    ``weights_only=True`` never runs code from the file: a pickled module or arbitrary object
    is refused, only tensors and plain containers load. ``.safetensors`` files are read with
    safetensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            return load_file(str(path), device=str(map_location))
        except Exception as exc:  # safetensors raises its own SafetensorError and OSError
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        # torch.load fails with RuntimeError (bad zip), UnpicklingError (bad pickle or a
        # forbidden global), EOFError (truncated)... all mean "this file cannot be used".
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot load {path}: the file is corrupt, truncated, or not a tensors-only "
            f"checkpoint ({type(exc).__name__}: {reason}). Pass a state_dict saved with "
            f"torch.save(model.state_dict(), ...) or a .safetensors file.") from exc


def read_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state_dict inside ``obj``: a state_dict or a checkpoint dict holding one.

    Recognises the usual checkpoint keys (``model``, ``state_dict``, ``model_state_dict``,
    ``model_state``) and strips the ``module.`` (DistributedDataParallel) and ``_orig_mod.``
    (``torch.compile``) prefixes.
    """
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state_dict", "model_state"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{source} holds no state_dict (expected a dict of tensors, or a checkpoint dict "
            f"with a 'model' / 'state_dict' entry)")
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        state[str(key)] = value
    return state


def resolve_torchvision_weights(name: str, *, download: bool = False) -> Optional[dict[str, torch.Tensor]]:
    """The state_dict of torchvision weights ``name`` from the hub cache, or None if not a weights name.

    ``name`` is ``ResNet18_Weights.IMAGENET1K_V1`` (or ``ResNet18_Weights.DEFAULT``). The file
    must already be in ``torch.hub.get_dir()/checkpoints``; with ``download=True`` it is fetched.
    """
    if "_Weights." not in name:
        return None
    import torchvision.models as tvm

    try:
        weights = tvm.get_weight(name)
    except (ValueError, KeyError, AttributeError) as exc:
        raise ConfigError(f"--weights {name!r}: not a torchvision weights name ({exc})") from exc
    filename = Path(weights.url).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if cached.is_file():
        return read_state_dict(load_checkpoint_file(cached), str(cached))
    if not download:
        raise CheckpointError(
            f"--weights {name}: {cached} is not in the torch hub cache and nothing is downloaded "
            f"unless asked. Pass --download, or put the file there (from {weights.url}).")
    return weights.get_state_dict(progress=False, check_hash=True)


def _fits(spec: ModelSpec, state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state`` loads strictly into ``spec``'s architecture (built on the meta device)."""
    try:
        with torch.device("meta"):
            own = spec.build().state_dict()
    except Exception:  # cannot tell cheaply: no suggestion
        return False
    return set(own) == set(state) and all(tuple(own[k].shape) == tuple(state[k].shape) for k in own)


def _other_stem_hint(spec: Optional[ModelSpec], state: Mapping[str, torch.Tensor]) -> str:
    """" these weights fit <model> without the small-image adaptation; pass --no-adapt" (or the reverse), or ""."""
    if spec is None:
        return ""
    name = spec.name if spec.family == "torchvision" else spec.constructor
    if spec.adapt.get("small_image_stem"):
        other = ModelSpec(spec.constructor, spec.kwargs, {k: v for k, v in spec.adapt.items() if k != "small_image_stem"})
        if _fits(other, state):
            return f"these weights fit {name} without the small-image adaptation; pass --no-adapt"
        return ""
    other = ModelSpec(spec.constructor, spec.kwargs, {**spec.adapt, "small_image_stem": True})
    if _fits(other, state):
        return f"these weights fit {name} with the small-image adaptation (3x3 stem); drop --no-adapt"
    return ""


def load_weights(model: nn.Module, weights: Union[str, Path], *, download: bool = False,
                 spec: Optional[ModelSpec] = None) -> nn.Module:
    """Load ``weights`` (a file or a torchvision weights name) into ``model`` (in place), strictly.

    A mismatch (missing, unexpected or differently shaped tensors) raises
    :class:`CheckpointError` listing the first offending keys: loading half a model silently
    would make every later number meaningless. ``spec``: the :func:`model_spec` ``model`` was
    built from; when the weights fit the same model with the other small-image stem choice,
    the error says exactly that (and which ``--no-adapt`` setting fits).
    """
    state = resolve_torchvision_weights(str(weights), download=download)
    if state is None:
        state = read_state_dict(load_checkpoint_file(weights), str(weights))
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        details = []
        if wrong:
            details.append("shape mismatch " + "; ".join(wrong[:4]))
        if missing:
            details.append("missing " + ", ".join(missing[:4]))
        if unexpected:
            details.append("unexpected " + ", ".join(unexpected[:4]))
        hint = _other_stem_hint(spec, state)
        if hint:
            raise CheckpointError(f"weights {weights} do not fit {type(model).__name__} as built "
                                  f"({' | '.join(details[:1])}): {hint}")
        raise CheckpointError(
            f"weights {weights} do not fit {type(model).__name__}: {' | '.join(details)}. "
            f"Check --model and the data set's class count / input channels (the model is "
            f"built for the data), or pass a pruned model's artifact to the matching loader.")
    model.load_state_dict(state, strict=True)
    return model
