"""The public face of fxprune: prune, plan, apply, find_groups.

Each call works on its own copy of the graph: the model passed in is never modified.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx
import torch.nn as nn

from .errors import FxPruneError
from .groups import Analysis, Group, analyze
from .importance import Criterion
from .plan import PruningPlan, check_ratio, make_plan
from .rewrite import rewrite
from .trace import as_graph_module, propagate_shapes

__all__ = ["prune", "plan", "apply", "find_groups", "analyze_model", "GroupList"]

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
def _few_threads() -> Iterator[None]:
    """Run the pass on one intra-op thread.

    The pass is hundreds of small, memory-bound kernels (norms, index_select). Measured on a
    2-core machine, fanning each out to a thread pool made the whole pass 2-5x slower; the
    user's thread setting is restored afterwards.
    """
    before = torch.get_num_threads()
    if before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before > 1:
            torch.set_num_threads(before)


def _inputs(example_inputs: Any) -> Optional[Tuple[Any, ...]]:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise FxPruneError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def _ignore(ignore: Union[str, Iterable[str]]) -> Tuple[str, ...]:
    return (ignore,) if isinstance(ignore, str) else tuple(ignore)


def analyze_model(model: ModelLike, *, example_inputs: Any = None, ignore: Union[str, Iterable[str]] = (),
                  strict: bool = False) -> Analysis:
    """Trace if needed and analyse a private copy of the graph (modules are shared, read-only)."""
    gm = as_graph_module(model)
    # Our own graph (metadata goes on its nodes); submodules are shared and only read.
    work = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph), gm.__class__.__name__)
    work.training = gm.training
    inputs = _inputs(example_inputs)
    if inputs is not None:
        propagate_shapes(work, inputs)
    return analyze(work, ignore=_ignore(ignore), strict=strict)


def find_groups(model: ModelLike, *, example_inputs: Any = None, ignore: Union[str, Iterable[str]] = (),
                strict: bool = False) -> GroupList:
    """The channel-coupled groups of ``model``, printable for humans.

    >>> import torch, torchvision, fxprune
    >>> groups = fxprune.find_groups(torch.fx.symbolic_trace(torchvision.models.resnet18()))
    >>> len(groups), len(groups.prunable)
    (13, 12)
    >>> groups[0].modules("out")
    ['conv1', 'layer1.0.conv2', 'layer1.1.conv2']
    """
    return GroupList(analyze_model(model, example_inputs=example_inputs, ignore=ignore, strict=strict).groups)


def plan(model: ModelLike, ratio: float, *, importance: Union[str, Criterion] = "l1", example_inputs: Any = None,
         ignore: Union[str, Iterable[str]] = (), strict: bool = False) -> PruningPlan:
    """Decide which channels to keep, without building anything.

    >>> import torchvision, fxprune
    >>> p = fxprune.plan(torchvision.models.resnet18(), 0.5)
    >>> len(p.keep("layer1.0.conv1"))
    32
    """
    ratio = check_ratio(ratio)
    with _few_threads():
        analysis = analyze_model(model, example_inputs=example_inputs, ignore=ignore, strict=strict)
        return make_plan(analysis, ratio, importance)


def apply(model: ModelLike, pruning_plan: PruningPlan, *, example_inputs: Any = None,
          strict: bool = False) -> torch.fx.GraphModule:
    """Build the pruned GraphModule a plan describes (raises PlanMismatchError if it does not fit).

    >>> import torchvision, fxprune
    >>> m = torchvision.models.resnet18()
    >>> pruned = fxprune.apply(m, fxprune.plan(m, 0.3))
    >>> pruned.layer1[0].conv1.out_channels
    44
    """
    with _few_threads():
        analysis = analyze_model(model, example_inputs=example_inputs, strict=strict)
        return rewrite(analysis, pruning_plan, _inputs(example_inputs))


def prune(model: ModelLike, ratio: float, *, importance: Union[str, Criterion] = "l1", example_inputs: Any = None,
          ignore: Union[str, Iterable[str]] = (), strict: bool = False) -> torch.fx.GraphModule:
    """Remove ``ratio`` of the channels of every prunable group; return a NEW, smaller GraphModule.

    ``model`` is a GraphModule or an ``nn.Module`` (traced for you); it is never modified. A
    group of C channels keeps its ``int(C * (1 - ratio))`` most important ones (at least 1).
    The model's inputs and outputs keep their channels, and so do modules matching ``ignore``
    (names or glob patterns). Ops fxprune has no rule for freeze the groups they touch, with a
    warning (``strict=True``: raise :class:`fxprune.UnsupportedNodeError`).

    >>> import torch, torchvision, fxprune
    >>> model = torchvision.models.resnet18().eval()
    >>> pruned = fxprune.prune(torch.fx.symbolic_trace(model), 0.3)
    >>> pruned(torch.randn(1, 3, 64, 64)).shape
    torch.Size([1, 1000])
    >>> sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    True
    """
    ratio = check_ratio(ratio)
    with _few_threads():
        analysis = analyze_model(model, example_inputs=example_inputs, ignore=ignore, strict=strict)
        return rewrite(analysis, make_plan(analysis, ratio, importance), _inputs(example_inputs))
