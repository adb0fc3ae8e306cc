"""Save and load pruned models as a plan plus weights: no pickle, no code in the artifact.

A saved model is a folder of three files::

    model.fxprune/
      plan.json            the PruningPlan (kept channels per group) + "source": the model's identity
      weights.safetensors  every tensor of the pruned state_dict (safetensors: a JSON header + raw bytes)
      meta.json            format version, fxprune/torch versions, input shapes, training flag,
                           size and sha256 of the two files above (corruption/truncation check)

Loading rebuilds the pruned GraphModule from the *original* architecture by replaying the plan
(:func:`fxprune.apply`) and then assigns the saved tensors (strict: every key, every shape).
Nothing in the folder is ever unpickled or imported, so a downloaded artifact cannot run code:
safetensors is a plain tensor container, and a ``source`` naming a Python callable is only
honoured when the caller passes it explicitly as ``model=``. The sha256 in ``meta.json``
detects accidents (truncated copies, bit rot), not tampering: a forger can rewrite it too,
which is harmless because the files themselves carry no code.

>>> import os, tempfile, torch, torchvision, fxprune
>>> model = torchvision.models.resnet18().eval()
>>> plan = fxprune.plan(model, 0.5)
>>> pruned = fxprune.apply(model, plan).eval()
>>> path = fxprune.save(pruned, os.path.join(tempfile.mkdtemp(), "r18.fxprune"), plan=plan,
...                     source="torchvision:resnet18")
>>> sorted(os.listdir(path))
['meta.json', 'plan.json', 'weights.safetensors']
>>> loaded = fxprune.load(path)          # "torchvision:resnet18" is rebuilt without weights, then loaded
>>> x = torch.randn(1, 3, 32, 32)
>>> torch.equal(loaded(x), pruned(x))
True

For a standalone module without fxprune, ``print(pruned.code)`` shows the plain Python forward,
``torch.jit.script(pruned)`` (or :func:`fxprune.export.to_torchscript`) gives TorchScript and
``torch.export.export(pruned, (x,))`` an ExportedProgram (:mod:`fxprune.export`).
"""

from __future__ import annotations

import datetime
import hashlib
import importlib
import json
import os
import platform
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.fx
import torch.nn as nn

from .errors import FxPruneError, PlanMismatchError
from .plan import PruningPlan

__all__ = ["save", "load", "read_meta", "read_plan", "ArtifactError", "FORMAT", "FORMAT_VERSION", "PLAN_META_KEY",
           "SOURCE_META_KEY"]

FORMAT = "fxprune-artifact"
FORMAT_VERSION = 1
PLAN_FILE, WEIGHTS_FILE, META_FILE = "plan.json", "weights.safetensors", "meta.json"
#: ``pruned.meta[PLAN_META_KEY]``: the PruningPlan (or its JSON) a pruned GraphModule carries.
PLAN_META_KEY = "fxprune_plan"
#: ``pruned.meta[SOURCE_META_KEY]``: the source identity, e.g. ``"torchvision:resnet18"``.
SOURCE_META_KEY = "fxprune_source"

PathLike = Union[str, "os.PathLike[str]"]
ModelSpec = Union[nn.Module, str, None]


class ArtifactError(FxPruneError):
    """A saved model folder that cannot be written or read back: the message says what is wrong."""


# =========================================================================== helpers


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # the rename below must never publish a half-written file


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform can open a directory; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _plan_of(pruned: nn.Module, plan: Union[PruningPlan, str, None]) -> PruningPlan:
    if plan is None:
        plan = getattr(pruned, "meta", {}).get(PLAN_META_KEY) if isinstance(getattr(pruned, "meta", None), dict) else None
    if plan is None:
        raise ArtifactError(
            "save() needs the pruning plan the model was built from, and this model does not carry one. "
            "Hint: plan = fxprune.plan(model, ratio); pruned = fxprune.apply(model, plan); "
            "fxprune.save(pruned, path, plan=plan)")
    if isinstance(plan, str):
        return PruningPlan.from_json(plan)
    if not isinstance(plan, PruningPlan):
        raise ArtifactError(f"plan must be a PruningPlan or its JSON text, got {type(plan).__name__}")
    return plan


