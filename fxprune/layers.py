"""Layers fxprune builds where PyTorch's own cannot hold the pruned widths.

:class:`PrunedMultiheadAttention` replaces an ``nn.MultiheadAttention`` whose heads were pruned:
PyTorch's module ties the width of its heads (``num_heads * head_dim``) to ``embed_dim``, the
width of its input and output, so a module with fewer heads (same ``head_dim``) and the same
embedding cannot be an ``nn.MultiheadAttention``. It computes what ``nn.MultiheadAttention``
computes (packed q/k/v projection, scaled dot-product attention per head, output projection),
with the heads' width its own.

:func:`window_attention` replaces torchvision's ``shifted_window_attention`` (Swin V1 and V2)
(and ``shifted_window_attention_3d``, Video Swin) for the same reason: torchvision's function derives ``head_dim`` as ``C // num_heads`` from its
input width ``C``, so the heads' width *is* the residual width. This one takes ``head_dim``
explicitly, so heads and the residual width can be pruned apart.
"""

from __future__ import annotations

import itertools
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .errors import FxPruneError

__all__ = ["PrunedMultiheadAttention", "window_attention", "shifted_window_mask"]


def _kept_heads(heads: torch.Tensor, count: int, head_dim: int) -> Tuple[int, int]:
    """``(heads, dims per head)`` that kept head channels ``heads`` (sorted) make, of ``count`` heads of ``head_dim``.

    Whole heads (each touched head kept entire) or the same dims of every head; anything else
    has no attention layer to build and is refused.
    """
    if len(heads) == 0:
        raise FxPruneError("no head channels kept")
    heads = heads.sort().values
    per = torch.bincount(heads // head_dim, minlength=count)
    touched = per[per > 0]
    if bool((touched == head_dim).all()):
        return len(touched), head_dim
    alike = len(touched) == count and bool((touched == touched[0]).all())
    offsets = (heads % head_dim).reshape(count, -1) if alike else None
    if offsets is None or not bool((offsets == offsets[0]).all()):
        raise FxPruneError(f"{len(heads)} head channels are neither whole heads of {head_dim} nor the same dims "
                           f"of all {count} heads")
    return count, int(touched[0])


class PrunedMultiheadAttention(nn.Module):
    """Multi-head attention with ``num_heads`` heads of ``head_dim`` between ``in_dim`` and ``out_dim`` widths.

    Parameters as in ``nn.MultiheadAttention`` (``in_proj_weight`` ``[3 * num_heads * head_dim,
    in_dim]`` packing q, k and v; ``in_proj_bias``; ``out_proj``). ``forward`` takes the
    arguments of ``nn.MultiheadAttention.forward``; masks are not supported (fxprune only
    replaces modules called without them). ``scale``: what the scores are scaled by (default
    ``head_dim ** -0.5``; a copy with fewer dims per head keeps the original's).

    >>> mha = nn.MultiheadAttention(8, 4, batch_first=True).eval()
    >>> pruned = PrunedMultiheadAttention.from_module(mha, torch.arange(4)).eval()
    >>> pruned.num_heads, pruned.head_dim, tuple(pruned(torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8))[0].shape)
    (2, 2, (2, 5, 8))
    """

    def __init__(self, in_dim: int, num_heads: int, head_dim: int, out_dim: int, *, bias: bool = True,
                 out_bias: bool = True, dropout: float = 0.0, batch_first: bool = False,
                 scale: Optional[float] = None) -> None:
        super().__init__()
        self.in_dim, self.num_heads, self.head_dim, self.out_dim = in_dim, num_heads, head_dim, out_dim
        self.scale = float(head_dim ** -0.5 if scale is None else scale)
        self.dropout, self.batch_first = dropout, batch_first
        width = num_heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, in_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width)) if bias else None
        self.out_proj = nn.Linear(width, out_dim, bias=out_bias)
        nn.init.xavier_uniform_(self.in_proj_weight)

    @classmethod
    def from_module(cls, mha: nn.Module, heads: Optional[torch.Tensor] = None,
                    inputs: Optional[torch.Tensor] = None, outputs: Optional[torch.Tensor] = None) -> "PrunedMultiheadAttention":
        """A copy of ``mha`` (an ``nn.MultiheadAttention`` or one of these) keeping the head
        channels ``heads`` (indices into its ``num_heads * head_dim`` head channels: whole heads,
        or the same dims of every head), input columns ``inputs`` and output rows ``outputs``
        (None: all). The copy scales its scores as ``mha`` does.

        >>> mha = nn.MultiheadAttention(8, 2).eval()
        >>> fewer_dims = PrunedMultiheadAttention.from_module(mha, torch.tensor([0, 2, 4, 6]))
        >>> fewer_dims.num_heads, fewer_dims.head_dim, fewer_dims.scale
        (2, 2, 0.5)
        """
        if isinstance(mha, PrunedMultiheadAttention):
            embed, head_dim, scale = mha.num_heads * mha.head_dim, mha.head_dim, mha.scale
        elif isinstance(mha, nn.MultiheadAttention):
            if not mha._qkv_same_embed_dim or mha.in_proj_weight is None or mha.bias_k is not None or mha.add_zero_attn:
                raise FxPruneError("only an nn.MultiheadAttention with packed q/k/v weights and no bias_k/zero_attn can be pruned")
            embed, head_dim = mha.embed_dim, mha.head_dim
            scale = head_dim ** -0.5
        else:
            raise FxPruneError(f"cannot build a PrunedMultiheadAttention from {type(mha).__name__}")
        heads = torch.arange(embed) if heads is None else heads.to(torch.long)
        num_heads, new_dim = _kept_heads(heads, embed // head_dim, head_dim)
        rows = torch.cat([heads, heads + embed, heads + 2 * embed])
        w = mha.in_proj_weight.detach().index_select(0, rows)
        if inputs is not None:
            w = w.index_select(1, inputs.to(torch.long))
        out_w = mha.out_proj.weight.detach().index_select(1, heads)
        out_b = mha.out_proj.bias.detach() if mha.out_proj.bias is not None else None
        if outputs is not None:
            out_w = out_w.index_select(0, outputs.to(torch.long))
            out_b = None if out_b is None else out_b.index_select(0, outputs.to(torch.long))
        new = cls(w.shape[1], num_heads, new_dim, out_w.shape[0], bias=mha.in_proj_bias is not None,
                  out_bias=out_b is not None, dropout=float(mha.dropout), batch_first=bool(mha.batch_first),
                  scale=scale)
        new = new.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.in_proj_weight.copy_(w)
            if mha.in_proj_bias is not None:
                new.in_proj_bias.copy_(mha.in_proj_bias.detach().index_select(0, rows))  # type: ignore[union-attr]
            new.out_proj.weight.copy_(out_w)
            if out_b is not None:
                new.out_proj.bias.copy_(out_b)
        new.train(mha.training)
        return new

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise FxPruneError("PrunedMultiheadAttention does not take masks (fxprune prunes only unmasked attention)")
        if self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        length, batch = query.shape[0], query.shape[1]
        source = key.shape[0]
        width = self.num_heads * self.head_dim
        w_q, w_k, w_v = self.in_proj_weight.split(width)
        b_q, b_k, b_v = self.in_proj_bias.split(width) if self.in_proj_bias is not None else (None, None, None)
        # (L, N, H * D) -> (N * H, L, D): head h owns channels [h * D, (h + 1) * D), as in nn.MultiheadAttention.
        q = F.linear(query, w_q, b_q).reshape(length, batch * self.num_heads, self.head_dim).transpose(0, 1)
        k = F.linear(key, w_k, b_k).reshape(source, batch * self.num_heads, self.head_dim).transpose(0, 1)
        v = F.linear(value, w_v, b_v).reshape(source, batch * self.num_heads, self.head_dim).transpose(0, 1)
        attn = torch.softmax((q * self.scale) @ k.transpose(1, 2), dim=-1)
        if self.training and self.dropout > 0:
            attn = F.dropout(attn, p=self.dropout)
        out = (attn @ v).transpose(0, 1).reshape(length * batch, width)
        out = self.out_proj(out).reshape(length, batch, self.out_dim)
        if self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = attn.reshape(batch, self.num_heads, length, source)
        return out, weights.mean(dim=1) if average_attn_weights else weights


def shifted_window_mask(size: Sequence[int], window: Sequence[int], shift: Sequence[int],
                        like: torch.Tensor) -> torch.Tensor:
    """The additive mask ``[windows, N, N]`` of shifted-window attention on a padded map of ``size``.

    ``size``, ``window`` and ``shift``: one entry per window dim (H, W; or T, H, W). After the
    cyclic shift, a window may hold pixels of up to three bands per dim that were not
    neighbours; a query attends only within its own region (-100 elsewhere).

    >>> m = shifted_window_mask([4, 4], [2, 2], [1, 1], torch.zeros(()))
    >>> tuple(m.shape), m[0].eq(0).all().item(), m[-1].eq(0).sum().item()
    ((4, 4, 4), True, 4)
    """
    regions = like.new_zeros(tuple(size))
    bands = [[(0, -w), (-w, -s), (-s, None)] for w, s in zip(window, shift)]
    for label, box in enumerate(itertools.product(*bands)):
        regions[tuple(slice(a, b) for a, b in box)] = label
    nd = len(size)
    interleaved = [v for n, w in zip(size, window) for v in (n // w, w)]
    regions = regions.view(interleaved).permute(*range(0, 2 * nd, 2), *range(1, 2 * nd, 2)).reshape(-1, math.prod(window))
    diff = regions.unsqueeze(1) - regions.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


def window_attention(input: torch.Tensor, qkv_weight: torch.Tensor, proj_weight: torch.Tensor,
                     relative_position_bias: torch.Tensor, window_size: Sequence[int], num_heads: int,
                     shift_size: Sequence[int], attention_dropout: float = 0.0, dropout: float = 0.0,
                     qkv_bias: Optional[torch.Tensor] = None, proj_bias: Optional[torch.Tensor] = None,
                     logit_scale: Optional[torch.Tensor] = None, training: bool = True,
                     head_dim: Optional[int] = None) -> torch.Tensor:
    """(Shifted) window multi-head self-attention on a channels-last ``[B, H, W, C]`` or ``[B, T, H, W, C]`` map.

    The arguments of torchvision's ``shifted_window_attention`` (and, for 5-d input,
    ``shifted_window_attention_3d``), plus ``head_dim``: the heads' width is ``num_heads *
    head_dim`` (``qkv_weight`` is ``[3 * num_heads * head_dim, C]``, ``proj_weight`` ``[C_out,
    num_heads * head_dim]``), independent of the input width ``C``; ``head_dim=None`` is
    torchvision's ``C // num_heads``, and the function then computes what torchvision's does.
    ``logit_scale`` given: Swin V2's cosine attention (its q/k/v bias's k third is not used,
    as in torchvision).

    >>> import torchvision.models.swin_transformer as swin
    >>> x, qkv, proj = torch.randn(1, 8, 8, 6), torch.randn(18, 6), torch.randn(6, 6)
    >>> bias = torch.randn(1, 2, 16, 16)
    >>> ours = window_attention(x, qkv, proj, bias, [4, 4], 2, [2, 2], training=False)
    >>> torch.allclose(ours, swin.shifted_window_attention(x, qkv, proj, bias, [4, 4], 2, [2, 2], training=False), atol=1e-5)
    True
    >>> tuple(window_attention(x, torch.randn(12, 6), torch.randn(5, 4), bias[:, :1], [4, 4], 1, [2, 2],
    ...                        training=False, head_dim=4).shape)   # one head of 4, 5 channels out
    (1, 8, 8, 5)
    """
    batch, size, channels = input.shape[0], list(input.shape[1:-1]), input.shape[-1]
    nd = len(size)
    dim = channels // num_heads if head_dim is None else head_dim
    heads_width = num_heads * dim
    window = [int(w) for w in window_size]
    pad: List[int] = [0, 0]
    for n, w in zip(reversed(size), reversed(window)):
        pad += [0, (w - n % w) % w]
    x = F.pad(input, pad)
    padded = list(x.shape[1:-1])
    # A window as large as the map sees all of it: nothing to shift.
    shift = [0 if w >= n else int(s) for w, n, s in zip(window, padded, shift_size)]
    shifted = sum(shift) > 0
    dims = tuple(range(1, nd + 1))
    if shifted:
        x = torch.roll(x, shifts=tuple(-s for s in shift), dims=dims)
    counts = [n // w for n, w in zip(padded, window)]
    windows, tokens = math.prod(counts), math.prod(window)
    interleaved = [v for c, w in zip(counts, window) for v in (c, w)]
    x = x.view(batch, *interleaved, channels).permute(0, *range(1, 2 * nd, 2), *range(2, 2 * nd + 1, 2), 2 * nd + 1)
    x = x.reshape(batch * windows, tokens, channels)
    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = qkv_bias.clone()
        third = qkv_bias.numel() // 3
        qkv_bias[third:2 * third].zero_()
    qkv = F.linear(x, qkv_weight, qkv_bias).reshape(x.size(0), tokens, 3, num_heads, dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * dim ** -0.5) @ k.transpose(-2, -1)
    attn = attn + relative_position_bias
    if shifted:
        mask = shifted_window_mask(padded, window, shift, x)
        attn = attn.view(batch, windows, num_heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, tokens, tokens)
    attn = F.dropout(F.softmax(attn, dim=-1), p=attention_dropout, training=training)
    x = (attn @ v).transpose(1, 2).reshape(x.size(0), tokens, heads_width)
    x = F.dropout(F.linear(x, proj_weight, proj_bias), p=dropout, training=training)
    out = x.size(-1)
    order = [v for i in range(nd) for v in (1 + i, 1 + nd + i)]
    x = x.view(batch, *counts, *window, out).permute(0, *order, 2 * nd + 1).reshape(batch, *padded, out)
    if shifted:
        x = torch.roll(x, shifts=tuple(shift), dims=dims)
    return x[(slice(None),) + tuple(slice(0, n) for n in size)].contiguous()


# A leaf for torch.fx (like torchvision's own function): re-tracing a pruned model keeps the call.
torch.fx.wrap("window_attention")
