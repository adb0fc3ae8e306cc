"""Packaging and the command line: what a user meets before any pruning happens.

- ``fxprune --help`` / ``fxprune run --help`` build their parsers without importing torch,
  and ``import fxprune`` alone imports nothing heavy (checked in fresh interpreters: sys.modules);
- the pass needs only torch, torchvision, networkx, numpy and safetensors: tqdm and matplotlib
  are the ``run`` extra, and a run without them is one clear error naming it;
- ``--version``, did-you-mean suggestions, the importance choices in --help kept equal to
  :func:`fxprune.available_criteria`, ``prune``'s --weights/--ignore/--target-macs;
- smaller items: the rank-0-only summary, ``--workers`` reaching the training loader, the
  saved folder's mode following the umask, and the hints of two errors.
"""

from __future__ import annotations

import ast
import json
import os
import pkgutil
import subprocess
import sys
import tomllib
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import fxprune
from fxprune.cli import main

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "numpy", "networkx", "safetensors", "tqdm", "matplotlib")


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter with this checkout first on the path."""
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=environ, capture_output=True,
                          text=True, timeout=240)


def _loaded_heavy(code: str) -> list[str]:
    """The heavy top-level modules loaded after ``code`` runs in a fresh interpreter."""
    probe = (f"import sys\n{code}\n"
             f"print('LOADED', sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
    done = _python(probe)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("LOADED"))
    return ast.literal_eval(line[len("LOADED "):])


# --------------------------------------------------------------------------------------------
# Start-up: no torch for the parser
# --------------------------------------------------------------------------------------------
def test_building_the_parsers_imports_no_torch() -> None:
    code = """
import fxprune.cli
from fxprune.workflow import cli_args
parser = fxprune.cli.build_parser()
parser.format_help()
for name in ("run", "sweep", "prune", "groups"):
    try:
        parser.parse_args([name, "--help"])
    except SystemExit:
        pass
cli_args.build_parser().format_help()
try:
    fxprune.cli.main(["run", "--ratoi", "0.3"])   # a parse error answers without torch too
except SystemExit:
    pass
"""
    assert _loaded_heavy(code) == []


def test_import_fxprune_alone_loads_nothing_heavy() -> None:
    # Before, ``import fxprune`` imported torch, and torch imports tqdm when it is installed.
    assert _loaded_heavy("import fxprune, fxprune.workflow") == []


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"fxprune {fxprune.__version__} (torch ")
    assert "torchvision " in out and "Python " in out
    # One source of truth: pyproject reads the version from fxprune/version.py, which the
    # package re-exports (modules that record the version import it from there, not the package).
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fxprune.version.__version__"}
    from fxprune.version import __version__
    assert fxprune.__version__ == __version__


# --------------------------------------------------------------------------------------------
# Dependencies and metadata
# --------------------------------------------------------------------------------------------
def test_pyproject_dependencies_extras_and_metadata() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    meta = project["project"]
    names = {dep.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip() for dep in meta["dependencies"]}
    assert names == {"torch", "torchvision", "networkx", "numpy", "safetensors"}
    for dep in meta["dependencies"]:
        assert "<" not in dep, f"no upper bound on dependencies: {dep}"
        assert ">=" in dep, f"a lower bound on every dependency: {dep}"
    extras = meta["optional-dependencies"]
    assert {d.split(">")[0] for d in extras["run"]} == {"tqdm", "matplotlib"}
    assert "fxprune[run]" in extras["test"]  # the test command installs what the workflow needs
    assert meta["license"] == "Apache-2.0"  # SPDX expression (PEP 639)
    assert not any(c.startswith("License ::") for c in meta["classifiers"])  # PEP 639 forbids both
    assert "Typing :: Typed" in meta["classifiers"]
    assert (REPO / "fxprune" / "py.typed").is_file()
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["fxprune"]
    requires = project["build-system"]["requires"]
    assert any(r.replace(" ", "").startswith("setuptools>=") and int(r.split(">=")[1].split(".")[0]) >= 77
               for r in requires), "license = 'Apache-2.0' needs setuptools >= 77"


# One fresh interpreter (importing torch is the slow part) in which tqdm and matplotlib cannot
# be imported, as if not installed; it reports what several tests below check.
_PROBE = """
import sys
for name in ("tqdm", "matplotlib"):
    sys.modules[name] = None   # importing it raises ImportError, find_spec says it is not there
import contextlib, importlib, io, json, pkgutil, types
result = {}

