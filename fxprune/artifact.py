"""Save and load pruned models as a plan plus weights: no pickle, no code in the artifact.

A saved model is a folder of three files::

    model.fxprune/
      plan.json            the PruningPlan (kept channels per group) + "source": the model's identity
      weights.safetensors  every tensor of the pruned state_dict (safetensors: a JSON header + raw bytes)
      meta.json            the format marker ("format": "fxprune-artifact", "format_version"),
                           fxprune/torch versions, the source architecture's declarative
                           "model_spec" (fxprune.modelspec), input shapes, training flag,
                           tied-name aliases, each stored tensor's dtype, size and sha256 of
                           the two files above

Loading rebuilds the pruned GraphModule from the *original* architecture by replaying the plan
(:func:`fxprune.apply`) and then assigns the saved tensors (strict: every key, shape and dtype).
The original architecture is the caller's ``model=`` if given, else the recorded
``model_spec``: a constructor from an allow-list (``torchvision:<name>``, ``timm:<name>``) with
typed, bounded JSON arguments and fxprune's own adaptations (first-convolution channels, the
small-image ResNet stem), see :mod:`fxprune.modelspec`. ``fxprune run`` and ``fxprune prune
--save`` record it, so ``fxprune.load(path)`` works on their output as it is.

What an artifact can and cannot make fxprune do (the folder is treated as untrusted input):

- It never runs code. Nothing is unpickled or imported: safetensors is a plain tensor container,
  and a ``source`` naming a Python callable is only honoured when the caller passes it as
  ``model=``; a ``model_spec`` cannot name one at all (its constructor must be
  ``torchvision:`` or ``timm:`` plus a plain name, checked against that library's list, and
  every argument is an integer or boolean of a known key within bounds; anything else is an
  :class:`ArtifactError` before anything is imported); a recorded torchvision name is built
  with ``weights=None`` (and ``weights_backbone=None``), a timm one with ``pretrained=False``:
  nothing is downloaded.
- It cannot make fxprune allocate more than the model it describes. The JSON files are capped
  (:data:`MAX_JSON_BYTES`), strictly typed (no ``NaN``/``Infinity``, no duplicate keys, bounded
  nesting) and validated field by field; a recorded torchvision/timm architecture is first built on
  the ``meta`` device (no memory) and the plan checked against it, so a plan for another model
  is rejected before any weight exists; recorded input shapes are bounded
  (:data:`MAX_INPUT_ELEMENTS`); the weights file is memory-mapped and every tensor's name, shape
  and dtype is checked against the rebuilt model before a byte of it is read.
- It cannot reach outside its folder: a symbolic link (or anything but a regular file) in
  place of one of the three files is refused, never followed.
- Every malformed, truncated, tampered or mismatched artifact raises :class:`ArtifactError`
  naming the file, the field and what to do. The sha256 in ``meta.json`` detects accidents
  (truncated copies, bit rot), not tampering: a forger can rewrite it too. What a consistent
  forgery *can* do is give a model of the recorded architecture arbitrary weight values, so
  load artifacts whose *outputs* you trust from where you trust them.

Writing is just as careful with the user's files. :func:`save` replaces a folder only if it is
an fxprune artifact (its ``meta.json`` carries the format marker and the folder holds exactly
the files that meta.json lists); anything else is refused and left untouched, and nothing is
ever removed recursively: only files of our own names, then the empty folder. Replacement is
atomic: the new artifact is written to a temporary sibling and, on Linux, swapped in with
``renameat2(RENAME_EXCHANGE)``; elsewhere (or on a file system without it) the old folder is
renamed aside and the new one into place, and if a crash lands between those two renames the
next :func:`save`, :func:`load`, :func:`read_meta` or :func:`read_plan` of that path renames the
complete old artifact back. Stale temporaries of ours (``.NAME.PID-XXXX.tmp``,
``.NAME.old-PID-XXXX``) whose writer is gone are removed by the next :func:`save` to that path.

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

import contextlib
import ctypes
import datetime
import errno
import hashlib
import importlib
import json
import math
import os
import platform
import re
import stat
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Set, Tuple, Union

import torch
import torch.fx
import torch.nn as nn

from .version import __version__
from .adapters import resolve_attr
from .api import analyze_model, apply
from .errors import FxPruneError, FxPruneWarning, PlanMismatchError
from .groups import Analysis
from .modelspec import ModelSpec, ModelSpecError
from .planning import PLAN_VERSION, GroupPlan, PruningPlan, rules_for
from .rules import check_rule_options

__all__ = ["save", "load", "read_meta", "read_plan", "ArtifactError", "SpecMismatchError", "FORMAT", "FORMAT_VERSION", "PLAN_META_KEY",
           "SOURCE_META_KEY", "SPEC_META_KEY", "ARTIFACT_FILES", "MAX_JSON_BYTES", "MAX_INPUT_ELEMENTS", "MAX_INPUT_DIMS", "MAX_INPUTS",
           "process_alive"]

#: The format marker: ``meta.json``'s ``"format"``. A folder is an fxprune artifact (which
#: :func:`save` may replace) only if its meta.json says this and it holds nothing else.
FORMAT = "fxprune-artifact"
FORMAT_VERSION = 1
PLAN_FILE, WEIGHTS_FILE, META_FILE = "plan.json", "weights.safetensors", "meta.json"
ARTIFACT_FILES = (META_FILE, PLAN_FILE, WEIGHTS_FILE)
#: ``pruned.meta[PLAN_META_KEY]``: the PruningPlan (or its JSON) a pruned GraphModule carries.
PLAN_META_KEY = "fxprune_plan"
#: ``pruned.meta[SOURCE_META_KEY]``: the source identity, e.g. ``"torchvision:resnet18"``.
SOURCE_META_KEY = "fxprune_source"
#: ``pruned.meta[SPEC_META_KEY]``: the :class:`fxprune.modelspec.ModelSpec` of the source
#: architecture (what :func:`save` records as meta.json's ``"model_spec"``).
SPEC_META_KEY = "fxprune_model_spec"

#: Largest plan.json / meta.json read (bytes). A plan lists kept channel indices: even a
#: model with a million channels needs under 8 MiB, so 32 MiB bounds parsing time and memory.
MAX_JSON_BYTES = 32 << 20
#: Largest recorded example input, in elements summed over all inputs (2**25 = 128 MiB as
#: float32; 1x3x2048x2048 and 1x1x256x256x256 fit, 1x3x6000x6000 does not). The inputs only
#: give the replay its shapes; record batch-1 inputs (``save(..., example_inputs=x[:1])``).
MAX_INPUT_ELEMENTS = 1 << 25
#: Most dimensions of one recorded input, and most recorded inputs.
MAX_INPUT_DIMS = 8
MAX_INPUTS = 16
# Free-form JSON (a plan's "policy") nests a level or two; 16 is plenty and keeps every later
# recursive walk (dataclass equality, asdict) far from Python's recursion limit.
_MAX_FREEFORM_DEPTH = 16
_MAX_CHANNELS = 1 << 24  # per group: far above any real layer, it bounds a forged "size"

# Dtypes an artifact may name (inputs, stored tensors): plain torch dtypes, looked up in this
# table, never by getattr(torch, <text from the file>).
_DTYPE_NAMES = ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
                "complex64", "complex128", "float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64")
_DTYPES: Dict[str, torch.dtype] = {n: getattr(torch, n) for n in _DTYPE_NAMES if isinstance(getattr(torch, n, None), torch.dtype)}
# safetensors' header codes for the same dtypes.
_ST_DTYPES: Dict[str, str] = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                              "C64": "complex64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
                              "U16": "uint16", "U32": "uint32", "U64": "uint64"}

PathLike = Union[str, "os.PathLike[str]"]
ModelArg = Union[nn.Module, str, "ModelSpec", None]

_HINT_DAMAGED = ("Hint: the artifact is damaged or was edited; copy it again, or re-save the model with fxprune.save")


class ArtifactError(FxPruneError):
    """A saved model folder that cannot be written or read back: the message says what is wrong."""


class SpecMismatchError(ArtifactError):
    """:func:`save` was given a model spec that does not rebuild the model being saved (nothing was written)."""


# =========================================================================== files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with _open_regular(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _current_umask() -> int:
    """The process's file mode creation mask (POSIX has no call that reads it without setting it).

    Set to the strict 0o077 for the instant between the two calls, so a file another thread
    creates meanwhile is never more open than intended.
    """
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


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


def _open_regular(path: Path) -> Any:
    """Open a file of an artifact for reading without following a symbolic link."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ArtifactError(f"{path} is a symbolic link; fxprune never follows links inside an artifact "
                                "(one could point anywhere). Hint: put the real file in the folder") from exc
        raise ArtifactError(f"cannot read {path}: {exc.strerror or exc}") from exc
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        raise ArtifactError(f"{path} is not a regular file. Hint: copy the artifact again")
    return f


