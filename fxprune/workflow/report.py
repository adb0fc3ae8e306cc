"""What the user gets in the output folder: report.json, report.md, plots, log, pruned model.

``report.json`` is the machine-readable record (``baseline`` and ``pruned`` each with
``top1``, ``top5``, ``params``, ``macs``, ``size_mb``, ``latency_ms``; plus ``config``,
``machine``, ``date``); ``report.md`` is the same as a table a person reads. Plots are PNGs
drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import logging
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from fxprune.workflow.extras import require

__all__ = [
    "machine_info",
    "utc_now",
    "write_json",
    "write_report",
    "render_markdown",
    "layer_channels",
    "plot_channels",
    "plot_sweep",
    "render_sweep_markdown",
    "save_pruned",
    "load_pruned",
    "setup_logging",
    "close_logging",
    "LOG_NAME",
]

LOG_NAME = "run.log"
logger = logging.getLogger("fxprune.workflow")


def utc_now() -> str:
    """The current time, ISO 8601 in UTC (the ``date`` field)."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What ran the job: CPU, cores, threads, GPU, library versions."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": None,
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["cuda"] = {"device": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                        "version": torch.version.cuda}
    return info


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become None (JSON has no NaN), paths become strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return _clean(value.tolist())
    return value


def write_json(data: Mapping[str, Any], path: Union[str, Path]) -> Path:
    """Write ``data`` as indented JSON, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(_clean(data), indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _fmt_int(value: Optional[float]) -> str:
    if value is None:
        return "-"
    value = float(value)
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f}"


def _fmt(value: Optional[float], digits: int = 2, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}{suffix}"


def _delta(value: Optional[float]) -> str:
    """A signed change in accuracy points, e.g. ``+0.93 pts``."""
    return "-" if value is None or not math.isfinite(value) else f"{value:+.2f} pts"


def _ratio(before: Optional[float], after: Optional[float]) -> str:
    if not before or not after:
        return "-"
    return f"{before / after:.2f}x"


def _achieved_lines(achieved: Any) -> list[str]:
    """The report's statement of what pruning removed (loud when it removed nothing)."""
    if not isinstance(achieved, Mapping):
        return []
    fraction = achieved.get("channels_removed_fraction")
    groups = (f"{achieved['groups_pruned']} of {achieved['groups']} channel groups pruned, "
              if "groups" in achieved and "groups_pruned" in achieved else "")
    line = (f"- Achieved: {groups}{achieved.get('channels_removed', '-')} of {achieved.get('channels', '-')} "
            f"channels removed ({_fmt(100 * fraction if isinstance(fraction, (int, float)) else None, 1)}%), "
            f"{achieved.get('layers_pruned', '-')} of {achieved.get('layers', '-')} layers narrower")
    if achieved.get("nothing_pruned"):
        return [line, "", "> **WARNING: nothing was pruned.** Every group kept all its channels (check "
                "`--round-to`, `--ignore` and the warnings in run.log); the pruned model is the baseline's "
                "architecture.", ""]
    return [line]


