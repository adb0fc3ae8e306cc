"""The public face of fxprune: prune, plan, apply, find_groups.

Each call works on its own copy of the graph: the model passed in is never modified.
"""

from __future__ import annotations

import contextlib
import copy
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import torch
import torch.fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from .allocation import (CostModel, Policy, check_prunable, requests_pruning, unpruned_message,
                         warn_unmatched_ignore)
from .cost import count_macs, count_params
from .criteria import CriterionSpec
from .errors import FxPruneError, FxPruneWarning, InternalError, describe_node
from .groups import Analysis, Group, analyze, select_channels
from .importance import Criterion, ScoringOptions, check_importance
from .latency_model import LatencyOptions, LatencyTarget, plan_for_latency
from .planning import GroupPlan, PruningPlan, make_plan, rules_for
from .registry import Registry
from .rewrite import Builder, rewrite
from .rules import LAYER_NORM_MODULES, RuleTable
from .export import is_lifted
from .targets import Target, accepts_objects
from .tracing import as_graph_module, cast_model, propagate_shapes, trace

__all__ = ["prune", "plan", "apply", "find_groups", "analyze_model", "GroupList", "keep_class", "PruneRequest", "decide"]

ModelLike = Union[nn.Module, torch.fx.GraphModule]


class GroupList(List[Group]):
    """The groups of a model; ``print()`` shows one line per group."""

    def __str__(self) -> str:
        prunable = sum(g.prunable for g in self)
        head = f"{len(self)} channel groups, {prunable} prunable"
        return "\n".join([head] + [str(g) for g in self])

    @property
    def prunable(self) -> List[Group]:
        return [g for g in self if g.prunable]


@contextlib.contextmanager
def few_threads() -> Iterator[None]:
    """Run the pass on one intra-op thread; the user's thread setting is restored afterwards."""
    # Why: the pass is hundreds of small, memory-bound kernels (norms, index_select); on a
    # 2-core machine, fanning each out to a thread pool made the whole pass several times slower.
    before = torch.get_num_threads()
    if before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before > 1:
            torch.set_num_threads(before)


def as_inputs(example_inputs: Any) -> Optional[Tuple[Any, ...]]:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise FxPruneError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


_IGNORE_FORMS = "a module name or glob pattern (a str, e.g. 'fc' or 'layer4.*') or a list of them"


def check_ignore(ignore: Union[None, str, Iterable[str]]) -> Tuple[str, ...]:
    """``ignore=`` as a tuple of patterns; anything else is a clear error before any work."""
    if ignore is None:
        return ()
    if isinstance(ignore, str):
        return (ignore,)
    if isinstance(ignore, (bytes, Mapping)) or not isinstance(ignore, Iterable):
        raise FxPruneError(f"ignore= must be {_IGNORE_FORMS}, got {ignore!r} ({type(ignore).__name__})")
    patterns = tuple(ignore)
    for i, pattern in enumerate(patterns):
        if not isinstance(pattern, str):
            raise FxPruneError(f"ignore= must be {_IGNORE_FORMS}: entry {i} is {pattern!r} ({type(pattern).__name__})")
    return patterns


def _check_arity(gm: torch.fx.GraphModule, inputs: Tuple[Any, ...]) -> None:
    """``example_inputs`` must be one forward call's positional arguments: as many as the graph's inputs.

    An extra tensor would otherwise be dropped without a word (a one-input model given
    ``(x, x)`` ran on the first one); arguments with defaults may be left out.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if any(str(n.target).startswith("*") for n in placeholders):
        return  # *args: any number fits
    required = [n for n in placeholders if not n.args]  # a placeholder's args hold its default, if any
    if len(required) <= len(inputs) <= len(placeholders):
        return
    names = ", ".join(str(n.target) for n in placeholders) or "no arguments"
    wanted = (f"{len(placeholders)}" if len(required) == len(placeholders)
              else f"{len(required)} to {len(placeholders)}")
    raise FxPruneError(
        f"example_inputs has {len(inputs)} element{'s' if len(inputs) != 1 else ''}, but the forward of "
        f"{gm.__class__.__name__} takes {wanted} ({names}). Hint: example_inputs is the tuple of positional "
        "arguments of one forward call: x or (x,) for a one-input model (a batch is one tensor, not a tuple of samples)")


def analyze_model(model: ModelLike, *, example_inputs: Any = None, ignore: Union[str, Iterable[str]] = (),
                  strict: bool = False, rules: Optional[RuleTable] = None,
                  allow_renormalising: bool = True) -> Analysis:
    """Trace if needed and analyse a private copy of the graph (modules are shared, read-only)."""
    inputs = as_inputs(example_inputs)
    patterns = check_ignore(ignore)  # bad arguments fail before any tracing
    # An nn.Module torch.fx cannot trace is exported instead, given inputs (with a warning);
    # the route depends on the model alone, so plan() and apply() analyse the same graph.
    gm = as_graph_module(model, inputs)
    if gm is model:
        # The caller's graph: metadata goes on the nodes of our own copy. Submodules are
        # shared and only read. A graph we traced ourselves is private already.
        work = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph), gm.__class__.__name__)
        work.training = gm.training
    else:
        work = gm
    if inputs is not None:
        _check_arity(work, inputs)
        propagate_shapes(work, inputs)
    analysis = analyze(work, ignore=patterns, strict=strict, rules=rules, allow_renormalising=allow_renormalising)
    warn_unmatched_ignore(analysis, patterns, stacklevel=3)
    return analysis


def find_groups(model: ModelLike, *, example_inputs: Any = None, ignore: Union[str, Iterable[str]] = (),
                strict: bool = False, rules: Optional[RuleTable] = None,
                allow_renormalising: bool = True) -> GroupList:
    """The channel-coupled groups of ``model``, printable for humans.

    A group a LayerNorm/RMSNorm normalises over says so (``renormalising``, the norms named):
    see :attr:`fxprune.Group.renormalising`; ``allow_renormalising=False`` keeps those whole.

    >>> import torch, torchvision, fxprune
    >>> groups = fxprune.find_groups(torch.fx.symbolic_trace(torchvision.models.resnet18()))
    >>> len(groups), len(groups.prunable)
    (13, 12)
    >>> groups[0].modules("out")
    ['conv1', 'layer1.0.conv2', 'layer1.1.conv2']

    ``rules``: the rule table to analyse with (see :func:`prune`).
    """
    return GroupList(analyze_model(model, example_inputs=example_inputs, ignore=ignore, strict=strict, rules=rules,
                                   allow_renormalising=allow_renormalising).groups)


# ------------------------------------------------------------------ keep_class: the user's own class back

def _targets(gm: torch.fx.GraphModule) -> List[str]:
    """Every module and attribute ``gm``'s graph reads, once each, in graph order."""
    return list(dict.fromkeys(str(n.target) for n in gm.graph.nodes if n.op in ("call_module", "get_attr")))