def _check_member(folder: Path, name: str) -> None:
    """One of the three files, as a regular file of the folder itself (a link is refused)."""
    path = folder / name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return  # reported together with the other missing files
    if stat.S_ISLNK(st.st_mode):
        raise ArtifactError(f"{path} is a symbolic link; fxprune never follows links inside an artifact "
                            "(one could point outside the folder). Hint: put the real file in the folder")
    if not stat.S_ISREG(st.st_mode):
        raise ArtifactError(f"{path} is not a regular file. Hint: copy the artifact again")


# =========================================================================== strict JSON


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed (only finite numbers)")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:24]} is out of range")
    return value


def _small_int(text: str) -> int:
    if len(text.lstrip("-")) > 19:  # past int64: no real count or index, and int() of 1e6 digits is slow
        raise ValueError(f"integer {text[:24]}... is out of range")
    return int(text)


def _unique(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _read_json(path: Path, corrupt: str) -> Any:
    """Parse one of our JSON files strictly: size-capped, UTF-8, finite numbers, unique keys."""
    with _open_regular(path) as f:
        data = f.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise ArtifactError(f"{path} {corrupt}: larger than {MAX_JSON_BYTES >> 20} MiB, the most fxprune reads. "
                            + _HINT_DAMAGED)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{path} {corrupt}: not UTF-8 text (bad byte at offset {exc.start}). {_HINT_DAMAGED}") from exc
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite, parse_int=_small_int,
                          object_pairs_hook=_unique)
    except RecursionError as exc:
        raise ArtifactError(f"{path} {corrupt}: JSON nested too deeply. {_HINT_DAMAGED}") from exc
    except ValueError as exc:  # JSONDecodeError and our hooks' errors
        raise ArtifactError(f"{path} {corrupt} (not valid JSON: {exc}). {_HINT_DAMAGED}") from exc


def _kind(value: Any) -> str:
    """The JSON type of a parsed value, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _bad(path: Path, field: str, want: str, got: Any) -> ArtifactError:
    shown = json.dumps(got)[:60] if not isinstance(got, (dict, list)) else ""
    return ArtifactError(f"{path}: field {field} must be {want}, got {_kind(got)}{' ' + shown if shown else ''}. "
                         + _HINT_DAMAGED)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not 1


def _want_int(path: Path, field: str, value: Any, lo: int = 0, hi: Optional[int] = None) -> int:
    if not _is_int(value) or value < lo or (hi is not None and value > hi):
        bound = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
        raise _bad(path, field, bound, value)
    return value


def _want_str(path: Path, field: str, value: Any, *, null: bool = False) -> Optional[str]:
    if value is None and null:
        return None
    if not isinstance(value, str):
        raise _bad(path, field, "a string" + (" or null" if null else ""), value)
    return value


def _want_obj(path: Path, field: str, value: Any) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(path, field, "an object", value)
    return value


def _want_list(path: Path, field: str, value: Any, most: Optional[int] = None) -> List[Any]:
    if not isinstance(value, list):
        raise _bad(path, field, "an array", value)
    if most is not None and len(value) > most:
        raise _bad(path, field, f"an array of at most {most} items", f"{len(value)} items")
    return value


def _check_depth(path: Path, field: str, value: Any) -> None:
    """Free-form JSON must stay shallow (iterative: the check itself cannot overflow)."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > _MAX_FREEFORM_DEPTH:
            raise ArtifactError(f"{path}: field {field} is nested more than {_MAX_FREEFORM_DEPTH} levels deep. "
                                + _HINT_DAMAGED)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


# =========================================================================== schemas


def _input_elements(shapes: List[List[int]]) -> int:
    return sum(math.prod(s) for s in shapes)


def _validate_inputs(path: Path, value: Any) -> Optional[List[Dict[str, Any]]]:
    if value is None:
        return None
    specs = _want_list(path, "inputs", value, MAX_INPUTS)
    shapes = []
    for i, spec in enumerate(specs):
        where = f"inputs[{i}]"
        spec = _want_obj(path, where, spec)
        shape = _want_list(path, f"{where}.shape", spec.get("shape"), MAX_INPUT_DIMS)
        for j, dim in enumerate(shape):
            _want_int(path, f"{where}.shape[{j}]", dim, 0, MAX_INPUT_ELEMENTS)
        dtype = _want_str(path, f"{where}.dtype", spec.get("dtype"))
        if dtype not in _DTYPES:
            raise _bad(path, f"{where}.dtype", f"a torch dtype name ({', '.join(list(_DTYPES)[:4])}, ...)", dtype)
        shapes.append(shape)
    if _input_elements(shapes) > MAX_INPUT_ELEMENTS:
        raise ArtifactError(
            f"{path}: field inputs records example inputs of {_input_elements(shapes):,} elements "
            f"({' + '.join('x'.join(map(str, s)) for s in shapes)}), more than the {MAX_INPUT_ELEMENTS:,} fxprune "
            "allocates to replay a plan. Hint: re-save with a batch-1 example input (example_inputs=x[:1])")
    return specs


def _validate_spec(path: Path, value: Any) -> Optional[ModelSpec]:
    """meta.json's ``model_spec`` (or None): schema, types and bounds; imports nothing."""
    if value is None:
        return None
    try:
        return ModelSpec.from_dict(value)
    except ModelSpecError as exc:
        raise ArtifactError(f"{path}: field model_spec: {exc}. {_HINT_DAMAGED}") from exc


