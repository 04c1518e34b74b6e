"""What a new user has: a copy of the checkout, a fresh virtualenv, an environment without test setup.

Used by the README and wheel-install tests. The virtualenv reuses the packages of
the interpreter running the tests (a ``.pth`` file), so installing lca into it
needs no network: dependencies are already satisfied, and only the build backend
comes from the package index.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Set by tests/conftest.py for the test process itself; a new user's shell has none of them.
TEST_ONLY_ENV = ("XLA_FLAGS", "JAX_PLATFORMS", "JAX_NUM_CPU_DEVICES", "PYTHONPATH", "VIRTUAL_ENV")


def user_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TEST_ONLY_ENV and not k.startswith("PYTEST")}
    return {**env, **extra}


def copy_checkout(dst: Path) -> Path:
    """The checkout's tracked and untracked-but-not-ignored files (what a fresh clone plus edits has)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                                capture_output=True, check=True).stdout.decode().split("\0")
        files = [name for name in listed if name and (REPO / name).is_file()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: everything but build output
        ignore = shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__")
        shutil.copytree(REPO, dst, ignore=ignore)
        return dst
    for name in files:
        target = dst / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    return dst


def make_venv(path: Path) -> Path:
    """A new virtualenv that sees this interpreter's installed packages; returns its bin directory."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    bin_dir = path / "bin"
    purelib = subprocess.run([bin_dir / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in (*site.getsitepackages(), site.getusersitepackages()) if Path(p).is_dir()]
    Path(purelib, "_reuse_test_packages.pth").write_text("\n".join(ours) + "\n")
    # pip itself comes from the reused packages: `python -m pip` and a `pip` script.
    (bin_dir / "pip").write_text(f'#!/bin/sh\nexec "{bin_dir / "python"}" -m pip "$@"\n')
    (bin_dir / "pip").chmod(0o755)
    return bin_dir