def _replacements(model: nn.Module, pruned: torch.fx.GraphModule) -> Dict[str, Tuple[Any, Any]]:
    """``target -> (the user's object, the pruned one)`` for every module and attribute the graph reads.

    A target ``model`` lacks raises AttributeError; keep_class turns that into a fallback.
    """
    return {t: (operator.attrgetter(t)(model), operator.attrgetter(t)(pruned)) for t in _targets(pruned)}


def _place(root: nn.Module, target: str, value: Any) -> None:
    """Set ``root.<target>`` to ``value`` (a submodule, parameter, buffer or plain attribute)."""
    owner_path, _, name = target.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    if getattr(owner, name, None) is not value:
        setattr(owner, name, value)  # nn.Module.__setattr__ files it under _modules/_parameters/_buffers


def _node_key(node: torch.fx.Node) -> Tuple[Any, ...]:
    """What a node computes, with its inputs named: equal keys over equal graphs are equal code."""
    named = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: ("%node", n.name))
    return (node.op, node.name, node.target, named)


def _mismatch(copy_: nn.Module, pruned: torch.fx.GraphModule) -> Optional[str]:
    """Why ``copy_`` is not provably the function of ``pruned`` (None: it is).

    Two checks, both structural: every module and tensor the pruned graph reads is, in the
    copy, the very same object; and the copy's own ``forward``, traced again, is the pruned
    graph node for node (Python code reading a pruned size, e.g. ``out_channels``, traces into
    other constants). The same code over the same objects is the same function.
    """
    if type(copy_).__call__ is not nn.Module.__call__:
        return f"{type(copy_).__name__} overrides __call__, which the traced graph (its forward) leaves out"
    hooks = [kind for kind in ("_forward_pre_hooks", "_forward_hooks") if getattr(copy_, kind, None)]
    if hooks:
        # fx traces the root's forward, not its __call__: the graph never ran these, the copy would.
        return f"it has {' and '.join(h.strip('_') for h in hooks)} on the model itself, which the traced graph leaves out"
    for target in _targets(pruned):
        if operator.attrgetter(target)(copy_) is not operator.attrgetter(target)(pruned):
            return f"{target} in the copy is not the pruned module or tensor"
    modes = [(m, m.training) for m in copy_.modules()]
    copy_.eval()  # the mode fxprune traced in; trace() would otherwise trace twice to compare modes
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the first trace already said whatever this one would
            retraced = trace(copy_)
    except FxPruneError as exc:
        return f"tracing the copy again failed: {exc}"
    finally:
        for m, mode in modes:
            m.training = mode
    theirs, ours = list(retraced.graph.nodes), list(pruned.graph.nodes)
    for mine, want in zip(theirs, ours):
        if _node_key(mine) != _node_key(want):
            return (f"its forward, traced again, has {mine.format_node()} where the pruned graph has "
                    f"{describe_node(want)} (Python code in forward reads a value pruning changed, e.g. a channel count)")
    if len(theirs) != len(ours):
        return f"its forward traces to {len(theirs)} nodes, the pruned graph has {len(ours)}"
    if retraced.graph.python_code("self").src != pruned.graph.python_code("self").src:
        return "its forward traces to other generated code than the pruned graph's"
    return None


# Width attributes a layer keeps besides its tensors: a lifted layer that is not of the user's
# exact type (a subclass such as Hugging Face's ConvNextLayerNorm) gets its tensors and these.
_WIDTHS = ("in_channels", "out_channels", "in_features", "out_features", "num_features", "normalized_shape",
           "num_channels", "groups", "embed_dim")
_PROOF_INPUTS = 3  # random inputs the numerical proof runs on; the copy must agree on each


