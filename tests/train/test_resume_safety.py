"""Resuming never loses a good checkpoint: a changed config stops first, only unreadable checkpoints are set aside."""

import logging
import shutil

import pytest

from lca.config import ConfigError
from lca.train.checkpoint import Checkpointer, CheckpointMismatch
from lca.train.setup import build_mesh, make_setup


def copy_run(finished_run, tmp_path, name="run"):
    reference, _ = finished_run
    run_dir = tmp_path / name
    shutil.copytree(reference, run_dir)
    return run_dir


def truncate_largest_file(checkpoint_dir):
    victim = max((p for p in (checkpoint_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])


def listing(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


def test_a_config_that_changes_the_state_stops_before_touching_anything(finished_run, tmp_path, tiny):
    from lca.train import train

    run_dir = copy_run(finished_run, tmp_path)
    saved = (run_dir / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"model\.d_model 32 -> 64.*new run_dir.*checkpoint\.allow_config_change=true"):
        train(tiny(run_dir, "model.d_model=64", "train.steps=10"))
    assert listing(run_dir) == ["6", "8"]
    assert (run_dir / "config.yaml").read_text() == saved


def test_a_forced_change_of_shapes_is_a_mismatch_not_corruption(finished_run, tmp_path, tiny):
    from lca.train import train

    run_dir = copy_run(finished_run, tmp_path)
    with pytest.raises(CheckpointMismatch, match=r"checkpoint 8 .* saved \(32, 16\) float32, wanted \(64, 32\)"):
        train(tiny(run_dir, "model.d_model=64", "checkpoint.allow_config_change=true"))
    assert listing(run_dir) == ["6", "8"]  # nothing set aside


def test_rerunning_a_finished_run_says_so_without_compiling(finished_run, tmp_path, tiny, caplog):
    from lca.train import train

    run_dir = copy_run(finished_run, tmp_path)
    with caplog.at_level(logging.INFO):
        result = train(tiny(run_dir, "train.log_every=4", "eval.num_batches=2"))  # harmless changes
    assert result["already_finished"] and result["final"]["step"] == 8
    assert f"resuming from step 8 ({run_dir / 'checkpoints' / '8'})" in caplog.text
    assert "already finished" in caplog.text and "compiled" not in caplog.text
    assert listing(run_dir) == ["6", "8"]


def test_a_set_aside_never_deletes_an_earlier_one(finished_run, tmp_path, tiny):
    """The same step unreadable twice (saved again after the first was set aside): both copies are kept."""
    run_dir = copy_run(finished_run, tmp_path)
    ckpt_dir = run_dir / "checkpoints"
    cfg = tiny(run_dir)
    setup = make_setup(cfg, build_mesh(cfg))
    for _ in range(2):
        shutil.copytree(ckpt_dir / "8", ckpt_dir / "10")
        truncate_largest_file(ckpt_dir / "10")
        ckpt = Checkpointer(ckpt_dir, every=2, keep=2)
        step, _ = ckpt.restore_latest(setup.abstract_state)
        ckpt.close()
        assert step == 8
    names = listing(run_dir)
    assert len([n for n in names if n.startswith("10.corrupt-")]) == 2, names
    assert {"6", "8"} <= set(names)  # keep=2 counts only good checkpoints


def test_every_checkpoint_unreadable_stops_unless_asked_to_restart(finished_run, tmp_path, tiny):
    from lca.train import train

    run_dir = copy_run(finished_run, tmp_path)
    for step in ("6", "8"):
        truncate_largest_file(run_dir / "checkpoints" / step)
    for _ in range(2):  # the second run finds only the set-aside ones: it stops too
        with pytest.raises(ConfigError, match="no usable checkpoint is left.*checkpoint.restart_if_unusable=true"):
            train(tiny(run_dir))
    assert len(listing(run_dir)) == 2 and all(".corrupt-" in n for n in listing(run_dir))
