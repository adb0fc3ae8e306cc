"""benchmarks/accuracy.py's bookkeeping and renderer, on fake results (no training)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, Optional

import pytest

from .scripts import load_benchmark

ROOT = Path(__file__).resolve().parent.parent


bench = load_benchmark("accuracy.py")

SETTINGS = {"model": "resnet18", "data": "fashion-mnist", "epochs": 3, "baseline_epochs": 2, "batch_size": 256, "limit": 30000,
            "eval_limit": None, "subset_seed": 0}
# Per seed: top-1 of each arm at ratio 0.5 (and a few at 0.8).
TOP1 = {0: {"baseline": 89.0, "E": 90.0, "A": 89.9, "B": 89.9, "C": 90.1, "D": 89.0, "F": 90.2},
        1: {"baseline": 88.8, "E": 90.2, "A": 89.5, "B": 89.6, "C": 89.7, "D": 89.3, "F": 89.9}}


def _entry(seed: int, arm: str, ratio: Optional[float], top1: float) -> Dict[str, Any]:
    macs = 32.5e6 if ratio is None else 8.16e6
    return {"seed": seed, "arm": arm, "ratio": ratio, "top1": top1, "top5": 99.0, "macs": macs,
            "params": 11.2e6 if ratio is None else 2.8e6, "train_s": 100.0 + seed, "latency_ms": 3.0,
            "speedup": 1.0 if ratio is None else 2.5, "latency_busy": arm == "D" and seed == 1,
            "top1_before_finetune": None if ratio is None else 80.0}


def fake_doc() -> Dict[str, Any]:
    results = {}
    for seed, arms in TOP1.items():
        for arm, top1 in arms.items():
            ratio = None if arm in ("baseline", "E") else 0.5
            results[bench.job_key(seed, arm, ratio)] = _entry(seed, arm, ratio, top1)
        results[bench.job_key(seed, "A", 0.8)] = _entry(seed, "A", 0.8, 85.0 + seed)
    results[bench.job_key(0, "B", 0.8)] = dict(_entry(0, "B", 0.8, 84.0),
                                              note="B at ratio 0.8: pruning_ratio=0.7900 was used instead")
    return {"settings": SETTINGS, "results": results,
            "meta": {"machine": {"cpu": "Test CPU", "cpu_count": 2, "torch": "2.x", "platform": "Linux"},
                     "threads": 2, "seeds": [0, 1], "ratios": [0.5, 0.8], "torch_pruning": "1.6.0",
                     "data": {"source": "/data/fmnist", "train_samples_full": 60000, "test_samples": 10000},
                     "sizing": "Sized to fit."},
            "sessions": [{"started": "2026-01-01T00:00:00+00:00", "finished": "2026-01-01T00:30:00+00:00",
                          "command": "python benchmarks/accuracy.py", "wall_s": 1800.0, "load_start": 1.5,
                          "load_end": 2.5}],
            "conclusion": "Pruning holds up."}


def test_job_keys_and_order() -> None:
    jobs = bench.plan_jobs([0, 1], [0.5, 0.8], list(bench.ARMS))
    keys = [bench.job_key(*job) for job in jobs]
    assert len(keys) == len(set(keys)) == 2 * (2 + 2 * 5)
    # The first ratio for every seed before the second ratio: a cut-short run holds the main comparison.
    assert keys.index("seed1/F/r0.5") < keys.index("seed0/A/r0.8")
    # A seed's baseline (and control) come before its pruned arms.
    for seed in (0, 1):
        assert keys.index(f"seed{seed}/baseline") < keys.index(f"seed{seed}/E") < keys.index(f"seed{seed}/A/r0.5")
    assert bench.plan_jobs([0], [0.5], ["A"]) == [(0, "baseline", None), (0, "A", 0.5)]
    with pytest.raises(ValueError, match="unknown arm"):
        bench.plan_jobs([0], [0.5], ["Z"])


def test_summary_and_targets_pair_by_seed() -> None:
    doc = fake_doc()
    summary = bench.summarize(doc["results"])
    assert summary["A/r0.5"]["top1"]["values"] == [89.9, 89.5]
    assert summary["A/r0.5"]["top1"]["mean"] == pytest.approx(89.7)
    assert summary["E"]["ratio"] is None and summary["D/r0.5"]["busy"] is True
    rows = {row["other"] if row["goal"].startswith("A >=") else row["arm"]: row for row in bench.goals(doc["results"])}
    # A - E per seed: -0.1 and -0.7, mean -0.4 < -0.3: not met.
    assert rows["E"]["diff"]["values"] == pytest.approx([-0.1, -0.7])
    assert rows["E"]["met"] is False and rows["E"]["met_every_seed"] is False
    # A - D: +0.9 and +0.2, mean +0.55 >= 0.5 but not on every seed.
    assert rows["D"]["met"] is True and rows["D"]["met_every_seed"] is False
    # A - B: 0.0 and -0.1.
    assert rows["B"]["diff"]["mean"] == pytest.approx(-0.05) and rows["B"]["met"] is False
    # F - A: +0.3 and +0.4.
    assert rows["F"]["diff"]["values"] == pytest.approx([0.3, 0.4]) and rows["F"]["met"] is True


def test_render_markdown_from_fake_json() -> None:
    doc = json.loads(json.dumps(fake_doc()))  # what the renderer reads back from the file
    text = bench.render_markdown(doc)
    assert "### Ratio 0.5" in text and "### Ratio 0.8" in text
    assert "| A | fxprune default" in text and "89.70 ± 0.20" in text
    assert "(busy)" in text  # D's seed-1 latency was flagged
    assert "pruning_ratio=0.7900 was used instead" in text
    assert "Test CPU" in text and "python benchmarks/accuracy.py" in text and "30.0 min" in text
    assert "a fixed subset of 30000 of the 60000 training images" in text
    assert "-0.40 pt (per seed -0.10, -0.70)" in text
    assert "Sized to fit." in text and "Pruning holds up." in text
    # Incomplete runs render too (an arm missing for a seed, no conclusion yet).
    del doc["results"]["seed1/D/r0.5"]
    del doc["conclusion"]
    partial = bench.render_markdown(doc)
    assert "Not written yet" in partial and "| D |" in partial
    assert bench.render_markdown({}).startswith("# Accuracy")


def test_results_of_other_settings_are_never_mixed(tmp_path: Path) -> None:
    bench.check_settings({"settings": SETTINGS}, dict(SETTINGS), tmp_path / "a.json")
    bench.check_settings({}, dict(SETTINGS), tmp_path / "a.json")
    with pytest.raises(SystemExit, match="other settings"):
        bench.check_settings({"settings": SETTINGS}, dict(SETTINGS, epochs=5), tmp_path / "a.json")
    args = argparse.Namespace(epochs=3, baseline_epochs=2, batch_size=256, limit=30000, eval_limit=None)
    settings = bench.settings_of(args)
    assert bench.baseline_settings(settings) == SETTINGS
    # The fine-tuning recipe is recorded as it resolved: the job's defaults without --finetune.
    assert settings["finetune"]["distill"] is False and settings["finetune"]["importance"] == "taylor"
    assert settings["finetune"]["global_ranking"] is True
    # The recipe that was the default before (L1, uniform) records what the runs of then recorded.
    old = bench.settings_of(argparse.Namespace(**vars(args), finetune=["importance=l1", "global_ranking=0"]))
    assert "global_ranking" not in old["finetune"] and old["finetune"]["importance"] == "l1"


def test_finetune_variants_are_recorded_and_never_mix_with_the_default(tmp_path: Path) -> None:
    base = argparse.Namespace(epochs=3, baseline_epochs=2, batch_size=256, limit=30000, eval_limit=None)
    variant = argparse.Namespace(**vars(base), finetune=["lr=0.02", "warmup_epochs=0.5", "distill=1"])
    default, changed = bench.settings_of(base), bench.settings_of(variant)
    assert changed["finetune"]["lr"] == 0.02 and changed["finetune"]["warmup_epochs"] == 0.5
    assert changed["finetune"]["distill"] is True
    # Every variant starts from the same cached baseline, but their results never share a JSON.
    assert bench.baseline_settings(changed) == bench.baseline_settings(default)
    with pytest.raises(SystemExit, match="other settings"):
        bench.check_settings({"settings": default}, changed, tmp_path / "a.json")
    # Flags and a default that resolve to the same recipe are the same settings.
    same = argparse.Namespace(**vars(base), finetune=[f"lr={default['finetune']['lr']}"])
    assert bench.settings_of(same) == default
    for bad in (["augment=1"], ["lr"], ["distill=maybe"]):  # the baseline's options are not variants
        with pytest.raises(SystemExit, match="--finetune"):
            bench.parse_finetune(bad)
    assert "lr 0.02, warm-up 0.5 epochs" in bench.render_markdown({"settings": changed})
    assert "distillation from the baseline (alpha 0.5, T 4)" in bench.render_markdown({"settings": changed})


def test_render_only_writes_the_table_atomically(tmp_path: Path) -> None:
    out, table = tmp_path / "acc.json", tmp_path / "ACC.md"
    out.write_text(json.dumps(fake_doc()), encoding="utf-8")
    assert bench.main(["--render-only", "--out", str(out), "--table", str(table)]) == 0
    assert table.read_text(encoding="utf-8").startswith("# Accuracy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ACC.md", "acc.json"]  # no temporary left
    # The recipes tried are stored in the JSON and rendered before the conclusion.
    recipes = tmp_path / "recipes.md"
    recipes.write_text("| recipe | top-1 |\n|---|---|\n| lr 0.05 | 91.0 |\n", encoding="utf-8")
    assert bench.main(["--render-only", "--out", str(out), "--table", str(table), "--recipes", str(recipes)]) == 0
    text = table.read_text(encoding="utf-8")
    assert "## Recipes tried" in text and "| lr 0.05 | 91.0 |" in text
    assert text.index("Recipes tried") < text.index("## Conclusion")
    assert "lr 0.05" in json.loads(out.read_text(encoding="utf-8"))["recipes"]


def test_reinitialise_gives_fresh_weights_of_the_pruned_shapes() -> None:
    import torch
    from torch import nn

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
    model[1].running_mean.fill_(3.0)
    bench.reinitialise(model, 0)
    assert not torch.all(model[0].weight == 0.5) and not torch.all(model[3].weight == 0.5)
    assert torch.all(model[1].weight == 1) and torch.all(model[1].bias == 0)
    assert torch.all(model[1].running_mean == 0)
    other = bench.reinitialise(nn.Sequential(nn.Conv2d(1, 4, 3)), 0)
    assert torch.equal(other[0].weight, model[0].weight)  # seeded
    assert bench.same_weights(model, model) and not bench.same_weights(model, other)


def test_extending_a_json_from_a_machine_with_other_cpu_kernels_warns(tmp_path: Path) -> None:
    from fxprune.workflow.report import machine_info

    machine = machine_info()
    kernels = machine["cpu_kernels"]
    assert set(kernels) == {"capability", "family", "model"}  # recorded in every report and benchmark JSON
    doc = fake_doc()
    warning = bench.kernel_warning(doc, machine, tmp_path / "a.json")  # fake_doc's machine records none
    assert warning is not None and "unrecorded" in warning and "same baseline" in warning
    doc["meta"]["machine"]["cpu_kernels"] = dict(kernels)
    assert bench.kernel_warning(doc, machine, tmp_path / "a.json") is None
    other = "AVX2" if kernels["capability"] != "AVX2" else "AVX512"  # whatever this machine is not
    doc["meta"]["machine"]["cpu_kernels"] = dict(kernels, capability=other)
    assert other in (bench.kernel_warning(doc, machine, tmp_path / "a.json") or "")
    assert bench.kernel_warning({"results": {}}, machine, tmp_path / "a.json") is None  # nothing to pair with