def _split_width(module: nn.Module) -> None:
    """Ultralytics C2f/C3k2-style blocks split ``cv1``'s output in two halves of ``self.c``.

    ``forward_split`` reads ``self.c``; it must follow ``cv1``'s (pruned) width where the two
    halves are equal. Where they are not, nothing is changed and the proof decides.
    """
    conv = getattr(getattr(module, "cv1", None), "conv", None)
    width = getattr(conv, "out_channels", None)
    if isinstance(getattr(module, "c", None), int) and isinstance(width, int) and width % 2 == 0:
        module.c = width // 2



def _norm_widths(root: nn.Module) -> None:
    """A LayerNorm/RMSNorm subclass traced through (torchvision's LayerNorm2d, Hugging Face's
    ConvNextLayerNorm) got its pruned weight by name; its forward passes ``self.normalized_shape``,
    which must say the weight's new width. Only the one-dim case is ever pruned; the proof decides."""
    for module in root.modules():
        if not isinstance(module, LAYER_NORM_MODULES):
            continue
        weight, shape = getattr(module, "weight", None), tuple(getattr(module, "normalized_shape", ()))
        if isinstance(weight, torch.Tensor) and weight.dim() == 1 and len(shape) == 1 and shape[0] != weight.shape[0]:
            module.normalized_shape = (int(weight.shape[0]),)


def _update_widths(root: nn.Module) -> None:
    """Python ints a class's forward reads about widths pruning changed (see :func:`_split_width`)."""
    _norm_widths(root)
    for module in root.modules():
        if type(module).__module__.startswith("ultralytics.") and hasattr(module, "cv1") and hasattr(module, "c"):
            _split_width(module)


def _transplant(old: nn.Module, new: nn.Module) -> None:
    """Give ``old`` the tensors and width attributes of ``new`` (a layer of another type)."""
    for name, param in new.named_parameters(recurse=False):
        setattr(old, name, param)
    for name, buf in new.named_buffers(recurse=False):
        setattr(old, name, buf)
    for attr in _WIDTHS:
        if hasattr(old, attr) and hasattr(new, attr):
            setattr(old, attr, getattr(new, attr))


def _random_inputs(example_inputs: Tuple[Any, ...], seed: int) -> Tuple[Any, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(x.shape, generator=g, dtype=torch.float64) if isinstance(x, torch.Tensor)
                 and x.is_floating_point() else x for x in example_inputs)


def _numerical_mismatch(copy_: nn.Module, pruned: torch.fx.GraphModule, example_inputs: Tuple[Any, ...]) -> Optional[str]:
    """Why ``copy_`` does not compute ``pruned`` (None: it does), run on random float64 inputs in eval mode.

    The proof for a graph lifted from torch.export, whose class torch.fx cannot re-trace: both
    run on float64 deep copies (so neither the copy nor the pruned model caches anything from
    the proof, e.g. Ultralytics' anchors) on several random inputs shaped like
    ``example_inputs``; every output tensor must agree, and the outputs must have the same structure.
    """
    try:
        mine, want = copy.deepcopy((copy_, pruned))
        cast_model(mine, torch.float64).eval()
        cast_model(want, torch.float64).eval()
    except Exception as exc:  # user code (__deepcopy__, .to): any failure means no proof
        return f"copying it for the float64 proof failed: {type(exc).__name__}: {exc}"
    for seed in range(_PROOF_INPUTS):
        inputs = _random_inputs(example_inputs, seed)
        try:
            with torch.no_grad():
                got, ref = mine(*inputs), want(*inputs)
        except Exception as exc:
            return f"running it on a random float64 input failed: {type(exc).__name__}: {exc}"
        got_leaves, got_spec = pytree.tree_flatten(got)
        ref_leaves, ref_spec = pytree.tree_flatten(ref)
        if len(got_leaves) != len(ref_leaves):
            return f"it returns {len(got_leaves)} values where the pruned graph returns {len(ref_leaves)} ({got_spec} vs {ref_spec})"
        for i, (a, b) in enumerate(zip(got_leaves, ref_leaves)):
            if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
                return f"output {i} is a {type(a).__name__} where the pruned graph returns a {type(b).__name__}"
            if not isinstance(a, torch.Tensor):
                continue
            if a.shape != b.shape:
                return f"output {i} has shape {tuple(a.shape)} where the pruned graph's has {tuple(b.shape)}"
            if a.is_floating_point() or b.is_floating_point():
                scale = float(b.abs().max()) if b.numel() else 1.0
                if not torch.allclose(a.double(), b.double(), rtol=1e-9, atol=1e-9 * max(1.0, scale)):
                    diff = float((a.double() - b.double()).abs().max())
                    return f"output {i} differs from the pruned graph's by up to {diff:.3g} on a random float64 input"
            elif not torch.equal(a, b):
                return f"output {i} differs from the pruned graph's on a random float64 input"
    return None


