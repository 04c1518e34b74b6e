"""Every shell command and Python block in README.md runs as written.

The README's fenced ```bash/```sh and ```python blocks are extracted in order; each
one is a test case named after its line number and section. An HTML comment on the
line right before a fence (invisible on GitHub) says how a block is run:

    <!-- readme-test: slow -->          takes minutes on a 2-core CPU: runs only under `pytest -m slow`
    <!-- readme-test: continues -->     Python: runs in one process after the Python block before it
                                        (and that block's own predecessors, if it continues too);
                                        the block it continues then runs only as part of it
    <!-- readme-test: ci -->            it is .ci/run's test command: checked to be in .ci/run verbatim
    <!-- readme-test: skip <reason> --> cannot run on a CPU machine at all (e.g. a TPU pod command)

Markers combine with commas: `<!-- readme-test: slow, continues -->`. An unmarked block
is part of the default test run, so keep it to seconds.

How blocks run, as a new user would run them:
- Python: a fresh interpreter in an empty directory, this checkout importable, and none of
  the test setup (no fake devices from tests/conftest.py: a block that needs 8 devices says
  how to get them).
- Shell: `bash -euo pipefail` in a scratch copy of this checkout (a fresh clone: relative
  paths such as runs/demo land there), with a fresh virtualenv first on PATH that has this
  checkout installed (editable, from the copy) and reuses the test interpreter's packages,
  so `pip install -e .`, `lca-train` and `python -m launch.train` work offline.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fresh_env import REPO, copy_checkout, make_venv, user_env

README = REPO / "README.md"
SHELLS = ("bash", "sh", "shell")
PYTHONS = ("python", "py", "python3")
MARKERS = ("slow", "continues", "ci", "skip")
FAST_TIMEOUT_S = 300  # an unmarked block over this is too slow for the default run: mark it slow
SLOW_TIMEOUT_S = 3600


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    section: str
    language: str  # "bash" or "python"
    code: str
    markers: frozenset
    skip_reason: str = ""

    @property
    def name(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.section.lower()).strip("-")[:40]
        return f"L{self.line}-{self.language}-{slug}"


def parse_markers(comment: str, line: int) -> tuple[frozenset, str]:
    markers, reason = set(), ""
    for item in (part.strip() for part in comment.split(",")):
        word, _, rest = item.partition(" ")
        if word not in MARKERS:
            raise ValueError(f"README.md:{line}: unknown readme-test marker {word!r}; known: {list(MARKERS)}")
        if word == "skip":
            reason = rest.strip()
            if not reason:
                raise ValueError(f"README.md:{line}: `readme-test: skip` needs a reason (what makes it unrunnable)")
        markers.add(word)
    return frozenset(markers), reason


def readme_blocks(text: str) -> list[Block]:
    blocks, section, pending = [], "top", None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"^(\s*)(```+|~~~+)\s*([\w+-]*)", line)
        if line.startswith("#") and not fence:
            section = line.lstrip("#").strip()
        marker = re.match(r"^\s*<!--\s*readme-test:\s*(.*?)\s*-->\s*$", line)
        if marker:
            pending = (*parse_markers(marker.group(1), i + 1), i + 1)
            i += 1
            continue
        if fence:
            indent, ticks, language = fence.groups()
            start = i
            body = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(ticks):
                body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
                i += 1
            language = language.lower()
            kind = "bash" if language in SHELLS else "python" if language in PYTHONS else None
            if pending and pending[2] != start:
                raise ValueError(f"README.md:{pending[2]}: a readme-test marker must be on the line right before a fence")
            if kind:
                markers, reason = (pending[0], pending[1]) if pending else (frozenset(), "")
                blocks.append(Block(start + 1, section, kind, "\n".join(body) + "\n", markers, reason))
            pending = None
        elif pending and pending[2] != i + 1 and line.strip():
            raise ValueError(f"README.md:{pending[2]}: a readme-test marker must be on the line right before a fence")
        i += 1
    return blocks


BLOCKS = readme_blocks(README.read_text())


def python_source(block: Block) -> str:
    """The block's code, after the blocks it continues."""
    chain = [block]
    while "continues" in chain[0].markers:
        earlier = [b for b in BLOCKS if b.language == "python" and b.line < chain[0].line]
        if not earlier:
            raise ValueError(f"README.md:{chain[0].line}: marked `continues` but no Python block comes before it")
        chain.insert(0, earlier[-1])
    return "\n".join(f"# README.md:{b.line}\n{b.code}" for b in chain)


