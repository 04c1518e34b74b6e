"""The launchers: argument handling, one-line config errors with exit code 2, lca-eval."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch import eval as eval_cli
from launch import train as train_cli

REPO = Path(__file__).resolve().parents[2]


def test_no_arguments_means_the_demo_config():
    assert train_cli.split_args([]) == ("demo", [])
    assert train_cli.split_args(["train.steps=3"]) == ("demo", ["train.steps=3"])
    assert train_cli.split_args(["tiny", "train.steps=3"]) == ("tiny", ["train.steps=3"])


def test_config_error_is_one_line_and_exit_code_2_in_a_fresh_process():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "launch.train", "tiny", "model.num_layer=3"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "lca-train: error: unknown config key 'model.num_layer' in override 'model.num_layer=3'; "
        "did you mean 'model.num_layers'?"
    )
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.steps=abc"], "bad value for config key 'train.steps'"),
        (["mesh.data=3"], "mesh does not fit the 8 devices"),
        (["train.seq_len=66"], "train.seq_len=66 is not divisible by 4"),
        (["runtime.cpu_devices=4"], "JAX already started with 8 devices"),
    ],
)
def test_config_errors_print_one_line(overrides, message, tmp_path, capsys):
    assert train_cli.main(["tiny", f"run_dir={tmp_path}", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lca-train: error: ") and message in err and "\n" not in err


def test_eval_cli_errors(tmp_path, capsys):
    assert eval_cli.main([]) == 2
    assert eval_cli.main([str(tmp_path)]) == 2
    assert "has no config.yaml" in capsys.readouterr().err
