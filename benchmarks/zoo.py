"""Zoo: fxprune on the models people prune, proven, beside Torch-Pruning on the same model.

The zoo (random weights, nothing downloaded): every Ultralytics YOLO yaml of the families
v8 / v10 / 11 / 26 at scale ``n`` shipped with the installed ``ultralytics`` (tasks detect,
segment, classify, pose), one model per timm CNN family (the smallest of each),
segmentation-models-pytorch (every architecture x encoders resnet34, efficientnet-b0,
mobilenet_v2), torchvision's segmentation and video models and detection backbones, and
Hugging Face ResNet, RegNet, MobileNetV1/V2, EfficientNet and ConvNeXt built from configs.

For each model, in a subprocess with a timeout (a crash, a hang or an exhausted memory
cannot stop the table):

1. build it with random weights and BatchNorm statistics (eval mode) and a small input;
2. trace it with ``fxprune.trace`` (torch.fx); if fx cannot, ``torch.export.export`` it
   (``strict=False``) and lift the program with ``fxprune.export.from_exported``;
3. prune at ratio 0.5 (``fxprune.prune(gm, 0.5, example_inputs=(x,))``), prove the result
   equivalent to the masked reference in float64 (``fxprune.testing.assert_equivalent``), count
   parameters and MACs before and after and list the frozen groups with their reasons;
4. on a fresh copy of the same model, run Torch-Pruning (``MagnitudePruner``,
   ``GroupMagnitudeImportance(p=1)``, ``pruning_ratio=0.5``; the final classifier or head
   ignored as Torch-Pruning's own examples do) and record its parameters after, or its error.

    python benchmarks/zoo.py                          # everything -> benchmarks/zoo.json + ZOO.md
    python benchmarks/zoo.py --family timm --jobs 2   # one family, two models at a time
    python benchmarks/zoo.py --only 'yolo*' --force   # re-run finished models too
    python benchmarks/zoo.py --table                  # only rewrite ZOO.md from zoo.json
    python benchmarks/zoo.py --list                   # the model names

``zoo.json`` is written atomically after each model; a rerun skips the models it already holds
(unless ``--force``), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

__all__ = [
    "Entry", "TIMM_MODELS", "SMP_ARCHS", "SMP_ENCODERS", "TV_SEGMENTATION", "TV_VIDEO", "TV_DETECTION", "HF_MODELS",
    "TV_CLASSIFIERS", "TIMM_TRANSFORMERS", "TIMM_KWARGS", "HF_CONFIGS",
    "YOLO_FAMILIES", "YOLO_TASKS", "yolo_task", "yolo_entries", "entries", "select", "build", "output_layers",
    "short_kind", "reason_kind",
    "fxprune_record", "tp_record", "run_isolated", "summarize", "render", "main",
]

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "zoo.json"
TABLE = HERE / "ZOO.md"
RATIO = 0.5
SEED = 0
SIDE = 64  # input side where the model allows
MEMORY_GB = 6.0  # per model (``--memory-gb``); 0: no limit

# --------------------------------------------------------------------------- the model list


@dataclass(frozen=True)
class Entry:
    """One model of the zoo: ``name`` is unique and says how to build it (``source:spec``)."""

    name: str
    source: str  # yolo | timm | smp | torchvision | hf
    family: str  # the table's family column


YOLO_FAMILIES: Tuple[str, ...] = ("v8", "v10", "11", "26")
YOLO_TASKS: Tuple[str, ...] = ("detect", "segment", "classify", "pose")
# Yaml name parts that mean a task outside the four (or another model kind sharing the folder).
_YOLO_OTHER = ("-obb", "-world", "yoloe", "rtdetr", "-depth", "-sem")

# timm: one model per CNN family, the smallest real model of each (timm's ``test_*`` models are
# left out: they exist to test timm). Key: the family (mostly the timm module; a few modules hold
# several families, e.g. efficientnet.py holds MixNet, MNASNet, MobileNetV2 and FBNet).
TIMM_MODELS: Dict[str, str] = {
    "resnet": "resnet10t",
    "resnetv2": "resnetv2_18",
    "resnest": "resnest14d",
    "res2net": "res2next50",
    "senet": "legacy_seresnet18",
    "sknet": "skresnet18",
    "tresnet": "tresnet_m",
    "regnet": "regnetx_002",
    "efficientnet": "efficientnet_b0",
    "efficientnetv2": "efficientnetv2_rw_t",
    "tinynet": "tinynet_e",
    "mixnet": "mixnet_s",
    "mnasnet": "mnasnet_small",
    "mobilenetv2": "mobilenetv2_035",
    "fbnet": "fbnetc_100",
    "spnasnet": "spnasnet_100",
    "mobilenetv3": "mobilenetv3_small_050",
    "mobilenetv4": "mobilenetv4_conv_small_035",
    "lcnet": "lcnet_035",
    "hardcorenas": "hardcorenas_a",
    "ghostnet": "ghostnet_050",
    "repghost": "repghostnet_050",
    "repvit": "repvit_m1",
    "repvgg": "repvgg_a0",
    "mobileone": "mobileone_s0",
    "gernet": "gernet_s",
    "byobnet (regnetz)": "regnetz_005",
    "cspnet": "cs3darknet_focus_s",
    "cspnext": "cspnext_tiny",
    "dla": "dla46x_c",
    "hrnet": "hrnet_w18_small",
    "densenet": "densenet121",
    "dpn": "dpn48b",
    "rexnet": "rexnet_100",
    "nfnet": "nf_regnet_b0",
    "vgg": "vgg11",
    "vovnet": "ese_vovnet19b_slim_dw",
    "selecsls": "selecsls42",
    "xception": "legacy_xception",
    "xception_aligned": "xception41p",
    "inception_v3": "inception_v3",
    "inception_v4": "inception_v4",
    "inception_resnet_v2": "inception_resnet_v2",
    "inception_next": "inception_next_atto",
    "nasnet": "nasnetalarge",
    "pnasnet": "pnasnet5large",
    "hgnet": "hgnetv2_b0",
    "fasternet": "fasternet_t0",
    "starnet": "starnet_s050",
    "rdnet": "rdnet_tiny",
    "convnext": "convnext_atto",
    "convmixer": "convmixer_768_32",
    "fastvit": "fastvit_t8",
    "efficientformer": "efficientformer_l1",
    "efficientformer_v2": "efficientformerv2_s0",
    "poolformer": "poolformerv2_s12",
    "metaformer (convformer)": "convformer_s18",
    "mambaout": "mambaout_femto",
    "lcnetv2": "lcnetv2_small",
    "efficientvit_mit": "efficientvit_b0",
    "edgenext": "edgenext_xx_small",
}

# The smallest input these accept (their stems reduce 64 px below a 3x3 kernel).
TIMM_MIN_SIDE: Dict[str, int] = {"inception_v3": 75, "inception_v4": 75, "inception_resnet_v2": 75}

SMP_ARCHS: Tuple[str, ...] = ("Unet", "UnetPlusPlus", "MAnet", "Linknet", "FPN", "PSPNet", "DeepLabV3",
                              "DeepLabV3Plus", "PAN", "UPerNet", "Segformer", "DPT")
SMP_ENCODERS: Tuple[str, ...] = ("resnet34", "efficientnet-b0", "mobilenet_v2")

TV_SEGMENTATION: Tuple[str, ...] = ("fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101",
                                    "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large")
TV_VIDEO: Tuple[str, ...] = ("r3d_18", "mc3_18", "r2plus1d_18", "s3d", "mvit_v1_b", "mvit_v2_s", "swin3d_t",
                             "swin3d_s", "swin3d_b")
# Detection models' backbones (with their FPN / feature extractor), one per distinct backbone:
# the detection heads' post-processing (anchors, NMS) is not a channel-pruning question.
TV_DETECTION: Tuple[str, ...] = ("fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn",
                                 "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn",
                                 "ssd300_vgg16", "ssdlite320_mobilenet_v3_large")
HF_MODELS: Tuple[str, ...] = ("ResNet", "RegNet", "MobileNetV1", "MobileNetV2", "EfficientNet", "ConvNext", "ViT", "Swin")

# Transformer-era widths (LayerNorm-coupled residual widths, attention heads): the acceptance
# models of the transformer issue that the lists above lack. torchvision classifiers by name, with
# the builder's keyword arguments that give them a cheap input (``image_size`` resizes ViT's
# position embedding; the other builders have no fixed size and run at the side given).
TV_CLASSIFIERS: Dict[str, Tuple[Dict[str, Any], int]] = {
    "vit_b_16": ({"image_size": 64}, 64),
    "vit_b_32": ({"image_size": 64}, 64),
    "swin_t": ({}, 64),
    "swin_v2_t": ({}, 64),
    "convnext_tiny": ({}, 64),
    "maxvit_t": ({}, 224),  # its grid/window partitions of 7 need 224 px
}
# timm transformer rows by family (in the table as ``timm <family>``), with ``create_model``
# keyword arguments where a smaller input than the fixed 224 px works (``img_size``).
TIMM_TRANSFORMERS: Dict[str, str] = {
    "vit": "vit_tiny_patch16_224",
    "deit": "deit_tiny_patch16_224",
    "swin": "swin_tiny_patch4_window7_224",
    "convnext (pico)": "convnext_pico",
    "mobilevit": "mobilevit_xxs",
    "levit": "levit_128",
    "poolformer (v1)": "poolformer_s12",
}
TIMM_KWARGS: Dict[str, Dict[str, Any]] = {
    "vit_tiny_patch16_224": {"img_size": 64},
    "deit_tiny_patch16_224": {"img_size": 64},
}
# Hugging Face transformers built from small configs (the default configs are ViT-Base/Swin-Tiny at
# 224 px); the CNN configs keep their defaults.
HF_CONFIGS: Dict[str, Dict[str, Any]] = {
    "ViT": {"image_size": 64, "patch_size": 8, "hidden_size": 192, "num_hidden_layers": 4, "num_attention_heads": 3,
            "intermediate_size": 768},
    "Swin": {"image_size": 64, "patch_size": 4, "embed_dim": 48, "depths": [2, 2, 2], "num_heads": [3, 6, 12],
             "window_size": 4},
}


def _yolo_dir() -> Optional[Path]:
    try:
        import importlib.util
        spec = importlib.util.find_spec("ultralytics")
    except Exception:  # noqa: BLE001 - a broken install lists no YOLO models, it does not stop the zoo
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "cfg" / "models"


def yolo_task(stem: str) -> str:
    """The task of an Ultralytics yaml by its name (what ``guess_model_task`` reads from the head)."""
    for part, task in (("-seg", "segment"), ("-cls", "classify"), ("-pose", "pose")):
        if part in stem:
            return task
    return "detect"


def yolo_entries() -> List[Entry]:
    """Every shipped yaml of the YOLO families at scale n, by name (``yolov8n-seg``); nothing is built."""
    root = _yolo_dir()
    out: List[Entry] = []
    if root is None:
        return out
    for fam in YOLO_FAMILIES:
        for path in sorted((root / fam).glob("*.yaml")):
            stem = path.stem
            if any(part in stem for part in _YOLO_OTHER):
                continue
            if "scales:" in path.read_text() and not re.search(r"^\s+n:\s*\[", path.read_text(), re.MULTILINE):
                continue  # no n scale in this yaml
            m = re.match(r"(yolov?\d+)([nslmxb]?)(.*)$", stem)
            if m is None:
                continue
            if m.group(2):  # the yaml is one scale already (v10 ships yolov10n.yaml ... yolov10x.yaml)
                scaled = stem if m.group(2) == "n" else ""
            elif "scales:" in path.read_text():
                scaled = f"{m.group(1)}n{m.group(3)}"  # yolov8-seg.yaml at scale n: yolov8n-seg
            else:
                scaled = stem  # a fixed-size yaml (yolo11-cls-resnet18)
            if not scaled:
                continue
            task = yolo_task(stem)
            label = {"v8": "YOLOv8", "v10": "YOLOv10", "11": "YOLO11", "26": "YOLO26"}[fam]
            out.append(Entry(f"yolo:{scaled}", "yolo", f"{label} {task}"))
    return out


def entries() -> List[Entry]:
    """The whole zoo, in table order (names only: no model is built)."""
    out = yolo_entries()
    out += [Entry(f"timm:{model}", "timm", f"timm {fam}") for fam, model in TIMM_MODELS.items()]
    out += [Entry(f"smp:{arch}/{enc}", "smp", f"smp {arch}") for arch in SMP_ARCHS for enc in SMP_ENCODERS]
    out += [Entry(f"tv-seg:{m}", "torchvision", "torchvision segmentation") for m in TV_SEGMENTATION]
    out += [Entry(f"tv-video:{m}", "torchvision", "torchvision video") for m in TV_VIDEO]
    out += [Entry(f"tv-det:{m}", "torchvision", "torchvision detection backbone") for m in TV_DETECTION]
    out += [Entry(f"tv-cls:{m}", "torchvision", "torchvision classifier (transformer-era)") for m in TV_CLASSIFIERS]
    out += [Entry(f"timm:{model}", "timm", f"timm {fam}") for fam, model in TIMM_TRANSFORMERS.items()]
    out += [Entry(f"hf:{m}", "hf", "Hugging Face") for m in HF_MODELS]
    return out


# --------------------------------------------------------------------------- building


def _image(side: int, seed: int = SEED, frames: Optional[int] = None) -> Any:
    import torch
    shape = (1, 3, side, side) if frames is None else (1, 3, frames, side, side)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1))


def _build_yolo(spec: str) -> Tuple[Any, Any, str]:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    from ultralytics.nn import tasks
    cls = {"detect": tasks.DetectionModel, "segment": tasks.SegmentationModel, "classify": tasks.ClassificationModel,
           "pose": tasks.PoseModel}[yolo_task(spec)]
    import torchvision
    get_model = torchvision.models.get_model

    def random_weights(name: str, **kwargs: Any) -> Any:
        return get_model(name, **{**kwargs, "weights": None})

    # A yaml with a TorchVision backbone (yolo11-cls-resnet18) asks for ImageNet weights:
    # nothing is downloaded here, it gets random ones like every other model of the zoo.
    torchvision.models.get_model = random_weights
    try:
        model = cls(f"{spec}.yaml", verbose=False)
    finally:
        torchvision.models.get_model = get_model
    side = 224 if yolo_task(spec) == "classify" and "resnet" in spec else SIDE
    note = f"{side}px"
    head = model.model[-1]
    if yolo_task(spec) != "classify" and hasattr(head, "export"):
        # The deployment output (what YOLO.export writes): in eval mode the head otherwise also
        # returns the neck's feature maps, and fxprune never changes an output's width, so the
        # whole neck would stay whole. examples/prune_yolo.py prunes the same way.
        head.export = True
        note += ", head export=True"
    return model, _image(side), note


def _build_timm(spec: str) -> Tuple[Any, Any, str]:
    import timm
    kwargs = TIMM_KWARGS.get(spec, {})
    model = timm.create_model(spec, pretrained=False, **kwargs)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    side = SIDE
    if "img_size" in kwargs:
        side = int(kwargs["img_size"])
    elif cfg.get("fixed_input_size"):
        side = int(cfg["input_size"][-1])  # position embeddings or attention biases of one size
    elif cfg.get("min_input_size"):
        side = max(side, int(cfg["min_input_size"][-1]))
    side = max(side, TIMM_MIN_SIDE.get(spec, 0))
    return model, _image(side), f"{side}px"


def _build_smp(spec: str) -> Tuple[Any, Any, str]:
    import segmentation_models_pytorch as smp
    arch, encoder = spec.split("/")
    model = getattr(smp, arch)(encoder_name=encoder, encoder_weights=None, classes=2)
    side = 128 if arch == "PAN" else SIDE  # PAN's pyramid pools its 1/32 map three more times
    return model, _image(side), f"{side}px"


def _build_torchvision(kind: str, spec: str) -> Tuple[Any, Any, str]:
    import torchvision
    if kind == "tv-cls":
        kwargs, side = TV_CLASSIFIERS[spec]
        note = f"{side}px" + (", " + ", ".join(f"{k}={v}" for k, v in kwargs.items()) if kwargs else "")
        return torchvision.models.get_model(spec, weights=None, **kwargs), _image(side), note
    if kind == "tv-seg":
        return torchvision.models.get_model(spec, weights=None, weights_backbone=None), _image(SIDE), f"{SIDE}px"
    if kind == "tv-video":
        if spec.startswith("mvit"):
            # MViT's builders fix its position embeddings to 16 frames of 224 px: the clip it needs.
            return torchvision.models.get_model(spec, weights=None), _image(224, frames=16), "16x224px (fixed by the builder)"
        if spec == "s3d":
            return torchvision.models.get_model(spec, weights=None), _image(224, frames=16), "16x224px (its pooling needs it)"
        return torchvision.models.get_model(spec, weights=None), _image(SIDE, frames=4), f"4x{SIDE}px"
    detector = torchvision.models.get_model(spec, weights=None, weights_backbone=None)
    side = {"ssd300_vgg16": 300, "ssdlite320_mobilenet_v3_large": 320}.get(spec, SIDE)
    return detector.backbone, _image(side), f"{side}px"


def _build_hf(spec: str) -> Tuple[Any, Any, str]:
    import transformers
    small = HF_CONFIGS.get(spec, {})
    config = getattr(transformers, f"{spec}Config")(**small)
    model = getattr(transformers, f"{spec}ForImageClassification")(config)
    return model, _image(SIDE), f"{SIDE}px" + (", small config" if small else "")


def build(name: str, seed: int = SEED) -> Tuple[Any, Any, str]:
    """``(model, input, size note)``: random weights and BatchNorm statistics, eval mode, batch of one."""
    import torch
    from fxprune.testing import randomize_norms
    kind, spec = name.split(":", 1)
    torch.manual_seed(seed)
    if kind == "yolo":
        model, x, note = _build_yolo(spec)
    elif kind == "timm":
        model, x, note = _build_timm(spec)
    elif kind == "smp":
        model, x, note = _build_smp(spec)
    elif kind in ("tv-cls", "tv-seg", "tv-video", "tv-det"):
        model, x, note = _build_torchvision(kind, spec)
    elif kind == "hf":
        model, x, note = _build_hf(spec)
    else:
        raise ValueError(f"unknown model kind {kind!r} in {name!r}")
    return randomize_norms(model, seed).eval(), x, note


# --------------------------------------------------------------------------- helpers


def _leaves(value: Any) -> Iterator[Any]:
    """The tensors of a model output (tensor, tuple/list, dict, a Hugging Face ModelOutput)."""
    import torch
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _leaves(v)
    elif hasattr(value, "to_tuple"):
        yield from _leaves(value.to_tuple())


def _shapes(value: Any) -> List[List[int]]:
    return [list(t.shape) for t in _leaves(value)]


def output_layers(model: Any, x: Any) -> List[Any]:
    """The convolutions and linear layers whose outputs reach the model output with no other
    such layer in between (the classifier, a segmentation head, an FPN's output convs).

    Found on the autograd graph of one forward pass, so no tracer is needed: these are the
    layers Torch-Pruning's examples list in ``ignored_layers`` (their output channels are the
    model's own output channels).
    """
    import torch
    import torch.nn as nn
    producers: Dict[Any, Any] = {}

    def hook(module: Any, _inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.grad_fn is not None:
            producers[output.grad_fn] = module

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        with torch.enable_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    found: List[Any] = []
    seen = set()
    stack = [t.grad_fn for t in _leaves(out) if t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if fn in producers:
            if not any(producers[fn] is m for m in found):
                found.append(producers[fn])
            continue
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return found


def _error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


# Frozen-group reasons, condensed for the table: (pattern, label); a label may use the match's group 1.
_REASON_KINDS: Tuple[Tuple[str, str], ...] = (
    (r"reaches the model output", "model output"),
    (r"no channel rule for (?:call_\w+ |get_attr )?(\S+)", "no rule for {0}"),
    (r"normalises over the channel dim", "LayerNorm over channels"),
    (r"normalises across channels", "GroupNorm/LRN"),
    (r"MultiheadAttention", "MultiheadAttention"),
    (r"is not a table gathered per head", "window attention bias from an MLP (heads)"),
    (r"channel shuffle", "channel shuffle"),
    (r"splits or interleaves the channel dim", "view splitting channels"),
    (r"split of the channel dim", "split of channels"),
    (r"one channel per conv group", "depthwise conv of an untracked input"),
    (r"has \d+ channels of its own", "channel-sized parameter operand"),
    (r"unknown channel structure", "concat/add with an untracked tensor"),
    (r"channels of a non-prunable tensor", "concat with an untracked tensor"),
    (r"tensor shared by|weights tied", "shared tensor"),
)


def short_kind(kind: str) -> str:
    """``no rule for torch.ops.aten.chunk.default`` -> ``no rule for aten.chunk``."""
    return re.sub(r"\.default\b", "", kind.replace("torch.ops.", ""))


def reason_kind(reason: str) -> str:
    """A frozen group's reason, condensed (``no rule for aten.pad.default``, ``model output``)."""
    for pattern, label in _REASON_KINDS:
        m = re.search(pattern, reason)
        if m:
            return short_kind(label.format(*(g.strip("`'\":,.") for g in m.groups())))
    # Unknown wording: numbers out (so equal reasons count together), the node's name out.
    return re.sub(r"\d+", "N", reason.split(" at ")[0]).split(",")[0][:70]


def _threads() -> None:
    import torch
    torch.set_num_threads(1)  # several models share few cores: OpenMP's spinning threads only contend


# --------------------------------------------------------------------------- one model


def fxprune_record(name: str, ratio: float = RATIO) -> Dict[str, Any]:
    """Trace (fx, else torch.export), prune, prove in float64 and count one model (JSON-able)."""
    import torch
    import fxprune
    from fxprune.cost import count_macs, count_params
    from fxprune.export import from_exported
    from fxprune.testing import assert_equivalent

    _threads()
    start = time.perf_counter()
    rec: Dict[str, Any] = {"model": name, "ratio": ratio}
    try:
        model, x, note = build(name)
    except Exception as exc:  # noqa: BLE001 - a model that cannot be built is a row, not a crash
        rec.update(stage="build", error=_error(exc), seconds=round(time.perf_counter() - start, 1))
        return rec
    rec["input"] = note
    rec["params_before"] = count_params(model)
    gm = None
    try:
        gm = fxprune.trace(model)
        rec["traced"] = "fx"
    except Exception as exc:  # noqa: BLE001 - untraceable by fx: try torch.export next
        rec["fx_error"] = _error(exc)
    if gm is None:
        try:
            with torch.no_grad():
                program = torch.export.export(model, (x,), strict=False)
            gm = from_exported(program)
            rec["traced"] = "torch.export"
        except Exception as exc:  # noqa: BLE001
            rec.update(stage="trace", traced=None, error=f"torch.export: {_error(exc)}",
                       seconds=round(time.perf_counter() - start, 1))
            return rec
    caught: List[Any] = []
    try:
        with torch.no_grad():
            reference_out = gm(x)
        rec["macs_before"] = count_macs(gm, (x,))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", fxprune.FxPruneWarning)
            groups = list(fxprune.analyze_model(gm, example_inputs=(x,)).groups)
            frozen: Dict[str, int] = {}
            for g in groups:
                if getattr(g, "frozen", False):
                    for kind in dict.fromkeys(reason_kind(r) for r in getattr(g, "reasons", ())):
                        frozen[kind] = frozen.get(kind, 0) + 1
            rec.update(groups=len(groups), prunable=sum(1 for g in groups if getattr(g, "prunable", False)),
                       frozen_groups=sum(1 for g in groups if getattr(g, "frozen", False)), frozen=frozen)
            rec["stage"] = "prune"
            pruned = fxprune.prune(gm, ratio, example_inputs=(x,))
        plan = pruned.meta["fxprune_plan"]
        rec.update(params_after=count_params(pruned), pruned_groups=len(plan.pruned_groups))
        # The proof contract of each pruned group: assert_equivalent (below) proves the exact ones
        # against the masked reference and these against the masked-norm reference, from the plan.
        renorm = plan.renormalising_groups
        rec["renormalising"] = len(renorm)
        if renorm:
            rec["renormalising_channels"] = sum(g.size - len(g.keep) for g in renorm)
        with torch.no_grad():
            out = pruned.eval()(x)
        rec["shape_ok"] = _shapes(out) == _shapes(reference_out)
        rec["macs_after"] = count_macs(pruned, (x,))
        rec["pruned"] = bool(rec["shape_ok"] and rec["params_after"] < rec["params_before"])
    except Exception as exc:  # noqa: BLE001
        rec.update(pruned=False, error=_error(exc), trace=traceback.format_exc()[-1500:])
        rec["warnings"] = sum(1 for w in caught if issubclass(w.category, fxprune.FxPruneWarning))
        rec["seconds"] = round(time.perf_counter() - start, 1)
        return rec
    rec["warnings"] = sum(1 for w in caught if issubclass(w.category, fxprune.FxPruneWarning))
    rec["stage"] = "proof"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fxprune.FxPruneWarning)  # counted above already
            assert_equivalent(gm, pruned, plan, [x], example_inputs=(x,))
        rec["proven"] = True
        rec.pop("stage")
    except Exception as exc:  # noqa: BLE001 - AssertionError (not equivalent, vacuous) or a crash
        rec.update(proven=False, error=_error(exc))
    rec["seconds"] = round(time.perf_counter() - start, 1)
    return rec


