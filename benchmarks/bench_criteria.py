"""Compare importance criteria: accuracy at the same MACs target after the same short fine-tune.

Fashion-MNIST, resnet18 (the workflow's small-image stem). One baseline is trained (or read
from ``--baseline``), then for every criterion the same recipe runs:

    prune to --target-macs of the baseline's MACs (uniform allocation: every criterion gets
    the *same architecture* and only the choice of channels differs; global ranking: each
    criterion also chooses the per-layer widths)
    -> BatchNorm recalibration -> accuracy ("pruned")
    -> --finetune-epochs of fine-tuning on --finetune-limit training images -> accuracy ("fine-tuned")

Every criterion runs once per seed in --seeds, with the same seeds, data order and schedule. Accuracy is on the held-out test
split, which no step trains on. Results go to ``--out`` (JSON) and a markdown table
(``--table``, default ``benchmarks/CRITERIA.md``).

    python benchmarks/bench_criteria.py                      # the recorded table (~30 min on 2 CPU cores)
    python benchmarks/bench_criteria.py --quick              # a smoke run (~3 min)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

import fxprune
from fxprune.cost import count_macs, count_params
from fxprune.workflow.data import example_batch, limit_dataset, load_data, make_loader
from fxprune.workflow.evaluate import evaluate_accuracy
from fxprune.workflow.finetune import TrainConfig, recalibrate_batchnorm, train
from fxprune.workflow.models import build_model

CRITERIA = ["l1", "l2", "fpgm", "bn", "apoz", "taylor", "random"]
HERE = Path(__file__).resolve().parent
CACHE = Path.home() / ".cache" / "fxprune" / "bench"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--criteria", nargs="+", default=CRITERIA)
    p.add_argument("--target-macs", type=float, default=0.3, help="fraction of the baseline's MACs to keep")
    p.add_argument("--allocations", nargs="+", choices=["uniform", "global"], default=["uniform", "global"],
                   help="uniform: one ratio for every group (same architecture for every criterion); "
                        "global: global ranking, each criterion also chooses the layer widths")
    p.add_argument("--baseline", type=Path, default=CACHE / "fmnist_resnet18_e1.pt",
                   help="baseline weights: read if present, else trained and written here")
    p.add_argument("--baseline-epochs", type=int, default=1)
    p.add_argument("--baseline-limit", type=int, default=60000, help="training images used for the baseline")
    p.add_argument("--baseline-lr", type=float, default=0.1)
    p.add_argument("--baseline-batch", type=int, default=128)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--finetune-limit", type=int, default=10000, help="training images used for fine-tuning")
    p.add_argument("--test-limit", type=int, default=None, help="held-out images evaluated (default all 10 000)")
    p.add_argument("--calibration-batches", type=int, default=8, help="batches of 64 for apoz/taylor")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0, help="seed of the baseline")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                   help="one prune + fine-tune per seed (calibration batches, random scores, data order)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="tiny smoke run: 2000 images, 1 baseline epoch")
    p.add_argument("--out", type=Path, default=HERE / "criteria.json")
    p.add_argument("--table", type=Path, default=HERE / "CRITERIA.md")
    args = p.parse_args(argv)
    if args.quick:
        args.baseline_epochs, args.baseline_limit, args.finetune_limit, args.test_limit = 1, 6000, 2000, 2000
        args.baseline = CACHE / "fmnist_resnet18_quick.pt"
        args.out, args.table = Path("/tmp/criteria_quick.json"), Path("/tmp/CRITERIA_quick.md")
    return args


def baseline_model(args: argparse.Namespace, data: Any) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    model = build_model("resnet18", num_classes=len(data.classes), in_channels=data.in_channels,
                        image_size=data.image_size)
    recipe = {"epochs": args.baseline_epochs, "limit": args.baseline_limit, "lr": args.baseline_lr,
              "batch": args.baseline_batch, "seed": args.seed}
    sidecar = args.baseline.with_suffix(".json")
    if args.baseline.is_file() and sidecar.is_file() and json.loads(sidecar.read_text()) == recipe:
        model.load_state_dict(torch.load(args.baseline, map_location="cpu", weights_only=True))
        print(f"baseline read from {args.baseline}", flush=True)
    else:
        train_set = limit_dataset(data.train, args.baseline_limit)
        config = TrainConfig(epochs=args.baseline_epochs, lr=args.baseline_lr, batch_size=args.baseline_batch,
                             seed=args.seed, quiet=True, desc="baseline", warmup_epochs=0.3)
        started = time.perf_counter()
        train(model, train_set, config)
        print(f"baseline trained in {time.perf_counter() - started:.0f} s", flush=True)
        args.baseline.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), args.baseline)
        sidecar.write_text(json.dumps(recipe))
    return model.eval()


def one_run(args: argparse.Namespace, data: Any, baseline: torch.nn.Module, example: torch.Tensor, test_set: Any,
            finetune_set: Any, name: str, allocation: str, seed: int) -> Dict[str, Any]:
    """Prune -> recalibrate -> evaluate -> fine-tune -> evaluate, all seeded by ``seed``."""
    torch.manual_seed(seed)
    calibration = make_loader(data.train, 64, train=True, seed=seed)
    started = time.perf_counter()
    pruned = fxprune.prune(baseline, target_macs=args.target_macs, example_inputs=example, importance=name,
                           global_ranking=allocation == "global", calibration=calibration,
                           calibration_batches=args.calibration_batches, seed=seed)
    prune_s = time.perf_counter() - started
    plan = pruned.meta["fxprune_plan"]
    recalibrate_batchnorm(pruned, data.train, batches=20, seed=seed)
    acc_pruned = evaluate_accuracy(pruned, test_set, classes=data.classes).top1
    started = time.perf_counter()
    config = TrainConfig(epochs=args.finetune_epochs, lr=args.lr, seed=seed, quiet=True, desc=f"finetune {name}")
    train(pruned, finetune_set, config)
    finetune_s = time.perf_counter() - started
    acc_tuned = evaluate_accuracy(pruned, test_set, classes=data.classes).top1
    return {"seed": seed, "macs": count_macs(pruned, example), "params": count_params(pruned),
            "achieved_macs": plan.policy["achieved_macs"], "top1_pruned": acc_pruned, "top1_finetuned": acc_tuned,
            "prune_s": prune_s, "finetune_s": finetune_s,
            "widths": {g.key: len(g.keep) for g in plan.groups if g.pruned}}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_data("fashion-mnist")
    test_set = limit_dataset(data.test, args.test_limit) if args.test_limit else data.test
    finetune_set = limit_dataset(data.train, args.finetune_limit)
    example = example_batch(data.train, 1)
    baseline = baseline_model(args, data)
    base_acc = evaluate_accuracy(baseline, test_set, classes=data.classes).top1
    base_macs, base_params = count_macs(baseline, example), count_params(baseline)
    print(f"baseline: top-1 {base_acc:.2f}%, {base_macs / 1e6:.2f} MMACs, {base_params / 1e6:.2f} M params", flush=True)

    rows = []
    for allocation in args.allocations:
        for name in args.criteria:
            runs = []
            for seed in args.seeds:
                runs.append(one_run(args, data, baseline, example, test_set, finetune_set, name, allocation, seed))
            row = {"criterion": name, "allocation": allocation, "runs": runs,
                   "achieved_macs": runs[0]["achieved_macs"], "params": runs[0]["params"],
                   "prune_s": min(r["prune_s"] for r in runs)}
            for key in ("top1_pruned", "top1_finetuned"):
                values = [r[key] for r in runs]
                row[key] = sum(values) / len(values)
                row[key + "_range"] = [min(values), max(values)]
            rows.append(row)
            print(f"{allocation:7s} {name:7s} MACs {row['achieved_macs']:.3f}  pruned {row['top1_pruned']:6.2f}%  "
                  f"fine-tuned {row['top1_finetuned']:6.2f}% {row['top1_finetuned_range']}", flush=True)
    return {
        "baseline": {"top1": base_acc, "macs": base_macs, "params": base_params},
        "rows": rows,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
                    "threads": torch.get_num_threads()},
    }


def table(result: Dict[str, Any]) -> str:
    s, b = result["settings"], result["baseline"]
    seeds = ", ".join(str(x) for x in s["seeds"])
    lines = [
        "# Importance criteria on Fashion-MNIST / resnet18",
        "",
        f"Generated by `python benchmarks/bench_criteria.py` ({result['machine']['platform']}, torch "
        f"{result['machine']['torch']}, {result['machine']['threads']} thread(s)); raw numbers in `criteria.json`.",
        "",
        f"- Baseline: resnet18 with the small-image stem, {s['baseline_epochs']} epoch(s) on {s['baseline_limit']} "
        f"training images (lr {s['baseline_lr']}, batch {s['baseline_batch']}); top-1 **{b['top1']:.2f}%**, "
        f"{b['macs'] / 1e6:.2f} MMACs, {b['params'] / 1e6:.2f} M params.",
        f"- Every criterion: `fxprune.prune(target_macs={s['target_macs']})`; BatchNorm recalibration (20 batches); "
        f"top-1 (*pruned*); then {s['finetune_epochs']} fine-tuning epoch(s) on {s['finetune_limit']} training "
        f"images, lr {s['lr']}; top-1 (*fine-tuned*). Accuracy on the held-out test split "
        f"({s['test_limit'] or 10000} images), never trained on.",
        "- *uniform*: one ratio for every group, so every criterion gets the same architecture and only the choice "
        "of channels differs. *global*: `global_ranking=True`, each criterion also decides the layer widths "
        "(so params differ at the same MACs).",
        f"- Each cell is the mean over seeds {seeds} (seed: calibration batches, `random` scores, fine-tuning "
        f"order), min-max in brackets. `apoz` / `taylor` calibrate on {s['calibration_batches']} training batches "
        "of 64.",
        "",
        "| allocation | criterion | MACs (of baseline) | params | top-1 pruned (%) | top-1 fine-tuned (%) | prune time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(result["rows"], key=lambda r: (r["allocation"] != "uniform", -r["top1_finetuned"])):
        lo, hi = r["top1_pruned_range"]
        flo, fhi = r["top1_finetuned_range"]
        lines.append(f"| {r['allocation']} | {r['criterion']} | {r['achieved_macs']:.3f} | {r['params'] / 1e6:.2f} M | "
                     f"{r['top1_pruned']:.2f} [{lo:.2f}-{hi:.2f}] | {r['top1_finetuned']:.2f} [{flo:.2f}-{fhi:.2f}] | "
                     f"{r['prune_s']:.2f} |")
    lines += ["", "One baseline and a short fine-tune: differences smaller than the min-max spread across seeds, or "
              "than about half a point, are not evidence that one criterion beats another.", ""]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    result = run(args)
    args.out.write_text(json.dumps(result, indent=1))
    args.table.write_text(table(result))
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
