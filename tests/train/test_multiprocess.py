"""Training as a multi-controller job (2 processes x 4 CPU devices), the code path of a pod or a GPU cluster.

One job resumes a run that one process saved, past a corrupt newest checkpoint,
and evaluates at the end: every process must set aside the same checkpoint,
continue from the same step with the data the single process would have read,
and the evaluation must equal a single-process one.
"""

import json
import shutil

import jax
import numpy as np
import pytest

from lca.train.evaluate import evaluate_run
from lca.train.metrics import read_metrics
from tests.train.conftest import run_launcher_processes


def test_two_processes_resume_a_one_process_run_past_a_corrupt_checkpoint(finished_run, tmp_path):
    if jax.device_count() < 8:
        pytest.skip("needs the 8 fake CPU devices of tests/conftest.py")
    reference, _ = finished_run
    run_dir = tmp_path / "two_processes"
    shutil.copytree(reference, run_dir)
    (run_dir / "metrics.jsonl").unlink()
    ckpt_dir = run_dir / "checkpoints"
    victim = max((p for p in (ckpt_dir / "8" / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])

    results = run_launcher_processes(str(run_dir / "config.yaml"), f"run_dir={run_dir}", "eval.at_end=true")
    for rank, (code, log) in enumerate(results):
        assert code == 0, (rank, log[-3000:])
        assert "checkpoint 8" in log and "unreadable" in log, (rank, log[-3000:])
        assert "data-iterator state of 1 processes merged for 2" in log, (rank, log[-3000:])
        assert "resuming from step 6" in log, (rank, log[-3000:])
    assert len(list(ckpt_dir.glob("8.corrupt-*"))) == 1 and (ckpt_dir / "6").is_dir()  # nothing good lost

    got = {step: r["loss"] for step, r in read_metrics(run_dir).items()}
    want = {step: r["loss"] for step, r in read_metrics(reference).items()}
    assert sorted(got) == [7, 8]
    np.testing.assert_allclose([got[7], got[8]], [want[7], want[8]], rtol=2e-5)

    # Each process read the logits of the whole (replicated) eval batch; one process
    # evaluating the checkpoint the job saved must agree.
    two = json.loads((run_dir / "eval" / "step_8" / "summary.json").read_text())["perplexity"]
    one = evaluate_run(run_dir)["perplexity"]
    assert two["tokens"] == one["tokens"]
    np.testing.assert_allclose(two["bits_per_byte"], one["bits_per_byte"], rtol=1e-5)

    # lca-eval launched as the job was: the run's mesh spans both processes, each prints the same result.
    # The saved config.yaml holds no launch fields (process 0's id would be every process's).
    assert "process_id: null" in (run_dir / "config.yaml").read_text()
    results = run_launcher_processes(str(run_dir), "eval.context_lengths=[256]", "eval.depths=[0.5]",
                                     module="launch.eval")
    for rank, (code, log) in enumerate(results):
        assert code == 0, (rank, log[-3000:])
        printed = json.loads([line for line in log.splitlines() if line.startswith("{")][-1])
        assert printed["step"] == 8 and printed["tokens"] == one["tokens"], (rank, printed)
        np.testing.assert_allclose(printed["bits_per_byte"], one["bits_per_byte"], rtol=1e-5)


@pytest.mark.slow
def test_sigterm_stops_every_process_after_the_same_step_with_a_checkpoint(tmp_path):
    """Both processes get SIGTERM while paused after step 3: they agree, save checkpoint 3 and exit 143."""
    import signal

    from lca.train.loop import PAUSE_AT_STEP_ENV
    from tests.train.conftest import start_launcher_processes

    if jax.device_count() < 8:
        pytest.skip("needs the 8 fake CPU devices of tests/conftest.py")
    run_dir = tmp_path / "signalled"
    procs = start_launcher_processes("tiny", f"run_dir={run_dir}", env={PAUSE_AT_STEP_ENV: "3"})
    try:
        logs = []
        for proc in procs:
            lines = []
            for line in proc.stderr:
                lines.append(line)
                if "paused after step 3" in line:
                    break
            logs.append(lines)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc, lines in zip(procs, logs):
            lines.append(proc.stderr.read())
            proc.wait(timeout=120)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, lines in zip(procs, logs):
        text = "".join(lines)
        assert proc.returncode == 128 + signal.SIGTERM, text[-3000:]
        assert "lca-train: stopped by SIGTERM after step 3 of 8; checkpoint 3 saved" in text, text[-3000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2", "3"]