def _validate_meta(meta: Any, path: Path) -> Dict[str, Any]:
    """meta.json, field by field (format version 1). Unknown fields are ignored."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else _kind(meta)
        raise ArtifactError(f"{path} is not fxprune artifact metadata (format {found!r}, expected {FORMAT!r})")
    version = meta.get("format_version")
    _want_int(path, "format_version", version, 1)
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{path.parent} uses artifact format version {version!r}; this fxprune "
                            f"({__version__}) reads up to {FORMAT_VERSION}. Hint: upgrade fxprune")
    for key in ("created", "fxprune_version", "torch_version", "python_version"):
        if key in meta:
            _want_str(path, key, meta[key])
    _want_str(path, "source", meta.get("source"), null=True)
    _want_str(path, "model_class", meta.get("model_class"), null=True)
    _validate_spec(path, meta.get("model_spec"))
    if not isinstance(meta.get("training"), bool):
        raise _bad(path, "training", "true or false", meta.get("training"))
    _validate_inputs(path, meta.get("inputs"))
    aliases = _want_obj(path, "aliases", meta.get("aliases", {}))
    for name, target in aliases.items():
        _want_str(path, f"aliases.{name}", target)
    dtypes = _want_obj(path, "dtypes", meta.get("dtypes", {}))
    for name, dtype in dtypes.items():
        if dtype not in _DTYPES:
            raise _bad(path, f"dtypes.{name}", "a torch dtype name", dtype)
    for key in ("num_tensors", "num_parameters"):
        if key in meta:
            _want_int(path, key, meta[key])
    files = _want_obj(path, "files", meta.get("files"))
    if set(files) != {PLAN_FILE, WEIGHTS_FILE}:
        raise _bad(path, "files", f"an object with exactly the keys {PLAN_FILE!r} and {WEIGHTS_FILE!r}",
                   sorted(files))
    for name in (PLAN_FILE, WEIGHTS_FILE):
        entry = _want_obj(path, f"files.{name}", files[name])
        _want_int(path, f"files.{name}.bytes", entry.get("bytes"))
        digest = entry.get("sha256")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise _bad(path, f"files.{name}.sha256", "64 lowercase hex digits", digest)
    return meta


def _validate_plan(data: Any, path: Path) -> Tuple[PruningPlan, Any]:
    """plan.json, field by field, into a PruningPlan; also returns its "source" (or ... if absent)."""
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} is not a valid fxprune plan: it holds {_kind(data)}, not an object. {_HINT_DAMAGED}")
    version = data.get("version")
    if not _is_int(version) or not 1 <= version <= PLAN_VERSION:
        raise ArtifactError(f"{path}: plan version {version!r} is not one this fxprune reads (1 to {PLAN_VERSION}). "
                            "Hint: upgrade fxprune, or re-save the model")
    groups: List[GroupPlan] = []
    for i, g in enumerate(_want_list(path, "groups", data.get("groups"))):
        where = f"groups[{i}]"
        g = _want_obj(path, where, g)
        key = _want_str(path, f"{where}.key", g.get("key"))
        size = _want_int(path, f"{where}.size", g.get("size"), 1, _MAX_CHANNELS)
        keep = _want_list(path, f"{where}.keep", g.get("keep"), size)
        for j, index in enumerate(keep):
            _want_int(path, f"{where}.keep[{j}]", index, 0, size - 1)
        if not keep or len(set(keep)) != len(keep):
            raise _bad(path, f"{where}.keep", f"a non-empty array of distinct channel indices in [0, {size})",
                       f"{len(keep)} items, {len(keep) - len(set(keep))} repeated")
        modules = _want_list(path, f"{where}.modules", g.get("modules", []))
        for j, name in enumerate(modules):
            _want_str(path, f"{where}.modules[{j}]", name)
        renorm = g.get("renormalising", False)
        if not isinstance(renorm, bool):
            raise _bad(path, f"{where}.renormalising", "true or false", renorm)
        groups.append(GroupPlan(str(key), size, list(keep), list(modules), renorm))
    criterion = _want_str(path, "criterion", data.get("criterion", ""))
    policy = _want_obj(path, "policy", data.get("policy") or {})
    _check_depth(path, "policy", policy)
    model = _want_obj(path, "model", data.get("model") or {})
    for k, v in model.items():
        _want_str(path, f"model.{k}", v)
    source = data.get("source", ...)
    if source is not ...:
        _want_str(path, "source", source, null=True)
    options = _want_obj(path, "rule_options", data.get("rule_options") or {})
    try:
        options = check_rule_options(options)
    except FxPruneError as exc:
        raise _bad(path, "rule_options", "an object of rule options this fxprune knows", options) from exc
    return PruningPlan(groups, str(criterion), dict(policy), PLAN_VERSION, dict(model), options), source


# =========================================================================== what save may replace


def _artifact_problem(folder: Path) -> Optional[str]:
    """None if ``folder`` is an fxprune artifact :func:`save` may replace, else why it is not.

    It must be a real folder (not a link) whose meta.json carries the format marker and which
    holds exactly meta.json plus the files meta.json lists, all regular files: a folder the
    user also keeps anything else in is theirs, not ours.
    """
    try:
        st = os.lstat(folder)
        names = sorted(os.listdir(folder))
    except OSError as exc:
        return f"cannot list it: {exc.strerror or exc}"
    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link"
    if META_FILE not in names:
        return f"it has no {META_FILE}"
    try:
        meta = _read_json(folder / META_FILE, "is corrupt")
    except ArtifactError as exc:
        return str(exc)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return f"its {META_FILE} has no fxprune format marker"
    files = meta.get("files")
    if not isinstance(files, dict) or not set(files) <= {PLAN_FILE, WEIGHTS_FILE}:
        return f"its {META_FILE} does not list the artifact's files"
    own = {META_FILE, *files}
    foreign = [n for n in names if n not in own]
    if foreign:
        return f"it also holds {', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}"
    if set(names) != own:
        return f"it lacks {', '.join(sorted(own - set(names)))}"
    for name in names:
        if not stat.S_ISREG(os.lstat(folder / name).st_mode):
            return f"{name} in it is not a regular file"
    return None


def _discard(folder: Path) -> bool:
    """Remove a folder of ours: only when it holds nothing but regular files of our names.

    Never recursive: a folder holding anything else is left as it is (returns False).
    """
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return False
    if any(e.name not in ARTIFACT_FILES or e.is_dir(follow_symlinks=False) for e in entries):
        return False
    # meta.json first: a folder half removed has lost its format marker, so it can never be
    # mistaken for (and restored as) a complete artifact.
    entries.sort(key=lambda e: e.name != META_FILE)
    try:
        for e in entries:
            os.unlink(os.path.join(folder, e.name))  # unlink removes a link itself, never its target
        os.rmdir(folder)
    except OSError:
        return False
    return True


# Temporaries are hidden siblings named after the artifact and the writing process, so the
# next save knows which are ours and whether their writer is gone.
_TMP = re.compile(r"(?:(?P<pid>\d+)-)?[A-Za-z0-9_]+\.tmp")
_OLD = re.compile(r"old-(?:(?P<pid>\d+)-)?[0-9a-f]+")
_ACTIVE: Set[str] = set()  # temporaries this process is writing right now
_LEGACY_AGE_S = 600.0  # temporaries of older fxprune versions record no writer: stale after 10 minutes
_FOREIGN_AGE_S = 3600.0  # where a process cannot be probed, a writer's temporary is stale after an hour


def _siblings(dest: Path) -> Iterator[Tuple[Path, str, Optional[int]]]:
    """Our temporaries next to ``dest``: (path, "tmp" or "old", writer pid if recorded)."""
    prefix = f".{dest.name}."
    try:
        names = os.listdir(dest.parent)
    except OSError:
        return
    for name in names:
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix):]
        for kind, pattern in (("tmp", _TMP), ("old", _OLD)):
            m = pattern.fullmatch(rest)
            if m:
                yield dest.parent / name, kind, int(m.group("pid")) if m.group("pid") else None


def process_alive(pid: int) -> Optional[bool]:
    """Whether process ``pid`` runs; None where that cannot be asked safely."""
    if os.name != "posix":
        return None  # os.kill(pid, 0) would terminate the process on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def _stale(path: Path, pid: Optional[int]) -> bool:
    if str(path) in _ACTIVE:
        return False
    try:
        age = time.time() - os.lstat(path).st_mtime
    except OSError:
        return False
    if pid is None:
        return age > _LEGACY_AGE_S
    if pid == os.getpid():
        return True  # an earlier save of this very process that was interrupted
    alive = process_alive(pid)
    return not alive if alive is not None else age > _FOREIGN_AGE_S


def _recover(dest: Path) -> None:
    """If ``dest`` vanished between the two renames of a fallback replace, rename the old one back."""
    if os.path.lexists(dest):
        return
    olds = [p for p, kind, _ in _siblings(dest) if kind == "old" and _artifact_problem(p) is None]
    if not olds:
        return
    newest = max(olds, key=lambda p: os.lstat(p).st_mtime)
    try:
        os.rename(newest, dest)
    except OSError as exc:
        if os.path.lexists(dest):
            return  # someone else restored or wrote it meanwhile
        raise ArtifactError(f"{dest} is missing after an interrupted save; the complete previous artifact is at "
                            f"{newest} and could not be renamed back ({exc.strerror or exc}). "
                            f"Hint: rename {newest.name} to {dest.name} yourself") from exc
    _fsync_dir(dest.parent)


def _clean_stale(dest: Path) -> None:
    for path, _, pid in list(_siblings(dest)):
        if _stale(path, pid):
            _discard(path)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2: Any = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directory entries (Linux renameat2 RENAME_EXCHANGE); False if unavailable."""
    global _renameat2
    if not sys.platform.startswith("linux"):
        return False
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
        except (OSError, AttributeError):
            _renameat2 = False
            return False
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        _renameat2 = fn
    if _renameat2 is False:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # an old kernel or a file system without it: the caller falls back
    raise OSError(err, os.strerror(err), str(b))


