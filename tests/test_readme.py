"""Every ```python block of README.md runs, as written, in a fresh namespace.

A block is self-contained (its own imports and inputs; sizes kept small so the whole file runs
in seconds). A block that cannot run here is marked in the README with the line
``<!-- readme-test: skip REASON -->`` right above it; the test then skips it by name, with that
reason. A ```python block followed by a plain ``` block shows its output: the first line
printed must be that block's first line. The main and test commands are checked as text.
"""

from __future__ import annotations

import contextlib
import io
import re
import signal
import warnings
from pathlib import Path
from typing import Iterator, List, NamedTuple, Optional

import pytest

import fxprune

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*(?P<reason>.*?)\s*-->")
#: A hang guard, not a speed check: a block gets this many seconds.
BUDGET_S = 120


class Block(NamedTuple):
    line: int  # 1-based line of the opening fence
    code: str
    skip: Optional[str]
    output: Optional[str]  # the plain ``` block right after it, if any


def python_blocks(text: str) -> List[Block]:
    lines = text.splitlines()
    blocks: List[Block] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            code = "\n".join(lines[start + 1:j]) + "\n"
            before = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
            match = SKIP.search(before)
            k = j + 1
            while k < len(lines) and not lines[k].strip():
                k += 1
            output = None
            if k < len(lines) and lines[k].strip() == "```":
                end = k + 1
                while lines[end].strip() != "```":
                    end += 1
                output = "\n".join(lines[k + 1:end])
            blocks.append(Block(start + 1, code, match.group("reason") or "marked" if match else None, output))
            i = j + 1
        else:
            i += 1
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


@contextlib.contextmanager
def _budget(seconds: int) -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"README block still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_the_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("block", BLOCKS, ids=[f"line{b.line}" for b in BLOCKS])
def test_readme_block_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           one_thread: None) -> None:
    if block.skip is not None:
        pytest.skip(f"README block at line {block.line}: {block.skip}")
    monkeypatch.chdir(tmp_path)  # blocks that save write under the current folder
    printed = io.StringIO()
    namespace: dict = {"__name__": "__readme__"}
    with _budget(BUDGET_S), contextlib.redirect_stdout(printed), warnings.catch_warnings():
        warnings.simplefilter("ignore", fxprune.FxPruneWarning)
        exec(compile(block.code, f"README.md:{block.line}", "exec"), namespace)
    if block.output is not None:
        assert printed.getvalue().splitlines()[:1] == block.output.splitlines()[:1]


def _command(marker: str) -> str:
    lines = README.read_text(encoding="utf-8").splitlines()
    at = lines.index(f"<!-- {marker} -->")
    assert lines[at + 1].startswith("```")
    return lines[at + 2]


def test_main_command_installs_the_run_extra() -> None:
    command = _command("main-command")
    assert "pip install -q -e '.[run]'" in command and command.endswith("fxprune run")


def test_test_command_installs_the_test_extra() -> None:
    command = _command("test-command")
    assert "pip install -q -e '.[test]'" in command  # the test extra includes the run extra
    assert "--doctest-modules fxprune tests" in command


def test_no_internal_history_in_the_readme_and_benchmarks() -> None:
    words = re.compile(r"seed article|last session|\bissue[- ]\d+|\bissue \d+|the issue\b", re.IGNORECASE)
    files = [README, *sorted((README.parent / "benchmarks").rglob("*.md"))]
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            assert not words.search(line), f"{path.name}:{number}: {line}"
