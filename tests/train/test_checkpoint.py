"""Checkpoints: kill -9 and resume bit-identically, restore on 4 devices, skip a corrupt latest."""

import hashlib
import inspect
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from lca.train.checkpoint import Checkpointer
from lca.train.loop import KILL_AT_STEP_ENV
from lca.train.setup import build_mesh, make_setup
from lca.train.metrics import read_metrics


def losses(run_dir):
    return {step: record["loss"] for step, record in read_metrics(run_dir).items()}


def test_kill_9_then_resume_is_bit_identical(finished_run, tmp_path, launcher, tiny):
    from lca.train import train

    reference, _ = finished_run
    run_dir = tmp_path / "killed"
    killed = launcher("tiny", f"run_dir={run_dir}", env={KILL_AT_STEP_ENV: "5"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    first_life = losses(run_dir)
    assert max(first_life) == 5

    train(tiny(run_dir))  # resumes from the newest committed checkpoint (2 or 4)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) > 8, "the resumed run should have redone the steps after its checkpoint"
    assert losses(run_dir) == losses(reference)  # exactly equal floats at every step
    assert sorted(losses(reference)) == list(range(1, 9))


_RESTORE_SCRIPT = """
import json, sys
from lca.train.runtime import set_cpu_devices
set_cpu_devices(4)
import jax, numpy as np
from lca.config import load_run_config
from lca.train.checkpoint import Checkpointer
from lca.train.setup import build_mesh, make_setup
cfg = load_run_config(sys.argv[1], ["mesh.context=1", "runtime.cpu_devices=4"])
setup = make_setup(cfg, build_mesh(cfg))
step, state = Checkpointer(sys.argv[1] + "/checkpoints", every=2, keep=2).restore_latest(setup.abstract_state)
print(json.dumps({"step": step, "devices": len(jax.devices()), "digest": DIGEST(state)}))
"""


def digest(state) -> str:
    """A hash of every array's bytes: equal iff the states are bit-identical."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(state):
        h.update(np.asarray(leaf).tobytes())
    return h.hexdigest()


def test_restore_onto_4_devices_is_exact(finished_run, tmp_path, tiny):
    """A checkpoint written on 8 devices (data 2 x fsdp 2 x context 2) restores bit-exactly on 4."""
    reference, _ = finished_run
    cfg = tiny(reference)
    setup = make_setup(cfg, build_mesh(cfg))
    step, state = Checkpointer(reference / "checkpoints", every=2, keep=2).restore_latest(setup.abstract_state)
    # The subprocess gets the same `digest` function, defined ahead of the script.
    script = "import hashlib\nimport jax\nimport numpy as np\n" + inspect.getsource(digest) + _RESTORE_SCRIPT.replace("DIGEST", "digest")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", script, str(reference)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"step": step, "devices": 4, "digest": digest(state)}


@pytest.mark.slow
def test_training_continues_on_4_devices(finished_run, tmp_path, launcher):
    reference, _ = finished_run
    run_dir = tmp_path / "four"
    shutil.copytree(reference, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "8")  # resume from step 6 and redo 7, 8
    (run_dir / "metrics.jsonl").unlink()
    proc = launcher(str(run_dir / "config.yaml"), f"run_dir={run_dir}", "mesh.context=1", devices=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from step 6" in proc.stderr
    got, want = losses(run_dir), losses(reference)
    assert sorted(got) == [7, 8]
    np.testing.assert_allclose([got[7], got[8]], [want[7], want[8]], rtol=2e-5)


def test_corrupt_latest_falls_back_with_warning(finished_run, tmp_path, caplog, tiny):
    reference, _ = finished_run
    run_dir = tmp_path / "corrupt"
    shutil.copytree(reference, run_dir)
    ckpt_dir = run_dir / "checkpoints"
    # A truncated array file in the newest checkpoint, and a leftover of a save killed midway.
    victim = max((p for p in (ckpt_dir / "8" / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    (ckpt_dir / "10.orbax-checkpoint-tmp").mkdir()

    cfg = tiny(run_dir)
    setup = make_setup(cfg, build_mesh(cfg))
    ckpt = Checkpointer(ckpt_dir, every=2, keep=2)
    with caplog.at_level(logging.WARNING):
        step, state = ckpt.restore_latest(setup.abstract_state)
    ckpt.close()
    assert step == 6
    assert "checkpoint 8" in caplog.text and "unreadable" in caplog.text
    assert "bound method" not in caplog.text and "Error reading" in caplog.text  # the cause, not a repr
    assert [p.name.split("-")[0] for p in ckpt_dir.glob("8.corrupt-*")] == ["8.corrupt"]
    assert (ckpt_dir / "6").is_dir()  # nothing good lost
    assert int(state["step"]) == 6
    assert all(bool(np.isfinite(x).all()) for x in jax.tree.leaves(state["params"]))


def test_checkpoint_schedule_keeps_last_k(finished_run):
    reference, result = finished_run
    steps = sorted(int(p.name) for p in (reference / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [6, 8]
    assert result["final"]["step"] == 8


@pytest.mark.parametrize("every, step, final, expected", [(2, 4, False, True), (2, 3, False, False), (5, 3, True, True)])
def test_should_save(tmp_path, every, step, final, expected):
    ckpt = Checkpointer(tmp_path, every=every, keep=1)
    assert ckpt.should_save(step, final=final) is expected
