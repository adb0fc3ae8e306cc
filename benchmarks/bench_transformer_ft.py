"""Fine-tuning recovers a pruned ViT: accuracy before pruning, right after, after fine-tuning.

A tiny timm ViT (``vit_tiny_patch16_224`` widths: embedding 192, 3 heads, MLP 768; depth 4,
patch 4, 28 px, one input channel) is trained on Fashion-MNIST for ``--epochs`` epochs (AdamW),
pruned at ``--ratio`` with ``fxprune.prune`` (L1: the embedding width under the LayerNorms is a
renormalising group, the heads and MLP widths exact), and fine-tuned for as many epochs with the
same recipe. There is no BatchNorm to recalibrate (LayerNorm uses no running statistics), so
"right after" is the pruned model as built. The pruned model is proven against its reference
(masked-norm for the renormalising group) in float64 on a few test images before it is trained.

    python benchmarks/bench_transformer_ft.py [--limit 4000] [--epochs 1] [--ratio 0.5] [--out FILE]

Writes a JSON record (accuracies, parameters, groups, machine, date, load average, seconds).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict

import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import fxprune  # noqa: E402
from fxprune.testing import assert_equivalent  # noqa: E402
from fxprune.workflow.data import load_data  # noqa: E402
from fxprune.workflow.evaluate import evaluate_accuracy  # noqa: E402
from fxprune.workflow.finetune import TrainConfig, train  # noqa: E402
from fxprune.workflow.report import machine_info  # noqa: E402


def tiny_vit(num_classes: int, in_chans: int, img_size: int) -> nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size, patch_size=4,
                             in_chans=in_chans, depth=4, num_classes=num_classes)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=4000, help="samples of each split (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=1, help="training and fine-tuning epochs (default: %(default)s)")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(HERE / "transformer_ft.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    load_before = os.getloadavg()

    data = load_data("fashion-mnist", limit=args.limit)
    model = tiny_vit(data.num_classes, data.in_channels, data.image_size)
    recipe = TrainConfig(epochs=args.epochs, lr=args.lr, optimizer="adamw", weight_decay=0.05, batch_size=64,
                         warmup_epochs=0.1 * args.epochs, quiet=True)

    def accuracy(m: nn.Module, label: str) -> float:
        return evaluate_accuracy(m, data.test, classes=data.classes, batch_size=256, desc=label).top1

    timings: Dict[str, float] = {}
    t = time.perf_counter()
    train(model, data.train, recipe)
    timings["train"] = time.perf_counter() - t
    before = accuracy(model, "baseline")

    example = data.test[0][0].unsqueeze(0)
    t = time.perf_counter()
    pruned = fxprune.prune(model.eval(), args.ratio, example_inputs=(example,))
    timings["prune"] = time.perf_counter() - t
    plan = pruned.meta["fxprune_plan"]
    batch = torch.stack([data.test[i][0] for i in range(8)])
    assert_equivalent(model, pruned, plan, (batch,), example_inputs=(example,))
    after = accuracy(pruned, "pruned")

    t = time.perf_counter()
    train(pruned, data.train, TrainConfig(**{**recipe.__dict__, "desc": "fine-tune"}))
    timings["finetune"] = time.perf_counter() - t
    tuned = accuracy(pruned, "fine-tuned")

    record: Dict[str, Any] = {
        "model": "timm vit_tiny_patch16_224 widths, depth 4, patch 4, img 28, 1 channel",
        "data": {"name": data.name, "train": len(data.train), "test": len(data.test)},  # type: ignore[arg-type]
        "recipe": {"epochs": args.epochs, "optimizer": "adamw", "lr": args.lr, "weight_decay": 0.05,
                   "batch_size": 64, "warmup_epochs": 0.1 * args.epochs, "label_smoothing": recipe.label_smoothing},
        "ratio": args.ratio, "importance": "l1",
        "top1": {"before_pruning": before, "after_pruning": after, "after_finetune": tuned},
        "params": {"before": params(model), "after": params(pruned)},
        "groups": {"pruned": len(plan.pruned_groups), "of": len(plan.groups),
                   "renormalising": [g.key for g in plan.renormalising_groups]},
        "widths": {"embedding": pruned.get_submodule("patch_embed.proj").out_channels,
                   "heads_width": pruned.get_submodule("blocks.0.attn.qkv").out_features // 3,
                   "mlp": pruned.get_submodule("blocks.0.mlp.fc1").out_features},
        "recalibration": "none: LayerNorm has no running statistics (no BatchNorm in the model)",
        "proof": "pruned model proven against the masked-norm reference (float64, 8 test images) before fine-tuning",
        "seconds": {**timings, "total": time.perf_counter() - started},
        "machine": machine_info(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
    }
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("top1", "params", "widths", "seconds")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
