"""Prune Ultralytics YOLOv8n to half its channels and keep using it through ``YOLO(...)``.

Runs offline: the model is built from its yaml with random weights (use your trained
``yolov8n.pt`` instead: ``YOLO("yolov8n.pt").model``). Steps:

1. ``fxprune.prune(model, 0.5, example_inputs=(x,), keep_class=True)``: torch.fx cannot trace a
   ``DetectionModel``, so fxprune exports it with ``torch.export`` (a warning says so), prunes
   that graph, and puts the pruned layers back into a copy of the ``DetectionModel``, proven
   to compute the pruned graph (float64, random inputs);
2. prove it against the masked reference (removed channels zeroed in the original model);
3. hand it to ``YOLO``: predict on a numpy image, save a checkpoint and load it back, export to
   TorchScript.

Fine-tuning and validation go through Ultralytics as usual, but its default trainer rebuilds
the model from the yaml; give it a trainer that returns the pruned one (see README, "Ultralytics YOLO").

    YOLO_OFFLINE=1 python examples/prune_yolo.py [--imgsz 64] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings

os.environ.setdefault("YOLO_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import fxprune  # noqa: E402
from fxprune.testing import assert_equivalent  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cfg", default="yolov8n.yaml", help="an Ultralytics model yaml (detect task)")
    parser.add_argument("--imgsz", type=int, default=64, help="example input size the model is exported at")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--out", default=None, help="folder for the checkpoint and the TorchScript file")
    parser.add_argument("--keep-neck", action="store_true", help="keep the widths of the maps the Detect head reads")
    args = parser.parse_args()

    from ultralytics import YOLO

    yolo = YOLO(args.cfg, task="detect")
    model = yolo.model.eval()
    x = torch.randn(1, 3, args.imgsz, args.imgsz)
    before = sum(p.numel() for p in model.parameters())

    # In eval mode the Detect head returns its P3-P5 input maps beside the boxes, and fxprune
    # never changes a model output's width. Its export flag makes it return the boxes only, so
    # the last neck layers are pruned too (yolov8n at 64 px: 3.16 M -> 0.83 M instead of 1.02 M); --keep-neck skips that.
    head = model.model[-1]
    head.export = not args.keep_neck
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the export-route note and per-op notes; drop this line to see them
        pruned = fxprune.prune(model, args.ratio, example_inputs=(x,), keep_class=True)
        # The masked reference: the original model with the removed channels zeroed, in float64.
        assert_equivalent(model, pruned, pruned.meta["fxprune_plan"], [x], example_inputs=(x,))
    head.export = pruned.model[-1].export = False  # both back to Ultralytics' usual (boxes, maps) output
    after = sum(p.numel() for p in pruned.parameters())
    print(f"{type(pruned).__name__}: {before / 1e6:.2f} M -> {after / 1e6:.2f} M parameters, proven equivalent")

    yolo.model = pruned  # the pruned DetectionModel, inside YOLO
    image = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    result = yolo.predict(image, imgsz=args.imgsz, verbose=False)[0]
    print(f"predict: {len(result.boxes)} boxes on a random image (random weights)")

    out = args.out or tempfile.mkdtemp(prefix="fxprune-yolo-")
    os.makedirs(out, exist_ok=True)
    checkpoint = os.path.join(out, "yolov8n-pruned.pt")
    yolo.save(checkpoint)  # Ultralytics checkpoints hold the module itself: the pruned widths come back
    again = YOLO(checkpoint)
    assert again.model.model[0].conv.out_channels == pruned.model[0].conv.out_channels
    print(f"saved and reloaded {checkpoint}")
    exported = again.export(format="torchscript", imgsz=args.imgsz, verbose=False)
    print(f"exported {exported}")


if __name__ == "__main__":
    main()