# Exports named like submodules stay the functions, whichever is imported first.
import fxprune.testing           # imports fxprune/planning.py and fxprune/tracing.py as submodules
import fxprune.workflow.job      # the workflow job module (run, sweep)
import fxprune, fxprune.workflow
result["modules_not_functions"] = [repr(v) for v in (fxprune.plan, fxprune.trace, fxprune.workflow.run,
                                   fxprune.workflow.sweep) if isinstance(v, types.ModuleType) or not callable(v)]
result["in_dir"] = "prune" in dir(fxprune)
result["criteria"] = fxprune.available_criteria()

# The pass: every core module imports and prunes without the run extra.
import torch
for info in pkgutil.iter_modules(fxprune.__path__):
    if info.name not in ("cli", "__main__") and not info.ispkg:
        importlib.import_module("fxprune." + info.name)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
result["pruned_channels"] = fxprune.prune(model, 0.5).get_submodule("0").out_channels

# The workflow: one clear error naming the extra.
from fxprune.cli import main
err = io.StringIO()
with contextlib.redirect_stderr(err):
    result["run_status"] = main(["run", "--limit", "8", "--data", sys.argv[1] + "/missing", "--out", sys.argv[1] + "/out"])
result["run_stderr"] = err.getvalue()
from fxprune.workflow.errors import ConfigError
from fxprune.workflow.report import plot_channels
try:
    plot_channels(None, None, sys.argv[1] + "/x.png")
except ConfigError as error:
    result["plot_error"] = str(error)
print("RESULT", json.dumps(result))
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("probe")
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _PROBE, str(folder)], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_the_pass_works_without_tqdm_and_matplotlib(probe: dict[str, Any]) -> None:
    assert probe["pruned_channels"] == 4


def test_a_run_without_the_run_extra_is_one_clear_error(probe: dict[str, Any]) -> None:
    assert probe["run_status"] == 2
    lines = probe["run_stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fxprune: error: "), lines
    assert "tqdm and matplotlib" in lines[0] and "pip install 'fxprune[run]'" in lines[0]
    assert "fxprune[run]" in probe["plot_error"]


# --------------------------------------------------------------------------------------------
# Lazy exports behave like the eager imports they replace
# --------------------------------------------------------------------------------------------
def _type_checking_imports(path: Path) -> dict[str, str]:
    """name -> submodule of the ``if TYPE_CHECKING:`` imports of a package's __init__."""
    found: dict[str, str] = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom)
                module = "." + imp.module.rsplit(".", 1)[-1] if imp.level == 0 else "." + (imp.module or "")
                found.update({alias.name: module for alias in imp.names})
    return found


@pytest.mark.parametrize("package", ["fxprune", "fxprune.workflow"])
def test_lazy_exports_match_the_type_checking_imports_and_all(package: str) -> None:
    module = sys.modules[package] if package in sys.modules else __import__(package, fromlist=["_"])
    path = Path(module.__file__)
    table = {name: sub for sub, names in module._EXPORTS.items() for name in names}
    assert _type_checking_imports(path) == table
    assert set(module.__all__) - {"__version__"} == set(table)
    for name in module.__all__:
        assert getattr(module, name) is not None


def test_exports_stay_the_functions_after_every_submodule_is_imported(probe: dict[str, Any]) -> None:
    assert probe["modules_not_functions"] == [] and probe["in_dir"]


@pytest.mark.parametrize("package", ["fxprune", "fxprune.workflow"])
def test_no_export_shares_its_name_with_a_submodule(package: str) -> None:
    # ``import fxprune.plan as P`` used to bind the function plan(), not fxprune/plan.py: an
    # export named like a submodule shadows it (or is shadowed). The modules were renamed.
    module = sys.modules[package] if package in sys.modules else __import__(package, fromlist=["_"])
    submodules = {info.name for info in pkgutil.iter_modules(module.__path__)}
    exports = {name for names in module._EXPORTS.values() for name in names}
    assert not exports & submodules


def test_importing_a_submodule_as_a_name_binds_the_module() -> None:
    import fxprune.planning as planning
    import fxprune.tracing as tracing
    import fxprune.workflow.job as job

    assert all(isinstance(m, types.ModuleType) for m in (planning, tracing, job))
    assert planning.PruningPlan is fxprune.PruningPlan and job.run is fxprune.workflow.run


# --------------------------------------------------------------------------------------------
# The options: suggestions, choices, defaults
# --------------------------------------------------------------------------------------------
def _error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    status = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("fxprune: error: "), err
    return err[0]