def _check_plan_fits(pruned: nn.Module, plan: PruningPlan) -> None:
    """Catch a plan that does not describe ``pruned`` at save time, not at load time.

    A group's key is its first producer (a Conv/Linear whose output rows are exactly that
    group), so that layer's output size must be the number of kept channels.
    """
    modules = dict(pruned.named_modules())
    for g in plan.groups:
        layer = modules.get(g.key)
        # out_channels, not weight.shape[0]: a transposed conv stores its outputs on dim 1.
        outputs = getattr(layer, "out_channels", getattr(layer, "out_features", None))
        if isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)) and outputs != len(g.keep):
            raise ArtifactError(
                f"the plan does not describe this model: group {g.key} keeps {len(g.keep)} of {g.size} channels "
                f"but {g.key} has {outputs} outputs. Hint: pass the plan the model was pruned with")


def _input_specs(pruned: nn.Module, example_inputs: Any) -> Optional[List[Dict[str, Any]]]:
    """Shapes/dtypes of the inputs: given, or read from the placeholders' ShapeProp metadata."""
    if example_inputs is not None:
        items = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        if not all(isinstance(t, torch.Tensor) for t in items):
            raise ArtifactError("example_inputs must be a tensor or a tuple of tensors")
        return [{"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for t in items]
    if isinstance(pruned, torch.fx.GraphModule):
        specs = []
        for node in pruned.graph.nodes:
            if node.op != "placeholder":
                continue
            meta = node.meta.get("tensor_meta")
            if meta is None or not hasattr(meta, "shape"):
                return None
            specs.append({"shape": list(meta.shape), "dtype": str(meta.dtype).replace("torch.", "")})
        return specs or None
    return None


def _tensors(pruned: nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """The state_dict as contiguous CPU tensors safetensors accepts, plus tied-name aliases.

    safetensors refuses tensors sharing memory; a tied parameter (same tensor under two names)
    is stored once and the other name recorded as an alias, so loading ties it again.
    """
    tensors: Dict[str, torch.Tensor] = {}
    aliases: Dict[str, str] = {}
    seen: Dict[Tuple[Any, ...], str] = {}
    storages: set = set()
    for name, t in pruned.state_dict(keep_vars=True).items():
        if not isinstance(t, torch.Tensor):
            raise ArtifactError(f"state_dict entry {name} is a {type(t).__name__}, not a tensor; only tensors can be saved")
        t = t.detach()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype) \
            if t.device.type != "meta" else None
        if ident is not None and ident in seen and t.numel() > 0:
            aliases[name] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = name
        ptr = t.untyped_storage().data_ptr() if t.numel() > 0 else None
        # A view into a storage already stored (but not the same view) must become its own copy.
        t = t.to("cpu")
        if ptr is not None and ptr in storages:
            t = t.clone()
        if ptr is not None:
            storages.add(ptr)
        tensors[name] = t.contiguous() if not t.is_contiguous() else t
    return tensors, aliases


# =========================================================================== save


def save(pruned: nn.Module, path: PathLike, *, plan: Union[PruningPlan, str, None] = None,
         source: Optional[str] = None, example_inputs: Any = None) -> Path:
    """Write ``pruned`` to the folder ``path`` (plan.json, weights.safetensors, meta.json).

    ``plan``: the :class:`fxprune.PruningPlan` the model was built from; defaults to
    ``pruned.meta["fxprune_plan"]`` when the model carries it. ``source``: how to rebuild the
    original architecture at load time: a torchvision name (``"torchvision:resnet18"`` or
    ``"resnet18"``) or ``"pkg.module:callable"``; defaults to ``pruned.meta["fxprune_source"]``;
    without it, :func:`load` needs ``model=``. ``example_inputs``: recorded as input shapes
    (else read from shape metadata if the model was pruned with example inputs); they let
    :func:`load` replay a plan that was made with shape propagation.

    The folder appears atomically: everything is written to a temporary sibling folder, synced,
    then renamed into place, so a crash never leaves a half-written artifact under ``path``.
    An existing artifact at ``path`` is replaced; any other non-empty folder is refused.
    Returns the folder's path.

    >>> import os, tempfile, torchvision, fxprune
    >>> m = torchvision.models.resnet18()
    >>> p = fxprune.plan(m, 0.3)
    >>> out = fxprune.save(fxprune.apply(m, p), os.path.join(tempfile.mkdtemp(), "a"), plan=p, source="resnet18")
    >>> fxprune.artifact.read_meta(out)["source"]
    'resnet18'
    """
    if not isinstance(pruned, nn.Module):
        raise ArtifactError(f"save() expects the pruned nn.Module, got {type(pruned).__name__}")
    the_plan = _plan_of(pruned, plan)
    _check_plan_fits(pruned, the_plan)
    meta_dict = getattr(pruned, "meta", None)
    if source is None and isinstance(meta_dict, dict):
        source = meta_dict.get(SOURCE_META_KEY)
    if source is not None and not isinstance(source, str):
        raise ArtifactError(f"source must be a string such as 'torchvision:resnet18', got {type(source).__name__}")

    dest = Path(path)
    if dest.exists() and not dest.is_dir():
        raise ArtifactError(f"{dest} exists and is not a folder; refusing to replace it")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / META_FILE).is_file():
        raise ArtifactError(f"{dest} is a non-empty folder that is not an fxprune artifact; refusing to replace it. "
                            "Hint: choose a new path")
    dest.parent.mkdir(parents=True, exist_ok=True)

    from safetensors.torch import save as st_save

    tensors, aliases = _tensors(pruned)
    plan_data = json.loads(the_plan.to_json())
    plan_data["source"] = source
    plan_bytes = (json.dumps(plan_data, indent=1) + "\n").encode()
    try:
        weight_bytes = st_save(tensors, metadata={"format": FORMAT})
    except Exception as exc:  # safetensors raises plain Exceptions (dtype, sharing)
        raise ArtifactError(f"could not serialise the weights: {exc}") from exc

    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        _write(tmp / PLAN_FILE, plan_bytes)
        _write(tmp / WEIGHTS_FILE, weight_bytes)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "fxprune_version": _fxprune_version(),
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "source": source,
            "model_class": type(pruned).__name__,
            "training": bool(pruned.training),
            "inputs": _input_specs(pruned, example_inputs),
            "aliases": aliases,
            "num_tensors": len(tensors),
            "num_parameters": int(sum(p.numel() for p in pruned.parameters())),
            "files": {
                PLAN_FILE: {"bytes": len(plan_bytes), "sha256": hashlib.sha256(plan_bytes).hexdigest()},
                WEIGHTS_FILE: {"bytes": len(weight_bytes), "sha256": hashlib.sha256(weight_bytes).hexdigest()},
            },
        }
        _write(tmp / META_FILE, (json.dumps(meta, indent=1) + "\n").encode())
        _fsync_dir(tmp)
        if dest.exists():
            # rename() cannot replace a non-empty folder: move the old one aside first, then
            # drop it once the new one is in place.
            old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(dest, old)
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _fxprune_version() -> str:
    from . import __version__

    return __version__


