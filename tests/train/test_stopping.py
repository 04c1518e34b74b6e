"""A run stops early without saving bad state: a diverged loss, SIGTERM or Ctrl-C."""

import logging
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from launch.common import run_cli
from lca.train.checkpoint import Checkpointer
from lca.train.loop import PAUSE_AT_STEP_ENV, make_data_iterator
from lca.train.metrics import read_metrics
from lca.train.setup import build_mesh, make_setup
from lca.train.stopping import Diverged
from tests.train.conftest import REPO, launcher_env


class PoisonAt:
    """The config's data, with a NaN loss mask from ``step`` on: the loss and gradients become NaN there."""

    def __init__(self, cfg, step):
        self.inner, self.step, self.count = make_data_iterator(cfg), step, 0

    def __next__(self):
        batch = dict(next(self.inner))
        self.count += 1
        if self.count >= self.step:
            batch["loss_mask"] = np.full_like(batch["loss_mask"], np.nan)
        return batch

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


@pytest.mark.parametrize("log_every", [1, 8])
def test_divergence_stops_and_keeps_the_last_good_checkpoint(tiny, tmp_path, log_every):
    """At every log line, and before every save even when no line is due (log_every=8)."""
    from lca.train import train

    cfg = tiny(tmp_path, f"train.log_every={log_every}")
    with pytest.raises(Diverged, match=r"training diverged at step 3 \(loss nan, grad_norm nan\).*step 2, stays in"):
        train(cfg, data_iterator=PoisonAt(cfg, step=3))
    ckpt_dir = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["2"]
    setup = make_setup(cfg, build_mesh(cfg))
    ckpt = Checkpointer(ckpt_dir, every=2, keep=2, read_only=True)
    step, state = ckpt.restore_latest(setup.abstract_state)
    ckpt.close()
    assert step == 2 and all(bool(np.isfinite(x).all()) for x in jax.tree.leaves(state))


def test_a_stopped_run_is_one_line_and_its_exit_code(capsys):
    def body():
        raise Diverged("training diverged at step 3 (loss nan)")

    assert run_cli("lca-train", body) == 1
    assert capsys.readouterr().err == "lca-train: training diverged at step 3 (loss nan)\n"


def _train_until_paused(run_dir, pause_at):
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.train", "tiny", f"run_dir={run_dir}", "runtime.cpu_devices=8"],
        cwd=REPO, env=launcher_env({PAUSE_AT_STEP_ENV: str(pause_at)}), stderr=subprocess.PIPE, text=True,
    )
    lines = []
    deadline = time.monotonic() + 300
    for line in proc.stderr:
        lines.append(line)
        if "paused after step" in line or time.monotonic() > deadline:
            break
    return proc, lines


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_a_signal_saves_the_finished_step_and_the_run_resumes_exactly(sig, finished_run, tiny, tmp_path, caplog):
    from lca.train import train

    reference, _ = finished_run
    run_dir = tmp_path / "signalled"
    proc, lines = _train_until_paused(run_dir, pause_at=3)
    assert lines and "paused after step 3" in lines[-1], "".join(lines)[-3000:]
    proc.send_signal(sig)
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    name = signal.Signals(sig).name
    assert proc.returncode == 128 + sig, rest[-3000:]
    assert rest.strip().splitlines()[-1] == (
        f"lca-train: stopped by {name} after step 3 of 8; checkpoint 3 saved in {run_dir / 'checkpoints'}; "
        "run the same command again to resume."
    )
    assert "Traceback" not in rest
    assert f"starting fresh in {run_dir}" in "".join(lines)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2", "3"]

    with caplog.at_level(logging.INFO):
        train(tiny(run_dir))
    assert f"resuming from step 3 ({run_dir / 'checkpoints' / '3'})" in caplog.text
    assert "outputs of this run" in caplog.text and str(run_dir / "metrics.jsonl") in caplog.text
    got = {s: r["loss"] for s, r in read_metrics(run_dir).items()}
    want = {s: r["loss"] for s, r in read_metrics(reference).items()}
    assert got == want