def _publish(tmp: Path, dest: Path) -> None:
    """Put the complete folder ``tmp`` at ``dest`` (absent, empty, or an artifact of ours).

    After a crash at any point ``dest`` holds the complete old or the complete new artifact,
    or (fallback only, between its two renames) nothing, with the old one beside it for
    :func:`_recover`.
    """
    if not os.path.lexists(dest):
        os.rename(tmp, dest)  # atomic; fails rather than merge if something appeared meanwhile
        return
    if _exchange(tmp, dest):
        _drop_previous(tmp, dest)  # tmp now holds the previous artifact (or the empty folder)
        return
    old = dest.parent / f".{dest.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        if not os.path.lexists(dest):
            try:
                os.rename(old, dest)
            except OSError:
                pass  # _recover puts it back on the next access
        raise
    _drop_previous(old, dest)


def _drop_previous(folder: Path, dest: Path) -> None:
    if not _discard(folder) and os.path.lexists(folder):
        # Something not ours appeared in the old artifact after it was checked: keep all of it.
        warnings.warn(f"the previous artifact at {dest} was moved to {folder} and kept there, because it now holds "
                      "files fxprune did not write; nothing was deleted. Remove that folder yourself when done",
                      FxPruneWarning, stacklevel=4)


# =========================================================================== save


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


