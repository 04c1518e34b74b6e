"""Evaluation of a finished run through ``lca-eval RUN_DIR``: bits per byte and the passkey grid."""

import json

from launch import eval as eval_cli


def test_eval_cli_on_a_finished_run(finished_run, capsys):
    run_dir, _ = finished_run
    overrides = ["eval.num_batches=1", "eval.batch=2", "eval.context_lengths=[256]", "eval.depths=[0.5]"]
    assert eval_cli.main([str(run_dir), *overrides]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 8 and 0 < summary["bits_per_byte"] < 20
    assert 0.0 <= summary["retrieval_accuracy"] <= 1.0
    assert {p.name for p in (run_dir / "eval" / "step_8").iterdir()} >= {"summary.json", "passkey_retrieval.md",
                                                                        "passkey_retrieval.png"}


def test_eval_only_reads_checkpoints_and_keeps_each_steps_results(finished_run, tmp_path, capsys):
    """A corrupt newest checkpoint is skipped, not moved; results go to eval/step_N/ and to TensorBoard."""
    import shutil

    reference, _ = finished_run
    run_dir = tmp_path / "evaluated"
    shutil.copytree(reference, run_dir, ignore=shutil.ignore_patterns("eval"))
    # every array data file: eval reads the parameters only, so damage to the optimizer's alone would not count
    for victim in (run_dir / "checkpoints" / "8" / "state").glob("ocdbt.process_*/d/*"):
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*")}
    events = set((run_dir / "tensorboard").iterdir())

    overrides = ["eval.num_batches=1", "eval.batch=2", "eval.context_lengths=[256]", "eval.depths=[0.5]"]
    assert eval_cli.main([str(run_dir), *overrides]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 6
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*")} == before
    assert [p.name for p in (run_dir / "eval").iterdir()] == ["step_6"]
    assert set((run_dir / "tensorboard").iterdir()) > events  # eval/* scalars next to the training curves


def test_eval_restores_the_parameters_only(finished_run, monkeypatch, capsys):
    """The optimizer's moments (twice the parameters under Adam) are never read into memory by lca-eval."""
    from lca.train.checkpoint import Checkpointer

    restored, restore = [], Checkpointer._restore

    def spy(self, *args, **kwargs):
        state, data = restore(self, *args, **kwargs)
        restored.append(sorted(state))
        return state, data

    monkeypatch.setattr(Checkpointer, "_restore", spy)
    run_dir, _ = finished_run
    overrides = ["eval.num_batches=1", "eval.batch=2", "eval.context_lengths=[256]", "eval.depths=[0.5]"]
    assert eval_cli.main([str(run_dir), *overrides]) == 0
    assert restored == [["params"]]


def test_eval_batches_are_split_over_processes():
    """Each process reads its own rows; in process order they are the one-process batch."""
    import numpy as np

    from lca.data.pipeline import DataConfig, eval_batches

    args = dict(seq_len=64, batch=4, num_batches=2, seed=3)
    whole = eval_batches(DataConfig(), **args, process_index=0, process_count=1)
    parts = [eval_batches(DataConfig(), **args, process_index=p, process_count=2) for p in range(2)]
    for i, batch in enumerate(whole):
        for key, rows in batch.items():
            assert parts[0][i][key].shape[0] == 2
            np.testing.assert_array_equal(np.concatenate([parts[0][i][key], parts[1][i][key]]), rows)


def test_held_out_text_leaves_the_task_mixture_out(tmp_path):
    """Bits per byte are measured on the corpus: data.mixture's passkey batches are not held-out text."""
    import numpy as np

    from lca.train.evaluate import held_out_batches
    from tests.train.conftest import tiny_config

    shared = ["train.seq_len=256", "eval.batch=2", "eval.num_batches=4"]
    plain = held_out_batches(tiny_config(tmp_path, *shared))
    mixed = held_out_batches(tiny_config(tmp_path, *shared, "data.mixture={passkey: 0.5}", "data.task_loss=answer",
                                         "data.task_len_jitter=15"))  # the task knobs go with the tasks
    for ours, theirs in zip(mixed, plain, strict=True):
        for key in theirs:
            np.testing.assert_array_equal(ours[key], theirs[key])