@pytest.mark.parametrize("argv, hint", [
    (["run", "--ratoi", "0.3"], "did you mean --ratio?"),
    (["run", "--target-mcas=0.5"], "did you mean --target-macs?"),
    (["sweep", "--ratioz", "0.3"], "did you mean --ratios?"),
    (["prune", "--ignroe", "fc"], "did you mean --ignore?"),
    (["prun"], "did you mean 'prune'?"),
    (["run", "--optimizer", "adamm"], "did you mean 'adamw'?"),
])
def test_misspelt_options_and_choices_get_a_suggestion(capsys: pytest.CaptureFixture[str], argv: list[str],
                                                        hint: str) -> None:
    line = _error_line(capsys, argv)
    assert line.endswith(f"{hint} (see 'fxprune{' ' + argv[0] if argv[0] != 'prun' else ''} --help')"), line


def test_an_option_of_another_command_is_not_suggested(capsys: pytest.CaptureFixture[str]) -> None:
    line = _error_line(capsys, ["prune", "--epochs", "3"])
    assert "fxprune prune: unrecognized arguments: --epochs 3 (see 'fxprune prune --help')" in line


def test_importance_choices_agree_with_the_registry_and_are_in_help(probe: dict[str, Any]) -> None:
    # From a fresh interpreter: other tests may have registered criteria of their own.
    from fxprune.workflow.cli_args import IMPORTANCE_CHOICES

    assert list(IMPORTANCE_CHOICES) == probe["criteria"]
    parser = __import__("fxprune.cli", fromlist=["build_parser"]).build_parser()
    for command in ("run", "prune"):
        text = " ".join(parser._subparsers._group_actions[0].choices[command].format_help().split())
        assert f"criterion: {', '.join(IMPORTANCE_CHOICES)}" in text, command


def test_parser_defaults_are_the_run_config_defaults() -> None:
    from fxprune.workflow import cli_args
    from fxprune.workflow.job import DEFAULT_RATIO, RunConfig

    defaults = RunConfig()
    for name, value in cli_args.RUN_DEFAULTS.items():
        assert getattr(defaults, name) == value, name
    assert cli_args.DEFAULT_RATIO == DEFAULT_RATIO
    args = cli_args.build_parser().parse_args(["run"])
    assert cli_args.config_from_args(args) == RunConfig()


def test_prune_and_run_share_ratio_wording_and_defaults() -> None:
    from fxprune.cli import build_parser
    from fxprune.workflow.cli_args import DATALESS_IMPORTANCE

    parser = build_parser()
    choices = parser._subparsers._group_actions[0].choices
    helps = {command: {a.dest: (a.default, a.help) for a in choices[command]._actions}
             for command in ("run", "prune")}
    for dest in ("ratio", "target_macs", "ignore", "model"):
        run_default, run_help = helps["run"][dest]
        prune_default, prune_help = helps["prune"][dest]
        assert run_default == prune_default, dest
        if dest in ("ratio", "target_macs", "ignore"):
            assert run_help == prune_help, dest
    # The job scores with data (Taylor); fxprune prune has none, so it scores the weights.
    assert helps["run"]["importance"][0] == "taylor"
    assert helps["prune"]["importance"][0] == DATALESS_IMPORTANCE == "l1"


