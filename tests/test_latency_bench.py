"""benchmarks/bench_latency_target.py's options, bookkeeping, estimate and tables, on tiny fake inputs.

Nothing here times anything or trains: the Fashion-MNIST arm runs on a fake runner, the
estimate counts the probes of a tiny model, and the tables are rendered from made-up rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from torch import nn

from .scripts import load_benchmark

ROOT = Path(__file__).resolve().parent.parent


bench = load_benchmark("bench_latency_target.py")


def test_defaults_are_the_acceptance_run() -> None:
    args = bench.parse_args([])
    assert (args.models, args.batches, args.targets) == ("resnet18,resnet50", "1,32", "0.5,0.3")
    assert args.depthwise == "mobilenet_v3_small,efficientnet_b0" and args.fmnist and args.fmnist_limit is None
    assert (args.device, args.mode, args.threads, args.size) == ("cpu", "eager", 1, 224)
    assert bench.FMNIST_RATIO == 0.7


def test_quick_shrinks_everything_and_short_is_its_old_name() -> None:
    for flag in ("--quick", "--short"):
        args = bench.parse_args([flag])
        assert (args.models, args.batches, args.targets, args.depthwise) == ("resnet18", "1", "0.5", "mobilenet_v3_small")
        assert (args.fmnist_limit, args.fmnist_epochs, args.fmnist_baseline_epochs) == (2048, 1, 1) and args.quick


@pytest.mark.parametrize("argv", [["--targets", "1.5"], ["--targets", "0.5,x"], ["--batches", "0"], ["--ladder", "1"],
                                  ["--models", "not_a_model"], ["--depthwise", "resnet18,nope"], ["--threads", "0"],
                                  ["--fmnist-batch", "8"], ["--device", "tpu"], ["--gmacs-per-s", "0"]])
def test_bad_options_exit_with_status_2(argv: List[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2 and "error" in capsys.readouterr().err


def test_interpolation_along_the_ladder() -> None:
    ladder = [{"ratio": 0.3, "fraction": 0.6, "macs": 0.5}, {"ratio": 0.5, "fraction": 0.3, "macs": 0.25}]
    assert bench.interpolate_macs(ladder, 0.45) == pytest.approx(0.375)
    assert bench.interpolate_macs(ladder, 0.2) is None and bench.interpolate_macs(ladder, 0.7) is None


INFO = {"date": "2026-01-01 00:00 UTC", "device_name": "Fake CPU", "cpus": 2, "device": "cpu", "mode": "eager",
        "threads": 1, "dtype": "model's own", "torch": "0.0", "size": 224, "load_before": [0.1, 0.1, 0.1],
        "load_after": [0.2, 0.1, 0.1], "quick": False, "shared": False, "command": "python benchmarks/bench_latency_target.py"}

RESULTS = [
    {"model": "resnet18", "batch": 1, "base_ms": 20.0, "busy": False, "depthwise": False,
     "rows": {"latency 0.5": {"target": 0.5, "fraction": 0.48, "met": True, "macs": 0.36, "uniform_macs_same_latency": 0.27,
                              "macs_vs_uniform": 0.36 / 0.27, "realised_fraction": 0.75, "tries": 3, "give_back_tries": 2,
                              "search_s": 12.0},
              "latency 0.3": {"target": 0.3, "error": "target_latency=0.3 was not met ... best reached measured 7 ms"}},
     "uniform": [{"ratio": 0.3, "fraction": 0.62, "macs": 0.49, "realised_fraction": 0.79}]},
    {"model": "mobilenet_v3_small", "batch": 1, "base_ms": 5.0, "busy": True, "depthwise": True, "uniform": [],
     "rows": {"latency 0.5": {"target": 0.5, "fraction": 0.55, "met": False, "macs": 0.2, "realised_fraction": 0.36,
                              "tries": 7, "give_back_tries": 0, "search_s": 30.0}}},
]

FMNIST = {"ratio": 0.7, "key": "cpu/eager/b1", "seed": 0, "limit": None, "epochs": 5, "baseline_epochs": 3,
          "target": 0.4123,
          "target_stat": "median",
          "uniform": {"top1": 90.1, "top1_before_finetune": 40.0, "macs": 0.1, "fraction": 0.4123, "baseline_top1": 92.0},
          "latency": {"top1": 90.6, "top1_before_finetune": 55.0, "macs": 0.16, "fraction": 0.40, "baseline_top1": 92.0},
          "top1_gain": 0.5, "remeasured": {"uniform": 0.41, "latency": 0.39}}


def test_render_has_every_acceptance_column_and_the_fmnist_pair() -> None:
    md = bench.render(RESULTS, INFO, FMNIST)
    assert "| resnet18 | 1 | 20.00 | 0.5 | 0.480 | yes | 0.360 | 0.270 | 1.33 | 0.75 | 3 (2) | 12 |" in md
    assert "| resnet18 | 1 | 20.00 | 0.3 | error: target_latency=0.3 was not met" in md
    assert "| mobilenet_v3_small | 1 | 5.00 | 0.5 | 0.550 | NO | 0.200 | - | - | 0.36 | 7 (0) | 30 |" in md
    assert "- resnet18 batch 1: 0.3: 0.620 / 0.490 / 0.79" in md
    assert "Busy (a model's per-round spread above 10%): mobilenet_v3_small batch 1." in md
    assert "## Fashion-MNIST main job: latency target = uniform 0.7's measured latency" in md
    assert "| uniform | ratio 0.7 | 0.100 | 0.412 | 0.410 | 40.00 | 90.10 |" in md
    assert "| latency | target 0.4123 | 0.160 | 0.400 | 0.390 | 55.00 | 90.60 |" in md
    assert "Top-1 latency run - uniform run: +0.50 pts (acceptance met; one seed)." in md
    assert "shared with other jobs" not in md and "QUICK" not in md


def test_render_says_quick_shared_and_fmnist_failures() -> None:
    md = bench.render(RESULTS[:1], {**INFO, "quick": True, "shared": True},
                      {**FMNIST, "latency": {"error": "FxPruneError: target_latency=0.41 was not met"}})
    assert "QUICK version" in md and "treat every digit as rough" in md
    assert "| latency | target 0.4123 | error: FxPruneError: target_latency=0.41 was not met" in md
    assert "Top-1 latency run" not in md
    md = bench.render([], INFO, {k: v for k, v in FMNIST.items() if k not in ("latency", "target")}
                      | {"error": "uniform 0.7 is not faster"})
    assert "Not compared: uniform 0.7 is not faster." in md


def _report(top1: float, macs: float, speedup: float, target: Any = None, low: Any = None) -> Dict[str, Any]:
    pruned = {"top1": top1, "top1_before_finetune": top1 - 30, "macs": macs}
    if target is not None:
        pruned["latency_target"] = target
    b1 = {"speedup": speedup} if low is None else {"speedup": speedup, "speedup_q25": low}
    return {"baseline": {"top1": 92.0, "macs": 100.0}, "pruned": pruned,
            "latency": {"settings": {"cpu/eager/b1": b1, "cpu/eager/b32": {"speedup": 9.0}}}}


def test_fmnist_arm_targets_uniforms_measured_latency_with_the_same_recipe(tmp_path: Path) -> None:
    args = bench.parse_args(["--fmnist-seed", "3", "--fmnist-epochs", "2"])
    configs: List[Any] = []

    def runner(config: Any) -> Dict[str, Any]:
        configs.append(config)
        out = Path(config.out)
        if config.target_latency is None:
            (out / "baseline").mkdir(parents=True)
            (out / "baseline" / "baseline_model.pt").write_text("trained")
            return _report(90.0, 10.0, 2.5)
        assert (out / "baseline" / "baseline_model.pt").read_text() == "trained"  # the same trained baseline
        return _report(90.7, 16.0, 2.6, target={"target": f"target_latency={config.target_latency}"})

    result = bench.bench_fmnist(args, tmp_path, runner=runner, remeasure=lambda u, l: {"uniform": 0.4, "latency": 0.39})
    uniform, latency = configs
    assert uniform.ratio == 0.7 and uniform.target_latency is None
    assert latency.target_latency == 0.4 and latency.ratio is None and latency.latency_batch == 1
    for name in ("seed", "epochs", "baseline_epochs", "limit", "model", "data", "lr", "control"):
        assert getattr(uniform, name) == getattr(latency, name), name  # two runs, one recipe
    assert (uniform.seed, uniform.epochs, uniform.control) == (3, 2, False)
    uniform.validate()
    latency.validate()  # both are configs the CLI would accept
    assert result["target"] == 0.4 and result["uniform"]["macs"] == pytest.approx(0.1)
    assert result["latency"]["macs"] == pytest.approx(0.16) and result["top1_gain"] == pytest.approx(0.7)
    assert result["remeasured"] == {"uniform": 0.4, "latency": 0.39}
    assert "| latency | target 0.4 | 0.160 | 0.385 | 0.390 | 60.70 | 90.70 |" in bench.render([], INFO, result)
    assert result["target_stat"] == "median"  # these reports give no quartile: the median, said so


def test_fmnist_target_is_uniforms_upper_quartile_by_default(tmp_path: Path) -> None:
    # The statistic a latency target is checked with: the latency run is held to uniform's own yardstick.
    seen: List[Any] = []

    def runner(config: Any) -> Dict[str, Any]:
        seen.append(config.target_latency)
        return _report(90.0, 10.0, 2.5, low=2.0) if config.target_latency is None else _report(90.2, 12.0, 2.6, low=2.1)

    result = bench.bench_fmnist(bench.parse_args([]), tmp_path, runner=runner, remeasure=lambda u, l: {})
    assert seen == [None, 0.5] and result["target"] == 0.5 and result["target_stat"] == "q75"
    assert result["uniform"]["fraction"] == pytest.approx(0.4) and result["uniform"]["fraction_q75"] == pytest.approx(0.5)
    md = "\n".join(bench.render_fmnist(result))
    assert "the upper quartile of its per-round fraction" in md and "| uniform | ratio 0.7 | 0.100 | 0.400, 0.500 |" in md
    median = bench.bench_fmnist(bench.parse_args(["--fmnist-target", "median"]), tmp_path / "m", runner=runner,
                                remeasure=lambda u, l: {})
    assert median["target"] == 0.4


def test_fmnist_arm_records_failures_instead_of_raising(tmp_path: Path) -> None:
    args = bench.parse_args([])
    slower = bench.bench_fmnist(args, tmp_path / "a", runner=lambda c: _report(90.0, 10.0, 0.9))
    assert "not faster" in slower["error"] and "latency" not in slower

    def runner(config: Any) -> Dict[str, Any]:
        if config.target_latency is not None:
            raise RuntimeError("target_latency=0.5 was not met: the best reached measured 0.6")
        return _report(90.0, 10.0, 2.0)

    failed = bench.bench_fmnist(args, tmp_path / "b", runner=runner,
                                remeasure=lambda u, l: pytest.fail("no re-measurement without two models"))
    assert "best reached" in failed["latency"]["error"] and failed["target"] == 0.5


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3)))


def test_estimate_counts_probes_and_model_calls_of_a_tiny_model() -> None:
    args = bench.parse_args(["--models", "resnet18", "--batches", "1,4", "--depthwise", "", "--no-fmnist",
                             "--size", "8"])
    est = bench.estimate(args, build=lambda arch: Tiny().eval())
    rows = est["rows"]
    assert [(r["model"], r["batch"]) for r in rows] == [("resnet18", 1), ("resnet18", 4)]
    for r in rows:
        assert r["grid_probes"] > 0 and r["refine_probes"] > 0 and 0 < r["expected_s"] <= r["worst_s"]
    assert rows[1]["model_gmacs"] == pytest.approx(4 * rows[0]["model_gmacs"])
    assert est["fmnist_s"] == 0 and est["expected_s"] == pytest.approx(sum(r["expected_s"] for r in rows))
    text = bench.render_estimate(est)
    assert "| resnet18 | 4 |" in text and "nothing was timed" in text and "min expected" in text
    with_fmnist = bench.estimate(bench.parse_args(["--models", "resnet18", "--batches", "1", "--depthwise", "",
                                                   "--size", "8", "--quick"]), build=lambda arch: Tiny().eval())
    assert 0 < with_fmnist["fmnist_s"] < bench.estimate(
        bench.parse_args(["--models", "resnet18", "--batches", "1", "--depthwise", "", "--size", "8"]),
        build=lambda arch: Tiny().eval())["fmnist_s"]


def test_main_estimate_prints_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    monkeypatch.setattr(bench.torchvision.models, "get_model", lambda arch, weights=None: Tiny())
    md, js = tmp_path / "L.md", tmp_path / "l.json"
    assert bench.main(["--estimate", "--models", "resnet18", "--batches", "1", "--depthwise", "", "--size", "8",
                       "--no-fmnist", "--md", str(md), "--json", str(js)]) == 0
    assert "Estimated run time" in capsys.readouterr().out and not md.exists() and not js.exists()


def test_gpu_check_passes_valid_options_and_fits_in_8_minutes() -> None:
    import re
    import shlex

    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    joined = script.replace("\\\n", " ")
    steps = re.findall(r"^step (\w+) (\d+) (.*)$", joined, flags=re.M)
    assert [name for name, _, _ in steps] == ["cuda_tests", "latency_benchmark", "main_job"]
    # Each step's limit plus the 10 s its kill may take after TERM: the whole check within 8 minutes.
    assert sum(int(limit) + 10 for _, limit, _ in steps) <= 480
    bench_line = next(cmd for name, _, cmd in steps if name == "latency_benchmark")
    argv = shlex.split(bench_line.replace('"$OUT', '"/tmp/out'))
    argv = argv[argv.index("benchmarks/bench_latency_target.py") + 1:]
    args = bench.parse_args(argv)
    assert args.device == "cuda" and not args.fmnist and args.dtype == "float16" and args.channels_last
    from fxprune.workflow import cli_args

    main_job = shlex.split(next(cmd for name, _, cmd in steps if name == "main_job").replace('"$OUT', '"/tmp/out'))
    parsed = cli_args.build_parser().parse_args(main_job[main_job.index("fxprune") + 1:])
    assert parsed.target_latency == 0.5 and parsed.latency_device == "cuda"


def test_remeasure_loads_both_saved_models_beside_the_unpruned_architecture(tmp_path: Path, monkeypatch) -> None:
    # What bench_fmnist re-measures: the two runs' saved pruned models and the architecture rebuilt
    # from pruned_model.json; the timing itself is a fake (nothing is timed).
    import fxprune
    from fxprune.workflow.models import build_model
    from fxprune.workflow.report import save_pruned

    build = {"name": "resnet18", "num_classes": 10, "in_channels": 1, "image_size": 28, "adapt": True}
    x = torch.randn(1, 1, 28, 28)
    for name, ratio in (("uniform", 0.7), ("latency", 0.4)):
        torch.manual_seed(0)
        save_pruned(fxprune.prune(build_model(**build).eval(), ratio, example_inputs=(x,)), tmp_path / name,
                    example_inputs=x, build=build)
    seen: Dict[str, Any] = {}

    def fake_measure(models: Dict[str, nn.Module], **kwargs: Any) -> Any:
        seen.update(kwargs, names=list(models), shapes=[m(x).shape for m in models.values()],
                    params=[sum(p.numel() for p in m.parameters()) for m in models.values()])
        speedups = {n: argparse.Namespace(median=s) for n, s in (("uniform", 2.5), ("latency", 2.0))}
        return argparse.Namespace(speedups=speedups)

    monkeypatch.setattr(bench, "measure_latency", fake_measure)
    args = bench.parse_args(["--fmnist-batch", "32"])
    fractions = bench.remeasure_saved(args)(tmp_path / "uniform", tmp_path / "latency")
    assert fractions == {"uniform": 0.4, "latency": 0.5}
    assert seen["names"] == ["original", "uniform", "latency"] and seen["batch_size"] == 32
    assert seen["threads"] == 1 and seen["device"] == "cpu" and seen["mode"] == "eager"
    assert all(shape == (1, 10) for shape in seen["shapes"])
    assert seen["params"][0] > seen["params"][2] > seen["params"][1]  # unpruned > ratio 0.4 > ratio 0.7
    assert seen["example_inputs"][0].shape == (1, 1, 28, 28)