def _lifted_copy(model: nn.Module, pruned: torch.fx.GraphModule,
                 example_inputs: Optional[Tuple[Any, ...]]) -> Tuple[Optional[nn.Module], str]:
    """keep_class for a graph lifted from torch.export: place by name, then prove numerically.

    torch.fx cannot trace the class again, so the structural proof does not apply. The pruned
    layers are put into a deep copy of ``model`` under their qualified names (the lifter names
    each layer after the module that owns its weights): the very module where the type matches,
    its tensors and widths where the user's layer is a subclass; tensors the graph reads go in
    by name; graph-only constants export made up stay in the graph. Width ints the class's
    forward reads are updated (:func:`_update_widths`). The copy is then run against ``pruned``.
    """
    if example_inputs is None:
        return None, ("the pruned graph came from torch.export, so the copy can only be proven by running it, "
                      "and that needs example_inputs")
    modules: Dict[str, nn.Module] = {}
    tensors: Dict[str, Any] = {}
    for node in pruned.graph.nodes:
        target = str(node.target)
        if node.op == "call_module":
            modules[target] = pruned.get_submodule(target)
        elif node.op == "get_attr":
            tensors[target] = operator.attrgetter(target)(pruned)
    memo: Dict[int, Any] = {}
    for target, new in modules.items():
        try:
            old = model.get_submodule(target)
        except AttributeError:
            return None, f"the pruned graph calls a layer {target} that {type(model).__name__} does not have"
        if type(old) is type(new):
            memo[id(old)] = new
    for target, new in tensors.items():
        try:
            old = operator.attrgetter(target)(model)
        except AttributeError:
            continue  # a constant export lifted into the graph (anchors, arange results): the graph's own
        if isinstance(old, torch.Tensor):
            memo[id(old)] = new
    try:
        kept = copy.deepcopy(model, memo)
        for target, new in modules.items():
            old = kept.get_submodule(target)
            if type(old) is type(new):
                _place(kept, target, new)
            else:
                _transplant(old, new)
        for target, new in tensors.items():
            try:
                old = operator.attrgetter(target)(kept)
            except AttributeError:
                continue
            if isinstance(old, torch.Tensor):
                _place(kept, target, new)
        _update_widths(kept)
    except Exception as exc:  # user code (__deepcopy__, __setattr__): any failure means no copy
        return None, f"copying {type(model).__name__} failed: {type(exc).__name__}: {exc}"
    why = _numerical_mismatch(kept, pruned, example_inputs)
    if why is not None:
        return None, why
    modes = dict(model.named_modules(remove_duplicate=False))
    for name, module in kept.named_modules(remove_duplicate=False):
        if name in modes:
            module.training = modes[name].training
    return kept, ""


def keep_class(model: Any, pruned: torch.fx.GraphModule, example_inputs: Any = None) -> nn.Module:
    """``pruned`` as a copy of ``model``'s own class where that is provably the same function.

    ``model`` is what was pruned, ``pruned`` the GraphModule fxprune built from it. For a plain
    ``nn.Module`` the result is a deep copy of ``model`` (same class, methods and attributes:
    a timm model keeps ``forward_features``, ``reset_classifier``, ``pretrained_cfg``) in which
    every module and tensor the pruned graph reads is the pruned one. It is returned only when
    the copy is proven to compute the pruned graph's function (same objects, and its forward
    re-traced is the same graph); otherwise an :class:`fxprune.FxPruneWarning` says why and
    ``pruned`` comes back. A GraphModule ``model`` has no other class to keep: ``pruned`` is
    returned as is. Modes: the proof is in eval mode, the mode fxprune traces in; every module
    of the copy keeps the user's training flag.

    A model torch.fx cannot trace was pruned through torch.export (Ultralytics YOLO): its
    class cannot be re-traced, so the copy gets the pruned layers by qualified name and is
    proven by running it instead: on several random float64 inputs shaped like
    ``example_inputs`` (which that route always has), in eval mode, every output must equal the
    pruned GraphModule's; otherwise the GraphModule comes back with a warning saying why.

    Plain Python numbers the class keeps about widths (timm's ``num_features``) are not
    rewritten: a method that builds a new layer from one (``reset_classifier``) builds it for
    the original width. Prune with ``ignore=`` on the head to keep its input width where such
    methods matter.

    >>> import torch, torch.nn as nn, fxprune
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)
    ...     def forward(self, x):
    ...         return self.b(torch.relu(self.a(x)))
    >>> net = Net()
    >>> small = fxprune.prune(net, 0.5, keep_class=True)
    >>> type(small).__name__, small.a.out_channels, net.a.out_channels
    ('Net', 4, 8)
    """
    if isinstance(model, torch.fx.GraphModule):
        return pruned
    if isinstance(model, nn.Module):
        if is_lifted(pruned):
            kept, why = _lifted_copy(model, pruned, as_inputs(example_inputs))
            if kept is not None and getattr(kept, "meta", None) is None:
                object.__setattr__(kept, "meta", {})
            if kept is not None and isinstance(getattr(kept, "meta", None), dict):
                kept.meta.update(pruned.meta)
        else:
            kept, why = _class_copy(model, pruned)
        if kept is not None:
            return kept
    else:
        why = f"{type(model).__name__} is not an nn.Module"
    warnings.warn(FxPruneWarning(
        f"keep_class=True: returning a GraphModule, not a {type(model).__name__}: {why}. Hint: the GraphModule "
        "computes the pruned model; to keep the class, make forward read no size fxprune changes "
        "(or make that module a leaf)"), stacklevel=3)
    return pruned


