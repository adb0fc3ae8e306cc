"""Proof tools: the masked reference a pruned model must match.

The masked reference is a deep copy of the original model in which every removed channel is
zeroed in every parameter that channel indexes (producer rows and biases, per-channel scales
and shifts, consumer columns). Removing a channel and zeroing its consumer columns compute the
same function, so a correct rewrite matches the masked model up to float rounding.

How a role's positions map onto a module's tensors is a table, :func:`register_mask`, per
module type; a module type without an entry falls back to ``weight``/``bias`` along the dims
:func:`fxprune.rules.role_tensors` gives (right for most layers, transposed convs included;
register a mask for a custom module with other per-channel tensors).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.fx
import torch.nn as nn

from .api import ModelLike, analyze_model
from .plan import PruningPlan, resolve
from .rewrite import slot_indices
from .rules import role_tensors
from .trace import as_graph_module

__all__ = ["masked_reference", "assert_equivalent", "register_mask", "randomize_norms", "Mask"]

Mask = Callable[[nn.Module, str, torch.Tensor], None]
_MASKS: Dict[type, Mask] = {}


def register_mask(*types: type) -> Callable[[Mask], Mask]:
    """Register how to zero positions of a module type: ``fn(module, role, removed)``.

    ``removed`` is a bool tensor over the role's positions (True: zero it); ``fn`` zeroes every
    tensor of ``module`` those positions index, in place, under ``torch.no_grad``.
    """

    def decorate(fn: Mask) -> Mask:
        for t in types:
            _MASKS[t] = fn
        return fn

    return decorate


def _zero_along(t: Optional[torch.Tensor], dim: int, removed: torch.Tensor) -> None:
    if t is None:
        return
    index: list = [slice(None)] * t.dim()
    index[dim] = removed.to(t.device)
    t[tuple(index)] = 0


def _default_mask(module: nn.Module, role: str, removed: torch.Tensor) -> None:
    for name, dim in role_tensors(module)[role]:
        t = getattr(module, name, None)
        if isinstance(t, torch.Tensor) and t.dim() > dim and t.shape[dim] == removed.numel():
            _zero_along(t, dim, removed)


@register_mask(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _mask_conv(conv: nn.Module, role: str, removed: torch.Tensor) -> None:
    assert isinstance(conv, nn.modules.conv._ConvNd)
    if role != "in" or conv.groups == 1:
        _default_mask(conv, role, removed)
        return
    # Grouped: input channel i is column i % (Cin/G) of the rows of conv group i // (Cin/G).
    cin_g, cout_g = conv.in_channels // conv.groups, conv.out_channels // conv.groups
    for i in torch.nonzero(removed).flatten().tolist():
        g = i // cin_g
        conv.weight[g * cout_g : (g + 1) * cout_g, i % cin_g] = 0


@register_mask(nn.Linear)
def _mask_linear(lin: nn.Module, role: str, removed: torch.Tensor) -> None:
    _default_mask(lin, role, removed)


@register_mask(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def _mask_norm(norm: nn.Module, role: str, removed: torch.Tensor) -> None:
    # weight = bias = 0 makes the channel's output exactly 0 whatever its statistics.
    _zero_along(getattr(norm, "weight", None), 0, removed)
    _zero_along(getattr(norm, "bias", None), 0, removed)


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
            removed = torch.ones(sum(size for _, size in slot.segments) * slot.block, dtype=torch.bool)
            removed[keep] = False
            _MASKS.get(type(module), _default_mask)(module, slot.role, removed)
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
        # Module.to converts in place: the float32 copies are released as it goes.
        ref, candidate = ref.to(dtype), candidate.to(dtype)
        inputs = [x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]
    with torch.no_grad():
        expected = ref(*inputs)
        actual = candidate(*inputs)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm/InstanceNorm non-trivial statistics and affine parameters, in place.

    A freshly built model has mean 0, variance 1, scale 1 and shift 0 everywhere, which can hide
    a BatchNorm sliced with the wrong channels; random values make equivalence checks bite.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, nn.modules.batchnorm._NormBase):
                continue
            n = m.num_features
            if m.running_mean is not None and m.running_var is not None:
                m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.weight is not None and m.bias is not None:
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model