def tp_record(name: str, ratio: float = RATIO) -> Dict[str, Any]:
    """Torch-Pruning on a fresh copy of the same model: its parameters (and MACs) after, or its error."""
    import torch
    import torch_pruning as tp
    from fxprune.cost import count_macs, count_params

    _threads()
    start = time.perf_counter()
    rec: Dict[str, Any] = {"tp_version": getattr(tp, "__version__", "?")}
    try:
        model, x, _ = build(name)
        with torch.no_grad():
            before = model(x)
        if name.startswith("yolo:"):
            ignored = [model.model[-1]]  # Torch-Pruning's YOLO example ignores the Detect/Segment/Pose/Classify head
        else:
            ignored = output_layers(model, x)
        rec["tp_ignored"] = len(ignored)
        pruner = tp.pruner.MagnitudePruner(model, example_inputs=x,
                                           importance=tp.importance.GroupMagnitudeImportance(p=1),
                                           pruning_ratio=ratio, ignored_layers=ignored)
        pruner.step()
        rec["tp_params_after"] = count_params(model)
        model.eval()
        with torch.no_grad():
            after = model(x)
        rec["tp_runs"] = _shapes(after) == _shapes(before)
        rec["tp_macs_after"] = count_macs(model, (x,))
    except Exception as exc:  # noqa: BLE001
        rec["tp_error"] = _error(exc)
    rec["tp_seconds"] = round(time.perf_counter() - start, 1)
    return rec