def _class_copy(model: nn.Module, pruned: torch.fx.GraphModule) -> Tuple[Optional[nn.Module], str]:
    """(the proven class copy, "") or (None, why not)."""
    try:
        pairs = _replacements(model, pruned)
    except AttributeError as exc:
        return None, f"the pruned graph reads an attribute {type(model).__name__} does not have ({exc})"
    # Seeding deepcopy's memo puts the pruned objects in place wherever the user's model refers
    # to the originals (a module registered twice, a Python list of layers), and the large
    # original tensors are never copied only to be dropped.
    # Only modules and tensors: an id is unique to them, while a small int or str is shared
    # by the interpreter and would be replaced wherever it occurs.
    memo: Dict[int, Any] = {id(old): new for old, new in pairs.values() if isinstance(old, (nn.Module, torch.Tensor))}
    try:
        kept = copy.deepcopy(model, memo)
        for target, (_, new) in pairs.items():
            _place(kept, target, new)  # a class with its own __deepcopy__ ignores the memo
        _norm_widths(kept)  # re-traced below: the proof checks the widths it set
    except Exception as exc:  # user code (__deepcopy__, __setattr__): any failure means no copy
        return None, f"copying {type(model).__name__} failed: {type(exc).__name__}: {exc}"
    why = _mismatch(kept, pruned)
    if why is not None:
        return None, why
    modes = dict(model.named_modules(remove_duplicate=False))
    for name, module in kept.named_modules(remove_duplicate=False):
        if name in modes:
            module.training = modes[name].training  # the pruned modules came with the root's mode
    if getattr(kept, "meta", None) is None:
        object.__setattr__(kept, "meta", {})
    if isinstance(getattr(kept, "meta", None), dict):
        kept.meta.update(pruned.meta)  # the plan, where a GraphModule keeps it
    return kept, ""


_keep_class_fn = keep_class  # prune()/apply() take a keep_class flag that hides the function's name


RatioArg = Union[None, float, Mapping[str, float], Target]
Importance = Union[str, Criterion, Callable[..., Any], CriterionSpec]

# The keyword arguments plan() and prune() share, documented once here.
_OPTIONS_DOC = """
    Options (all keyword-only):

    - ``importance``: ``"l1"`` (default), ``"l2"``, ``"fpgm"``, ``"bn"``, ``"apoz"``, ``"taylor"``,
      ``"random"``, or a callable ``(group) -> Tensor[C]`` / ``(group, gm) -> Tensor[C]``
      (higher = keep). See :mod:`fxprune.importance` for how each reduces over a group.
    - ``calibration``: ``(inputs, targets)`` batches for ``apoz``/``taylor`` (a DataLoader
      works; it is iterated once per call); ``calibration_batches`` caps how many are used;
      ``loss_fn(output, targets)`` for ``taylor`` (default cross-entropy); ``seed`` for ``random``.
    - ``ratio``: a float, or a dict of glob patterns on module names -> ratio, matched against
      the modules that output a group's channels (first match wins; others use
      ``default_ratio``). ``global_ranking=True`` ranks all channels together on per-group
      mean-normalised scores, no group losing more than ``max_group_ratio``.
    - ``round_to``: pruned groups keep a multiple of it; ``min_channels``: a floor per group.
    - ``target_macs`` / ``target_params``: fractions of the original model to stay within,
      instead of ``ratio`` (MACs need ``example_inputs``); the plan's ``policy`` records what
      was achieved (``achieved_macs`` / ``achieved_params``).
    - ``example_inputs``: a tensor or tuple, the positional arguments of one forward call (as
      many as ``forward`` takes, less any with defaults); checks shapes, and is what MACs are
      counted on.
    - ``ignore``: module names or glob patterns whose channels never change (an entry that
      names no module warns); ``strict``: raise :class:`fxprune.UnsupportedNodeError` on ops
      without a rule instead of freezing, and on a layer fxprune cannot see (a functional
      ``torch.conv2d``, an unknown leaf with weights) when nothing else could be pruned.
    - ``allow_renormalising``: ``True`` (default) lets the width a LayerNorm/RMSNorm normalises
      over be pruned: the smaller norm renormalises over the kept channels, so those groups are
      proven against the masked-norm reference (:attr:`fxprune.Group.renormalising`). ``False``
      (with ``strict=True``: the strictest mode) refuses them: such norms keep their width and
      every rewrite is exact (equal to the plain masked reference).

    Never silent: when nothing can be pruned (every group frozen, or no layer fxprune knows), or
    ``round_to``/``min_channels``/ratio patterns leave every group whole, an
    :class:`fxprune.FxPruneWarning` says why; the model still comes back, as a new, unchanged copy.
"""


def make_policy(ratio: RatioArg, *, global_ranking: bool, max_group_ratio: float, default_ratio: float, round_to: int,
                min_channels: int, target_macs: Optional[float], target_params: Optional[float]) -> Policy:
    policy = Policy(ratio=ratio, default_ratio=default_ratio, global_ranking=global_ranking,
                    max_group_ratio=max_group_ratio, round_to=round_to, min_channels=min_channels,
                    target_macs=target_macs, target_params=target_params)
    return policy.validated()  # ValueError naming a bad ratio, as before