# --------------------------------------------------------------------------------------------
# fxprune prune: --weights, --ignore, --target-macs
# --------------------------------------------------------------------------------------------
def small_net(num_classes: int = 10) -> nn.Module:
    """A small CNN for ``fxprune prune --model tests.test_packaging:small_net``."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))


def test_prune_with_weights_ignore_and_target_macs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file

    torch.manual_seed(0)
    weights = small_net().state_dict()
    torch.save(weights, tmp_path / "w.pt")
    out = tmp_path / "pruned"
    status = main(["prune", "--model", "tests.test_packaging:small_net", "--num-classes", "10",
                   "--weights", str(tmp_path / "w.pt"), "--target-macs", "0.6", "--ignore", "0",
                   "--image-size", "16", "--runs", "1", "--save", str(out)])
    text = capsys.readouterr().out
    assert status == 0, text
    assert "to at most 0.6 of its MACs, ignoring 0 (l1)" in text
    macs = next(line.split() for line in text.splitlines() if line.startswith("MACs"))
    assert float(macs[-1].rstrip("x")) <= 0.6
    saved = load_file(str(out / "weights.safetensors"))
    # Module 0 is ignored: its output channels, and so its weights, are the file's, untouched.
    assert torch.equal(saved["0.weight"], weights["0.weight"])
    assert saved["3.weight"].shape[0] < 32  # the target was met by pruning elsewhere


def test_prune_refuses_ratio_with_target_macs_like_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prune_line = _error_line(capsys, ["prune", "--ratio", "0.3", "--target-macs", "0.5"])
    run_line = _error_line(capsys, ["run", "--ratio", "0.3", "--target-macs", "0.5",
                                    "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert "contradict each other" in prune_line and prune_line == run_line


def test_prune_with_weights_that_do_not_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(small_net(num_classes=3).state_dict(), tmp_path / "w.pt")
    line = _error_line(capsys, ["prune", "--model", "tests.test_packaging:small_net", "--num-classes", "10",
                                "--weights", str(tmp_path / "w.pt"), "--image-size", "16"])
    assert "do not fit" in line and "11.weight" in line
    line = _error_line(capsys, ["prune", "--weights", str(tmp_path / "nothing.pt")])
    assert "--weights" in line and "no such file" in line


def test_prune_default_ratio_is_run_default() -> None:
    from fxprune.cli import build_parser
    from fxprune.workflow.job import DEFAULT_RATIO

    args = build_parser().parse_args(["prune"])
    assert args.ratio is None and args.target_macs is None
    assert __import__("fxprune.cli", fromlist=["_"])._amount(args)["ratio"] == DEFAULT_RATIO


# --------------------------------------------------------------------------------------------
# Smaller items
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank, prints", [("0", True), ("1", False)])
def test_only_rank_0_prints_the_run_summary(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                            rank: str, prints: bool) -> None:
    import importlib

    from fxprune.workflow import cli_args

    run_module = importlib.import_module("fxprune.workflow.job")
    report = {"baseline": {"top1": 90.0}, "pruned": {"top1": 89.0}, "reduction": {"macs_x": 4.0}}
    monkeypatch.setattr(run_module, "run", lambda config: report)
    monkeypatch.setattr(cli_args, "run", run_module.run, raising=False)  # never a real run, whatever binds it
    monkeypatch.setenv("RANK", rank)
    assert cli_args.main_run(cli_args.build_parser().parse_args(["run"])) == 0
    out = capsys.readouterr().out
    assert bool(out.strip()) is prints
    if prints:
        assert json.loads(out)["macs_x"] == 4.0


def test_workers_reach_the_training_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from fxprune.workflow import finetune
    from fxprune.workflow.job import RunConfig, run

    from .workflow.helpers import synthetic_images, write_idx

    data = tmp_path / "fmnist"
    data.mkdir()
    for split, count in (("train", 40), ("t10k", 20)):
        images, labels = synthetic_images(count, seed=1)
        write_idx(data / f"{split}-images-idx3-ubyte.gz", images[:, 0].numpy())
        write_idx(data / f"{split}-labels-idx1-ubyte.gz", labels.numpy().astype(np.uint8))

    seen: list[Any] = []

    class Stop(Exception):
        pass

    def recording_loader(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("num_workers"))
        raise Stop  # the loader's settings are all this test needs

    monkeypatch.setattr(finetune, "make_loader", recording_loader)
    with pytest.raises(Stop):
        run(RunConfig(model="tests.workflow.helpers:TinyNet", data=str(data), workers=2, out=str(tmp_path / "out"),
                      quiet=True, compile=False, threads=1, baseline_epochs=1, epochs=1, batch_size=10))
    assert seen == [2]


def test_saved_folder_follows_the_umask(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    pruned = fxprune.prune(model, 0.5)
    before = os.umask(0o022)
    try:
        fxprune.save(pruned, tmp_path / "a")
        os.umask(0o027)
        fxprune.save(pruned, tmp_path / "b")
    finally:
        os.umask(before)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o750
    assert ((tmp_path / "a") / "meta.json").stat().st_mode & 0o777 == 0o644


def test_assert_equivalent_without_the_plans_example_inputs_says_so() -> None:
    from fxprune.testing import assert_equivalent

    from .zoo import LinearSENet

    torch.manual_seed(0)
    model = LinearSENet().eval()
    x = torch.randn(2, 3, 8, 8)
    plan = fxprune.plan(model, 0.5, example_inputs=(x,))
    pruned = fxprune.apply(model, plan, example_inputs=(x,))
    with pytest.warns(fxprune.FxPruneWarning), pytest.raises(fxprune.PlanMismatchError) as error:
        assert_equivalent(model, pruned, plan, (x,))
    assert "analysed without example_inputs" in str(error.value)
    assert "pass the same example_inputs= that fxprune.plan/prune was given" in str(error.value)
    assert_equivalent(model, pruned, plan, (x,), example_inputs=(x,))  # the hint's fix works


def test_prune_without_ratio_or_target_says_what_is_required() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    with pytest.raises(ValueError) as error:
        fxprune.prune(model)
    text = str(error.value)
    assert "a ratio or a target is required" in text and "fxprune.prune(model, 0.5)" in text
    assert "target_macs=0.5" in text and "got None" not in text
