"""Pruning head_dim instead of whole heads (rule option ``attention="head_dim"``).

Every head keeps the same dims of q and k (and of v); the head count stays. Exact, so each
result is proven against the plain masked reference, and each proof is shown to fail on a
deliberately broken rewrite: dims rolled within a head, the wrong dims kept, the
scaled_dot_product_attention scale left to follow the new head_dim. Plan and apply agree on
the option: the plan records it and apply, the proof and save read it from there.
"""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.planning import rules_for
from fxprune.rules import DEFAULT_RULES, RULE_OPTIONS
from fxprune.testing import assert_equivalent, randomize_constants
from fxprune.workflow.cli_args import ATTENTION_MODES
from tests.test_units import HandAttention, MHANet, SeparateQKV, T, Tokens, small_hf_vit
from tests.zoo import assert_rolled_parameter_fails, assert_rolled_weight_fails

HEAD_DIM = DEFAULT_RULES.with_options(attention="head_dim")


def _group(model: nn.Module, key: str, inputs: tuple = (T,), rules=HEAD_DIM) -> fxprune.Group:
    return next(g for g in fxprune.find_groups(model, example_inputs=inputs, rules=rules) if g.key == key)


def _prune(model: nn.Module, inputs: tuple = (T,)) -> tuple:
    pruned = fxprune.prune(model, 0.5, example_inputs=inputs, rules=HEAD_DIM)
    plan = pruned.meta["fxprune_plan"]
    assert_equivalent(model, pruned, plan, list(inputs), example_inputs=inputs)
    return pruned, plan


def _with_keep(plan: fxprune.PruningPlan, key: str, keep: list) -> fxprune.PruningPlan:
    data = plan.to_dict()
    for g in data["groups"]:
        if g["key"] == key:
            g["keep"] = keep
    data["model"].pop("fingerprint")
    return fxprune.PruningPlan.from_json(json.dumps(data))


def test_the_cli_offers_the_rule_options_values() -> None:
    assert ATTENTION_MODES == RULE_OPTIONS["attention"]


@pytest.mark.parametrize("fused", [False, True])
def test_packed_qkv_keeps_every_head_and_the_same_dims_of_each(fused: bool) -> None:
    model = Tokens(HandAttention(fused=fused)).eval()
    dims = _group(model, "attn.qkv")
    assert dims.prunable and dims.size == 6 and dims.unit == 1  # one head's dims, tied across heads and q/k/v
    assert [m.offset for m in dims.members if m.module == "attn.qkv"] == [6 * i for i in range(12)]
    assert _group(model, "attn.qkv", rules=DEFAULT_RULES).size == 24  # whole heads by default
    pruned, plan = _prune(model)
    assert plan.rule_options == {"attention": "head_dim"} and len(plan.keep("attn.qkv")) == 3
    assert pruned.get_submodule("attn.qkv").out_features == 3 * 4 * 3
    view = next(n for n in pruned.graph.nodes if n.op == "call_method" and n.target == "reshape")
    assert view.args[-2:] == (4, 3)  # four heads of three dims (the computed C // heads became the literal)
    if fused:
        sdpa = next(n for n in pruned.graph.nodes if n.target is F.scaled_dot_product_attention)
        assert sdpa.kwargs["scale"] == pytest.approx(6 ** -0.5)  # the original head_dim's scale, pinned
    assert_rolled_weight_fails(model, pruned, plan, (T,), "attn.qkv", 0)
    assert_rolled_weight_fails(model, pruned, plan, (T,), "attn.proj", 1)
    other = sorted(set(range(6)) - set(plan.keep("attn.qkv")))
    with pytest.raises(AssertionError):  # proved against other dims than the ones built
        assert_equivalent(model, pruned, _with_keep(plan, "attn.qkv", other), [T], example_inputs=(T,))