# =========================================================================== load


def read_meta(path: PathLike) -> Dict[str, Any]:
    """The parsed ``meta.json`` of an artifact folder, after checking its format."""
    folder = Path(path)
    if not folder.is_dir():
        raise ArtifactError(f"no fxprune artifact at {folder}: not a folder")
    missing = [f for f in (META_FILE, PLAN_FILE, WEIGHTS_FILE) if not (folder / f).is_file()]
    if missing:
        raise ArtifactError(f"{folder} is not a complete fxprune artifact: missing {', '.join(missing)} "
                            "(an interrupted copy?). Hint: copy the whole folder again or re-save the model")
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{folder / META_FILE} is corrupt (not JSON: {exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{folder / META_FILE} is not fxprune artifact metadata (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(f"{folder} uses artifact format version {version!r}; this fxprune ({_fxprune_version()}) "
                            f"reads up to {FORMAT_VERSION}. Hint: upgrade fxprune")
    return meta


def _verify(folder: Path, meta: Mapping[str, Any]) -> None:
    files = meta.get("files")
    if not isinstance(files, dict):
        raise ArtifactError(f"{folder / META_FILE} is corrupt: no file checksums")
    for name in (PLAN_FILE, WEIGHTS_FILE):
        want = files.get(name) or {}
        size = (folder / name).stat().st_size
        if want.get("bytes") != size:
            raise ArtifactError(f"{folder / name} is truncated or corrupt: {size} bytes, meta.json says {want.get('bytes')}. "
                                "Hint: copy the artifact again")
        if _sha256(folder / name) != want.get("sha256"):
            raise ArtifactError(f"{folder / name} is corrupt: its sha256 does not match meta.json. Hint: copy the artifact again")


def read_plan(path: PathLike, *, verify: bool = True) -> PruningPlan:
    """The :class:`fxprune.PruningPlan` stored in an artifact folder."""
    folder = Path(path)
    meta = read_meta(folder)
    if verify:
        _verify(folder, meta)
    return PruningPlan.from_json((folder / PLAN_FILE).read_text())


def _torchvision(name: str) -> Optional[nn.Module]:
    try:
        import torchvision
    except ImportError:
        return None
    if name not in torchvision.models.list_models():
        return None
    return torchvision.models.get_model(name, weights=None)


def _resolve_model(model: ModelSpec, source: Optional[str], folder: Path) -> nn.Module:
    """The original architecture, from an nn.Module, a torchvision name or ``pkg.mod:callable``."""
    if isinstance(model, nn.Module):
        return model
    trusted = model is not None  # a string the caller wrote may import code; one from the file may not
    spec = model if model is not None else source
    if spec is None:
        raise ArtifactError(f"{folder} does not record its source architecture. Hint: pass model= (the original "
                            "nn.Module, a torchvision name such as 'resnet18', or 'package.module:callable')")
    if not isinstance(spec, str):
        raise ArtifactError(f"model must be an nn.Module or a string, got {type(spec).__name__}")
    prefix, _, rest = spec.partition(":")
    if prefix == "torchvision" or ":" not in spec:
        name = rest if prefix == "torchvision" else spec
        built = _torchvision(name)
        if built is None:
            raise ArtifactError(f"{name!r} is not a torchvision model name. Hint: pass the original nn.Module as model=")
        return built
    if not trusted:
        raise ArtifactError(
            f"{folder} was saved from {spec!r}, a Python callable; fxprune never imports code named by a file. "
            f"Hint: if you trust it, pass it yourself: fxprune.load(path, model={spec!r})")
    try:
        obj: Any = importlib.import_module(prefix)
        for part in rest.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ArtifactError(f"cannot find {spec!r}: {exc}") from exc
    built = obj() if callable(obj) and not isinstance(obj, nn.Module) else obj
    if not isinstance(built, nn.Module):
        raise ArtifactError(f"{spec!r} returned a {type(built).__name__}, not an nn.Module")
    return built


def _example_inputs(meta: Mapping[str, Any]) -> Optional[Tuple[torch.Tensor, ...]]:
    specs = meta.get("inputs")
    if not specs:
        return None
    try:
        return tuple(torch.zeros([int(s) for s in spec["shape"]], dtype=getattr(torch, spec["dtype"])) for spec in specs)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ArtifactError(f"meta.json has unreadable input specs {specs!r}: {exc}") from exc


def _rebuild(original: nn.Module, plan: PruningPlan, meta: Mapping[str, Any], folder: Path) -> torch.fx.GraphModule:
    from .api import apply

    inputs = _example_inputs(meta)
    # Replay with shapes first when they are known (a plan made with shape propagation may
    # need them), else without; fall back to the other if the first does not fit.
    attempts: List[Optional[Tuple[torch.Tensor, ...]]] = [inputs, None] if inputs is not None else [None]
    first: Optional[FxPruneError] = None
    for attempt in attempts:
        try:
            return apply(original, plan, example_inputs=attempt)
        except PlanMismatchError as exc:
            first = first or exc
        except FxPruneError as exc:
            if attempt is None:
                raise ArtifactError(f"cannot rebuild {folder} from {type(original).__name__}: {exc}") from exc
            first = first or exc
    where = f"saved from {meta.get('source')!r} ({meta.get('model_class')})" if meta.get("source") else \
        f"saved from a {meta.get('model_class')}"
    raise ArtifactError(
        f"the artifact {folder} ({where}) does not fit the model given ({type(original).__name__}): {first}. "
        "Hint: pass the architecture the artifact was pruned from (same class and constructor arguments)") from first


def _load_weights(rebuilt: nn.Module, folder: Path, meta: Mapping[str, Any], device: Union[str, torch.device]) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    try:
        tensors = st_load((folder / WEIGHTS_FILE).read_bytes())
    except (SafetensorError, ValueError, OSError) as exc:
        raise ArtifactError(f"{folder / WEIGHTS_FILE} is not a readable safetensors file: {exc}") from exc
    aliases = meta.get("aliases") or {}
    for name, target in aliases.items():
        if target not in tensors:
            raise ArtifactError(f"{folder / META_FILE}: alias {name} -> {target} names no stored tensor")
        tensors[name] = tensors[target]
    expected = rebuilt.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{k}: file {tuple(tensors[k].shape)}, model {tuple(expected[k].shape)}"
             for k in expected if k in tensors and tensors[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} weights of the wrong shape ({'; '.join(wrong[:3])})")
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])})")
        raise ArtifactError(f"the weights in {folder / WEIGHTS_FILE} do not fit the rebuilt model: {'; '.join(parts)}. "
                            "Hint: the model given must be the architecture (and constructor arguments, e.g. "
                            "num_classes) the artifact was saved from")
    # assign=True installs the stored tensors themselves: dtypes and values exactly as saved
    # (copying into the rebuilt ones would cast), and tied names end up sharing one tensor.
    rebuilt.load_state_dict({k: v.to(device) for k, v in tensors.items()}, strict=True, assign=True)


