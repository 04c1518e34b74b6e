"""A run that cannot start says why in one line, exits 2 and leaves nothing behind."""

import re
from pathlib import Path

import pytest

from launch import eval as eval_cli
from launch import train as train_cli
from lca.config import load_config, save_config


def one_line_error(capsys, prog="lca-train"):
    err = capsys.readouterr().err
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def file_in_the_way(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return path


@pytest.mark.parametrize(
    "run_dir, message",
    [
        (lambda tmp, f: f / "run", "is a file"),
        (lambda tmp, f: "/proc/lca-run", "is not writable"),
    ],
    ids=["under_a_file", "proc"],
)
def test_a_run_dir_that_cannot_be_written(run_dir, message, tmp_path, file_in_the_way, capsys):
    target = run_dir(tmp_path, file_in_the_way)
    assert train_cli.main(["tiny", f"run_dir={target}"]) == 2
    assert message in one_line_error(capsys)


def text_dir_with(tmp_path, *names):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in names:
        (corpus / name).write_text("some text " * 100)
    return corpus


@pytest.mark.parametrize(
    "files, overrides, message",
    [
        (None, [], "is not a directory"),
        ((), [], "no non-empty files match"),
        (("only.txt",), ["eval.at_end=true"], "split of the 1 file(s)"),
    ],
    ids=["missing", "empty", "single_file"],
)
def test_a_text_dir_without_enough_files(files, overrides, message, tmp_path, capsys):
    corpus = tmp_path / "missing" if files is None else text_dir_with(tmp_path, *files)
    run_dir = tmp_path / "run"
    argv = ["tiny", f"run_dir={run_dir}", "data.source=text_dir", f"data.path={corpus}", *overrides]
    assert train_cli.main(argv) == 2
    err = one_line_error(capsys)
    assert message in err and "split='all'" not in err
    if files:
        assert "data.eval_fraction" in err
    if "eval.at_end=true" in overrides:
        assert "eval.at_end=false" in err
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=0", "'train.lr' must be in (0, inf), got 0.0"),
        ("train.lr=-1e-3", "'train.lr' must be in (0, inf)"),
        ("train.b2=1.5", "'train.b2' must be in [0, 1)"),
        ("train.clip_norm=0", "'train.clip_norm' must be in (0, inf]"),
        ("train.warmup_steps=-1", "'train.warmup_steps' must be >= 0"),
        ("train.grad_accum=0", "'train.grad_accum' must be >= 1"),
        ("eval.depths=[0.5,2]", "'eval.depths' must hold depths in [0, 1]"),
        ("eval.context_lengths=[128,512]", "'eval.context_lengths' holds 128, too short for "
                                           "eval.retrieval_task='passkey' (passkey: context_len=128 is too short "
                                           "for the prompt; use >= 243 tokens)"),
        ("eval.retrieval_task=pasky", "'eval.retrieval_task' has unknown value 'pasky'; did you mean 'passkey'?"),
    ],
)
def test_impossible_values_are_refused_at_load_time(override, message, tmp_path, capsys):
    assert train_cli.main(["tiny", f"run_dir={tmp_path / 'run'}", override]) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_lca_eval_without_checkpoints_is_one_line(tmp_path, capfd):
    run_dir = tmp_path / "no_checkpoints"
    save_config(load_config("tiny", [f"run_dir={run_dir}"]), run_dir)
    assert eval_cli.main([str(run_dir)]) == 2
    err = capfd.readouterr().err
    assert err.startswith("lca-eval: error: ") and "has no checkpoint to evaluate" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]


def test_an_impl_these_devices_cannot_run_is_one_line_before_anything_is_written(tmp_path, capsys):
    """impl=cudnn on CPU: refused with the impls that would run, before a run_dir is written."""
    run_dir = tmp_path / "run"
    assert train_cli.main(["tiny", f"run_dir={run_dir}", "model.attention.impl=cudnn"]) == 2
    assert "'model.attention.impl': impl='cudnn' runs cuDNN's fused attention and needs a CUDA GPU" in (
        one_line_error(capsys))
    assert not run_dir.exists()
    # lca-eval runs the same check before it looks for a checkpoint (this run has none).
    save_config(load_config("tiny", [f"run_dir={run_dir}", "model.attention.impl=cudnn"]), run_dir)
    assert eval_cli.main([str(run_dir)]) == 2
    assert re.search(r"needs a CUDA GPU.*'blockwise', 'pallas'", one_line_error(capsys, "lca-eval"))
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]


def test_lca_eval_on_fewer_fake_devices_than_the_run_names_runtime_cpu_devices(tmp_path):
    """A run trained as 2 processes x 4 devices, evaluated by one process: its saved cpu_devices=4 is the cause.
    A fresh process: the fake device count is fixed once JAX starts."""
    import os
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    save_config(load_config("tiny", [f"run_dir={run_dir}", "runtime.cpu_devices=4"]), run_dir)
    (run_dir / "checkpoints" / "2").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run([sys.executable, "-m", "launch.eval", str(run_dir)], capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}, timeout=300)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "runtime.cpu_devices=4 per process sets that count" in done.stderr, done.stderr