def test_the_proof_fails_when_sdpa_takes_its_scale_from_the_pruned_head_dim() -> None:
    model = Tokens(HandAttention(fused=True)).eval()
    pruned, plan = _prune(model)
    broken = copy.deepcopy(pruned)
    sdpa = next(n for n in broken.graph.nodes if n.target is F.scaled_dot_product_attention)
    sdpa.kwargs = {}  # what a rewrite that forgot the scale would build
    broken.recompile()
    with pytest.raises(AssertionError):
        assert_equivalent(model, broken, plan, [T], example_inputs=(T,))


@pytest.mark.parametrize("fused", [False, True])
def test_head_dims_prune_alike_on_the_exported_graph(fused: bool) -> None:
    model = randomize_constants(Tokens(HandAttention(fused=fused)).eval())
    program = torch.export.export(model, (T,), strict=False)
    dims = next(g for g in fxprune.find_groups(program, example_inputs=(T,), rules=HEAD_DIM) if g.key == "attn.qkv")
    assert dims.prunable and dims.size == 6
    pruned = fxprune.prune(program, 0.5, example_inputs=(T,), rules=HEAD_DIM)
    assert pruned.get_submodule("attn.qkv").out_features == 36
    assert_equivalent(program, pruned, pruned.meta["fxprune_plan"], [T], example_inputs=(T,))


def test_separate_projections_give_v_its_own_dims() -> None:
    model = Tokens(SeparateQKV()).eval()
    groups = {g.key: g for g in fxprune.find_groups(model, example_inputs=(T,), rules=HEAD_DIM)}
    assert groups["attn.q"].size == 6 and groups["attn.v"].size == 6  # q/k dims, and v's own
    assert {m.module for m in groups["attn.q"].members} >= {"attn.q", "attn.k"}
    assert {m.module for m in groups["attn.v"].members} >= {"attn.v", "attn.o"}
    pruned, plan = _prune(model)
    assert pruned.get_submodule("attn.q").out_features == pruned.get_submodule("attn.k").out_features == 12
    assert pruned.get_submodule("attn.v").out_features == pruned.get_submodule("attn.o").in_features == 12
    for name in ("attn.k", "attn.v"):
        assert_rolled_weight_fails(model, pruned, plan, (T,), name, 0)
    wrong = sorted(set(range(6)) - set(plan.keep("attn.v")))
    with pytest.raises(AssertionError):
        assert_equivalent(model, pruned, _with_keep(plan, "attn.v", wrong), [T], example_inputs=(T,))


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_keeps_its_heads_and_the_original_scale(batch_first: bool) -> None:
    model = MHANet(batch_first).eval()
    x = T if batch_first else T.transpose(0, 1).contiguous()
    dims = _group(model, "mha:channelwise", (x,))
    assert dims.size == 4 and dims.prunable  # one head's dims, every head alike (whole heads: 16 in units of 4)
    pruned, plan = _prune(model, (x,))
    mha = pruned.get_submodule("mha")
    assert (mha.num_heads, mha.head_dim, mha.scale) == (4, 2, 0.5)  # 1/sqrt(4): the original head_dim's
    assert_rolled_parameter_fails(model, pruned, plan, (x,), "mha.in_proj_weight", 0)
    broken = copy.deepcopy(pruned)
    broken.get_submodule("mha").scale = 2 ** -0.5  # scaled by the new head_dim
    with pytest.raises(AssertionError):
        assert_equivalent(model, broken, plan, [x], example_inputs=(x,))


def test_pruned_attention_layer_refuses_head_channels_it_cannot_build() -> None:
    from fxprune.layers import PrunedMultiheadAttention
    mha = nn.MultiheadAttention(8, 2)
    assert PrunedMultiheadAttention.from_module(mha, torch.arange(4, 8)).num_heads == 1  # a whole head
    for bad in ([0, 1, 4], [0, 1, 5, 6]):  # a head and a part; the same count, other dims per head
        with pytest.raises(fxprune.FxPruneError, match="neither whole heads"):
            PrunedMultiheadAttention.from_module(mha, torch.tensor(bad))


