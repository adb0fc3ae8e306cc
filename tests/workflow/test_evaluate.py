"""Evaluation: exact accuracies, size on disk, latency (single model and baseline vs pruned interleaved,
and recorded compile failures)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fxprune.workflow.evaluate import evaluate_accuracy, measure_latency, model_cost, model_size_mb


class _Oracle(nn.Module):
    """Returns its input as logits: the test decides exactly what the "model" predicts."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def test_top1_top5_and_per_class_are_exact() -> None:
    classes = ["a", "b", "c", "d", "e", "f"]
    # Six samples; logits rank the classes so that the true class is at a chosen position.
    rows, labels = [], []
    ranks = [0, 0, 1, 4, 5, 2]  # position of the true class in the ranking of each sample
    for sample, rank in enumerate(ranks):
        label = sample % 6
        order = [c for c in range(6) if c != label]
        order.insert(rank, label)  # order[0] is the top prediction
        logits = torch.zeros(6)
        for position, cls in enumerate(order):
            logits[cls] = 10.0 - position
        rows.append(logits)
        labels.append(label)
    data = TensorDataset(torch.stack(rows), torch.tensor(labels))
    result = evaluate_accuracy(_Oracle(), data, classes=classes, batch_size=4)
    assert result.samples == 6
    assert result.top1 == pytest.approx(100 * 2 / 6)
    assert result.top5 == pytest.approx(100 * 5 / 6)  # only rank 5 misses the top 5
    assert result.per_class == {"a": 100.0, "b": 100.0, "c": 0.0, "d": 0.0, "e": 0.0, "f": 0.0}


def test_size_on_disk_tracks_the_parameters() -> None:
    model = nn.Linear(1000, 250)  # 250,250 float32 values = 1.001 MB
    size = model_size_mb(model)
    assert 1.001 <= size < 1.001 + 0.01  # plus a few KB of zip/pickle framing


def test_model_cost() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    cost = model_cost(model, torch.randn(5, 1, 28, 28))
    assert cost["params"] == 36 + 4 * 26 * 26 * 10 + 10
    assert cost["macs"] == 36 * 26 * 26 + 4 * 26 * 26 * 10  # per sample: only the first is used
    assert cost["size_mb"] > 0


def test_latency_eager_and_recorded_compile_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10)).eval()

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nsecond line")

    monkeypatch.setattr(torch, "compile", no_compiler)
    latency, failures = measure_latency(model, torch.randn(1, 1, 28, 28), runs=3, warmup=1)
    assert set(latency) == {"cpu/eager/b1", "cpu/eager/b32", "cpu/compile/b1", "cpu/compile/b32"}
    assert latency["cpu/eager/b1"] > 0 and latency["cpu/eager/b32"] > 0
    assert latency["cpu/compile/b1"] is None
    assert failures["cpu/compile/b1"] == "RuntimeError: no C++ compiler found"
    assert not model.training


def test_latency_with_torch_compile() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    latency, failures = measure_latency(model, torch.randn(1, 16), batch_sizes=(1,), runs=3, warmup=2)
    assert latency["cpu/eager/b1"] > 0
    # Either it compiled and was timed, or the reason it could not is on record.
    assert (latency["cpu/compile/b1"] or 0) > 0 or "cpu/compile/b1" in failures


def test_compare_latency_records_a_compile_failure_for_both_sides(monkeypatch: pytest.MonkeyPatch) -> None:
    from fxprune.workflow.evaluate import compare_latency

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nsecond line")

    monkeypatch.setattr(torch, "compile", no_compiler)
    base = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 26 * 26, 10)).eval()
    pruned = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10)).eval()
    before = torch.get_num_threads()
    out = compare_latency(base, pruned, torch.randn(1, 1, 28, 28), batch_sizes=(1, 4), rounds=2)
    keys = {"cpu/eager/b1", "cpu/eager/b4", "cpu/compile/b1", "cpu/compile/b4"}
    for side in ("baseline", "pruned"):
        assert set(out[side]["latency_ms"]) == keys  # the keys report.json always had
        assert out[side]["latency_ms"]["cpu/eager/b4"] > 0 and out[side]["latency_ms"]["cpu/compile/b1"] is None
        assert out[side]["latency_failures"]["cpu/compile/b1"] == "RuntimeError: no C++ compiler found"
        assert out[side]["latency_iqr_ms"]["cpu/eager/b1"] >= 0
    row = out["latency"]["settings"]["cpu/eager/b1"]
    assert {"speedup", "speedup_q25", "speedup_q75", "speedup_text", "threads", "busy", "baseline_iqr_ms"} <= set(row)
    assert row["threads"] == 1 and out["latency"]["threads"] == 1 and out["latency"]["devices"]["cpu"]
    assert out["latency"]["settings"]["cpu/compile/b1"] == {"failed": "RuntimeError: no C++ compiler found"}
    assert torch.get_num_threads() == before and not base.training
