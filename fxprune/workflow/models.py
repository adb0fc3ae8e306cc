"""Building the model to prune, and loading its weights.

``--model`` is a torchvision classification model name (``resnet18``) or a
``package.module:callable`` returning an ``nn.Module``. torchvision models are built for the
data: ``num_classes`` from the data set, the first convolution rebuilt for its number of
input channels, and, for small images (Fashion-MNIST 28x28, CIFAR 32x32), a ResNet stem
that keeps enough resolution (see :func:`adapt_stem`).

``--weights`` is a local file (a state_dict, a checkpoint dict holding one, or a
``.safetensors`` file) read with ``torch.load(weights_only=True)``, or a torchvision weights
name (``ResNet18_Weights.IMAGENET1K_V1``) whose file is already in the torch hub cache.
Nothing is downloaded unless ``download=True``.
"""

from __future__ import annotations

import inspect
import pkgutil
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import nn

from fxprune.workflow.errors import CheckpointError, ConfigError

__all__ = [
    "build_model",
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
]

# Below this input size the ImageNet stem (7x7 stride-2 conv + stride-2 max-pool) is adapted.
SMALL_IMAGE = 64


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def resolve_callable(name: str) -> Callable[..., nn.Module]:
    """The callable ``package.module:callable`` names (``pkgutil.resolve_name``), or a clear error."""
    module_name = name.partition(":")[0]
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
    if ":" not in name:
        return name
    return torchvision_builder_name(resolve_callable(name)) or name


def check_model_name(name: str) -> None:
    """Raise :class:`ConfigError` unless ``name`` is a torchvision model or a resolvable callable.

    Cheap (no model is built): the job checks it before loading data or training anything.
    """
    if ":" in name:
        resolve_callable(name)
        return
    import torchvision.models as tvm

    if name not in tvm.list_models(module=tvm):
        raise ConfigError(
            f"--model {name!r} is not a torchvision classification model (e.g. resnet18, "
            f"resnet50, mobilenet_v2, efficientnet_b0) nor a 'package.module:callable'.")


def build_model(name: str = "resnet18", *, num_classes: int = 10, in_channels: int = 3,
                image_size: int = 224, adapt: bool = True) -> nn.Module:
    """Build ``name`` (torchvision model name or ``pkg.module:callable``) for the data.

    A torchvision model gets ``num_classes`` through its constructor; with ``adapt`` its first
    convolution is rebuilt for ``in_channels`` and, for ResNets on images smaller than 64
    pixels, the stem is shrunk (:func:`adapt_stem`). A ``pkg.module:callable`` (resolved with
    :func:`pkgutil.resolve_name`) naming a torchvision builder is the same as its name; any
    other is called with those of ``num_classes``/``in_channels``/``image_size`` its signature
    declares, and with ``adapt`` its first convolution is rebuilt when it did not take
    ``in_channels``. Weights are freshly initialised (seed the global RNG for a fixed init).
    """
    if ":" in name:
        factory = resolve_callable(name)
        torchvision_name = torchvision_builder_name(factory)
        if torchvision_name is None:
            model, passed = _call_with_declared(name, factory, num_classes=num_classes,
                                                in_channels=in_channels, image_size=image_size)
            if adapt and "in_channels" not in passed:
                first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
                if first is not None and first.in_channels != in_channels:
                    adapt_input_channels(model, in_channels)
            return model
        name = torchvision_name
    check_model_name(name)
    import torchvision.models as tvm

    model = tvm.get_model(name, weights=None, num_classes=num_classes)
    if adapt:
        adapt_input_channels(model, in_channels)
        if image_size < SMALL_IMAGE:
            adapt_stem(model)
    return model


def adapt_input_channels(model: nn.Module, in_channels: int) -> nn.Module:
    """Rebuild the first ``Conv2d`` of ``model`` to take ``in_channels`` channels (in place)."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels != in_channels:
                    if child.groups != 1:
                        raise ConfigError(
                            f"cannot adapt the grouped first convolution {child_name} to "
                            f"{in_channels} input channels")
                    setattr(parent, child_name, nn.Conv2d(
                        in_channels, child.out_channels, child.kernel_size, child.stride,
                        child.padding, child.dilation, 1, child.bias is not None,
                        child.padding_mode))
                return model
    raise ConfigError(f"{type(model).__name__} has no Conv2d whose input channels can be adapted")


def adapt_stem(model: nn.Module) -> nn.Module:
    """Shrink a torchvision ResNet's ImageNet stem for small images (in place).

    The 7x7 stride-2 ``conv1`` becomes a 3x3 stride-2 convolution (a 7x7 kernel spans a
    quarter of a 28x28 image); the stride-2 max-pool stays. On 28x28 inputs the residual
    stages then run at 7, 4, 2 and 1 pixels: 32.5 MMACs per image, which is what lets the
    default pipeline train a real baseline in minutes on a 2-core CPU. Measured on the 2-core
    EPYC this project targets, a stride-1 stem (stages at 14 pixels, 122 MMACs) trained about
    2.6x slower per epoch, for accuracy the 88% target does not need. Models without a ResNet
    stem (``conv1``, ``maxpool``, ``layer1``)
    are left unchanged.
    """
    conv1 = getattr(model, "conv1", None)
    if isinstance(conv1, nn.Conv2d) and hasattr(model, "maxpool") and hasattr(model, "layer1"):
        model.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, kernel_size=3, stride=2,
                                padding=1, bias=conv1.bias is not None)
    return model


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


def load_weights(model: nn.Module, weights: Union[str, Path], *, download: bool = False) -> nn.Module:
    """Load ``weights`` (a file or a torchvision weights name) into ``model`` (in place), strictly.

    A mismatch (missing, unexpected or differently shaped tensors) raises
    :class:`CheckpointError` listing the first offending keys: loading half a model silently
    would make every later number meaningless.
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
        raise CheckpointError(
            f"weights {weights} do not fit {type(model).__name__}: {' | '.join(details)}. "
            f"Check --model and the data set's class count / input channels (the model is "
            f"built for the data), or pass a pruned model's artifact to the matching loader.")
    model.load_state_dict(state, strict=True)
    return model