def _own_groups(pruned: nn.Module, plan: PruningPlan) -> Optional[Analysis]:
    """The analysis of ``pruned`` itself (with the plan's rule options), or None if it cannot be analysed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FxPruneWarning)  # the pass warned when the plan was made
            return analyze_model(pruned, rules=rules_for(plan))
    except FxPruneError:
        return None


def _check_plan_fits(pruned: nn.Module, plan: PruningPlan) -> None:
    """Refuse at save time a plan that does not describe ``pruned`` (it could never be loaded).

    Three cheap checks, each a different kind of mismatch: every module the plan names
    exists in the model (a resnet34 plan for a resnet18); each group keeps exactly as many
    channels as the pruned model's own group of that key holds (a plan at another ratio; a
    layer's outputs are no measure of it: q/k/v rows hold the heads' group three times, a
    depthwise conv with a channel multiplier k times, a split producer several groups); and
    every module the model's own groups mention is in the plan (a resnet18 plan for a
    resnet34, whose layers are a superset). Group *membership* survives pruning, so the last
    check holds even where a one-channel group now broadcasts.
    """
    made_for = plan.model.get("class")
    where = f" (the plan was made for a {made_for}, this model is a {type(pruned).__name__})" if made_for else ""
    hint = "Hint: pass the plan this model was pruned with (fxprune.apply(model, plan) -> save(..., plan=plan))"
    modules = dict(pruned.named_modules())
    known = set(modules) | {n for n, _ in pruned.named_parameters(remove_duplicate=False)} \
        | {n for n, _ in pruned.named_buffers(remove_duplicate=False)}
    planned = {m for g in plan.groups for m in g.modules}
    absent = sorted(m for m in planned if m not in known and resolve_attr(pruned, m) is None)
    if absent:
        raise ArtifactError(f"the plan does not describe this model: it names {len(absent)} modules this model does "
                            f"not have ({', '.join(absent[:3])}){where}. {hint}")
    own = _own_groups(pruned, plan)
    # Only where the model's group of that key has the plan's members: a group the pruning
    # changed in kind (one head left, which a rule may read differently) is no measure.
    sizes = {g.key: (g.size, set(g.modules())) for g in own.groups} if own is not None else {}
    for g in plan.groups:
        size, members = sizes.get(g.key, (len(g.keep), set(g.modules)))
        if size != len(g.keep) and (not g.modules or members == set(g.modules)):
            raise ArtifactError(
                f"the plan does not describe this model: group {g.key} keeps {len(g.keep)} of {g.size} channels "
                f"but this model's group {g.key} has {size}. {hint}")
    if not planned:
        return  # a version-1 plan records no members
    members = {m.module for grp in own.groups for m in grp.members} if own is not None else set()
    extra = sorted(m for m in members if m not in planned and m in modules)
    if extra:
        raise ArtifactError(f"the plan does not describe this model: {len(extra)} of its layers are in no group of "
                            f"the plan ({', '.join(extra[:3])}){where}. {hint}")


def _input_specs(pruned: nn.Module, example_inputs: Any) -> Optional[List[Dict[str, Any]]]:
    """Shapes/dtypes of the inputs: given, or read from the placeholders' ShapeProp metadata."""
    specs: List[Dict[str, Any]] = []
    if example_inputs is not None:
        items = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        if not all(isinstance(t, torch.Tensor) for t in items):
            raise ArtifactError("example_inputs must be a tensor or a tuple of tensors")
        specs = [{"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for t in items]
    elif isinstance(pruned, torch.fx.GraphModule):
        for node in pruned.graph.nodes:
            if node.op != "placeholder":
                continue
            meta = node.meta.get("tensor_meta")
            if meta is None or not hasattr(meta, "shape"):
                return None
            specs.append({"shape": list(meta.shape), "dtype": str(meta.dtype).replace("torch.", "")})
    if not specs:
        return None
    shapes = [s["shape"] for s in specs]
    if len(specs) > MAX_INPUTS or any(len(s) > MAX_INPUT_DIMS for s in shapes) or \
            _input_elements(shapes) > MAX_INPUT_ELEMENTS or any(s["dtype"] not in _DTYPES for s in specs):
        raise ArtifactError(
            f"the example inputs to record ({', '.join('x'.join(map(str, s)) for s in shapes[:4])}) exceed what an "
            f"artifact may hold (at most {MAX_INPUTS} inputs of plain dtypes, {MAX_INPUT_DIMS} dims, "
            f"{MAX_INPUT_ELEMENTS:,} elements in all; load() would refuse them). "
            "Hint: pass a batch-1 example, save(..., example_inputs=x[:1])")
    return specs


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
        if str(t.dtype).replace("torch.", "") not in _DTYPES:
            raise ArtifactError(f"state_dict entry {name} has dtype {t.dtype}, which an artifact cannot hold")
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


def _prepare_destination(dest: Path) -> None:
    """Refuse, before writing anything, a ``dest`` that save must not replace."""
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        st = None
    except OSError as exc:  # e.g. a part of the path is a regular file
        raise ArtifactError(f"cannot save to {dest}: {exc.strerror or exc}. Hint: every part of the path above it "
                            "must be a folder you can write to") from exc
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise ArtifactError(f"{dest} is a symbolic link; refusing to replace it. Hint: save to the real folder")
        if not stat.S_ISDIR(st.st_mode):
            raise ArtifactError(f"{dest} exists and is not a folder; refusing to replace it")
        if os.listdir(dest):
            problem = _artifact_problem(dest)
            if problem is not None:
                raise ArtifactError(f"{dest} is not an fxprune artifact; refusing to replace it ({problem}). Nothing "
                                    "was changed. Hint: choose a new path, or empty the folder yourself")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # FileExistsError / NotADirectoryError when a parent is a file
        raise ArtifactError(f"cannot create the folder {dest.parent} for the artifact: {exc.strerror or exc}. "
                            "Hint: is a part of the path a regular file?") from exc


def _spec_of(pruned: nn.Module, spec: Union[ModelSpec, Mapping[str, Any], None], source: Optional[str]
             ) -> Tuple[Optional[ModelSpec], bool]:
    """The spec to record and whether the caller gave it (else it was derived from ``source``)."""
    if spec is not None:
        if isinstance(spec, ModelSpec):
            return spec, True
        if isinstance(spec, Mapping):
            try:
                return ModelSpec.from_dict(spec), True
            except ModelSpecError as exc:
                raise ArtifactError(f"spec: {exc}") from exc
        raise ArtifactError(f"spec must be a fxprune.modelspec.ModelSpec or its dict, got {type(spec).__name__}")
    carried = pruned.meta.get(SPEC_META_KEY) if isinstance(getattr(pruned, "meta", None), dict) else None
    if isinstance(carried, ModelSpec):
        return carried, True
    if source is None:
        return None, False
    prefix, colon, rest = source.partition(":")
    name = rest if prefix == "torchvision" else (source if not colon else None)
    try:
        if name is not None and name in _torchvision_names():
            return ModelSpec(f"torchvision:{name}"), False
        if prefix == "timm":
            return ModelSpec(source), False
    except ModelSpecError:
        return None, False
    return None, False  # a package.module:callable: a file may not name code, so no spec


def _spec_mismatch(spec: ModelSpec, plan: PruningPlan, pruned: nn.Module, inputs: Optional[List[Dict[str, Any]]],
                   dest: Path) -> Optional[str]:
    """Why ``spec`` (replayed with ``plan`` on the meta device) does not rebuild ``pruned``; None if it does.

    None too when it cannot be checked cheaply (no meta kernel for an op): load still checks
    every key and shape strictly.
    """
    try:
        spec.check_allowed()
    except ModelSpecError as exc:
        return str(exc)
    skeleton = _skeleton(spec.build)
    if skeleton is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FxPruneWarning)  # the pass warned when the plan was made
            rebuilt = _replay(skeleton, plan, {"inputs": inputs, "source": str(spec)}, dest, "meta")
    except _Mismatch as exc:
        return str(exc.__cause__ or exc)
    except ArtifactError:
        return None
    want = {k: tuple(v.shape) for k, v in pruned.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if want == got:
        return None
    wrong = [f"{k}: model {want[k]}, spec {got[k]}" for k in want if k in got and want[k] != got[k]]
    others = sorted(set(want) ^ set(got))
    return "; ".join(wrong[:3] + ([f"{len(others)} tensors only on one side ({', '.join(others[:3])})"]
                                  if others else []))


def save(pruned: nn.Module, path: PathLike, *, plan: Union[PruningPlan, str, None] = None,
         source: Optional[str] = None, example_inputs: Any = None,
         spec: Union[ModelSpec, Mapping[str, Any], None] = None) -> Path:
    """Write ``pruned`` to the folder ``path`` (plan.json, weights.safetensors, meta.json).

    ``plan``: the :class:`fxprune.PruningPlan` the model was built from; defaults to
    ``pruned.meta["fxprune_plan"]`` when the model carries it. It must describe ``pruned``
    (its modules, kept counts and group members), else :class:`ArtifactError`: such an
    artifact could never be loaded. ``source``: how to rebuild the original architecture at
    load time: a torchvision name (``"torchvision:resnet18"`` or ``"resnet18"``) or
    ``"pkg.module:callable"``; defaults to ``pruned.meta["fxprune_source"]``; without it,
    :func:`load` needs ``model=``. ``example_inputs``: recorded as input shapes (else read from
    shape metadata if the model was pruned with example inputs); they let :func:`load` replay
    a plan that was made with shape propagation. At most :data:`MAX_INPUT_ELEMENTS` elements
    are recorded (only shapes are stored; a batch of 1 is enough).

    ``spec``: the declarative :class:`fxprune.modelspec.ModelSpec` (or its dict) of the
    original architecture, recorded as meta.json's ``"model_spec"`` so that
    ``fxprune.load(path)`` rebuilds it with no ``model=``, e.g.
    ``ModelSpec("torchvision:resnet18", {"num_classes": 10})``. Default:
    ``pruned.meta["fxprune_model_spec"]`` (a loaded model carries it), else the spec of a
    torchvision or ``timm:`` ``source`` name with default arguments. The spec is replayed with
    the plan on the meta device before anything is written: a given spec that does not
    rebuild ``pruned`` is an :class:`ArtifactError`; a default one that does not (say
    ``source="resnet18"`` for a 10-class resnet18) is left out with an FxPruneWarning, and
    :func:`load` then needs ``model=``.

    ``path`` may be absent, an empty folder or an fxprune artifact (the format marker in its
    meta.json, and no file that is not its own); any other folder or file is refused with
    :class:`ArtifactError` and left untouched. The new artifact is written to a temporary
    sibling, synced, and swapped in atomically (see the module docs): a crash at any point
    leaves the complete old or the complete new artifact. Stale temporaries of an earlier,
    interrupted save to ``path`` are removed first. Every failure, file-system ones
    included, is an :class:`ArtifactError`. Returns the folder's path.

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
    inputs = _input_specs(pruned, example_inputs)
    model_spec, given = _spec_of(pruned, spec, source)
    if model_spec is not None:
        problem = _spec_mismatch(model_spec, the_plan, pruned, inputs, Path(os.fspath(path)))
        if problem is not None and given:
            raise SpecMismatchError(f"spec {model_spec} does not rebuild the model being saved: {problem}. Hint: give the "
                                "constructor arguments the original model was built with, e.g. "
                                "ModelSpec('torchvision:resnet18', {'num_classes': 10})")
        if problem is not None:
            warnings.warn(f"fxprune.save: source {source!r} with default arguments does not rebuild this model "
                          f"({problem}); no model spec recorded, so fxprune.load will need model=. Hint: pass "
                          "spec=fxprune.modelspec.ModelSpec(...) with its constructor arguments",
                          FxPruneWarning, stacklevel=2)
            model_spec = None

    from safetensors.torch import save as st_save

    tensors, aliases = _tensors(pruned)
    plan_data = json.loads(the_plan.to_json())
    plan_data["source"] = source
    try:
        plan_bytes = (json.dumps(plan_data, indent=1, allow_nan=False) + "\n").encode()
    except ValueError as exc:  # a NaN in the policy: load() would refuse it
        raise ArtifactError(f"the plan holds a value JSON cannot store ({exc})") from exc
    try:
        weight_bytes = st_save(tensors, metadata={"format": FORMAT})
    except Exception as exc:  # safetensors raises plain Exceptions (dtype, sharing)
        raise ArtifactError(f"could not serialise the weights: {exc}") from exc
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "fxprune_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "source": source,
        "model_class": type(pruned).__name__,
        "model_spec": None if model_spec is None else model_spec.to_dict(),
        "training": bool(pruned.training),
        "inputs": inputs,
        "aliases": aliases,
        "dtypes": {name: str(t.dtype).replace("torch.", "") for name, t in tensors.items()},
        "num_tensors": len(tensors),
        "num_parameters": int(sum(p.numel() for p in pruned.parameters())),
        "files": {
            PLAN_FILE: {"bytes": len(plan_bytes), "sha256": hashlib.sha256(plan_bytes).hexdigest()},
            WEIGHTS_FILE: {"bytes": len(weight_bytes), "sha256": hashlib.sha256(weight_bytes).hexdigest()},
        },
    }
    meta_bytes = (json.dumps(meta, indent=1) + "\n").encode()

    # Work on the absolute path: temporaries are siblings named after the folder, which
    # "." or "out/.." would not have.
    dest = Path(os.path.abspath(os.fspath(path)))
    if not dest.name:
        raise ArtifactError(f"cannot save to {path!r}: it names no folder. Hint: pass a path such as 'out/model.fxprune'")
    try:
        _recover(dest)  # a previous save died mid-replace: bring the old artifact back first
        _prepare_destination(dest)
        _clean_stale(dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{os.getpid()}-", suffix=".tmp", dir=dest.parent))
        # mkdtemp makes it drwx------; the published folder gets what os.mkdir would give
        # (the user's umask), like the files written into it.
        os.chmod(tmp, 0o777 & ~_current_umask())
    except OSError as exc:
        raise ArtifactError(f"cannot save to {dest}: {exc.strerror or exc}. Hint: choose a path in a writable folder") from exc
    _ACTIVE.add(str(tmp))
    try:
        _write(tmp / PLAN_FILE, plan_bytes)
        _write(tmp / WEIGHTS_FILE, weight_bytes)
        _write(tmp / META_FILE, meta_bytes)  # last: a temporary without it is plainly unfinished
        _fsync_dir(tmp)
        _publish(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException as exc:
        _discard(tmp)
        if isinstance(exc, OSError):
            raise ArtifactError(f"could not write the artifact {dest}: {exc.strerror or exc}. Nothing was replaced. "
                                "Hint: check the free space and permissions of the folder") from exc
        raise
    finally:
        _ACTIVE.discard(str(tmp))
    return Path(path)


# =========================================================================== load


def read_meta(path: PathLike) -> Dict[str, Any]:
    """The parsed, validated ``meta.json`` of an artifact folder.

    Checks that the three files are regular files of the folder (symbolic links are refused)
    and every meta.json field has its type and bounds; a malformed file raises
    :class:`ArtifactError` naming the field. If ``path`` is missing because a save was
    interrupted between its two renames (the fallback path), the complete previous artifact
    is renamed back first.
    """
    folder = Path(path)
    _recover(folder)
    if not folder.is_dir():
        raise ArtifactError(f"no fxprune artifact at {folder}: not a folder")
    for name in ARTIFACT_FILES:
        _check_member(folder, name)
    missing = [f for f in (META_FILE, PLAN_FILE, WEIGHTS_FILE) if not (folder / f).is_file()]
    if missing:
        raise ArtifactError(f"{folder} is not a complete fxprune artifact: missing {', '.join(missing)} "
                            "(an interrupted copy?). Hint: copy the whole folder again or re-save the model")
    return _validate_meta(_read_json(folder / META_FILE, "is corrupt"), folder / META_FILE)


def _check_size(folder: Path, meta: Mapping[str, Any], name: str) -> None:
    want = meta["files"][name]["bytes"]
    size = os.lstat(folder / name).st_size
    if want != size:
        raise ArtifactError(f"{folder / name} is truncated or corrupt: {size} bytes, meta.json says {want}. "
                            "Hint: copy the artifact again")


def _check_sha(folder: Path, meta: Mapping[str, Any], name: str) -> None:
    if _sha256(folder / name) != meta["files"][name]["sha256"]:
        raise ArtifactError(f"{folder / name} is corrupt: its sha256 does not match meta.json. Hint: copy the artifact again")


def _read_plan_file(folder: Path, meta: Mapping[str, Any]) -> PruningPlan:
    path = folder / PLAN_FILE
    plan, source = _validate_plan(_read_json(path, "is not a valid fxprune plan"), path)
    if source is not ... and source != meta.get("source"):
        raise ArtifactError(f"{path}: field source says {source!r} but meta.json says {meta.get('source')!r}. "
                            + _HINT_DAMAGED)
    return plan


def read_plan(path: PathLike, *, verify: bool = True) -> PruningPlan:
    """The :class:`fxprune.PruningPlan` stored in an artifact folder.

    ``verify``: check both files' sizes and sha256 against meta.json first (reads the weights
    once, in chunks). plan.json is validated field by field either way.
    """
    folder = Path(path)
    meta = read_meta(folder)
    if verify:
        for name in (PLAN_FILE, WEIGHTS_FILE):
            _check_size(folder, meta, name)
        for name in (PLAN_FILE, WEIGHTS_FILE):
            _check_sha(folder, meta, name)
    return _read_plan_file(folder, meta)


_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def _torchvision_names() -> List[str]:
    try:
        import torchvision
    except ImportError:
        return []
    return list(torchvision.models.list_models())


def _build_torchvision(name: str) -> nn.Module:
    import inspect

    import torchvision

    builder = torchvision.models.get_model_builder(name)
    kwargs: Dict[str, Any] = {"weights": None}
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs["weights_backbone"] = None  # detection/segmentation builders would download ImageNet weights
    return builder(**kwargs)


@contextlib.contextmanager
def _registered_on_meta() -> Iterator[None]:
    """Move every parameter and buffer to the meta device as a module registers it.

    For constructors that compute on small tensors of their own (torchvision's RegNets call
    ``.tolist()``), which the meta device context cannot run: each layer's tensor exists for
    real only until it is registered, and its initialisation then runs on meta. The hooks are
    process-wide while they are installed (modules built by other threads meanwhile would be
    affected too), so they are held only for the one constructor call.
    """
    from torch.nn.modules.module import (register_module_buffer_registration_hook,
                                         register_module_parameter_registration_hook)

    def parameter(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> Optional[nn.Parameter]:
        return None if param is None else nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    def buffer(module: nn.Module, name: str, value: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if value is None else value.to("meta")

    handles = [register_module_parameter_registration_hook(parameter), register_module_buffer_registration_hook(buffer)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _skeleton(build: Callable[[], nn.Module]) -> Optional[nn.Module]:
    """The architecture with (nearly) all its tensors on the meta device, or None if it cannot be."""
    # A constructor may fail on meta tensors in many ways (NotImplementedError, RuntimeError...);
    # each failure only means "try the next, more real, way".
    try:
        with torch.device("meta"):
            return build()
    except Exception:
        pass
    try:
        with _registered_on_meta():
            return build()
    except Exception:
        return None


def _spec_builder(spec: ModelSpec, folder: Path, where: str) -> Callable[[], nn.Module]:
    """Build ``spec`` after checking its name against the allow-list; errors as :class:`ArtifactError`."""
    try:
        spec.check_allowed()
    except ModelSpecError as exc:
        raise ArtifactError(f"{folder}: {where} {spec}: {exc}. Hint: pass the original architecture as model=") from exc

    def build() -> nn.Module:
        try:
            return spec.build()
        except ModelSpecError as exc:
            raise ArtifactError(f"cannot rebuild {spec} ({where} of {folder}): {exc}") from exc

    return build


def _resolve_model(model: ModelArg, source: Optional[str], folder: Path, spec: Optional[ModelSpec] = None
                   ) -> Tuple[Callable[[], nn.Module], bool]:
    """How to build the original architecture, and whether it may first be built on ``meta``.

    From an nn.Module (used as is), a :class:`~fxprune.modelspec.ModelSpec`, a torchvision or
    ``timm:`` name (built without weights; safe to build on the meta device, which costs no
    memory) or the caller's ``pkg.mod:callable``. With no ``model``: the recorded spec, else a
    recorded torchvision/timm source name; a recorded callable is never imported.
    """
    if isinstance(model, nn.Module):
        return (lambda: model), False
    if isinstance(model, ModelSpec):
        return _spec_builder(model, folder, "model="), True
    if model is None and spec is not None:
        return _spec_builder(spec, folder, "the recorded model_spec"), True
    trusted = model is not None  # a string the caller wrote may import code; one from the file may not
    spec_text = model if model is not None else source
    if spec_text is None:
        raise ArtifactError(f"{folder} does not record its source architecture. Hint: pass model= (the original "
                            "nn.Module, a torchvision name such as 'resnet18', or 'package.module:callable')")
    if not isinstance(spec_text, str):
        raise ArtifactError(f"model must be an nn.Module, a ModelSpec or a string, got {type(spec_text).__name__}")
    prefix, _, rest = spec_text.partition(":")
    if prefix == "torchvision" or ":" not in spec_text:
        name = rest if prefix == "torchvision" else spec_text
        if name not in _torchvision_names():
            raise ArtifactError(f"{name!r} is not a torchvision model name. Hint: pass the original nn.Module as model=")
        return (lambda: _build_torchvision(name)), True
    if prefix == "timm":
        try:
            named = ModelSpec(spec_text)
        except ModelSpecError as exc:
            raise ArtifactError(f"{folder}: {exc}") from exc
        return _spec_builder(named, folder, "model=" if trusted else "the recorded source"), True
    if not trusted:
        raise ArtifactError(
            f"{folder} was saved from {spec_text!r}, a Python callable; fxprune never imports code named by a file. "
            f"Hint: if you trust it, pass it yourself: fxprune.load(path, model={spec_text!r})")
    if not _DOTTED.fullmatch(prefix) or not _DOTTED.fullmatch(rest):
        raise ArtifactError(f"model {spec_text!r} is not of the form 'package.module:callable'. Hint: e.g. "
                            "model='mypkg.nets:build', or pass the nn.Module itself")
    try:
        obj: Any = importlib.import_module(prefix)
        for part in rest.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ArtifactError(f"cannot find {spec_text!r}: {exc}") from exc

    def build() -> nn.Module:
        built = obj() if callable(obj) and not isinstance(obj, nn.Module) else obj
        if not isinstance(built, nn.Module):
            raise ArtifactError(f"{spec_text!r} returned a {type(built).__name__}, not an nn.Module")
        return built

    return build, False


def _example_inputs(meta: Mapping[str, Any], device: Optional[str]) -> Optional[Tuple[torch.Tensor, ...]]:
    specs = meta.get("inputs")  # validated and bounded by read_meta
    if not specs:
        return None
    return tuple(torch.zeros(spec["shape"], dtype=_DTYPES[spec["dtype"]], device=device) for spec in specs)


class _Mismatch(ArtifactError):
    """The plan does not fit the architecture (as opposed to a replay that failed otherwise)."""


def _replay(original: nn.Module, plan: PruningPlan, meta: Mapping[str, Any], folder: Path,
            device: Optional[str]) -> torch.fx.GraphModule:
    inputs = _example_inputs(meta, device)
    # Replay with shapes first when they are known (a plan made with shape propagation may
    # need them), else without; fall back to the other if the first does not fit.
    attempts: List[Optional[Tuple[torch.Tensor, ...]]] = [inputs, None] if inputs is not None else [None]
    mismatch: Optional[PlanMismatchError] = None
    other: Optional[FxPruneError] = None
    for attempt in attempts:
        try:
            # The pass warns about ops it freezes; that is news only for a plan that fits, so
            # hold the warnings back until the replay has succeeded.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", FxPruneWarning)
                # A freshly built model is in train mode; fxprune traces in eval mode whatever
                # the mode, and would warn about that to a user who never chose it. The mode
                # the artifact was saved in is restored after the weights are loaded.
                rebuilt = apply(original.eval(), plan, example_inputs=attempt)
            for w in caught:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            return rebuilt
        except PlanMismatchError as exc:
            mismatch = mismatch or exc
        except FxPruneError as exc:
            other = other or exc
    where = f"saved from {meta.get('source')!r} ({meta.get('model_class')})" if meta.get("source") else \
        f"saved from a {meta.get('model_class')}"
    if mismatch is None:
        raise ArtifactError(f"cannot rebuild {folder} ({where}) from {type(original).__name__}: {other}") from other
    raise _Mismatch(
        f"the artifact {folder} ({where}) does not fit the model given ({type(original).__name__}): {mismatch}. "
        "Hint: pass the architecture the artifact was pruned from (same class and constructor arguments)") from mismatch


def _left_on_meta(gm: nn.Module) -> bool:
    """Whether a meta-built model holds a tensor the state_dict will not replace."""
    stored = set(gm.state_dict())
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if t.is_meta and name not in stored:
            return True  # a non-persistent buffer: only a real construction knows its value
    for module in gm.modules():
        registered = set(module._parameters) | set(module._buffers)
        if any(isinstance(v, torch.Tensor) and v.is_meta and k not in registered for k, v in vars(module).items()):
            return True  # a plain tensor attribute (e.g. a traced constant)
    return False


def _rebuild(build: Callable[[], nn.Module], meta_ok: bool, plan: PruningPlan, meta: Mapping[str, Any],
             folder: Path) -> torch.fx.GraphModule:
    """The pruned model's skeleton: on the meta device when possible, its tensors not yet loaded.

    Building on ``meta`` first means an artifact naming a huge architecture costs nothing until
    its plan has been checked against that architecture's structure.
    """
    if meta_ok:
        skeleton = _skeleton(build)
        if skeleton is not None:
            try:
                rebuilt = _replay(skeleton, plan, meta, folder, "meta")
            except _Mismatch:
                raise
            except ArtifactError:
                rebuilt = None  # an op without a meta kernel: replay for real below
            if rebuilt is not None and not _left_on_meta(rebuilt):
                return rebuilt
    return _replay(build(), plan, meta, folder, None)


def _stored_dtype(code: str, path: Path, name: str) -> torch.dtype:
    dtype = _DTYPES.get(_ST_DTYPES.get(code, ""))
    if dtype is None:
        raise ArtifactError(f"{path}: tensor {name} has dtype {code}, which fxprune does not load. " + _HINT_DAMAGED)
    return dtype


def _load_weights(rebuilt: nn.Module, folder: Path, meta: Mapping[str, Any], device: Union[str, torch.device]) -> None:
    """Check every stored tensor's name, shape and dtype against ``rebuilt``, then read and assign them.

    The file is memory-mapped (safetensors ``safe_open``): nothing is read before its header
    has been checked, and then each tensor once.
    """
    from safetensors import SafetensorError, safe_open

    path = folder / WEIGHTS_FILE
    _check_member(folder, WEIGHTS_FILE)
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, ValueError, OSError) as exc:
        raise ArtifactError(f"{path} is not a readable safetensors file: {exc}") from exc
    with handle as f:
        stored: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {}
        for name in f.keys():
            piece = f.get_slice(name)
            stored[name] = (tuple(piece.get_shape()), _stored_dtype(piece.get_dtype(), path, name))
        meta_file = folder / META_FILE
        if "num_tensors" in meta and meta["num_tensors"] != len(stored):
            raise ArtifactError(f"{path} holds {len(stored)} tensors, {meta_file} says {meta['num_tensors']}. "
                                + _HINT_DAMAGED)
        aliases: Mapping[str, str] = meta.get("aliases") or {}
        for name, target in aliases.items():
            if name in stored:
                raise ArtifactError(f"{meta_file}: field aliases.{name} names a tensor that is also stored in "
                                    f"{WEIGHTS_FILE}; an alias may only tie a name that is not stored. " + _HINT_DAMAGED)
            if target not in stored:
                raise ArtifactError(f"{meta_file}: alias {name} -> {target} names no stored tensor. " + _HINT_DAMAGED)
        recorded: Mapping[str, str] = meta.get("dtypes") or {}
        expected = rebuilt.state_dict()
        available = {**stored, **{name: stored[target] for name, target in aliases.items()}}
        missing = sorted(set(expected) - set(available))
        unexpected = sorted(set(available) - set(expected))
        wrong = [f"{k}: file {available[k][0]}, model {tuple(expected[k].shape)}"
                 for k in expected if k in available and available[k][0] != tuple(expected[k].shape)]
        if missing or unexpected or wrong:
            parts = []
            if wrong:
                parts.append(f"{len(wrong)} weights of the wrong shape ({'; '.join(wrong[:3])})")
            if missing:
                parts.append(f"{len(missing)} missing ({', '.join(missing[:3])})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])})")
            raise ArtifactError(f"the weights in {path} do not fit the rebuilt model: {'; '.join(parts)}. "
                                "Hint: the model given must be the architecture (and constructor arguments, e.g. "
                                "num_classes) the artifact was saved from")
        for name, (_, dtype) in stored.items():
            want = recorded.get(name)
            if want is not None and _DTYPES[want] != dtype:
                raise ArtifactError(f"{path}: tensor {name} is stored as {str(dtype)[6:]} but {meta_file} records "
                                    f"{want}. " + _HINT_DAMAGED)
        for name, (_, dtype) in available.items():
            model_dtype = expected[name].dtype
            # Floating tensors may be saved in another float precision (model.half()); an integer
            # or boolean buffer (BatchNorm's num_batches_tracked) must keep its exact dtype.
            same_kind = (dtype.is_floating_point == model_dtype.is_floating_point
                         and dtype.is_complex == model_dtype.is_complex)
            if not same_kind or (not model_dtype.is_floating_point and dtype != model_dtype):
                raise ArtifactError(f"{path}: tensor {name} is stored as {str(dtype)[6:]}, but the model's is "
                                    f"{str(model_dtype)[6:]}. " + _HINT_DAMAGED)
        _check_sha(folder, meta, WEIGHTS_FILE)  # only now: a file that cannot fit is not hashed
        tensors: Dict[str, torch.Tensor] = {}
        try:
            for name, (shape, dtype) in stored.items():
                # get_tensor may hand out a view of the memory map, at any byte offset: copy it
                # into a fresh allocation (aligned like the saved model's, so kernels take the
                # same code paths and outputs stay bit-identical) on the target device.
                tensors[name] = torch.empty(shape, dtype=dtype, device=device).copy_(f.get_tensor(name))
        except (SafetensorError, ValueError, OSError) as exc:
            raise ArtifactError(f"{path} is not a readable safetensors file: {exc}") from exc
    for name, target in aliases.items():
        tensors[name] = tensors[target]
    # assign=True installs the stored tensors themselves: dtypes and values exactly as saved
    # (copying into the rebuilt ones would cast), and tied names end up sharing one tensor.
    rebuilt.load_state_dict(tensors, strict=True, assign=True)


def load(path: PathLike, model: ModelArg = None, *, map_location: Union[str, torch.device] = "cpu") -> torch.fx.GraphModule:
    """Rebuild the pruned GraphModule saved at ``path`` and load its weights (never unpickles).

    ``model``: the original, unpruned architecture: an ``nn.Module`` (its weights do not
    matter, they are all replaced), a :class:`fxprune.modelspec.ModelSpec`, a torchvision name
    (``"resnet18"``, ``"torchvision:resnet18"``), ``"timm:<name>"`` or
    ``"package.module:callable"`` (imported and called with no arguments). Given, it always
    wins. Default: the ``model_spec`` recorded at save time (every artifact ``fxprune run`` and
    ``fxprune prune --save`` write has one: e.g. resnet18 with 10 classes, 1 input channel and
    the small-image stem), else the recorded ``source`` if it is a torchvision or timm name; a
    recorded Python callable is never imported on the file's word, pass it explicitly. The plan is replayed with
    :func:`fxprune.apply` (a torchvision architecture on the ``meta`` device, so a plan that does
    not fit is rejected before any memory is spent) and every saved tensor is assigned (strict:
    all keys, shapes and dtypes), so the result computes bit-identically to the model that was
    saved. It carries its plan in ``loaded.meta["fxprune_plan"]`` and comes back in the
    train/eval mode it was saved in.

    Raises :class:`ArtifactError` (an :class:`fxprune.FxPruneError`) naming the problem for a
    missing, incomplete, truncated, corrupt, malformed or tampered folder (see the module docs
    for every check), a plan for another architecture, and weights of the wrong shape or dtype.

    >>> import os, tempfile, torch, torchvision, fxprune
    >>> m = torchvision.models.resnet18().eval()
    >>> p = fxprune.plan(m, 0.5)
    >>> out = fxprune.save(fxprune.apply(m, p), os.path.join(tempfile.mkdtemp(), "a"), plan=p)
    >>> fxprune.load(out, model=torchvision.models.resnet18()).get_submodule("layer1.0.conv1").out_channels
    32
    """
    folder = Path(path)
    meta = read_meta(folder)
    for name in (PLAN_FILE, WEIGHTS_FILE):
        _check_size(folder, meta, name)
    _check_sha(folder, meta, PLAN_FILE)
    plan = _read_plan_file(folder, meta)
    source = meta.get("source")
    spec = _validate_spec(folder / META_FILE, meta.get("model_spec"))
    build, meta_ok = _resolve_model(model, source, folder, spec)
    rebuilt = _rebuild(build, meta_ok, plan, meta, folder)
    _load_weights(rebuilt, folder, meta, map_location)
    rebuilt.train(meta["training"])
    rebuilt.meta[PLAN_META_KEY] = plan
    if source is not None:
        rebuilt.meta[SOURCE_META_KEY] = source
    if spec is not None:
        rebuilt.meta[SPEC_META_KEY] = spec  # a later save of this model records it again
    return rebuilt