def _exact_measure(analysis: Analysis, inputs: Optional[Tuple[Any, ...]],
                   builders: Optional[Registry[type, Builder]] = None) -> Callable[[Mapping[int, int]], Dict[str, int]]:
    """Cost of the model rebuilt with the given keep counts (which channels does not matter)."""

    def measure(counts: Mapping[int, int]) -> Dict[str, int]:
        # Which channels does not change the cost; select_channels keeps grouped-conv blocks balanced.
        groups = [GroupPlan(g.key, g.size, select_channels(g, torch.zeros(g.size), counts.get(g.index, g.size)), [],
                            g.renormalising) for g in analysis.groups]
        built = rewrite(analysis, PruningPlan(groups), builders=builders)
        out = {"params": count_params(built)}
        if inputs is not None:
            out["macs"] = count_macs(built, inputs)
        return out

    return measure


@dataclass(frozen=True)
class PruneRequest:
    """What one analyse -> plan -> rewrite pass is asked, as one typed object.

    ``prune``, ``plan`` and ``prune_iteratively`` build it once from their keywords (``inputs``
    already normalised by :func:`as_inputs`, ``ignore`` by :func:`check_ignore`) and every stage
    reads it, instead of the same keywords threaded through each signature. The allocation
    policy (:class:`fxprune.allocation.Policy`) travels beside it, since iterative pruning asks
    one request under a policy per step.
    """

    importance: Importance = "l1"
    inputs: Optional[Tuple[Any, ...]] = None
    ignore: Tuple[str, ...] = ()
    strict: bool = False
    scoring: ScoringOptions = field(default_factory=ScoringOptions)
    rules: Optional[RuleTable] = None
    builders: Optional[Registry[type, Builder]] = None
    allow_renormalising: bool = True

    def analyse(self, model: ModelLike) -> Analysis:
        """The model's groups under this request's inputs, ignore list and tables."""
        return analyze_model(model, example_inputs=self.inputs, ignore=self.ignore, strict=self.strict,
                             rules=self.rules, allow_renormalising=self.allow_renormalising)


def decide(model: ModelLike, request: PruneRequest, policy: Policy, *, build: bool,
           keep_counts: Optional[Mapping[str, int]] = None,
           explain: bool = True) -> Tuple[PruningPlan, Optional[torch.fx.GraphModule]]:
    """Analyse, plan and (with ``build`` or a target to verify) rewrite: the body of plan()/prune().

    ``explain``: warn when nothing can be or was pruned (``strict``: raise on a layer fxprune
    cannot see); iterative pruning turns it off and explains once for all its steps.
    ``keep_counts``: group key -> count, instead of allocating (iterative pruning's steps).

    >>> import torchvision
    >>> from fxprune.allocation import Policy
    >>> result, built = decide(torchvision.models.resnet18(), PruneRequest(), Policy(ratio=0.5).validated(), build=False)
    >>> len(result.keep("layer1.0.conv1")), built
    (32, None)
    """
    inputs, importance, options, builders = request.inputs, request.importance, request.scoring, request.builders
    strict = request.strict
    if policy.target_macs is not None and inputs is None:
        raise FxPruneError(f"target_macs={policy.target_macs} needs example_inputs=(x,) to count MACs on "
                           "(a batch the model's forward accepts, e.g. torch.randn(1, 3, 224, 224))")
    check_importance(importance)
    analysis = request.analyse(model)
    # Never silent: a model returned unchanged says why (iterative pruning explains once, itself).
    can_prune = check_prunable(analysis, strict=strict, stacklevel=3) if explain else True
    if not policy.has_target:
        result = make_plan(analysis, importance=importance, policy=policy, options=options, keep_counts=keep_counts)
        if explain and can_prune and keep_counts is None and requests_pruning(policy) and not result.pruned_groups:
            warnings.warn(FxPruneWarning(unpruned_message(analysis, policy)), stacklevel=3)
        return result, (rewrite(analysis, result, inputs, builders=builders) if build else None)

    cost = CostModel(analysis, inputs)
    base = {"macs": cost.base_macs, "params": cost.base_params}
    scores: Dict[int, torch.Tensor] = {}
    result = make_plan(analysis, importance=importance, policy=policy, options=options, cost=cost, scores=scores)
    pruned = rewrite(analysis, result, inputs, builders=builders)
    achieved = _achieved(pruned, inputs, base)
    if not _meets(policy, achieved, base):
        # The prediction was off for some op: search again, measuring rebuilt models.
        result = make_plan(analysis, importance=importance, policy=policy, options=options, scores=scores,
                           measure=_exact_measure(analysis, inputs, builders), base=base)
        pruned = rewrite(analysis, result, inputs, builders=builders)
        achieved = _achieved(pruned, inputs, base)
        result.policy["measured_search"] = True
    result.policy.update(achieved)
    return result, pruned


