"""The zoo benchmark's harness (benchmarks/zoo.py): its model list, its isolation and its table.

The zoo itself (150 models) is a benchmark, not a test: here the renderer runs on a fake
``zoo.json``, the model list is checked by name (no model is built), the forked-child
isolation is checked with stand-in workloads (a hang, a crash, an error), and one real model
goes through the whole command line (``slow``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict

import pytest

from .scripts import load_benchmark

ROOT = Path(__file__).resolve().parent.parent


zoo = load_benchmark("zoo.py")

FAKE: Dict[str, Dict[str, Any]] = {
    "timm:resnet10t": {"model": "timm:resnet10t", "input": "64px", "traced": "fx", "pruned": True, "proven": True,
                       "params_before": 5_435_488, "params_after": 1_489_252, "macs_before": 90_042_368,
                       "macs_after": 22_804_480, "groups": 11, "frozen_groups": 1, "frozen": {"model output": 1},
                       "tp_params_after": 1_489_252, "tp_runs": True, "seconds": 1.5, "pruned_groups": 10,
                       "renormalising": 0},
    "hf:ConvNext": {"model": "hf:ConvNext", "input": "64px", "traced": "torch.export", "pruned": True, "proven": True,
                    "params_before": 27_820_000, "params_after": 7_000_000, "tp_params_after": 7_100_000, "tp_runs": True,
                    "groups": 20, "frozen_groups": 1, "frozen": {"model output": 1}, "pruned_groups": 19,
                    "renormalising": 4},
    "yolo:yolov8n": {"model": "yolo:yolov8n", "input": "64px", "traced": "torch.export", "pruned": True, "proven": True,
                     "params_before": 3_157_200, "params_after": 1_159_128, "macs_before": 43_719_936,
                     "macs_after": 19_387_392, "groups": 77, "frozen_groups": 39,
                     "frozen": {"concat with an untracked tensor": 19, "no rule for aten.pad": 12, "model output": 6},
                     "tp_error": "IndexError: index 384 is out of bounds | for dimension 0", "seconds": 4.9},
    "hf:MobileNetV2": {"model": "hf:MobileNetV2", "input": "64px", "traced": "torch.export", "pruned": True, "proven": True,
                       "params_before": 2_230_000, "params_after": 2_020_000, "tp_params_after": 580_000, "tp_runs": True,
                       "groups": 43, "frozen_groups": 42, "frozen": {"no rule for aten.pad": 41}},
    "tv-video:r3d_18": {"model": "tv-video:r3d_18", "input": "4x64px", "traced": "fx", "pruned": False, "proven": True,
                        "params_before": 33_371_472, "params_after": 33_371_472, "tp_params_after": 8_403_824,
                        "tp_runs": False, "groups": 5, "frozen_groups": 5, "frozen": {"no rule for torch.conv3d": 4}},
    "smp:Unet/resnet34": {"model": "smp:Unet/resnet34", "input": "64px", "traced": "fx", "pruned": False,
                          "stage": "timeout", "error": "timed out after 150 s", "tp_error": "timed out after 150 s"},
    "smp:DPT/resnet34": {"model": "smp:DPT/resnet34", "stage": "build",
                         "error": "ValueError: Only Timm encoders are supported for DPT."},
}


def test_render_on_a_fake_json() -> None:
    entries = zoo.entries()
    md = zoo.render(FAKE, entries, {"command": "python benchmarks/zoo.py --jobs 2", "date": "2026-01-01 00:00 UTC",
                                    "machine": "test box", "load_start": "1.0", "load_end": "2.0", "timeout": 150})
    s = zoo.summarize(list(FAKE.values()))
    assert (s["models"], s["built"], s["pruned"], s["proven"]) == (7, 6, 4, 4)
    assert (s["failed"], s["errors"], s["unpruned"]) == (2, 1, 1)
    # Ratios only where Torch-Pruning returned a model that runs: resnet10t (1.0), ConvNext (0.99), MobileNetV2 (3.48).
    assert s["compared"] == 3 and s["within_1_1"] == 2
    assert s["median_ratio"] == pytest.approx(1.0)
    assert s["renormalising"] == 1
    assert (s["yolo_pruned"], s["yolo_40"]) == (1, 1)
    assert "`python benchmarks/zoo.py --jobs 2`" in md and "test box" in md and "2026-01-01" in md
    assert "**pruned 4**, **proven equivalent in float64 4**, **failed 2**" in md
    assert "at most 1.1x Torch-Pruning's on **2 of 3**" in md
    assert "1 of the proven models prune renormalising groups" in md
    header = next(line for line in md.splitlines() if line.startswith("| model |"))
    for column in ("model", "family", "traced how", "pruned", "proven (float64)", "params before → after",
                   "MACs before → after", "frozen groups", "TP params after", "fxprune/TP", "pruned groups (renormalising)"):
        assert column in header
    rows = {line.split(" | ")[0][2:]: line for line in md.splitlines() if line.startswith("| ") and ":" in line.split(" | ")[0]}
    assert "| 5.44 → 1.49 | 90.0 → 22.8 |" in rows["timm:resnet10t"] and "| 1.00 |" in rows["timm:resnet10t"]
    assert "| yes | yes | 10 | 5.44" in rows["timm:resnet10t"]  # exact groups only: no mark
    assert "| yes | yes | 19 (**4 renormalising**) |" in rows["hf:ConvNext"]
    assert "out of bounds \\| for dimension" in rows["yolo:yolov8n"]  # a '|' in an error cannot break the table
    assert "39 of 77: concat with an untracked tensor (19), no rule for aten.pad (12), model output (6)" in rows["yolo:yolov8n"]
    assert "(**does not run**)" in rows["tv-video:r3d_18"] and rows["tv-video:r3d_18"].count("**no**") == 1
    assert "timed out after 150 s" in rows["smp:Unet/resnet34"]
    assert "smp:DPT/resnet34" not in rows and "- `smp:DPT/resnet34`: ValueError" in md  # refused builds listed apart
    assert "Not run:" in md  # the rest of the zoo
    # A resumed table names every run that made it.
    runs = {"runs": [{"command": "nice -n 15 python benchmarks/zoo.py", "date": "d1", "models": 149, "load_start": "3",
                      "load_end": "4"}, {"command": "python benchmarks/zoo.py --only yolov10n", "date": "d2", "models": 1}]}
    assert ("`nice -n 15 python benchmarks/zoo.py` on d1 (149 models, load average 3 at the start, 4 at the end), then "
            "`python benchmarks/zoo.py --only yolov10n` on d2 (1 models") in zoo.render(FAKE, entries, runs)
    # Every row has the header's number of cells.
    width = header.count(" | ")
    assert all(line.replace("\\|", "").count(" | ") == width for line in rows.values())


def test_the_model_list_by_name() -> None:
    entries = zoo.entries()
    names = [e.name for e in entries]
    assert len(names) == len(set(names))
    timm_families = {e.family for e in entries if e.source == "timm"}
    assert len(timm_families) >= 50 and len(zoo.TIMM_MODELS) >= 50
    assert len(set(zoo.TIMM_MODELS.values())) == len(zoo.TIMM_MODELS)  # one model each
    for family in ("resnet", "efficientnet", "mobilenetv3", "mobilenetv4", "regnet", "ghostnet", "repvgg", "mobileone",
                   "cspnet", "dla", "hrnet", "densenet", "dpn", "res2net", "resnest", "rexnet", "mixnet", "nfnet", "vgg",
                   "vovnet", "xception", "inception_v3", "fastvit", "efficientformer", "poolformer", "convnext"):
        assert family in zoo.TIMM_MODELS, family
    yolo = [e for e in entries if e.source == "yolo"]
    if not yolo:
        pytest.skip("ultralytics is not installed")
    families = {e.family.split()[0] for e in yolo}
    assert families == {"YOLOv8", "YOLOv10", "YOLO11", "YOLO26"}
    for fam in ("YOLOv8", "YOLO11", "YOLO26"):
        assert {e.family.split()[1] for e in yolo if e.family.startswith(fam + " ")} == set(zoo.YOLO_TASKS), fam
    for name in ("yolo:yolov8n", "yolo:yolov8n-seg", "yolo:yolov8n-cls", "yolo:yolov8n-pose", "yolo:yolov10n",
                 "yolo:yolo11n", "yolo:yolo11n-seg", "yolo:yolo26n-pose"):
        assert name in names, name
    assert not any(part in e.name for e in yolo for part in ("obb", "world", "yoloe", "rtdetr"))
    assert not any(re.match(r"yolo:yolov10[slmxb]", e.name) for e in yolo)
    assert sum(e.source == "smp" for e in entries) == len(zoo.SMP_ARCHS) * len(zoo.SMP_ENCODERS)
    assert {f"hf:{m}" for m in ("ResNet", "RegNet", "MobileNetV1", "MobileNetV2", "EfficientNet", "ConvNext", "ViT",
                                 "Swin")} <= set(names)
    assert {e.family for e in entries if e.source == "torchvision"} == {
        "torchvision segmentation", "torchvision video", "torchvision detection backbone",
        "torchvision classifier (transformer-era)"}
    # The transformer issue's acceptance models are rows.
    for name in ("tv-cls:vit_b_16", "tv-cls:vit_b_32", "tv-cls:swin_t", "tv-cls:swin_v2_t", "tv-cls:convnext_tiny",
                 "tv-cls:maxvit_t", "timm:vit_tiny_patch16_224", "timm:deit_tiny_patch16_224",
                 "timm:swin_tiny_patch4_window7_224", "timm:convnext_pico", "timm:efficientformer_l1", "timm:fastvit_t8",
                 "timm:mobilevit_xxs", "timm:levit_128", "timm:poolformer_s12"):
        assert name in names, name


def test_select_by_family_and_pattern() -> None:
    entries = zoo.entries()
    assert {e.source for e in zoo.select(entries, "timm", None)} == {"timm"}
    assert [e.name for e in zoo.select(entries, None, "timm:resnet10t")] == ["timm:resnet10t"]
    assert [e.name for e in zoo.select(entries, None, "resnet10t,fcn_resnet50")] == ["timm:resnet10t", "tv-seg:fcn_resnet50"]
    assert {e.name for e in zoo.select(entries, "video", "r3d*")} == {"tv-video:r3d_18"}


def test_reason_kinds() -> None:
    assert zoo.reason_kind("no channel rule for call_function torch.conv3d at conv3d_2") == "no rule for torch.conv3d"
    assert zoo.reason_kind("reaches the model output at output") == "model output"
    assert zoo.reason_kind("no channel rule for call_function torch.ops.aten.chunk.default at chunk") == "no rule for aten.chunk"
    # Unknown wordings still count together: numbers and node names out.
    assert (zoo.reason_kind("view gives the channel dim the literal size 64, which would break at view_3")
            == zoo.reason_kind("view gives the channel dim the literal size 80, which would break at view_9"))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the zoo forks its children")
def test_isolation_survives_hangs_crashes_and_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Stand-in workloads, looked up by the forked child at run time: nothing is built or imported.
    def fx(name: str, ratio: float) -> Dict[str, Any]:
        if name == "hang":
            time.sleep(60)
        if name == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        return {"model": name, "pruned": True, "proven": True, "params_after": 5}

    def tp(name: str, ratio: float) -> Dict[str, Any]:
        if name == "tp-hang":
            time.sleep(60)
        return {"tp_params_after": 4}

    monkeypatch.setattr(zoo, "fxprune_record", fx)
    monkeypatch.setattr(zoo, "tp_record", tp)
    monkeypatch.setattr(zoo, "MEMORY_GB", 0.0)
    seen = []
    start = time.monotonic()
    got = zoo.run_isolated(["hang", "crash", "ok", "tp-hang"], timeout=1.5, jobs=2, done=seen.append)
    assert time.monotonic() - start < 30
    by = {r["model"]: r for r in got}
    assert [r["model"] for r in seen] == [r["model"] for r in got] and set(by) == {"hang", "crash", "ok", "tp-hang"}
    assert by["hang"]["error"] == "timed out after 2 s" and by["hang"]["pruned"] is False
    assert by["hang"]["tp_error"] == "timed out after 2 s"
    assert by["crash"]["error"].startswith("process died (exit -9") and by["crash"]["stage"] == "crash"
    assert by["ok"]["proven"] and by["ok"]["tp_params_after"] == 4 and "error" not in by["ok"]
    # Torch-Pruning out of time: fxprune's part is kept.
    assert by["tp-hang"]["proven"] and by["tp-hang"]["tp_error"] == "timed out after 2 s" and "error" not in by["tp-hang"]


@pytest.mark.slow
def test_one_model_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("timm")
    pytest.importorskip("torch_pruning")
    results, table = tmp_path / "zoo.json", tmp_path / "ZOO.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "zoo.py"), "--only", "timm:resnet10t", "--timeout", "300",
           "--results", str(results), "--out", str(table)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads(results.read_text())["models"]["timm:resnet10t"]
    assert rec["traced"] == "fx" and rec["pruned"] and rec["proven"], rec
    assert rec["params_after"] < rec["params_before"] and rec["macs_after"] < rec["macs_before"]
    assert rec["frozen"] == {"model output": 1} and rec["tp_params_after"] > 0 and rec["tp_runs"]
    assert "| timm:resnet10t | timm resnet | 64px | fx | yes | yes |" in table.read_text()
    # A rerun skips what zoo.json holds.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert again.returncode == 0 and "0 models to run (1 already in zoo.json)" in again.stdout
