"""Whole-unit pruning (GroupNorm groups, attention heads) beside Torch-Pruning: parameters after ratio 0.5.

Random weights, eval mode, a small input. fxprune prunes with ``fxprune.prune(model, 0.5,
example_inputs=(x,))`` and proves the result against the masked reference in float64;
Torch-Pruning 1.6 runs on a fresh copy (``MagnitudePruner``, ``GroupMagnitudeImportance(p=1)``,
``pruning_ratio=0.5``, the classifier ignored) twice: as the zoo runs it, and with its ViT
example's head options (``num_heads``, ``prune_num_heads=True``, ``prune_head_dims=False``).

    python benchmarks/bench_units.py [name ...]
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Dict, Tuple

import torch
import torch.nn as nn


def _timm(name: str, **kw: Any) -> Callable[[], Tuple[nn.Module, torch.Tensor]]:
    def build() -> Tuple[nn.Module, torch.Tensor]:
        import timm
        return timm.create_model(name, pretrained=False, num_classes=10, **kw).eval(), torch.randn(1, 3, 32, 32)
    return build


def _tv_vit() -> Tuple[nn.Module, torch.Tensor]:
    import torchvision
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=12, num_heads=3,
                                                 hidden_dim=192, mlp_dim=768, num_classes=10)
    return model.eval(), torch.randn(1, 3, 32, 32)


def _hf_vit() -> Tuple[nn.Module, torch.Tensor]:
    import transformers
    config = transformers.ViTConfig(image_size=32, patch_size=8, num_hidden_layers=12, hidden_size=192,
                                    num_attention_heads=3, intermediate_size=768, num_labels=10)
    return transformers.ViTForImageClassification(config).eval(), torch.randn(1, 3, 32, 32)


def _fpn() -> Tuple[nn.Module, torch.Tensor]:
    import segmentation_models_pytorch as smp
    return smp.FPN(encoder_name="resnet34", encoder_weights=None).eval(), torch.randn(1, 3, 64, 64)


MODELS: Dict[str, Callable[[], Tuple[nn.Module, torch.Tensor]]] = {
    "timm:vit_tiny_patch16_224 (32px, patch 8)": _timm("vit_tiny_patch16_224", img_size=32, patch_size=8),
    "timm:deit_tiny_patch16_224 (32px, patch 8)": _timm("deit_tiny_patch16_224", img_size=32, patch_size=8),
    "torchvision VisionTransformer (vit_tiny widths, 32px, patch 8)": _tv_vit,
    "hf:ViTForImageClassification (vit_tiny widths, 32px, patch 8)": _hf_vit,
    "smp:FPN/resnet34 (64px)": _fpn,
}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fxprune_params(build: Callable[[], Tuple[nn.Module, torch.Tensor]]) -> Tuple[int, int, bool]:
    import fxprune
    from fxprune.testing import assert_equivalent, randomize_constants
    model, x = build()
    randomize_constants(model)  # zero-initialised heads would make the proof vacuous
    pruned = fxprune.prune(model, 0.5, example_inputs=(x,))
    assert_equivalent(model, pruned, pruned.meta["fxprune_plan"], [x], example_inputs=(x,))
    return _params(model), _params(pruned), True


def tp_params(build: Callable[[], Tuple[nn.Module, torch.Tensor]], heads: bool) -> str:
    import torch_pruning as tp
    model, x = build()
    ignored = [m for name, m in model.named_modules() if name in ("head", "heads.head", "segmentation_head", "classifier")]
    kw: Dict[str, Any] = {}
    if heads:
        num_heads = {}
        for m in model.modules():
            if hasattr(m, "qkv") and hasattr(m, "num_heads"):
                num_heads[m.qkv] = m.num_heads
            elif isinstance(m, nn.MultiheadAttention):
                num_heads[m] = m.num_heads
        if not num_heads:
            return "-"
        kw = dict(num_heads=num_heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=0.5)
    try:
        pruner = tp.pruner.MagnitudePruner(model, example_inputs=x, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                           pruning_ratio=0.5, ignored_layers=ignored, **kw)
        pruner.step()
    except Exception as exc:  # noqa: BLE001 - Torch-Pruning's failure is a table cell
        return f"error: {type(exc).__name__}"
    for m in model.modules():  # as Torch-Pruning's ViT example does after pruning
        if hasattr(m, "qkv") and hasattr(m, "num_heads"):
            m.num_heads = getattr(pruner, "num_heads", {}).get(m.qkv, m.num_heads)
            m.head_dim = m.qkv.out_features // (3 * m.num_heads)
            if hasattr(m, "attn_dim"):
                m.attn_dim = m.num_heads * m.head_dim
    try:
        with torch.no_grad():
            model(x)
        runs = "runs"
    except Exception as exc:  # noqa: BLE001
        runs = f"does not run: {type(exc).__name__}"
    return f"{_params(model) / 1e6:.2f} M ({runs})"


def main(names: Any) -> None:
    torch.manual_seed(0)
    print("| model | fxprune before → after (proven) | Torch-Pruning (zoo settings) | Torch-Pruning (ViT example, heads) |")
    print("|---|---|---|---|")
    for name, build in MODELS.items():
        if names and not any(n in name for n in names):
            continue
        before, after, proven = fxprune_params(build)
        print(f"| {name} | {before / 1e6:.2f} M → {after / 1e6:.2f} M ({'yes' if proven else 'no'}) | "
              f"{tp_params(build, False)} | {tp_params(build, True)} |", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