def load(path: PathLike, model: ModelSpec = None, *, map_location: Union[str, torch.device] = "cpu") -> torch.fx.GraphModule:
    """Rebuild the pruned GraphModule saved at ``path`` and load its weights (never unpickles).

    ``model``: the original, unpruned architecture: an ``nn.Module`` (its weights do not
    matter, they are all replaced), a torchvision name (``"resnet18"``, ``"torchvision:resnet18"``)
    or ``"package.module:callable"`` (imported and called with no arguments). Default: the
    ``source`` recorded at save time, if it is a torchvision name; a recorded Python callable is
    never imported on the file's word, pass it explicitly. The plan is replayed with
    :func:`fxprune.apply` and every saved tensor is assigned (strict: all keys, all shapes), so
    the result computes bit-identically to the model that was saved. It carries its plan in
    ``loaded.meta["fxprune_plan"]`` and comes back in the train/eval mode it was saved in.

    Raises :class:`ArtifactError` (an :class:`fxprune.FxPruneError`) naming the problem for a
    missing, incomplete, truncated or corrupt folder, a plan for another architecture, and
    weights of the wrong shape.

    >>> import os, tempfile, torch, torchvision, fxprune
    >>> m = torchvision.models.resnet18().eval()
    >>> p = fxprune.plan(m, 0.5)
    >>> out = fxprune.save(fxprune.apply(m, p), os.path.join(tempfile.mkdtemp(), "a"), plan=p)
    >>> fxprune.load(out, model=torchvision.models.resnet18()).get_submodule("layer1.0.conv1").out_channels
    32
    """
    folder = Path(path)
    meta = read_meta(folder)
    _verify(folder, meta)
    plan = PruningPlan.from_json((folder / PLAN_FILE).read_text())
    source = meta.get("source")
    original = _resolve_model(model, source, folder)
    rebuilt = _rebuild(original, plan, meta, folder)
    _load_weights(rebuilt, folder, meta, map_location)
    rebuilt.train(bool(meta.get("training", False)))
    rebuilt.meta[PLAN_META_KEY] = plan
    if source is not None:
        rebuilt.meta[SOURCE_META_KEY] = source
    return rebuilt