def test_torchvision_vit_prunes_head_dims_and_is_proven() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = randomize_constants(torchvision.models.VisionTransformer(32, 8, 2, 4, 64, 128, num_classes=3).eval())
    x = torch.randn(1, 3, 32, 32)
    pruned, _ = _prune(model, (x,))
    attn = pruned.get_submodule("encoder.layers.encoder_layer_0.self_attention")
    assert (attn.num_heads, attn.head_dim) == (4, 8)


def test_a_norm_over_head_dim_keeps_that_block_to_whole_heads() -> None:
    pytest.importorskip("timm")
    from timm.layers import Attention
    attn = Attention(24, num_heads=4, qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm)
    heads = _group(Tokens(attn).eval(), "attn.qkv")
    assert heads.size == 24 and heads.unit == 6  # the q/k norm reads head_dim: whole heads instead


def test_hugging_face_vit_prunes_head_dims_and_is_proven() -> None:
    model, x = small_hf_vit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxprune.FxPruneWarning)  # traced through torch.export, said so
        pruned, plan = _prune(model, (x,))
        assert_rolled_weight_fails(model, pruned, plan, (x,), "vit.layers.0.attention.v_proj", 0)
    attn = pruned.get_submodule("vit.layers.0.attention")
    assert attn.q_proj.out_features == attn.k_proj.out_features == 32  # 4 heads of 8 dims
    assert attn.v_proj.out_features == attn.o_proj.in_features == 32


def test_timm_vit_prunes_head_dims_and_is_proven() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=16, depth=2,
                              num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    pruned, plan = _prune(model, (x,))
    assert pruned.get_submodule("blocks.0.attn.qkv").out_features == 3 * 3 * 32  # 3 heads of 32 dims
    assert sum(p.numel() for p in pruned.parameters()) < 0.65 * sum(p.numel() for p in model.parameters())


def test_timm_swin_keeps_its_bias_tables_whole_and_is_proven() -> None:
    # Every head stays, so the relative position bias (one table column per head) and the
    # shifted windows' mask keep their shapes; only q/k/v rows and projection columns go.
    timm = pytest.importorskip("timm")
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=112, depths=(2, 2),
                              num_heads=(3, 6), embed_dim=48, num_classes=3).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_()  # timm starts it near zero: spread it so a wrong column would show
    model = randomize_constants(model)
    x = torch.randn(1, 3, 112, 112)
    pruned, plan = _prune(model, (x,))
    attn = pruned.get_submodule("layers.1.blocks.1.attn")
    assert attn.qkv.out_features == 3 * 6 * 8 and attn.relative_position_bias_table.shape[1] == 6
    assert_rolled_weight_fails(model, pruned, plan, (x,), "layers.1.blocks.1.attn.qkv", 0)


# ----------------------------------------------------------------------------- plan and apply agree


def test_apply_takes_the_option_from_the_plan_and_refuses_a_table_that_contradicts_it() -> None:
    model = Tokens(HandAttention()).eval()
    plan = fxprune.plan(model, 0.5, example_inputs=(T,), rules=HEAD_DIM)
    loaded = fxprune.PruningPlan.from_json(plan.to_json())
    assert loaded == plan and json.loads(plan.to_json())["rule_options"] == {"attention": "head_dim"}
    rebuilt = fxprune.apply(model, loaded, example_inputs=(T,))  # no rules=: the plan's option
    assert rebuilt.get_submodule("attn.qkv").out_features == 36
    assert_equivalent(model, rebuilt, loaded, [T], example_inputs=(T,))
    with pytest.raises(fxprune.PlanMismatchError, match="attention='heads'"):
        fxprune.apply(model, plan, example_inputs=(T,), rules=DEFAULT_RULES.with_options(attention="heads"))
    heads_plan = fxprune.plan(model, 0.5, example_inputs=(T,))
    assert "rule_options" not in heads_plan.to_dict()  # the default: the record plans always had
    with pytest.raises(fxprune.PlanMismatchError, match="rule option"):
        fxprune.apply(model, heads_plan, example_inputs=(T,), rules=HEAD_DIM)
    assert rules_for(heads_plan).option("attention") == "heads"


