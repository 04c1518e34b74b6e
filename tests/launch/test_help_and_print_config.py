"""lca-train --help lists the shipped configs and says how to see every key; --print-config prints and exits."""

import subprocess
import sys

import pytest
import yaml

from launch import train as train_cli
from lca.config import CONFIG_DIR, load_config, shipped_configs
from tests.fresh_env import REPO, user_env


def test_shipped_configs_are_the_configs_directory():
    assert CONFIG_DIR == REPO / "configs"  # a checkout reads its own configs/; a wheel ships them as lca.configs
    assert {"base", "demo", "tiny"} <= set(shipped_configs())


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["tiny", "train.steps=3", "--help"]])
def test_help_lists_configs_and_how_to_see_every_key(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        train_cli.main(argv)
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lca-train")
    assert f"shipped configs: {', '.join(shipped_configs())}" in out
    assert "--print-config" in out and "lca/config.py" in out


def test_print_config_prints_the_resolved_config_and_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train_cli.main(["tiny", f"run_dir={run_dir}", "train.steps=3", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["steps"] == 3 and printed["run_dir"] == str(run_dir)
    assert printed["train"]["lr"] == load_config("tiny").train.lr  # every key, defaults included
    assert set(printed) >= {"model", "mesh", "data", "train", "checkpoint", "eval", "runtime"}
    assert not run_dir.exists()


def test_print_config_in_a_fresh_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launch.train", "demo", "mesh.context=2", "--print-config"],
                          cwd=tmp_path, env=user_env(PYTHONPATH=str(REPO)), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["mesh"]["context"] == 2
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()


def test_bad_option_and_bad_key_are_one_line_exit_2(tmp_path, capsys):
    assert train_cli.main(["tiny", "--pirnt-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "lca-train: error: unknown option '--pirnt-config'; options are -h, --help, --print-config (see --help)."
    assert train_cli.main(["tiny", "model.num_layer=3", "--print-config"]) == 2
    assert "did you mean 'model.num_layers'" in capsys.readouterr().err


def test_demo_mesh_takes_a_context_override_on_8_devices():
    """The README's `lca-train demo ... mesh.context=2` once failed: data=2 x context=2 is not 8 devices."""
    from lca.parallel import resolve_axis_sizes

    for context in (1, 2, 4, 8):
        mesh = load_config("demo", [f"mesh.context={context}"]).mesh
        sizes = resolve_axis_sizes(dict(data=mesh.data, fsdp=mesh.fsdp, context=mesh.context, tensor=mesh.tensor), 8)
        assert sizes["context"] == context and sizes["data"] * context == 8
