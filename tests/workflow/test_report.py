"""Report files: report.json fields, report.md table, PNG plots, the pruned-model artifact."""

from __future__ import annotations

import pytest
import json
import logging
from pathlib import Path

import torch

from fxprune.workflow.report import (close_logging, plot_channels, plot_sweep, render_sweep_markdown, setup_logging,
                                     write_report)

from .helpers import TinyNet

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _entry(top1: float, macs: int, latency: float) -> dict:
    return {"top1": top1, "top5": 99.0, "params": 1000, "macs": macs, "size_mb": 0.5,
            "latency_ms": {"cpu/eager/b1": latency, "cpu/compile/b1": None},
            "latency_failures": {"cpu/compile/b1": "RuntimeError: no compiler"},
            "per_class": {"a": top1, "b": float("nan")}}


def test_report_json_and_markdown(tmp_path: Path) -> None:
    report = {"baseline": _entry(91.5, 32_000_000, 2.0), "pruned": _entry(91.2, 8_000_000, 1.0),
              "config": {"model": "resnet18", "ratio": 0.5, "importance": "l1"},
              "machine": {"cpu": "Test CPU", "cpu_count": 2, "cuda": None},
              "date": "2026-01-01T00:00:00+00:00", "timings_s": {"total": 12.5}}
    json_path, md_path = write_report(report, tmp_path)
    data = json.loads(json_path.read_text())
    for side in ("baseline", "pruned"):
        assert {"top1", "top5", "params", "macs", "size_mb", "latency_ms"} <= set(data[side])
    assert {"config", "machine", "date"} <= set(data)
    assert data["pruned"]["per_class"]["b"] is None  # NaN is not JSON: written as null
    md = md_path.read_text()
    assert "| top-1 accuracy (%) | 91.50 | 91.20 | -0.30 pts |" in md
    assert "| top-5 accuracy (%) | 99.00 | 99.00 | +0.00 pts |" in md
    assert "| MACs per image | 32.00 M | 8.00 M | 4.00x fewer |" in md
    assert "| latency cpu/eager/b1 (ms) | 2.000 | 1.000 | 2.00x faster |" in md
    assert "`cpu/compile/b1`: RuntimeError: no compiler" in md


@pytest.mark.parametrize("config, says", [
    ({"ratio": 0.5, "importance": "taylor", "global_ranking": True},
     "ranked across groups at the MACs of the ratio's uniform plan"),
    ({"target_macs": 0.3, "importance": "l1", "global_ranking": True}, "ranked across groups at the target's MACs"),
    ({"ratio": 0.5, "importance": "l1", "global_ranking": False}, "the same share of every group (uniform)"),
    ({"target_latency": 0.5, "importance": "l1", "global_ranking": True}, "channels chosen by measured cost"),
])
def test_the_report_says_how_channels_were_spread_over_the_groups(tmp_path: Path, config: dict, says: str) -> None:
    report = {"baseline": _entry(91.5, 32_000_000, 2.0), "pruned": _entry(91.2, 8_000_000, 1.0),
              "config": {"model": "resnet18", **config}, "machine": {"cpu": "Test CPU", "cpu_count": 2},
              "date": "2026-01-01T00:00:00+00:00"}
    line = next(l for l in write_report(report, tmp_path)[1].read_text().splitlines() if l.startswith("- Pruning:"))
    assert says in line


def test_channel_plot(tmp_path: Path) -> None:
    baseline = TinyNet()
    smaller = TinyNet()
    smaller.conv2 = torch.nn.Conv2d(8, 6, 3)
    path = plot_channels(baseline, smaller, tmp_path / "channels.png")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000


def test_sweep_plots_and_table(tmp_path: Path) -> None:
    points = [{"importance": imp, "ratio": r, **_entry(90 - 10 * r, int(32e6 * (1 - r) ** 2), 2 - r)}
              for imp in ("l1", "l2") for r in (0.3, 0.5, 0.7)]
    baseline = _entry(91.0, 32_000_000, 2.0)
    paths = plot_sweep(points, baseline, tmp_path)
    assert [p.name for p in paths] == ["accuracy_vs_macs.png", "accuracy_vs_latency.png"]
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in paths)
    md = render_sweep_markdown({"baseline": baseline, "points": points, "plots": [p.name for p in paths]})
    assert md.count("| pruned |") == 6 and "![accuracy_vs_macs](accuracy_vs_macs.png)" in md


def test_log_file(tmp_path: Path) -> None:
    path = setup_logging(tmp_path, quiet=True)
    logging.getLogger("fxprune.workflow").info("hello %d", 42)
    for handler in logging.getLogger("fxprune").handlers:
        handler.flush()
    assert path is not None and "hello 42" in path.read_text()
    close_logging()
    assert not [h for h in logging.getLogger("fxprune").handlers if getattr(h, "_fxprune_workflow", False)]