def render_markdown(report: Mapping[str, Any]) -> str:
    """``report.md``: the baseline and the pruned model side by side."""
    base, pruned = report["baseline"], report["pruned"]
    config = report.get("config", {})
    machine = report.get("machine", {}) or {}
    data_name = (report.get("data") or {}).get("name", config.get("data", "-"))
    if config.get("ratio") is not None:
        requested = f"ratio {config['ratio']}"
    elif config.get("target_macs"):
        requested = f"target MACs {config['target_macs']}"
    else:
        requested = "ratio -"
    gpu = f", GPU {machine['cuda']['device']}" if machine.get("cuda") else ""
    lines = [
        "# fxprune report",
        "",
        f"- Date: {report.get('date', '-')}",
        f"- Model: `{config.get('model', '-')}`; data: `{data_name}` "
        f"(accuracy on the held-out split, {base.get('samples', '-')} samples)",
        f"- Pruning: importance `{config.get('importance', '-')}`, requested {requested}",
        *_achieved_lines(pruned.get("achieved")),
        f"- Machine: {machine.get('cpu', '-')} ({machine.get('cpu_count', '-')} cores){gpu}",
        "",
        "| metric | baseline | pruned | change |",
        "|---|---:|---:|---:|",
    ]

    def change(key: str) -> Optional[float]:
        before, after = base.get(key), pruned.get(key)
        return None if before is None or after is None else after - before

    def row(label: str, key: str, fmt: Any, word: str) -> str:
        before, after = base.get(key), pruned.get(key)
        return f"| {label} | {fmt(before)} | {fmt(after)} | {_ratio(before, after)} {word} |"

    lines += [
        f"| top-1 accuracy (%) | {_fmt(base.get('top1'))} | {_fmt(pruned.get('top1'))} | {_delta(change('top1'))} |",
        f"| top-5 accuracy (%) | {_fmt(base.get('top5'))} | {_fmt(pruned.get('top5'))} | {_delta(change('top5'))} |",
        row("parameters", "params", _fmt_int, "fewer"),
        row("MACs per image", "macs", _fmt_int, "fewer"),
        row("size on disk (MB)", "size_mb", _fmt, "smaller"),
    ]
    base_lat, pruned_lat = base.get("latency_ms", {}) or {}, pruned.get("latency_ms", {}) or {}
    for key in base_lat:
        lines.append(f"| latency {key} (ms) | {_fmt(base_lat.get(key), 3)} | {_fmt(pruned_lat.get(key), 3)} | "
                     f"{_ratio(base_lat.get(key), pruned_lat.get(key))} faster |")
    failures = {**base.get("latency_failures", {}), **pruned.get("latency_failures", {})}
    if failures:
        lines += ["", "Latency settings that could not be measured:", ""]
        lines += [f"- `{key}`: {reason}" for key, reason in sorted(failures.items())]
    per_b, per_p = base.get("per_class", {}) or {}, pruned.get("per_class", {}) or {}
    if per_b:
        lines += ["", "## Per-class top-1 accuracy (%)", "", "| class | baseline | pruned |", "|---|---:|---:|"]
        lines += [f"| {name} | {_fmt(per_b.get(name))} | {_fmt(per_p.get(name))} |" for name in per_b]
    timings = report.get("timings_s", {})
    if timings:
        lines += ["", "## Time (s)", "", "| step | seconds |", "|---|---:|"]
        lines += [f"| {step} | {_fmt(sec, 1)} |" for step, sec in timings.items()]
    plots = report.get("plots", [])
    if plots:
        lines += [""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def write_report(report: Mapping[str, Any], out_dir: Union[str, Path]) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir``."""
    out = Path(out_dir)
    json_path = write_json(report, out / "report.json")
    md_path = out / "report.md"
    md_path.write_text(render_markdown(_clean(report)), encoding="utf-8")
    return json_path, md_path


def layer_channels(model: nn.Module) -> dict[str, int]:
    """Output channels (features) of every conv and linear layer, by qualified name."""
    channels: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            channels[name] = int(module.out_channels)
        elif isinstance(module, nn.Linear):
            channels[name] = int(module.out_features)
    return channels


def _pyplot() -> Any:
    matplotlib = require("matplotlib")  # the 'run' extra: a clear error when it is missing
    matplotlib.use("Agg")  # files only: no display on servers and CI
    return require("matplotlib.pyplot")


def plot_channels(baseline: nn.Module, pruned: nn.Module, path: Union[str, Path],
                  title: str = "Channels per layer") -> Path:
    """Bar chart of output channels per conv/linear layer, before and after pruning."""
    plt = _pyplot()
    before, after = layer_channels(baseline), layer_channels(pruned)
    names = list(before)
    x = list(range(len(names)))
    width = max(8.0, 0.28 * len(names))
    fig, ax = plt.subplots(figsize=(width, 4.5))
    ax.bar([i - 0.2 for i in x], [before[n] for n in names], width=0.4, label="baseline")
    ax.bar([i + 0.2 for i in x], [after.get(n, 0) for n in names], width=0.4, label="pruned")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylabel("output channels")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(points: Sequence[Mapping[str, Any]], baseline: Mapping[str, Any],
               out_dir: Union[str, Path], latency_setting: Optional[str] = None) -> list[Path]:
    """Accuracy vs MACs and accuracy vs latency, one line per importance criterion.

    ``points`` are sweep results with ``importance``, ``ratio``, ``top1``, ``macs`` and
    ``latency_ms``; ``latency_setting`` picks the latency key (default: the first one measured).
    """
    plt = _pyplot()
    out = Path(out_dir)
    paths = []
    if latency_setting is None:
        latency_setting = next(iter(baseline.get("latency_ms", {}) or {}), None)
    by_importance: dict[str, list[Mapping[str, Any]]] = {}
    for point in points:
        by_importance.setdefault(str(point["importance"]), []).append(point)
    axes_spec = [("macs", "MACs per image (M)", 1e-6, "accuracy_vs_macs.png")]
    if latency_setting:
        axes_spec.append(("latency", f"latency {latency_setting} (ms)", 1.0, "accuracy_vs_latency.png"))
    for kind, label, scale, filename in axes_spec:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))

        def value(entry: Mapping[str, Any]) -> Optional[float]:
            if kind == "macs":
                return entry.get("macs")
            return (entry.get("latency_ms") or {}).get(latency_setting)

        for importance, entries in sorted(by_importance.items()):
            entries = sorted((e for e in entries if value(e) is not None), key=lambda e: value(e))
            if not entries:
                continue
            xs = [value(e) * scale for e in entries]
            ax.plot(xs, [e["top1"] for e in entries], marker="o", label=importance)
            for e, xv in zip(entries, xs):
                ax.annotate(f"{e['ratio']:g}", (xv, e["top1"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
        if value(baseline) is not None:
            ax.scatter([value(baseline) * scale], [baseline["top1"]], marker="*", s=160,
                       color="black", label="baseline", zorder=5)
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(f"Accuracy vs {'MACs' if kind == 'macs' else 'latency'} (labels: ratio)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / filename
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def render_sweep_markdown(sweep: Mapping[str, Any]) -> str:
    """``sweep.md``: one row per (importance, ratio), with the baseline first."""
    base = sweep["baseline"]
    keys = list((base.get("latency_ms") or {}).keys())
    header = ("| model | importance | ratio | top-1 (%) | top-1 before fine-tuning (%) | top-5 (%) | params "
              "| MACs | size (MB) | " + " | ".join(f"{k} (ms)" for k in keys) + " |")
    lines = ["# fxprune sweep", "", f"- Date: {sweep.get('date', '-')}",
             f"- Machine: {sweep.get('machine', {}).get('cpu', '-')}", "", header,
             "|" + "---|" * (9 + len(keys))]

    def row(name: str, importance: str, ratio: str, entry: Mapping[str, Any]) -> str:
        lat = entry.get("latency_ms") or {}
        return (f"| {name} | {importance} | {ratio} | {_fmt(entry.get('top1'))} | "
                f"{_fmt(entry.get('top1_before_finetune'))} | {_fmt(entry.get('top5'))} | "
                f"{_fmt_int(entry.get('params'))} | {_fmt_int(entry.get('macs'))} | {_fmt(entry.get('size_mb'))} | "
                + " | ".join(_fmt(lat.get(k), 3) for k in keys) + " |")

    lines.append(row("baseline", "-", "0", base))
    for point in sweep["points"]:
        lines.append(row("pruned", str(point["importance"]), f"{point['ratio']:g}", point))
    plots = sweep.get("plots", [])
    if plots:
        lines += [""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


ARTIFACT_NAME = "pruned_model.fxprune"
ARTIFACT_INFO = "pruned_model.json"


def save_pruned(pruned: nn.Module, out_dir: Union[str, Path], *,
                example_inputs: Optional[torch.Tensor] = None,
                build: Optional[Mapping[str, Any]] = None,
                extra: Optional[Mapping[str, Any]] = None) -> list[Path]:
    """Save the pruned model into ``out_dir``; returns the paths written.

    - ``pruned_model.fxprune/``: the artifact of :func:`fxprune.save` (plan + safetensors
      weights, no pickle), loadable with :func:`load_pruned` or ``fxprune.load(path, model=...)``;
    - ``pruned_model.json``: how to rebuild the original architecture (``build``: the keyword
      arguments of :func:`fxprune.workflow.models.build_model`), the channels per layer, ``extra``;
    - ``pruned_model.py``: the generated forward code, for reading.
    """
    import fxprune

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build = dict(build or {})
    source = None
    # fxprune.load can rebuild a plain torchvision model by name on its own; an adapted one
    # (other class count, input channels or stem) needs build_model's arguments.
    if (build.get("name") and ":" not in str(build["name"]) and build.get("num_classes") == 1000
            and build.get("in_channels") == 3 and int(build.get("image_size") or 0) >= 64):
        source = f"torchvision:{build['name']}"
    if any(t.device.type != "cpu" for t in pruned.state_dict().values()):
        pruned = copy.deepcopy(pruned).cpu()  # the caller's model stays on its device
    artifact = fxprune.save(pruned, out / ARTIFACT_NAME, source=source,
                            example_inputs=None if example_inputs is None else (example_inputs[:1].cpu(),))
    written = [Path(artifact)]
    code = getattr(pruned, "code", None)
    if isinstance(code, str):
        code_path = out / "pruned_model.py"
        code_path.write_text(code, encoding="utf-8")
        written.append(code_path)
    info = {"artifact": ARTIFACT_NAME, "build_model": build, "source": source,
            "layers": layer_channels(pruned), **dict(extra or {})}
    written.append(write_json(info, out / ARTIFACT_INFO))
    return written


#: Keyword arguments of :func:`fxprune.workflow.models.build_model` a ``pruned_model.json`` may
#: give, with the JSON type each must have. Anything else in the file is refused.
_BUILD_KEYS: dict[str, type] = {"num_classes": int, "in_channels": int, "image_size": int}
# Bounds that keep a tampered file from making load_pruned build an absurdly large model.
_BUILD_LIMITS = {"num_classes": 1_000_000, "in_channels": 4096, "image_size": 16384}


def _declarative_build(info: Mapping[str, Any], where: Path) -> dict[str, Any]:
    """``pruned_model.json``'s ``build_model`` entry, if it is a plain torchvision spec.

    A spec is a torchvision classification model *name* (checked against
    ``torchvision.models.list_models``, so never a ``package.module:callable``: a file in a
    folder never chooses code to import) and integer arguments within bounds.
    """
    import torchvision.models as tvm

    from fxprune.workflow.errors import CheckpointError

    build = info.get("build_model")
    if not isinstance(build, Mapping) or not isinstance(build.get("name"), str) or not build["name"]:
        raise CheckpointError(f"{where} does not say how to build the original model; pass model= "
                              f"(the unpruned nn.Module, or a callable returning it)")
    name = build["name"]
    if name not in tvm.list_models(module=tvm):
        raise CheckpointError(
            f"{where} names the model {name!r}, which is not a torchvision classification model: "
            f"load_pruned never imports code a file names. Pass model= (the unpruned nn.Module, "
            f"or a callable returning it) to load it")
    kwargs: dict[str, Any] = {}
    for key, value in build.items():
        if key == "name":
            continue
        kind = _BUILD_KEYS.get(key)
        if kind is None:
            raise CheckpointError(f"{where}: build_model has an unknown entry {key!r}")
        if isinstance(value, bool) or not isinstance(value, kind) or not 1 <= value <= _BUILD_LIMITS[key]:
            raise CheckpointError(f"{where}: build_model {key} must be an integer in [1, {_BUILD_LIMITS[key]}], "
                                  f"got {value!r}")
        kwargs[key] = value
    missing = sorted(set(_BUILD_KEYS) - set(kwargs))
    if missing:
        raise CheckpointError(f"{where}: build_model lacks {', '.join(missing)}")
    return {"name": name, **kwargs}


def load_pruned(out_dir: Union[str, Path], map_location: Union[str, torch.device] = "cpu", *,
                model: Union[nn.Module, Callable[[], nn.Module], None] = None) -> torch.fx.GraphModule:
    """Load the pruned model :func:`save_pruned` wrote into ``out_dir`` (never unpickles).

    ``model``: the original, unpruned architecture, as an ``nn.Module`` (its weights do not
    matter) or a callable returning one, like :func:`fxprune.load`. Without it the folder's
    ``pruned_model.json`` may only describe a torchvision model by name with integer
    arguments (what ``fxprune run`` writes for torchvision models); a file never names code
    to import or call, so a model built by your own ``package.module:callable`` needs
    ``model=``.
    """
    import fxprune

    from fxprune.workflow.errors import CheckpointError
    from fxprune.workflow.models import build_model

    out = Path(out_dir)
    where = out / ARTIFACT_INFO
    try:
        info = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{where} is missing or unreadable: {exc}") from exc
    if not isinstance(info, Mapping):
        raise CheckpointError(f"{where} is not a JSON object")
    artifact = info.get("artifact", ARTIFACT_NAME)
    # The artifact lives in this folder, under its own name: a path from the file is not followed.
    if artifact != ARTIFACT_NAME:
        raise CheckpointError(f"{where}: artifact must be {ARTIFACT_NAME!r}, got {artifact!r}")
    if model is None:
        spec = _declarative_build(info, where)
        original: nn.Module = build_model(spec["name"], num_classes=spec["num_classes"],
                                          in_channels=spec["in_channels"], image_size=spec["image_size"])
    elif isinstance(model, nn.Module):
        original = model
    elif callable(model):
        original = model()
        if not isinstance(original, nn.Module):
            raise CheckpointError(f"model= returned {type(original).__name__}, not an nn.Module")
    else:
        raise CheckpointError(f"model= must be an nn.Module or a callable returning one, got {type(model).__name__}")
    return fxprune.load(out / ARTIFACT_NAME, model=original, map_location=map_location)


def close_logging() -> None:
    """Detach and close the handlers :func:`setup_logging` added (the log file is complete)."""
    root = logging.getLogger("fxprune")
    for handler in list(root.handlers):
        if getattr(handler, "_fxprune_workflow", False):
            root.removeHandler(handler)
            handler.close()


def setup_logging(out_dir: Union[str, Path, None], *, quiet: bool = False,
                  is_main: bool = True) -> Optional[Path]:
    """Log ``fxprune`` messages to ``out_dir/run.log`` (main process) and to stderr.

    Returns the log file path. Calling it again replaces the handlers it added before.
    """
    root = logging.getLogger("fxprune")
    root.setLevel(logging.INFO)
    close_logging()
    stream = logging.StreamHandler(sys.stderr)
    stream.setLevel(logging.WARNING if (quiet or not is_main) else logging.INFO)
    stream.setFormatter(logging.Formatter("%(message)s"))
    stream._fxprune_workflow = True  # type: ignore[attr-defined]
    root.addHandler(stream)
    if out_dir is None or not is_main:
        return None
    path = Path(out_dir) / LOG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setLevel(logging.INFO)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    file_handler._fxprune_workflow = True  # type: ignore[attr-defined]
    root.addHandler(file_handler)
    return path
