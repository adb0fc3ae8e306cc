"""Proof tools: the masked reference a pruned model must match.

The masked reference is a deep copy of the original model in which every removed channel is
zeroed in every parameter that channel indexes (producer rows and biases, per-channel scales
and shifts, consumer columns). Removing a channel and zeroing its consumer columns compute the
same function, so a correct rewrite matches the masked model up to float rounding.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Optional, Sequence

import torch
import torch.fx
import torch.nn as nn

from .api import ModelLike, analyze_model
from .plan import PruningPlan, resolve
from .rewrite import slot_indices
from .trace import as_graph_module

__all__ = ["masked_reference", "assert_equivalent"]

# Which tensors each role indexes, and along which dim.
_ROLE_TENSORS: Dict[str, Sequence[tuple]] = {
    "out": (("weight", 0), ("bias", 0)),
    "in": (("weight", 1),),
    "channelwise": (("weight", 0), ("bias", 0)),
}


def masked_reference(model: ModelLike, plan: PruningPlan, example_inputs: Optional[Sequence[Any]] = None) -> torch.fx.GraphModule:
    """A deep copy of ``model`` (traced) with the channels ``plan`` removes set to zero.

    >>> import torch, torchvision, fxprune
    >>> from fxprune.testing import masked_reference
    >>> m = torchvision.models.resnet18().eval()
    >>> p = fxprune.plan(m, 0.5)
    >>> ref = masked_reference(m, p)
    >>> int((ref.layer1[0].conv1.weight.abs().sum((1, 2, 3)) == 0).sum())
    32
    """
    gm = copy.deepcopy(as_graph_module(model))
    analysis = analyze_model(gm, example_inputs=example_inputs)
    kept = resolve(analysis, plan)
    with torch.no_grad():
        for slot in analysis.slots.values():
            keep = slot_indices(slot, kept)
            if keep is None:
                continue
            module = gm.get_submodule(slot.module)
            for name, dim in _ROLE_TENSORS[slot.role]:
                t = getattr(module, name, None)
                if t is None:
                    continue
                if slot.role == "in" and isinstance(module, nn.Linear):
                    dim = 1
                mask = torch.ones(t.shape[dim], dtype=torch.bool)
                mask[keep] = False
                index = [slice(None)] * t.dim()
                index[dim] = mask
                t[tuple(index)] = 0
    return gm


def assert_equivalent(model: ModelLike, pruned: nn.Module, plan: PruningPlan, inputs: Sequence[Any],
                      rtol: Optional[float] = None, atol: Optional[float] = None,
                      dtype: Optional[torch.dtype] = torch.float64,
                      example_inputs: Optional[Sequence[Any]] = None) -> None:
    """Assert ``pruned`` computes what the masked reference of ``model`` computes (eval mode).

    Both models run on copies cast to ``dtype`` (float64 by default): removing channels changes
    the order of float sums, and in double precision that rounding is far below any real bug,
    so the comparison can use tight tolerances. ``dtype=None`` compares in the models' own dtype.
    Pass the same ``example_inputs`` the plan was made with (shapes can tie more channels).
    """
    ref = masked_reference(model, plan, example_inputs=example_inputs).eval()
    candidate = copy.deepcopy(pruned).eval()
    if dtype is not None:
        ref, candidate = ref.to(dtype), candidate.to(dtype)
        inputs = [x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]
    with torch.no_grad():
        expected = ref(*inputs)
        actual = candidate(*inputs)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
