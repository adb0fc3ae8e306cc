"""Ultralytics YOLO, built from its yaml offline: pruned through torch.export, back in its own class (issue 11).

``DetectionModel`` cannot be traced by torch.fx (its forward iterates a Proxy), so fxprune
exports it (strict=False, eval mode) when given ``example_inputs``; ``keep_class=True`` puts
the pruned layers into a deep copy of the model by qualified name and proves the copy by
running it against the pruned GraphModule, so ``YOLO(...)`` keeps working with it.
yolov8n at 64 px runs by default; the other families and tasks are slow.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Tuple

import pytest
import torch

os.environ.setdefault("YOLO_OFFLINE", "1")  # never reach for the network (fonts, assets, checks)
pytest.importorskip("ultralytics")

import fxprune  # noqa: E402
from fxprune.testing import assert_equivalent  # noqa: E402


def _build(cfg: str) -> Tuple[torch.nn.Module, torch.Tensor]:
    from ultralytics.nn.tasks import ClassificationModel, DetectionModel, PoseModel, SegmentationModel

    cls = {"seg": SegmentationModel, "pose": PoseModel, "cls": ClassificationModel}.get(
        cfg.split("-")[-1].split(".")[0], DetectionModel)
    torch.manual_seed(0)
    model = cls(cfg, verbose=False).eval()
    return model, torch.randn(1, 3, 64, 64)


def _prune(model: torch.nn.Module, x: torch.Tensor, **kwargs: Any) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the export-route note and frozen-op notes are not under test here
        return fxprune.prune(model, 0.5, example_inputs=(x,), keep_class=True, **kwargs)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check(cfg: str) -> None:
    model, x = _build(cfg)
    kept = _prune(model, x)
    assert type(kept) is type(model), "keep_class fell back to a GraphModule"
    assert _params(kept) < 0.5 * _params(model)
    assert _params(model) == _params(_build(cfg)[0])  # the user's model is untouched
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_equivalent(model, kept, kept.meta["fxprune_plan"], [x], example_inputs=(x,))
    with torch.no_grad():
        out = kept(torch.randn(1, 3, 96, 96))  # another input size: anchors are rebuilt by the class itself
    assert out is not None


def test_yolov8n_prunes_keeps_its_class_and_predicts_inside_yolo() -> None:
    import numpy as np
    from ultralytics import YOLO
    from ultralytics.nn.tasks import DetectionModel

    model, x = _build("yolov8n.yaml")
    # Detect.export: the head returns its boxes only, not also the P3-P5 maps it reads, so the
    # neck's widths are no model output and are pruned too (examples/prune_yolo.py does the same).
    model.model[-1].export = True
    kept = _prune(model, x)
    assert type(kept) is DetectionModel
    assert _params(kept) <= 0.4 * _params(model)  # 3.16 M -> 0.83 M at 64 px (the target: at most 40 %)
    assert kept.model[0].conv.out_channels == model.model[0].conv.out_channels // 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_equivalent(model, kept, kept.meta["fxprune_plan"], [x], example_inputs=(x,))
    model.model[-1].export = kept.model[-1].export = False  # Ultralytics' usual (boxes, maps) output
    yolo = YOLO("yolov8n.yaml", task="detect")
    yolo.model = kept
    result = yolo.predict(np.zeros((64, 80, 3), dtype=np.uint8), imgsz=64, verbose=False)
    assert len(result) == 1 and result[0].boxes is not None
    assert yolo.model is kept and kept.model[0].conv.out_channels == 8


@pytest.mark.slow
@pytest.mark.parametrize("cfg", ["yolov8n-seg.yaml", "yolov8n-pose.yaml", "yolov8n-cls.yaml", "yolo11n.yaml",
                                 "yolo11n-seg.yaml", "yolov10n.yaml", "yolo26n.yaml"])
def test_yolo_families_and_tasks(cfg: str) -> None:
    _check(cfg)


@pytest.mark.slow
def test_the_example_script_runs_offline(tmp_path: Any) -> None:
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "prune_yolo.py"
    env = {**os.environ, "YOLO_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "proven equivalent" in done.stdout and (tmp_path / "yolov8n-pruned.torchscript").exists()