# --------------------------------------------------------------------------- isolation


def _child(name: str, ratio: float, tp_too: bool) -> int:
    """``--child NAME``: one model in this process, its JSON lines on stdout (for debugging one model)."""
    warnings.filterwarnings("ignore")  # the parent reads stdout only; library chatter goes nowhere
    print(json.dumps({"part": "fxprune", **fxprune_record(name, ratio)}), flush=True)
    if tp_too:
        print(json.dumps({"part": "tp", **tp_record(name, ratio)}), flush=True)
    return 0


def _preimport(zoo: Sequence[Entry]) -> None:
    """Import once, in the parent, what the children will need: each child is a fork of it.

    Importing torch, timm, ultralytics and transformers costs 10-30 s per process on a loaded
    2-core machine, more than most models take; a fork starts with all of it already loaded.
    """
    import torch
    import torchvision  # noqa: F401
    import fxprune  # noqa: F401
    import fxprune.cost  # noqa: F401
    import fxprune.export  # noqa: F401
    import fxprune.testing  # noqa: F401
    torch.set_num_threads(1)
    sources = {e.source for e in zoo}
    optional: List[Callable[[], Any]] = [lambda: __import__("torch_pruning")]
    if "timm" in sources:
        optional.append(lambda: __import__("timm"))
    if "smp" in sources:
        optional.append(lambda: __import__("segmentation_models_pytorch"))
    if "yolo" in sources:
        os.environ.setdefault("YOLO_OFFLINE", "1")
        os.environ.setdefault("YOLO_VERBOSE", "False")
        optional.append(lambda: __import__("ultralytics.nn.tasks"))
    if "hf" in sources:
        def hf() -> None:
            import transformers
            for spec in HF_MODELS:
                getattr(transformers, f"{spec}Config")
                getattr(transformers, f"{spec}ForImageClassification")
        optional.append(hf)
    for load in optional:
        try:
            load()
        except Exception:  # noqa: BLE001 - the child reports the import error as its row
            pass