def continued_by(block: Block) -> Block | None:
    """The next Python block if it continues this one (and so runs this one's code too)."""
    later = [b for b in BLOCKS if b.language == "python" and b.line > block.line]
    return later[0] if later and "continues" in later[0].markers else None


def case(block: Block):
    marks = [pytest.mark.slow] if "slow" in block.markers else []
    return pytest.param(block, id=block.name, marks=marks)


@pytest.fixture(scope="session")
def user_checkout(tmp_path_factory):
    """(a scratch copy of this checkout, the bin directory of a venv with it installed editable)."""
    root = tmp_path_factory.mktemp("readme")
    checkout = copy_checkout(root / "lca")
    bin_dir = make_venv(root / "venv")
    proc = subprocess.run([bin_dir / "pip", "install", "-q", "--no-deps", "-e", "."], cwd=checkout, env=user_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"installing the checkout copy failed:\n{proc.stdout}\n{proc.stderr}"
    return checkout, bin_dir


def report(block: Block, proc: subprocess.CompletedProcess, what: str) -> str:
    return (f"README.md:{block.line} ({block.section}) {what}, exit code {proc.returncode}. Fix the README (or the "
            f"code) so the block runs as written; if it takes minutes, mark it slow (see tests/test_readme.py).\n"
            f"--- block ---\n{block.code}--- stdout (tail) ---\n{proc.stdout[-4000:]}\n"
            f"--- stderr (tail) ---\n{proc.stderr[-6000:]}")


def run_block(block: Block, cmd: list, cwd: Path, env: dict) -> None:
    timeout = SLOW_TIMEOUT_S if "slow" in block.markers else FAST_TIMEOUT_S
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"README.md:{block.line} ({block.section}) ran over {timeout} s"
                    + ("; make it smaller or mark it `<!-- readme-test: slow -->`" if timeout == FAST_TIMEOUT_S else ""))
    assert proc.returncode == 0, report(block, proc, "failed")


def test_readme_has_blocks():
    languages = {b.language for b in BLOCKS}
    assert {"bash", "python"} <= languages, f"no code blocks extracted from {README}: the parser is broken"


def test_markers_are_read():
    text = "# S\n<!-- readme-test: slow, continues -->\n```python\nx = 1\n```\n```bash\necho hi\n```\n```text\nno\n```\n"
    first, second = readme_blocks(text)
    assert first.markers == {"slow", "continues"} and first.code == "x = 1\n" and first.line == 3
    assert second.markers == frozenset() and second.language == "bash"
    with pytest.raises(ValueError, match="needs a reason"):
        readme_blocks("<!-- readme-test: skip -->\n```bash\nx\n```\n")
    with pytest.raises(ValueError, match="unknown readme-test marker"):
        readme_blocks("<!-- readme-test: fast -->\n```bash\nx\n```\n")
    with pytest.raises(ValueError, match="right before a fence"):
        readme_blocks("<!-- readme-test: slow -->\ntext\n```bash\nx\n```\n")


@pytest.mark.parametrize("block", [case(b) for b in BLOCKS])
def test_readme_block(block: Block, tmp_path, request):
    if "skip" in block.markers:
        pytest.skip(f"README.md:{block.line}: {block.skip_reason}")
    if "ci" in block.markers:
        ci = (REPO / ".ci" / "run").read_text().splitlines()
        for line in block.code.strip().splitlines():
            assert line.strip() in (c.strip() for c in ci), (
                f"README.md:{block.line} is marked `ci` but .ci/run does not run {line.strip()!r}")
        return
    if block.language == "python":
        successor = continued_by(block)
        if successor is not None and "skip" not in successor.markers and successor.markers >= {"slow"} & block.markers:
            pytest.skip(f"runs as the start of README.md:{successor.line}, which continues it")
        run_block(block, [sys.executable, "-c", python_source(block)], cwd=tmp_path,
                  env=user_env(PYTHONPATH=str(REPO)))
        return
    checkout, bin_dir = request.getfixturevalue("user_checkout")
    env = user_env(PATH=f"{bin_dir}:{user_env()['PATH']}", VIRTUAL_ENV=str(bin_dir.parent))
    run_block(block, ["bash", "-euo", "pipefail", "-c", block.code], cwd=checkout, env=env)
