"""A wheel install works away from the checkout: configs ship as package data, the launcher runs.

Slow (a build and a short training run); CI runs it from .ci/run.
"""

import subprocess
import sys

import pytest

from tests.fresh_env import copy_checkout, make_venv, user_env

pytestmark = pytest.mark.slow


def run(cmd, cwd, timeout=600):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=user_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def test_wheel_install_ships_configs_and_trains(tmp_path):
    source = copy_checkout(tmp_path / "source")
    run([sys.executable, "-m", "pip", "wheel", source, "--no-deps", "-q", "-w", tmp_path / "dist"], cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("lca-*.whl")
    bin_dir = make_venv(tmp_path / "venv")
    # Dependencies are satisfied by the reused packages; --force-reinstall in case a checkout of lca is
    # installed (editable) in the environment running the tests.
    run([bin_dir / "pip", "install", "-q", "--no-deps", "--force-reinstall", wheel], cwd=tmp_path)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run([bin_dir / "python", "-c", "import lca, lca.config as c; print(lca.__file__); print(c.CONFIG_DIR)"],
                cwd=elsewhere)
    assert str(tmp_path / "venv") in where and str(source) not in where, where

    help_text = run([bin_dir / "lca-train", "--help"], cwd=elsewhere)
    # Every config of the checkout ships in the wheel.
    expected = ", ".join(sorted(path.stem for path in (source / "configs").glob("*.yaml")))
    assert f"shipped configs: {expected}" in help_text
    printed = run([bin_dir / "lca-train", "demo", "--print-config"], cwd=elsewhere)
    assert "name: demo" in printed and "context: 4" in printed

    log = run([bin_dir / "lca-train", "tiny", "train.steps=2", "checkpoint.every=2", "run_dir=run"], cwd=elsewhere)
    assert "step 2/2" in log
    assert (elsewhere / "run" / "config.yaml").is_file() and (elsewhere / "run" / "metrics.jsonl").is_file()
