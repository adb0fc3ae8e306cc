"""Coverage: torchvision classifiers pruned at ratio 0.5 and proven equivalent to their masked reference.

One model of every family runs by default (the smallest variant, small inputs); every other
model of ``torchvision.models.list_models`` is marked ``slow``. Each test goes through the same
proof as ``benchmarks/coverage.py`` (trace with ``torch.fx.symbolic_trace``, plan and apply at
0.5 with example inputs, output shape, fewer parameters, float64 equivalence with the masked
original), then checks what is special about the family.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch
import torch.nn as nn
import torchvision

import fxprune
from fxprune.testing import randomize_norms

from .scripts import load_benchmark

ROOT = Path(__file__).resolve().parent.parent


coverage = load_benchmark("coverage.py")

# One per family, the cheapest variant (ResNet itself is proven in test_core.py).
DEFAULT = [
    "alexnet", "vgg11", "resnext50_32x4d", "regnet_x_400mf", "regnet_y_400mf", "densenet121", "googlenet",
    "inception_v3", "mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5", "efficientnet_b0", "efficientnet_v2_s",
    "shufflenet_v2_x0_5", "squeezenet1_1", "convnext_tiny", "swin_t", "swin_v2_t", "vit_b_32",
]
# fxprune knows every op of these families (what it cannot prune it freezes by design, with a
# reason): no warning may be raised for them.
NO_WARNINGS = set(DEFAULT)
ALL = torchvision.models.list_models(module=torchvision.models)
SLOW = [m for m in ALL if m not in DEFAULT]


pytestmark = pytest.mark.usefixtures("one_thread")


def proven(name: str, **kw: Any) -> Tuple[Dict[str, Any], torch.fx.GraphModule, List[fxprune.Group]]:
    rec, pruned, groups = coverage.prove(name, **kw)
    assert rec["traceable"], rec
    assert "error" not in rec, rec.get("error")
    assert rec["shape_ok"], rec
    assert rec["params_after"] < rec["params_before"], rec
    assert rec["macs_after"] < rec["macs_before"], rec
    assert rec["equivalent"], f"{name}: max |diff| {rec.get('max_abs_diff')}"
    assert pruned is not None
    return rec, pruned, groups


def frozen_reasons(groups: List[fxprune.Group]) -> str:
    return "\n".join(r for g in groups for r in g.reasons)


@pytest.mark.parametrize("name", DEFAULT)
def test_family_representative_pruned_and_equivalent(name: str) -> None:
    rec, pruned, groups = proven(name)
    if name in NO_WARNINGS:
        assert rec["warnings"] == [], rec["warnings"][:3]
    check = FAMILY_CHECKS.get(name)
    if check is not None:
        check(pruned, groups)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_every_other_torchvision_classifier(name: str) -> None:
    proven(name)


# --------------------------------------------------------------------------- family specifics


def _resnext(pruned: nn.Module, groups: List[fxprune.Group]) -> None:
    conv = pruned.get_submodule("layer1.0.conv2")  # 128 -> 128, 32 groups of 4
    assert conv.groups == 32 and conv.in_channels == conv.out_channels == 64  # 2 of 4 kept per conv group
    g = next(g for g in groups if g.key == "layer1.0.conv1")
    assert g.blocks == 32 and g.prunable


def _regnet_x(pruned: nn.Module, groups: List[fxprune.Group]) -> None:
    conv = pruned.get_submodule("trunk_output.block2.block2-0.f.b.0")  # 64 -> 64, 4 groups of 16
    assert conv.groups == 4 and conv.in_channels == conv.out_channels == 32


def _regnet_y(pruned: nn.Module, groups: List[fxprune.Group]) -> None:
    block = "trunk_output.block1.block1-0.f"
    conv = pruned.get_submodule(f"{block}.b.0")  # 48 -> 48, 6 groups of 8, followed by an SE
    assert conv.groups == 6 and conv.out_channels == 24
    assert pruned.get_submodule(f"{block}.se.fc2").out_channels == 24  # the SE expand follows the gate


def _densenet(pruned: nn.Module, groups: List[fxprune.Group]) -> None:
    # Dense concatenation: every layer's 32 new channels are a group, read at growing offsets.
    assert pruned.get_submodule("features.denseblock1.denselayer1.conv2").out_channels == 16
    assert pruned.get_submodule("features.denseblock1.denselayer2.norm1").num_features == 32 + 16


def _inception(pruned: nn.Module, groups: List[fxprune.Group]) -> None:
    assert pruned.get_submodule("Mixed_5b.branch1x1.conv").out_channels == 32
    assert pruned.get_submodule("fc").out_features == 1000


def _efficientnet(pruned: nn.Module, groups: List[fxprune.Group]) -> None:
    # SE inside MBConv and stochastic depth on the residual (identity in eval) are both known.
    se = pruned.get_submodule("features.2.0.block.2")
    assert se.fc2.out_channels == pruned.get_submodule("features.2.0.block.0.0").out_channels


def _shufflenet(pruned: nn.Module, groups: List[fxprune.Group]) -> None:
    # The channel shuffle (view -> transpose -> view) is frozen, the branch interiors are pruned.
    assert "channel shuffle (view into 2 x 24, transpose) interleaves channels at view" in frozen_reasons(groups)
    assert pruned.get_submodule("stage2.1.branch2.0").out_channels == 12
    assert pruned.get_submodule("stage2.1.branch2.5").out_channels == 24


def _convnext(pruned: nn.Module, groups: List[fxprune.Group]) -> None:
    # The residual width is pruned under its LayerNorms (renormalising groups: proven against
    # the masked-norm reference), and so is the MLP hidden width (Linear -> GELU -> Linear,
    # channels last after a permute).
    stream = next(g for g in groups if g.key == "features.0.0")
    assert stream.prunable and stream.renormalising and not any(g.frozen for g in groups if g.key != "classifier.2")
    assert pruned.get_submodule("features.1.0.block.3").out_features == 192
    assert pruned.get_submodule("features.1.0.block.0").out_channels == 48
    assert pruned.get_submodule("features.1.0.block.2").normalized_shape == (48,)


def _swin(pruned: nn.Module, groups: List[fxprune.Group]) -> None:
    assert pruned.get_submodule("features.1.0.mlp.0").out_features == 192
    # The residual width (renormalising) and whole heads (3 of 32 -> 2) are pruned: the window
    # attention is rewritten into fxprune's, whose head_dim is its own (tests/test_tv_swin.py).
    assert next(g for g in groups if g.key == "features.0.0").renormalising
    assert pruned.get_parameter("features.1.0.attn.qkv.weight").shape == (3 * 2 * 32, 48)
    assert pruned.get_parameter("features.1.0.attn.relative_position_bias_table").shape[1] == 2


def _vit(pruned: nn.Module, groups: List[fxprune.Group]) -> None:
    mlp = "encoder.layers.encoder_layer_0.mlp"
    assert pruned.get_submodule(f"{mlp}.0").out_features == pruned.get_submodule(f"{mlp}.3").in_features == 1536
    # Whole heads are pruned (12 heads of 64 -> 6) into fxprune's own attention layer.
    attn = pruned.get_submodule("encoder.layers.encoder_layer_0.self_attention")
    assert (attn.num_heads, attn.head_dim) == (6, 64)


FAMILY_CHECKS = {
    "resnext50_32x4d": _resnext, "regnet_x_400mf": _regnet_x, "regnet_y_400mf": _regnet_y,
    "densenet121": _densenet, "inception_v3": _inception, "efficientnet_b0": _efficientnet,
    "shufflenet_v2_x0_5": _shufflenet, "convnext_tiny": _convnext, "swin_t": _swin, "vit_b_32": _vit,
}


# --------------------------------------------------------------------------- MaxViT, small


def test_maxvit_small_config_pruned_and_equivalent() -> None:
    """MaxViT's family at a CI-sized config (maxvit_t itself needs 224x224: slow)."""
    from torchvision.models.maxvit import MaxVit

    torch.manual_seed(0)
    model = MaxVit(input_size=(56, 56), stem_channels=16, partition_size=7, block_channels=[16, 32],
                   block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.1, num_classes=10)
    model = randomize_norms(model).eval()
    x = torch.randn(1, 3, 56, 56)
    rec, pruned, groups = proven("maxvit_small", model=model, x=x)
    # The MBConv expansion (with its SE) is pruned, and so are the residual widths and whole
    # heads of the einsum attention (tests/test_maxvit_heads.py): only the output stays whole.
    assert pruned.get_submodule("blocks.0.layers.0.layers.MBconv.layers.conv_a.0").out_channels == 32
    attention = "blocks.0.layers.0.layers.window_attention.attn_layer.1"
    assert pruned.get_submodule(f"{attention}.to_qkv").out_features == 3 * 8  # 1 of 2 heads of 8
    assert pruned.get_submodule(f"{attention}.merge").out_features < 16  # the residual width
    assert "splits or interleaves the channel dim" not in frozen_reasons(groups)


