"""Fine-tuning (``train.init_from``): a fresh run takes another run's parameters, and nothing else of it."""

import logging
import shutil

import numpy as np
import jax
import pytest

from lca.config import ConfigError
from lca.train.checkpoint import Checkpointer
from lca.train.setup import build_mesh, make_setup


def saved_state(cfg, run_dir, step=None):
    """``(step, state)`` of checkpoint ``step`` (default: the newest) of ``run_dir``, read independently of init_from."""
    setup = make_setup(cfg, build_mesh(cfg))
    ckpt = Checkpointer(run_dir / "checkpoints", every=2, keep=10, read_only=True)
    try:
        if step is None:
            return ckpt.restore_latest(setup.abstract_state)
        return step, ckpt._restore(step, setup.abstract_state, with_data=False)[0]
    finally:
        ckpt.close()


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_fine_tune_starts_from_the_named_checkpoints_parameters_and_nothing_else(finished_run, tmp_path, tiny,
                                                                                     caplog):
    from lca.train import train

    source, _ = finished_run
    run_dir = tmp_path / "tuned"
    # An lr far below float32 resolution leaves the parameters where they started: the saved ones are the loaded ones.
    cfg = tiny(run_dir, f"train.init_from={source / 'checkpoints' / '6'}", "train.steps=2", "train.lr=1e-30",
               "train.seed=7", "eval.at_end=false", "checkpoint.every=1")
    with caplog.at_level(logging.INFO):
        train(cfg)
    assert f"from the parameters of {source / 'checkpoints' / '6'}" in caplog.text
    _, source_state = saved_state(tiny(source), source, step=6)
    step, tuned = saved_state(cfg, run_dir)
    assert step == 2 and int(tuned["step"]) == 2  # its own step count, not the source's
    assert_trees_equal(tuned["params"], source_state["params"])
    # The optimizer started anew: two steps of moments, not eight.
    count = [np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tuned["opt_state"]) if "count" in str(p)]
    assert count and all(int(c) == 2 for c in count)


def test_a_run_dir_means_its_newest_checkpoint(finished_run, tmp_path, tiny):
    from lca.train import train

    source, _ = finished_run
    run_dir = tmp_path / "tuned"
    cfg = tiny(run_dir, f"train.init_from={source}", "train.steps=1", "train.lr=1e-30", "eval.at_end=false")
    train(cfg)
    _, source_state = saved_state(tiny(source), source, step=8)
    assert_trees_equal(saved_state(cfg, run_dir)[1]["params"], source_state["params"])


def test_a_resumed_fine_tune_uses_its_own_checkpoints_not_init_from(finished_run, tmp_path, tiny, caplog):
    from lca.train import train

    source, _ = finished_run
    moved = tmp_path / "source"
    shutil.copytree(source, moved)
    run_dir = tmp_path / "tuned"
    train(tiny(run_dir, f"train.init_from={moved}", "train.steps=2", "eval.at_end=false"))
    shutil.rmtree(moved)  # the source may be gone once the fine-tune has checkpoints of its own
    with caplog.at_level(logging.INFO):
        result = train(tiny(run_dir, f"train.init_from={moved}", "train.steps=4", "eval.at_end=false"))
    assert "resuming from step 2" in caplog.text and result["final"]["step"] == 4


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_a_path_without_a_checkpoint_stops_before_writing(tmp_path, tiny, where):
    from lca.train import train

    source = tmp_path / "source"
    if where == "empty":
        source.mkdir()
    run_dir = tmp_path / "tuned"
    with pytest.raises(ConfigError, match=r"train\.init_from=.*source.* holds no checkpoint.*RUN/checkpoints/STEP"):
        train(tiny(run_dir, f"train.init_from={source}"))
    assert not run_dir.exists()


def test_other_parameter_shapes_stop_before_writing(finished_run, tmp_path, tiny):
    from lca.train import train

    source, _ = finished_run
    run_dir = tmp_path / "tuned"
    with pytest.raises(ConfigError, match=r"train\.init_from: the parameters of checkpoint .*8 differ.*"
                                          r"saved \(32, 16\) float32, wanted \(64, 32\).*same model"):
        train(tiny(run_dir, f"train.init_from={source}", "model.d_model=64"))
    assert not run_dir.exists()


def test_an_unreadable_source_checkpoint_is_named_and_left_alone(finished_run, tmp_path, tiny):
    from lca.train import train

    source = tmp_path / "source"
    shutil.copytree(finished_run[0], source)
    for data_file in (source / "checkpoints" / "8" / "state").rglob("d/*"):  # every array file, params' too
        data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 3])
    run_dir = tmp_path / "tuned"
    with pytest.raises(ConfigError, match=r"checkpoint .*8 cannot be read .*name an earlier step"):
        train(tiny(run_dir, f"train.init_from={source}"))
    assert sorted(p.name for p in (source / "checkpoints").iterdir()) == ["6", "8"]  # nothing moved in the source
