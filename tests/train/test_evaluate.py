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