def test_a_plan_with_an_unknown_rule_option_is_refused() -> None:
    data = fxprune.plan(Tokens(HandAttention()).eval(), 0.5, example_inputs=(T,), rules=HEAD_DIM).to_dict()
    data["rule_options"] = {"attention": "rows"}
    with pytest.raises(fxprune.FxPruneError, match="not one of"):
        fxprune.PruningPlan.from_json(json.dumps(data))
    with pytest.raises(fxprune.FxPruneError, match="unknown rule option"):
        DEFAULT_RULES.with_options(heads="all")


def test_a_head_dim_model_saves_and_loads(tmp_path) -> None:
    model = Tokens(HandAttention(fused=True)).eval()
    pruned, plan = _prune(model)
    folder = os.path.join(tmp_path, "a")
    fxprune.save(pruned, folder, plan=plan, source=None)
    loaded = fxprune.load(folder, model=Tokens(HandAttention(fused=True)))
    assert torch.allclose(loaded(T), pruned(T))
    with open(os.path.join(folder, "plan.json")) as f:
        assert json.load(f)["rule_options"] == {"attention": "head_dim"}


def test_cli_prune_and_groups_take_attention(capsys) -> None:
    from fxprune.cli import main
    model = "tests.test_head_dim:tiny_timm_vit"
    assert main(["groups", "--model", model, "--attention", "head_dim", "--image-size", "32"]) == 0
    shown = capsys.readouterr()
    assert "group blocks.0.attn.qkv [64 ch, prunable]" in shown.out and "warning" not in shown.err
    assert main(["prune", "--model", model, "--attention", "head_dim", "--image-size", "32", "--runs", "1"]) == 0
    out = capsys.readouterr().out
    assert "attention head_dim pruned" in out and "   64 -> 32    blocks.0.attn.qkv" in out


def tiny_timm_vit(num_classes: int = 10) -> nn.Module:
    """A two-block timm ViT-Tiny for 32 px images (the CLI tests build it by name)."""
    timm = pytest.importorskip("timm")
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=16, depth=2,
                             num_classes=num_classes)


def test_the_run_records_head_dim_pruning_in_its_config_and_report() -> None:
    from fxprune.workflow.job import RunConfig, run_rules
    from fxprune.workflow.errors import ConfigError
    from fxprune.workflow.report import render_markdown
    config = RunConfig(attention="head_dim")
    config.validate()
    assert config.result_options()["attention"] == "head_dim" and "attention" not in RunConfig().result_options()
    assert run_rules(config).option("attention") == "head_dim" and run_rules(RunConfig()) is DEFAULT_RULES
    with pytest.raises(ConfigError, match="--attention"):
        RunConfig(attention="rows").validate()
    text = render_markdown({"config": config.to_dict(), "baseline": {}, "pruned": {}})
    assert "pruned by head_dim" in text


def test_iterative_pruning_records_the_option_in_its_composite_plan() -> None:
    model = Tokens(HandAttention()).eval()
    pruned = fxprune.prune_iteratively(model, 0.5, steps=2, example_inputs=(T,), rules=HEAD_DIM)
    plan = pruned.meta["fxprune_plan"]
    assert plan.rule_options == {"attention": "head_dim"} and len(plan.keep("attn.qkv")) == 3
    rebuilt = fxprune.apply(model, plan, example_inputs=(T,))  # the composite plan applies in one go
    assert rebuilt.get_submodule("attn.qkv").out_features == 36
    assert_equivalent(model, rebuilt, plan, [T], example_inputs=(T,))