# --------------------------------------------------------------------------- the table


def test_every_model_has_a_family_and_an_input() -> None:
    for name in ALL:
        assert coverage.family(name) != name, name
        kwargs, side = coverage.spec(name)
        assert side >= 28


def test_untraceable_model_reports_reason_and_hint() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # control flow on a traced value
                return self.conv(x)
            return x

    rec, pruned, _ = coverage.prove("data_dependent", model=DataDependent(), x=torch.randn(1, 3, 8, 8))
    assert rec["traceable"] is False and pruned is None
    assert "control flow" in rec["error"]
    assert "is_leaf_module" in rec["hint"] and "concrete_args" in rec["hint"]
    table = coverage.render({"data_dependent": rec}, ["data_dependent"], 0.5)
    assert "## Models fx cannot trace" in table and "`data_dependent`: TraceError" in table
    assert "**0 of 1** models trace" in table


def test_render_summarises_against_torch_pruning() -> None:
    rec = {"model": "m", "family": "F", "input": [1, 3, 8, 8], "traceable": True, "pruned": True, "equivalent": True,
           "params_before": 2_000_000, "params_after": 1_000_000, "macs_before": 10_000_000, "macs_after": 4_000_000,
           "groups": 5, "prunable": 4, "blocked_groups": 1, "frozen": {"model output": 1}, "warnings": [], "seconds": 1.0}
    table = coverage.render({"m": rec}, ["m"], 0.5)
    assert "**1 of 1** pruned models are proven equivalent" in table
    assert "Torch-Pruning publishes 77 of 85" in table
    assert "| m | 8x8 | yes | yes | yes | 2.00 → 1.00 | 10.0 → 4.0 | 5 (4 / 1) | model output (1) | 1.0 |" in table
