"""``allow_renormalising`` everywhere a plan is made or replayed, and its interplay with ``strict``.

Renormalising groups (a LayerNorm/RMSNorm normalises over their channels) are proven against
the masked-norm reference, exact ones against the plain masked model. These tests pin down
that the choice reaches every entry point (iterative pruning, the CLI, the run's report), that
plan and apply agree on it (a plan whose flag differs from the analysis is refused), that an
artifact round-trips it, and that ``strict=True, allow_renormalising=False`` is the mode in
which every rewrite is exact.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from typing import Any

import pytest
import torch
import torch.nn as nn

import fxprune
import fxprune.artifact
from fxprune.errors import PlanMismatchError
from fxprune.testing import assert_equivalent

from .test_layernorm_width import X, group_of, stream

pytestmark = pytest.mark.usefixtures("one_thread")


def flipped(plan: fxprune.PruningPlan, key: str) -> fxprune.PruningPlan:
    """``plan`` with the renormalising flag of group ``key`` inverted (as a hand-edited plan would be)."""
    groups = [dataclasses.replace(g, renormalising=not g.renormalising) if g.key == key else g for g in plan.groups]
    return dataclasses.replace(plan, groups=groups)


# --------------------------------------------------------------------------- plan and apply agree


def test_apply_refuses_a_plan_whose_renormalising_flag_disagrees() -> None:
    model = stream()
    plan = fxprune.plan(model, 0.5, example_inputs=(X,))
    assert {g.key: g.renormalising for g in plan.pruned_groups} == {"embed": True, "mlp.0": False}
    with pytest.raises(PlanMismatchError, match="group embed: the plan prunes it as exact, but in this model it is "
                                                "renormalising .LayerNorm norm"):
        fxprune.apply(model, flipped(plan, "embed"))
    with pytest.raises(PlanMismatchError, match="group mlp.0: the plan prunes it as renormalising, but in this model "
                                                "it is exact .no LayerNorm/RMSNorm normalises over it"):
        fxprune.apply(model, flipped(plan, "mlp.0"))
    with pytest.raises(PlanMismatchError, match="prunes it as exact"):
        fxprune.testing.masked_reference(model, flipped(plan, "embed"))  # the proof resolves the plan too
    # The plan as made applies and is proven.
    pruned = fxprune.apply(model, plan)
    assert_equivalent(model, pruned, plan, (X,))


def test_a_group_the_plan_keeps_whole_may_disagree() -> None:
    """Keeping every channel is the same function under either contract: such plans still apply."""
    model = stream()
    exact_plan = fxprune.plan(model, 0.5, allow_renormalising=False)
    entry = {g.key: g for g in exact_plan.groups}["embed"]
    assert not entry.pruned and not entry.renormalising
    pruned = fxprune.apply(model, exact_plan)  # analysed with renormalising groups allowed: embed is renormalising there
    assert pruned.get_submodule("embed").out_features == 8 and pruned.get_submodule("mlp.0").out_features == 8
    assert_equivalent(model, pruned, exact_plan, (X,))


def test_an_artifact_round_trips_the_flag(tmp_path: Any) -> None:
    model = stream()
    plan = fxprune.plan(model, 0.5, example_inputs=(X,))
    pruned = fxprune.apply(model, plan)
    path = fxprune.save(pruned, tmp_path / "stream.fxprune", plan=plan, example_inputs=(X,))
    on_disk = json.loads((path / "plan.json").read_text())
    assert {g["key"]: g.get("renormalising", False) for g in on_disk["groups"]} == {"embed": True, "mlp.0": False,
                                                                                    "head": False}
    read = fxprune.artifact.read_plan(path)
    assert read.groups == plan.groups and [g.key for g in read.renormalising_groups] == ["embed"]
    loaded = fxprune.load(path, model=stream())
    assert torch.equal(loaded(X), pruned(X))
    # Replayed on an analysis that refuses renormalising groups, the saved plan is refused.
    with pytest.raises(PlanMismatchError, match="cannot be pruned.*allow_renormalising=False"):
        fxprune.apply(stream(), read, allow_renormalising=False)


# --------------------------------------------------------------------------- iterative pruning


def test_prune_iteratively_takes_allow_renormalising() -> None:
    model = stream()
    seen = []
    exact = fxprune.prune_iteratively(model, 0.5, steps=2, allow_renormalising=False,
                                      finetune=lambda m, step: seen.append(step))
    assert seen == [1, 2]
    assert exact.get_submodule("embed").out_features == 8 and exact.get_submodule("mlp.0").out_features == 8
    final = exact.meta["fxprune_plan"]
    assert not final.renormalising_groups and all(not p.renormalising_groups for p in exact.meta["fxprune_steps"])
    assert_equivalent(model, fxprune.apply(stream(), final, allow_renormalising=False), final, (X,))

    renorm = fxprune.prune_iteratively(model, 0.5, steps=2)
    final = renorm.meta["fxprune_plan"]
    assert [g.key for g in final.renormalising_groups] == ["embed"]
    assert renorm.get_submodule("embed").out_features == 4
    rebuilt = fxprune.apply(stream(), final)  # the composite plan replays, flag and all
    assert_equivalent(model, rebuilt, final, (X,))


# --------------------------------------------------------------------------- strict


def test_strict_alone_prunes_renormalising_groups_silently() -> None:
    """``strict`` is about ops without a rule; a LayerNorm width has one, so strict prunes it."""
    model = stream()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = fxprune.plan(model, 0.5, example_inputs=(X,), strict=True)
    assert [g.key for g in plan.renormalising_groups] == ["embed"]


def test_strict_without_renormalising_refuses_them() -> None:
    """``strict=True, allow_renormalising=False``: every rewrite is exact; renormalising plans are refused."""
    model = stream()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # kept whole by request: no warning, no error
        plan = fxprune.plan(model, 0.5, example_inputs=(X,), strict=True, allow_renormalising=False)
        groups = fxprune.find_groups(model, strict=True, allow_renormalising=False)
    assert not plan.renormalising_groups and all(g.exact for g in groups)
    assert {g.key for g in plan.pruned_groups} == {"mlp.0"}
    embed = group_of(model, "embed", strict=True, allow_renormalising=False)
    assert embed.frozen and "renormalising; allow_renormalising=False" in embed.reasons[0]
    renorm_plan = fxprune.plan(model, 0.5)
    with pytest.raises(PlanMismatchError, match="group embed cannot be pruned .LayerNorm norm normalises"):
        fxprune.apply(model, renorm_plan, strict=True, allow_renormalising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        steps = fxprune.prune_iteratively(model, 0.5, steps=2, strict=True, allow_renormalising=False)
    assert not steps.meta["fxprune_plan"].renormalising_groups and steps.get_submodule("embed").out_features == 8


def test_strict_without_renormalising_on_a_norm_only_model_says_why() -> None:
    """Nothing left to prune: never silent, the reason names allow_renormalising=False."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)).eval()
    with pytest.warns(fxprune.FxPruneWarning, match="allow_renormalising=False"):
        pruned = fxprune.prune(model, 0.5, strict=True, allow_renormalising=False)
    assert pruned.get_submodule("0").out_features == 8