def _achieved(pruned: nn.Module, inputs: Optional[Tuple[Any, ...]], base: Mapping[str, Optional[int]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {"params": count_params(pruned), "base_params": base["params"]}
    out["achieved_params"] = out["params"] / max(1, int(base["params"] or 0))
    if inputs is not None and base.get("macs") is not None:
        out["macs"] = count_macs(pruned, inputs)
        out["base_macs"] = base["macs"]
        out["achieved_macs"] = out["macs"] / max(1, int(base["macs"] or 0))
    return out


def _meets(policy: Policy, achieved: Mapping[str, Any], base: Mapping[str, Optional[int]]) -> bool:
    ok = True
    if policy.target_macs is not None:
        ok &= achieved["macs"] <= policy.target_macs * float(base["macs"] or 0) * (1 + 1e-12)
    if policy.target_params is not None:
        ok &= achieved["params"] <= policy.target_params * float(base["params"] or 0) * (1 + 1e-12)
    return bool(ok)


@accepts_objects
def plan(model: ModelLike, ratio: RatioArg = None, *, importance: Importance = "l1", example_inputs: Any = None,
         ignore: Union[str, Iterable[str]] = (), strict: bool = False, allow_renormalising: bool = True,
         calibration: Optional[Iterable[Any]] = None, calibration_batches: Optional[int] = None,
         loss_fn: Optional[Callable[..., Any]] = None, seed: int = 0,
         global_ranking: bool = False, max_group_ratio: float = 0.9, default_ratio: float = 0.0,
         round_to: int = 1, min_channels: int = 1,
         target_macs: Optional[float] = None, target_params: Optional[float] = None,
         rules: Optional[RuleTable] = None) -> PruningPlan:
    """Decide which channels to keep, without returning a model (a target is still verified).

    >>> import torchvision, fxprune
    >>> p = fxprune.plan(torchvision.models.resnet18(), 0.5)
    >>> len(p.keep("layer1.0.conv1"))
    32
    """
    policy = make_policy(ratio, global_ranking=global_ranking, max_group_ratio=max_group_ratio, default_ratio=default_ratio,
                         round_to=round_to, min_channels=min_channels, target_macs=target_macs, target_params=target_params)
    request = PruneRequest(importance, as_inputs(example_inputs), check_ignore(ignore), strict,
                           ScoringOptions(calibration=calibration, calibration_batches=calibration_batches,
                                          loss_fn=loss_fn, seed=seed), rules, None, allow_renormalising)
    with few_threads():
        result, _ = decide(model, request, policy, build=False)
    return result


plan.__doc__ = (plan.__doc__ or "") + _OPTIONS_DOC


def apply(model: ModelLike, pruning_plan: PruningPlan, *, example_inputs: Any = None,
          strict: bool = False, keep_class: bool = False, rules: Optional[RuleTable] = None,
          builders: Optional[Registry[type, Builder]] = None, allow_renormalising: bool = True) -> nn.Module:
    """Build the pruned GraphModule a plan describes (raises PlanMismatchError if it does not fit).

    ``allow_renormalising=False`` refuses a plan that prunes a renormalising group
    (:class:`fxprune.PlanMismatchError`): such norms keep their width, as in :func:`plan`.

    A plan loaded with :meth:`PruningPlan.from_json` rebuilds the same architecture on a
    fresh copy of the model it was made for. ``keep_class=True``, ``rules``, ``builders``: see
    :func:`prune` (pass the tables the plan was made with; the rule options the plan records,
    such as ``attention="head_dim"``, are taken from the plan: :func:`fxprune.planning.rules_for`).

    >>> import torchvision, fxprune
    >>> m = torchvision.models.resnet18()
    >>> pruned = fxprune.apply(m, fxprune.plan(m, 0.3))
    >>> pruned.get_submodule("layer1.0.conv1").out_channels
    44
    """
    with few_threads():
        analysis = analyze_model(model, example_inputs=example_inputs, strict=strict,
                                 rules=rules_for(pruning_plan, rules),
                                 allow_renormalising=allow_renormalising)
        pruned = rewrite(analysis, pruning_plan, as_inputs(example_inputs), builders=builders)
    pruned.meta["fxprune_plan"] = pruning_plan
    return _keep_class_fn(model, pruned, example_inputs) if keep_class else pruned


@accepts_objects
def prune(model: ModelLike, ratio: RatioArg = None, *, importance: Importance = "l1", example_inputs: Any = None,
          ignore: Union[str, Iterable[str]] = (), strict: bool = False, allow_renormalising: bool = True,
          calibration: Optional[Iterable[Any]] = None, calibration_batches: Optional[int] = None,
          loss_fn: Optional[Callable[..., Any]] = None, seed: int = 0,
          global_ranking: bool = False, max_group_ratio: float = 0.9, default_ratio: float = 0.0,
          round_to: int = 1, min_channels: int = 1,
          target_macs: Optional[float] = None, target_params: Optional[float] = None,
          keep_class: bool = False, target_latency: Optional[float] = None,
          target_latency_ms: Optional[float] = None, device: Any = "cpu", batch_size: Optional[int] = 1,
          latency_mode: str = "eager", latency_options: Any = None, rules: Optional[RuleTable] = None,
          builders: Optional[Registry[type, Builder]] = None) -> nn.Module:
    """Remove ``ratio`` of the channels of every prunable group; return a NEW, smaller GraphModule.

    ``model`` is a GraphModule or an ``nn.Module`` (traced for you); it is never modified. A
    group of C channels keeps its ``int(C * (1 - ratio))`` most important ones (at least 1).
    The model's inputs and outputs keep their channels, and so do modules matching ``ignore``
    (names or glob patterns). Ops fxprune has no rule for freeze the groups they touch, with a
    warning (``strict=True``: raise :class:`fxprune.UnsupportedNodeError`). The plan that built
    the result is in ``pruned.meta["fxprune_plan"]``.

    ``keep_class=True`` returns, where it is provably the same function, a copy of the user's
    own class with the pruned layers in place instead of a GraphModule (see :func:`keep_class`);
    where not, the GraphModule and an :class:`fxprune.FxPruneWarning` saying why.

    >>> import torch, torchvision, fxprune
    >>> model = torchvision.models.resnet18().eval()
    >>> pruned = fxprune.prune(torch.fx.symbolic_trace(model), 0.3)
    >>> pruned(torch.randn(1, 3, 64, 64)).shape
    torch.Size([1, 1000])
    >>> sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    True
    >>> half = fxprune.prune(model, target_macs=0.5, example_inputs=torch.randn(1, 3, 64, 64))
    >>> half.meta["fxprune_plan"].policy["achieved_macs"] <= 0.5
    True
    """
    request = PruneRequest(importance, as_inputs(example_inputs), check_ignore(ignore), strict,
                           ScoringOptions(calibration=calibration, calibration_batches=calibration_batches,
                                          loss_fn=loss_fn, seed=seed), rules, builders, allow_renormalising)
    if target_latency is not None or target_latency_ms is not None:
        # A measured-latency target: the search and its verification live in fxprune.latency_model.
        if ratio is not None or target_macs is not None or target_params is not None or global_ranking:
            raise FxPruneError("a latency target chooses the channel counts itself: give target_latency= or "
                               "target_latency_ms= without ratio=, target_macs=, target_params= or global_ranking=")
        pruned = _latency_prune(model, request,
                                Policy(ratio=0.0, max_group_ratio=max_group_ratio, round_to=round_to,
                                       min_channels=min_channels).validated(),
                                target=(target_latency, target_latency_ms), device=device, batch_size=batch_size,
                                mode=latency_mode, options=latency_options)
        return _keep_class_fn(model, pruned) if keep_class else pruned
    policy = make_policy(ratio, global_ranking=global_ranking, max_group_ratio=max_group_ratio, default_ratio=default_ratio,
                         round_to=round_to, min_channels=min_channels, target_macs=target_macs, target_params=target_params)
    with few_threads():
        result, pruned = decide(model, request, policy, build=True)
    if pruned is None:
        raise InternalError("prune() planned without building the pruned model")
    pruned.meta["fxprune_plan"] = result
    return _keep_class_fn(model, pruned, example_inputs) if keep_class else pruned


prune.__doc__ = (prune.__doc__ or "") + _OPTIONS_DOC + """
    - ``target_latency`` / ``target_latency_ms``: prune until the model *measured* on ``device``
      (``"cpu"``/``"cuda"``), at ``batch_size``, in ``latency_mode`` (``"eager"``/``"compiled"``)
      takes at most that fraction of the original's latency (or that many milliseconds); needs
      ``example_inputs``. ``latency_options``: a :class:`fxprune.latency_model.LatencyOptions`
      (rounds, dtype, cost-table store, ...). The plan's ``policy["latency"]`` records the
      measured before/after, device, threads, torch version and method; a target that cannot be
      met raises :class:`fxprune.FxPruneError` naming the best reached. See :mod:`fxprune.latency_model`.
    - ``rules`` / ``builders``: the channel-rule table (:class:`fxprune.rules.RuleTable`) and the
      layer-builder table (:data:`fxprune.rewrite.DEFAULT_BUILDERS`) to use instead of the shipped
      defaults, e.g. ``rules=fxprune.rules.DEFAULT_RULES.extended({my_op: my_rule})``: teaches
      fxprune an op for this call only (``register_rule``/``register_builder`` teach it for
      every call). Prove the result with the same tables
      (``fxprune.testing.assert_equivalent(..., rules=...)``). ``plan`` takes ``rules`` too.
      A table also carries rule options (:data:`fxprune.rules.RULE_OPTIONS`):
      ``rules=DEFAULT_RULES.with_options(attention="head_dim")`` prunes attention blocks by
      head_dim (every head kept, the same dims of each) instead of whole heads; the plan records
      the option, and ``apply``, the proof and ``save`` take it from there.
"""


def _latency_prune(model: ModelLike, request: PruneRequest, policy: Policy, *,
                   target: Tuple[Optional[float], Optional[float]],
                   device: Any, batch_size: Optional[int], mode: str, options: Any) -> torch.fx.GraphModule:
    goal = LatencyTarget(fraction=target[0], ms=target[1]).validated()
    inputs = request.inputs
    if inputs is None:
        raise FxPruneError(f"{goal.describe()} needs example_inputs=(x,): the inputs latency is measured on "
                           "(their first sample repeated to batch_size)")
    if options is not None and not isinstance(options, LatencyOptions):
        raise FxPruneError(f"latency_options must be a fxprune.latency_model.LatencyOptions, got {type(options).__name__}")
    check_importance(request.importance)
    with few_threads():
        analysis = request.analyse(model)
    result, pruned = plan_for_latency(analysis, model, importance=request.importance, scoring=request.scoring,
                                      policy=policy, target=goal, example_inputs=inputs, device=device,
                                      batch_size=batch_size, mode=mode, options=options, builders=request.builders)
    pruned.meta["fxprune_plan"] = result
    return pruned