@dataclass
class _Running:
    name: str
    pid: int
    fd: int
    err: Path
    deadline: float
    start: float
    wanted: List[str]
    buf: bytes = b""
    rec: Optional[Dict[str, Any]] = None


def _fork(name: str, ratio: float, tp_too: bool, err: Path) -> Tuple[int, int]:
    """Fork a child that writes its JSON lines to a pipe; ``(pid, read end)``."""
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.close(r)
            os.setsid()  # its own process group: a timeout kills whatever it started too
            if MEMORY_GB:
                import resource
                # A model that needs more memory fails alone with a MemoryError instead of waking
                # the kernel's OOM killer, which may pick any process on a shared machine.
                limit = int(MEMORY_GB * 2**30)
                resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)  # library chatter (ultralytics, timm) must not mix with the parent's output
            errfd = os.open(str(err), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(errfd, 2)
            warnings.filterwarnings("ignore")
            with os.fdopen(w, "w") as out:
                out.write(json.dumps({"part": "fxprune", **fxprune_record(name, ratio)}) + "\n")
                out.flush()
                if tp_too:
                    out.write(json.dumps({"part": "tp", **tp_record(name, ratio)}) + "\n")
                    out.flush()
        except BaseException:  # noqa: BLE001 - report on stderr (the parent reads its tail), then leave
            code = 1
            try:
                traceback.print_exc()
                sys.stderr.flush()
            except BaseException:  # noqa: BLE001
                pass
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def _finish(run: _Running, timeout: float, timed_out: bool) -> Dict[str, Any]:
    for kill in (os.killpg, os.kill):  # the group, and the child itself if it had no group yet
        try:
            kill(run.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        _, status = os.waitpid(run.pid, 0)
        code = os.waitstatus_to_exitcode(status)
    except ChildProcessError:
        code = 0
    os.close(run.fd)
    rec: Dict[str, Any] = {"model": run.name, **(run.rec or {})}
    try:
        tail = [ln for ln in run.err.read_text(errors="replace").splitlines() if ln.strip()][-1:]
        run.err.unlink()
    except OSError:
        tail = []
    why = (f"timed out after {timeout:.0f} s" if timed_out else
           f"process died (exit {code}{', killed: out of memory?' if code == -9 else ''})"
           + (f": {tail[0].strip()[:200]}" if tail else ""))
    if "fxprune" in run.wanted:
        rec.update(pruned=False, error=why, stage=rec.get("stage") or ("timeout" if timed_out else "crash"))
    if "tp" in run.wanted:
        rec["tp_error"] = why
    rec["wall_seconds"] = round(time.monotonic() - run.start, 1)
    return rec


def run_isolated(names: Sequence[str], timeout: float, ratio: float = RATIO, tp_too: bool = True, jobs: int = 1,
                 done: Optional[Callable[[Dict[str, Any]], None]] = None) -> List[Dict[str, Any]]:
    """Run each model in a forked child, ``jobs`` at a time; call ``done(record)`` as each finishes.

    fxprune gets ``timeout`` seconds per model, then Torch-Pruning as many. A part that runs out
    of time, or a child that dies (memory), is recorded as such; what the other part found is
    kept. The scheduling is single-threaded (``select``), so forking is safe.
    """
    import select
    import tempfile

    pending = list(names)
    running: Dict[int, _Running] = {}
    finished: List[Dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="fxprune-zoo-"))

    def close(run: _Running, timed_out: bool) -> None:
        del running[run.fd]
        rec = _finish(run, timeout, timed_out)
        finished.append(rec)
        if done is not None:
            done(rec)

    while pending or running:
        while pending and len(running) < max(1, jobs):
            name = pending.pop(0)
            err = tmp / f"{len(finished) + len(running)}.err"
            pid, fd = _fork(name, ratio, tp_too, err)
            now = time.monotonic()
            running[fd] = _Running(name, pid, fd, err, now + timeout, now, ["fxprune", "tp"] if tp_too else ["fxprune"])
        wait = max(0.0, min(r.deadline for r in running.values()) - time.monotonic())
        ready, _, _ = select.select(list(running), [], [], wait)
        for fd in ready:
            run = running[fd]
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                close(run, timed_out=False)
                continue
            run.buf += chunk
            while b"\n" in run.buf:
                line, run.buf = run.buf.split(b"\n", 1)
                part = json.loads(line)
                kind = part.pop("part", None)
                run.rec = {**(run.rec or {}), **part}
                if kind in run.wanted:
                    run.wanted.remove(kind)
                    run.deadline = time.monotonic() + timeout  # the next part gets its own budget
            if not run.wanted:
                close(run, timed_out=False)
        now = time.monotonic()
        for run in [r for r in running.values() if r.deadline <= now]:
            close(run, timed_out=True)
    try:
        tmp.rmdir()
    except OSError:
        pass
    return finished


# --------------------------------------------------------------------------- the table


def _ratio(r: Mapping[str, Any]) -> Optional[float]:
    """fxprune's parameters after over Torch-Pruning's, where both returned a model and TP's runs
    (also where fxprune found nothing to prune: that is its worst case, not a missing row).
    TP's model must have run: where its forward raised, ``tp_runs`` was never set, and a broken
    model's parameter count says nothing."""
    fx, tpa = r.get("params_after"), r.get("tp_params_after")
    if not fx or not tpa or r.get("tp_runs") is not True or r.get("shape_ok") is False:
        return None
    return fx / tpa


def summarize(rows: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """The counts of the summary (also used by the tests)."""
    built = [r for r in rows if r.get("stage") != "build"]
    ratios = [q for q in (_ratio(r) for r in rows) if q is not None]
    yolo = [r for r in rows if r["model"].startswith("yolo:") and r.get("pruned")]
    reasons: Dict[str, int] = {}
    for r in rows:
        for kind, n in (r.get("frozen") or {}).items():
            reasons[short_kind(kind)] = reasons.get(short_kind(kind), 0) + n
    return {
        "models": len(rows), "built": len(built),
        "fx": sum(1 for r in rows if r.get("traced") == "fx"),
        "export": sum(1 for r in rows if r.get("traced") == "torch.export"),
        "pruned": sum(1 for r in rows if r.get("pruned")),
        "proven": sum(1 for r in rows if r.get("pruned") and r.get("proven")),
        "failed": sum(1 for r in built if not (r.get("pruned") and r.get("proven"))),
        "errors": sum(1 for r in built if r.get("error") and not r.get("proven")),
        "unpruned": sum(1 for r in built if r.get("proven") and not r.get("pruned")),
        "tp_ran": sum(1 for r in rows if r.get("tp_params_after") is not None),
        "tp_runs": sum(1 for r in rows if r.get("tp_runs")),
        "compared": len(ratios),
        "within_1_1": sum(1 for q in ratios if q <= 1.1),
        "median_ratio": statistics.median(ratios) if ratios else None,
        "renormalising": sum(1 for r in rows if r.get("pruned") and r.get("proven") and r.get("renormalising")),
        "yolo_pruned": len(yolo),
        "yolo_40": sum(1 for r in yolo if r["params_after"] <= 0.4 * r["params_before"]),
        "reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
    }


def _m(n: Optional[int], digits: int = 2) -> str:
    return "-" if n is None else f"{n / 1e6:.{digits}f}"


def _yes(ok: Optional[bool]) -> str:
    return {True: "yes", False: "**no**", None: "-"}[ok]


def _groups(r: Mapping[str, Any]) -> str:
    """``12`` (all exact), ``12 (1 renormalising)``, ``-`` (nothing pruned)."""
    n = r.get("pruned_groups")
    if n is None:
        return "-"
    k = r.get("renormalising")
    return f"{n}" + (f" (**{k} renormalising**)" if k else "")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _runs(meta: Mapping[str, Any]) -> str:
    runs = list(meta.get("runs", [])) or [{k: meta[k] for k in ("command", "date", "load_start", "load_end") if k in meta}]
    parts = []
    for i, r in enumerate(runs):
        count = f"{r['models']} models, " if "models" in r and len(runs) > 1 else ""
        code = f", {r['fxprune']}" if r.get("fxprune") else ""
        # A run on another machine than the file's (the newest run's) says which.
        where = f", on {r['machine']}" if r.get("machine") and r["machine"] != meta.get("machine") else ""
        parts.append(f"`{r.get('command', 'python benchmarks/zoo.py')}` on {r.get('date', '?')} ({count}load average "
                     f"{r.get('load_start', '?')} at the start, {r.get('load_end', '?')} at the end{code}{where})")
    return parts[0] if len(parts) == 1 else parts[0] + ", then " + ", then ".join(parts[1:])


def _fxprune_commit() -> str:
    """``fxprune at commit abc1234`` (plus a note when fxprune/ has uncommitted changes), or ''."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        if not commit:
            return ""
        # A run of edited code must not be credited to the commit it started from.
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fxprune"], cwd=HERE.parent,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"fxprune at commit {commit}" + (" with uncommitted changes to fxprune/" if dirty else "")


def render(results: Mapping[str, Mapping[str, Any]], zoo: Sequence[Entry], meta: Mapping[str, Any]) -> str:
    """ZOO.md: how it was made, the summary, then one row per model (in zoo order)."""
    rows = [dict(results[e.name], family=e.family) for e in zoo if e.name in results]
    s = summarize(rows)
    median = "-" if s["median_ratio"] is None else f"{s['median_ratio']:.2f}"
    lines = [
        "# fxprune on the model zoo, beside Torch-Pruning",
        "",
        f"Generated by {_runs(meta)}; machine: {meta.get('machine', '?')}; {meta.get('versions', '')}"
        + (f"; the runs that name no commit recorded none of their own (this file's note then: {meta['earlier_fxprune']})"
           if meta.get("earlier_fxprune") else "") + ".",
        "",
        "Every model has random weights and BatchNorm statistics (nothing is downloaded) and runs in eval mode "
        "on a batch of one small input (the size is in the table). Each runs in its own subprocess with a "
        f"timeout of {meta.get('timeout', '?')} s per tool. fxprune traces it with torch.fx, or where fx cannot, "
        "with `torch.export` (lifted back to layers by `fxprune.export.from_exported`), prunes at ratio "
        f"{meta.get('ratio', RATIO)} (`fxprune.prune(gm, {meta.get('ratio', RATIO)}, example_inputs=(x,))`) and proves "
        "the result equivalent to the masked reference (the original with every removed channel zeroed) in "
        "float64 with `fxprune.testing.assert_equivalent`, which reads each group's proof contract from the plan: "
        "groups a LayerNorm/RMSNorm normalises over (*renormalising*) are proven against the masked-norm reference "
        "instead (each such norm computes its statistics over the kept channels only). Torch-Pruning runs on a fresh copy of the same model "
        "(`MagnitudePruner`, `GroupMagnitudeImportance(p=1)`, `pruning_ratio=0.5`), with the layers that produce "
        "the model's outputs ignored as its own examples do (the classifier, segmentation head, FPN output convs; "
        "for YOLO the whole last head module); it checks nothing, so the table says whether its pruned model "
        "still runs with the same output shapes.",
        "",
        "Re-run everything with `python benchmarks/zoo.py --force` (`--family`, `--only PATTERN`, `--jobs N`, "
        "`--timeout S`; `--table` only rewrites this file from `benchmarks/zoo.json`).",
        "",
        "## Summary",
        "",
        f"- **{s['models']}** models; {s['built']} could be built ({s['models'] - s['built']} combinations the "
        "library itself refuses, listed at the end).",
        f"- traced: {s['fx']} with torch.fx, {s['export']} through `torch.export`.",
        f"- **pruned {s['pruned']}**, **proven equivalent in float64 {s['proven']}**, **failed {s['failed']}**: "
        f"{s['errors']} with an error or out of time, {s['unpruned']} proven but with nothing pruned (every group frozen).",
        f"- {s['renormalising']} of the proven models prune renormalising groups (LayerNorm/RMSNorm widths, one-group GroupNorms), proven "
        "against the masked-norm reference; every other pruned group is exact.",
        f"- Torch-Pruning returned a model for {s['tp_ran']} ({s['tp_runs']} of them still run with the same output shapes).",
        f"- fxprune's parameters after pruning are at most 1.1x Torch-Pruning's on **{s['within_1_1']} of "
        f"{s['compared']}** models where both returned a working model; median fxprune/TP ratio **{median}** "
        "(below 1: fxprune removed more).",
        f"- YOLO: {s['yolo_40']} of {s['yolo_pruned']} pruned YOLO models keep at most 40 % of their parameters.",
    ]
    if s["reasons"]:
        top = "; ".join(f"{k} ({v})" for k, v in list(s["reasons"].items())[:12])
        lines.append(f"- Frozen groups over the whole zoo, by reason: {top}.")
    by_source: Dict[str, List[Dict[str, Any]]] = {}
    for r in rows:
        by_source.setdefault(r["model"].split(":")[0], []).append(r)
    lines += ["", "| source | models | pruned | proven | fxprune <= 1.1x TP | median fxprune/TP |", "|---|---|---|---|---|---|"]
    for source, group in by_source.items():
        g = summarize(group)
        med = "-" if g["median_ratio"] is None else f"{g['median_ratio']:.2f}"
        lines.append(f"| {source} | {g['models']} | {g['pruned']} | {g['proven']} | {g['within_1_1']} of {g['compared']} | {med} |")
    lines += [
        "",
        "## Models",
        "",
        "Params and MACs in millions; MACs for the input shown. *Pruned groups*: how many groups lost channels; "
        "**renormalising** ones are LayerNorm/RMSNorm widths and one-group GroupNorms, proven against the masked-norm reference (the masked "
        "original with each affected norm computing its statistics over the kept channels), the rest exact (proven "
        "against the masked reference). *Frozen groups*: groups fxprune leaves whole, with "
        "the most frequent reasons. *fxprune/TP*: fxprune's parameters after over Torch-Pruning's.",
        "",
        "| model | family | input | traced how | pruned | proven (float64) | pruned groups (renormalising) | "
        "params before → after | MACs before → after | frozen groups (count: top reasons) | TP params after | fxprune/TP | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    refused: List[Dict[str, Any]] = []
    for r in rows:
        if r.get("stage") == "build":
            refused.append(r)
            continue
        frozen: Dict[str, int] = {}
        for kind, n in (r.get("frozen") or {}).items():
            frozen[short_kind(kind)] = frozen.get(short_kind(kind), 0) + n
        top = ", ".join(f"{k} ({v})" for k, v in sorted(frozen.items(), key=lambda kv: -kv[1])[:3])
        fz = f"{r.get('frozen_groups', '-')} of {r.get('groups', '-')}" + (f": {top}" if top else "")
        if r.get("error"):
            fz += f"; **error** ({r.get('stage', '?')}): {r['error'][:160]}"
        if r.get("tp_error"):
            tpa = f"error: {r['tp_error'][:80]}"
        elif r.get("tp_params_after") is not None:
            tpa = _m(r["tp_params_after"]) + ("" if r.get("tp_runs", True) else " (**does not run**)")
        else:
            tpa = "-"
        q = _ratio(r)
        traced = r.get("traced") or "**no**"
        lines.append(
            f"| {r['model']} | {r['family']} | {r.get('input', '-')} | {traced} | {_yes(r.get('pruned'))} | "
            f"{_yes(r.get('proven'))} | {_groups(r)} | {_m(r.get('params_before'))} → {_m(r.get('params_after'))} | "
            f"{_m(r.get('macs_before'), 1)} → {_m(r.get('macs_after'), 1)} | {_cell(fz)} | {_cell(tpa)} | "
            f"{'-' if q is None else f'{q:.2f}'} | {r.get('seconds', r.get('wall_seconds', '-'))} |")
    if refused:
        lines += ["", "## Combinations the libraries refuse to build", ""]
        lines += [f"- `{r['model']}`: {_cell(r.get('error', ''))[:200]}" for r in refused]
    missing = [e.name for e in zoo if e.name not in results]
    if missing:
        lines += ["", f"Not run: {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)  # atomic: a reader (or a crash) never sees half a file


def _versions() -> str:
    """The libraries' versions (each run records its own fxprune commit: :func:`_fxprune_commit`)."""
    import importlib.metadata as md
    parts = []
    for dist in ("torch", "torchvision", "timm", "ultralytics", "segmentation-models-pytorch", "transformers", "torch-pruning"):
        try:
            parts.append(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join(parts)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} CPU cores, 1 intra-op thread per model"


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def select(zoo: Sequence[Entry], family: Optional[str], only: Optional[str]) -> List[Entry]:
    """``--family`` (source or family label, case-insensitive substring) and ``--only`` (glob on names)."""
    out = list(zoo)
    if family:
        f = family.lower()
        out = [e for e in out if f == e.source or f in e.family.lower()]
    if only:
        pats = [p.strip() for p in only.split(",") if p.strip()]
        out = [e for e in out if any(fnmatch.fnmatch(e.name, p) or fnmatch.fnmatch(e.name.split(":", 1)[1], p) for p in pats)]
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", help="a source (yolo, timm, smp, torchvision, hf) or part of a family label")
    parser.add_argument("--only", help="glob(s) on model names, comma separated (e.g. 'yolov8*,timm:resnet*')")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per model and tool (default 150)")
    parser.add_argument("--jobs", type=int, default=1, help="models at a time (default 1)")
    parser.add_argument("--force", action="store_true", help="re-run models zoo.json already holds")
    parser.add_argument("--ratio", type=float, default=RATIO)
    parser.add_argument("--memory-gb", type=float, default=MEMORY_GB, help="memory limit per model (default 6; 0: none)")
    parser.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    parser.add_argument("--table", action="store_true", help="only rewrite ZOO.md from zoo.json")
    parser.add_argument("--list", action="store_true", help="print the model names and exit")
    parser.add_argument("--results", type=Path, default=RESULTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=TABLE, help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # child mode: one model, JSON lines on stdout
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.child, args.ratio, not args.no_tp)

    globals()["MEMORY_GB"] = args.memory_gb  # read by the forked children
    zoo = entries()
    chosen = select(zoo, args.family, args.only)
    if args.list:
        for e in chosen:
            print(f"{e.name:45s} {e.family}")
        return 0
    data: Dict[str, Any] = json.loads(args.results.read_text()) if args.results.exists() else {}
    results: Dict[str, Dict[str, Any]] = data.get("models", {})
    meta: Dict[str, Any] = dict(data.get("meta", {}))
    if not args.table:
        todo = [e for e in chosen if args.force or e.name not in results]
        runs: List[Dict[str, Any]] = list(meta.get("runs", []))
        if not runs and "command" in meta:  # zoo.json of a single earlier run
            runs = [{k: meta.pop(k) for k in ("command", "date", "load_start", "load_end", "jobs") if k in meta}]
        if args.force and not args.only and not args.family:
            runs = []  # everything is measured afresh
        niceness = os.nice(0)
        run = {"command": ("" if not niceness else f"nice -n {niceness} ") + "python benchmarks/zoo.py "
                          + " ".join(argv if argv is not None else sys.argv[1:]),
               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "load_start": _load(), "jobs": args.jobs, "models": len(todo), "fxprune": _fxprune_commit()}
        old_versions = str(meta.get("versions", ""))
        if runs and not any("fxprune" in r for r in runs) and old_versions.startswith("fxprune"):
            # Runs recorded before each run carried its commit: the file's one commit note is theirs.
            meta["earlier_fxprune"] = old_versions.split(", torch ")[0]
        run["machine"] = _machine()
        for earlier in runs:  # runs recorded before each carried its machine ran on the file's one
            earlier.setdefault("machine", meta.get("machine", "?"))
        if todo:
            runs.append(run)
        meta.update(runs=runs, machine=run["machine"], versions=_versions(), timeout=args.timeout, ratio=args.ratio)

        def one(rec: Dict[str, Any]) -> None:
            name = rec["model"]
            results[name] = rec
            run["load_end"] = _load()
            _write_json(args.results, {"meta": meta, "models": results})
            q = _ratio(rec)
            status = ("proven" if rec.get("proven") and rec.get("pruned") else "nothing pruned" if rec.get("proven") else "pruned, NOT proven" if rec.get("pruned") else "FAILED")
            print(f"{name:42s} {status:18s} {rec.get('traced') or '-':12s} params {_m(rec.get('params_before'))} -> "
                  f"{_m(rec.get('params_after'))} M  TP {_m(rec.get('tp_params_after'))}  "
                  f"ratio {'-' if q is None else f'{q:.2f}'}  {rec.get('wall_seconds')} s  "
                  f"{(rec.get('error') or '')[:90]}", flush=True)

        print(f"{len(todo)} models to run ({len(chosen) - len(todo)} already in {args.results.name})", flush=True)
        if todo:
            _preimport(todo)
            run_isolated([e.name for e in todo], args.timeout, args.ratio, tp_too=not args.no_tp, jobs=args.jobs, done=one)
    args.out.write_text(render(results, zoo, meta))
    s = summarize([dict(results[e.name]) for e in zoo if e.name in results])
    print(f"{s['proven']} of {s['models']} models pruned and proven; fxprune <= 1.1x TP on {s['within_1_1']} of "
          f"{s['compared']}; table in {args.out}")
    return 0


if __name__ == "__main__":
    # Run as a script, this folder is sys.path[0], and benchmarks/coverage.py would shadow the
    # ``coverage`` package for any library that imports it.
    if sys.path and Path(sys.path[0]).resolve() == HERE:
        sys.path.pop(0)
    sys.exit(main())
