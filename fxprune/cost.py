"""Model cost: parameter count and multiply-accumulates (MACs).

MACs come from :class:`torch.utils.flop_counter.FlopCounterMode`, PyTorch's own per-operator
FLOP formulas, rather than from a hand-written table: the count then follows whatever ops a
(possibly rewritten) model really runs. PyTorch counts a multiply-add as two FLOPs, so
``MACs = FLOPs / 2``. Only the ops PyTorch has formulas for are counted (convolutions, matrix
products, attention); element-wise ops (BatchNorm, ReLU, additions) are not, which is the usual
convention for MACs.

Two attention kernels have no FLOP formula in PyTorch, so a plain count leaves them out:
the fused fast path of ``nn.MultiheadAttention``/``nn.TransformerEncoderLayer`` (eval mode, no
autograd: the whole layer, projections included) and the CPU kernel of
``F.scaled_dot_product_attention`` (the scores and the weighted sum of every timm and Hugging
Face attention on CPU). :func:`counting` turns the fast path off (the same outputs, through ops
that are counted) and gives the CPU kernel the formula of its CUDA counterparts, so a model
costs the same whichever path it takes.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, Sequence, Union

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_params", "count_macs", "count_flops", "module_flops", "counting"]

ExampleInputs = Union[torch.Tensor, Sequence[Any]]


def count_params(model: nn.Module) -> int:
    """Number of parameters of ``model`` (each shared parameter counted once)."""
    # model.parameters() already de-duplicates shared (tied) parameters.
    return int(sum(p.numel() for p in model.parameters()))


def _cpu_attention_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    # The CPU flash kernel computes what the CUDA flash kernel does: the same count.
    return int(flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape))


_EXTRA_FORMULAS: Dict[Any, Any] = {}
_CPU_ATTENTION = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
if _CPU_ATTENTION is not None and hasattr(flop_counter, "sdpa_flop_count"):  # absent from older torch
    _EXTRA_FORMULAS[_CPU_ATTENTION] = _cpu_attention_flops


@contextlib.contextmanager
def counting() -> Iterator[FlopCounterMode]:
    """A :class:`FlopCounterMode` under ``no_grad``, with PyTorch's uncounted attention fast path off.

    >>> mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    >>> x = torch.randn(1, 4, 8)
    >>> with counting() as counter:
    ...     _ = mha(x, x, x, need_weights=False)
    >>> counter.get_total_flops() == 2 * (4 * 4 * 8 * 8 + 2 * 4 * 4 * 8)   # 4 projections, scores, weighted sum
    True
    """
    mha = getattr(torch.backends, "mha", None)
    before = mha.get_fastpath_enabled() if mha is not None else None
    if mha is not None:
        mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
            yield counter
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(before)


def _as_args(example_inputs: ExampleInputs) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def module_flops(model: nn.Module, example_inputs: ExampleInputs) -> Dict[str, int]:
    """FLOPs of one forward pass per module (qualified name), and in all under ``""``.

    Counted by :class:`torch.utils.flop_counter.FlopCounterMode`, which attributes each op to
    every module it ran inside: a module's entry includes its children's. The model runs in
    eval mode and without autograd, so BatchNorm running statistics are not updated and the
    model is left exactly as it was (its train/eval flags are restored).
    """
    args = _as_args(example_inputs)
    # Remember every submodule's flag: a model may deliberately mix train and eval submodules.
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with counting() as counter:
            model(*args)
    finally:
        for module, training in flags:
            module.training = training
    flops: Dict[str, int] = {"": int(counter.get_total_flops())}
    for name, per_op in counter.get_flop_counts().items():
        # Names are "<root class>.<qualified name>"; the root's own entry, and "Global", is the total.
        if "." in name:
            flops[name.split(".", 1)[1]] = int(sum(per_op.values()))
    return flops


def count_flops(model: nn.Module, example_inputs: ExampleInputs) -> int:
    """FLOPs of one forward pass of ``model`` on ``example_inputs``, as PyTorch counts them
    (eval mode, no autograd, the model left as it was; see :func:`module_flops`)."""
    return module_flops(model, example_inputs)[""]


def count_macs(model: nn.Module, example_inputs: ExampleInputs) -> int:
    """Multiply-accumulates of one forward pass on ``example_inputs`` (FLOPs / 2).

    The count is for the batch given: pass a batch of one to get MACs per sample.
    """
    return count_flops(model, example_inputs) // 2
