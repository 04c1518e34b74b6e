"""The training loop: resume or start, step, log, checkpoint, stop cleanly, evaluate.

``train(cfg)`` is what ``lca-train`` runs. Before it writes anything it checks
that the config fits the mesh, the data exist, ``run_dir`` can be written and,
when the run has checkpoints, that the config has not changed what they hold
(``lca.train.run_dir``). It then resumes from the newest good checkpoint in
``cfg.run_dir`` if there is one (else it starts at step 0, with the parameters of
``train.init_from``'s checkpoint when that is set); given the same config, a resumed run computes
exactly the losses of an uninterrupted one (same parameters, same optimizer
state, data iterator at the same position, same compiled program).

A run stops early, with a :class:`lca.train.stopping.RunStopped` naming why, on
SIGTERM or Ctrl-C (after saving the step it finished) and when the loss or the
gradient norm stops being finite (checked at every log line and before every
save, so a diverged state is never saved over a good checkpoint).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lca.config import Config, ConfigError, save_config
from lca.models.build import num_params
from lca.train.checkpoint import (Checkpointer, checkpoint_steps, init_from_checkpoint, restore_params,
                                  set_aside_names)
from lca.train.evaluate import check_eval, evaluate
from lca.train.flops import StepFlops
from lca.train.metrics import MetricsWriter, ProgressBar, format_line, plot_loss_curve, throughput
from lca.train.profile import StepProfiler
from lca.train.run_dir import check_resume, check_writable
from lca.train.runtime import initialize_distributed
from lca.train.setup import (Setup, abstract_batch, build_mesh, check_data, check_fits, compile_step, init_state,
                             make_setup)
from lca.train.step import BATCH_KEYS
from lca.train.stopping import RunStopped, StopSignals, check_finite

log = logging.getLogger("lca.train")

# Fault injection for the resume tests: SIGKILL this process right after this step.
KILL_AT_STEP_ENV = "LCA_FAULT_KILL_AT_STEP"
# For the signal tests: after this step, wait (up to a minute) for a stop signal.
PAUSE_AT_STEP_ENV = "LCA_FAULT_PAUSE_AT_STEP"

__all__ = ["train", "build_mesh", "check_fits", "make_setup", "init_state", "compile_step", "abstract_batch",
           "to_global_batch", "make_data_iterator", "KILL_AT_STEP_ENV", "PAUSE_AT_STEP_ENV"]


# --------------------------------------------------------------------------- batches


def make_data_iterator(cfg: Config, *, split: str = "train"):
    from lca.data.pipeline import make_train_iterator

    return make_train_iterator(
        cfg.data, seq_len=cfg.train.seq_len, global_batch=cfg.train.global_batch, seed=cfg.train.seed, split=split,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )


def to_global_batch(local: dict, setup: Setup) -> dict:
    """This process's rows ``[b_local, len]`` -> global arrays ``[accum, micro, len]`` on the mesh."""
    accum = setup.cfg.train.grad_accum
    micro = setup.cfg.train.global_batch // accum
    out = {}
    for key in BATCH_KEYS:
        rows = np.asarray(local[key])
        rows = rows.reshape(accum, rows.shape[0] // accum, *rows.shape[1:])
        global_shape = (accum, micro, *rows.shape[2:])
        out[key] = jax.make_array_from_process_local_data(setup.batch_sharding, rows, global_shape)
    return out


# --------------------------------------------------------------------------- loop


class _Interval:
    """Timing and throughput over the steps since the last log line."""

    def __init__(self, setup: Setup, flops: StepFlops | None):
        self.tokens_per_step = setup.cfg.train.global_batch * setup.cfg.train.seq_len
        self.step_flops = flops
        self.num_devices = setup.mesh.size
        self.device_kind = jax.devices()[0].device_kind
        self.reset()

    def reset(self):
        self.t0, self.steps, self.flops = time.perf_counter(), 0, 0.0

    def add(self, host_batch) -> None:
        """One step more, its model FLOPs counted from this process's rows (their documents)."""
        self.steps += 1
        if self.step_flops is not None:
            self.flops += self.step_flops.of(host_batch.get("segment_ids"))

    def stats(self) -> dict:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        steps = max(self.steps, 1)
        step_time = elapsed / steps
        out = {"step_time_s": step_time, "tokens_per_s": self.tokens_per_step / step_time}
        return out | throughput(self.flops / steps, step_time, self.num_devices, self.device_kind)


def train(cfg: Config, *, data_iterator=None) -> dict:
    """Train (or resume) the run ``cfg`` describes; returns the final metrics and where the outputs went.

    ``data_iterator`` replaces the config's data pipeline (it must yield this
    process's rows and have ``get_state``/``set_state``). Raises ConfigError
    before writing anything when the run cannot start, RunStopped when it stops early.
    """
    initialize_distributed(cfg.runtime)
    mesh = build_mesh(cfg)
    check_fits(cfg, mesh)
    if data_iterator is None:
        check_data(cfg, splits=("train",))
    if cfg.eval.at_end:
        try:
            check_eval(cfg, mesh)
        except ConfigError as err:
            raise ConfigError(f"{err} (Or set eval.at_end=false to train without the final evaluation.)") from None
    run_dir = Path(cfg.run_dir)
    check_writable(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    resuming = cfg.checkpoint.enabled and bool(checkpoint_steps(ckpt_dir))
    if resuming:
        check_resume(cfg, run_dir)
    elif cfg.checkpoint.enabled and set_aside_names(ckpt_dir) and not cfg.checkpoint.restart_if_unusable:
        raise _no_usable_checkpoint(ckpt_dir)
    # Checked now so that a wrong path stops before anything is written; a resumed run never reads it.
    init_dir = init_from_checkpoint(cfg.train.init_from) if cfg.train.init_from and not resuming else None
    setup = make_setup(cfg, mesh)
    data = data_iterator if data_iterator is not None else make_data_iterator(cfg)
    ckpt = None
    try:
        start, state = None, None
        if resuming:
            ckpt = _checkpointer(cfg, ckpt_dir)
            start, state = ckpt.restore_latest(setup.abstract_state, data)
            if state is None and not cfg.checkpoint.restart_if_unusable:
                raise _no_usable_checkpoint(ckpt_dir)
        if state is None:
            start, state = 0, init_state(setup, cfg.train.seed)
            if cfg.train.init_from:
                init_dir = init_dir or init_from_checkpoint(cfg.train.init_from)
                state["params"] = restore_params(init_dir, setup.abstract_state["params"])
                log.info("starting in %s from the parameters of %s", run_dir, init_dir.parent)
            else:
                log.info("starting fresh in %s", run_dir)
        else:
            log.info("resuming from step %d (%s)", start, ckpt_dir / str(start))
        if start >= cfg.train.steps:
            log.info("this run already finished: checkpoint %d, train.steps=%d; nothing to train (raise train.steps "
                     "to train on; lca-eval %s evaluates it)", start, cfg.train.steps, run_dir)
            return {"final": {"step": start}, "run_dir": str(run_dir), "already_finished": True}
        log.info("model: %s parameters, attention %r, mesh %s", f"{num_params(state['params']):,}", setup.kind,
                 dict(mesh.shape))
        compiled, flops = compile_step(setup)
        is_main = jax.process_index() == 0
        if is_main:
            save_config(cfg, run_dir)
        if ckpt is None and cfg.checkpoint.enabled:
            ckpt = _checkpointer(cfg, ckpt_dir)
        writer = MetricsWriter(run_dir, enabled=is_main)
        try:
            with StopSignals() as stops:
                state, last = _steps(setup, compiled, flops, state, start, data, ckpt, writer, stops)
            result = {"final": last, "run_dir": str(run_dir)}
            if is_main:
                result["loss_png"] = plot_loss_curve(run_dir)
            if cfg.eval.at_end:
                result["eval"] = evaluate(cfg, state["params"], setup, step=cfg.train.steps)
        finally:
            writer.close()
        if ckpt is not None:
            ckpt.wait()
            result["checkpoints"] = ckpt.steps()
        _log_outputs(cfg, result)
        return result
    finally:
        if ckpt is not None:
            ckpt.close()  # waits for the saves in flight, also when the run fails


def _checkpointer(cfg: Config, directory: Path) -> Checkpointer:
    c = cfg.checkpoint
    return Checkpointer(directory, every=c.every, keep=c.keep, async_save=c.async_save)


def _no_usable_checkpoint(ckpt_dir: Path) -> ConfigError:
    return ConfigError(
        f"no usable checkpoint is left in {ckpt_dir} (the unreadable ones are set aside there: "
        f"{', '.join(set_aside_names(ckpt_dir)[:3])}); set checkpoint.restart_if_unusable=true to start again "
        "at step 0 in this run_dir, or give a new run_dir."
    )


_all_finite = jax.jit(
    lambda tree: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
                                    if jnp.issubdtype(x.dtype, jnp.inexact)]))
)


def _steps(setup: Setup, compiled, flops, state, start: int, data, ckpt, writer, stops: StopSignals):
    """Steps ``start + 1 .. train.steps``; returns the last state and the last logged metrics."""
    cfg = setup.cfg
    total = cfg.train.steps
    single = jax.process_count() == 1
    bar = ProgressBar(total, initial=start, enabled=cfg.train.progress_bar and jax.process_index() == 0)
    interval = _Interval(setup, flops)
    kill_at = int(os.environ.get(KILL_AT_STEP_ENV, "0"))
    pause_at = int(os.environ.get(PAUSE_AT_STEP_ENV, "0"))
    pending: list[tuple[int, dict]] = []
    last: dict = {}
    saved = f"the last checkpoint, step {start}, stays in {ckpt.directory}" if start else "no checkpoint was saved"
    profiler = StepProfiler(Path(cfg.run_dir) / "profile", cfg.train.profile_at, cfg.train.profile_steps)
    try:
        for step in range(start, total):
            host_batch = next(data)
            batch = to_global_batch(host_batch, setup)
            profiler.before(step + 1)
            state, metrics = compiled(state, batch)
            profiler.after(step + 1, state)
            pending.append((step + 1, metrics))
            interval.add(host_batch)
            done = step + 1
            if done == pause_at:
                _pause_for_signal(done, stops)
            # A signal is acted on after this step: at once with one process, at the next
            # log line or save with several (they must agree, which takes a collective).
            stop = stops.signum if single else None
            save = ckpt is not None and ckpt.should_save(done, final=done == total or bool(stop))
            if save or stop or done % cfg.train.log_every == 0 or done == total:
                last = _flush(pending, interval, writer, total, saved)
                if not single:
                    stop = stops.agreed()
                    save = ckpt is not None and ckpt.should_save(done, final=done == total or bool(stop))
            bar.update(done, last.get("loss"))
            if save:
                if not bool(_all_finite(state)):
                    raise RunStopped(f"the state after step {done} is not finite although its loss and gradient "
                                     f"norm are; nothing was saved, {saved}; lower train.lr.", exit_code=1)
                ckpt.save(done, state, data)
                saved = f"the last checkpoint, step {done}, stays in {ckpt.directory}"
            if done == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if stop:
                _stopped(stop, done, total, ckpt)
    finally:
        profiler.stop()
        bar.close()
    return state, last


def _pause_for_signal(step: int, stops: StopSignals) -> None:
    log.info("paused after step %d (%s) until a stop signal", step, PAUSE_AT_STEP_ENV)
    deadline = time.monotonic() + 60
    while stops.signum is None and time.monotonic() < deadline:
        time.sleep(0.02)


def _stopped(signum: int, done: int, total: int, ckpt) -> None:
    name = StopSignals.describe(signum)
    if ckpt is None:
        where = "no checkpoint saved (checkpoint.enabled=false)"
    else:
        ckpt.wait()
        where = f"checkpoint {done} saved in {ckpt.directory}; run the same command again to resume"
    raise RunStopped(f"stopped by {name} after step {done} of {total}; {where}.", exit_code=128 + signum)


def _log_outputs(cfg: Config, result: dict) -> None:
    """At the end, one place that says where everything went."""
    if jax.process_index() != 0:
        return
    run_dir = Path(cfg.run_dir)
    lines = [f"config        {run_dir / 'config.yaml'}", f"metrics       {run_dir / 'metrics.jsonl'}"]
    if (run_dir / "tensorboard").is_dir():
        lines.append(f"TensorBoard   tensorboard --logdir {run_dir / 'tensorboard'}")
    if result.get("loss_png"):
        lines.append(f"loss curve    {result['loss_png']}")
    if "checkpoints" in result:
        lines.append(f"checkpoints   {run_dir / 'checkpoints'} (steps {result['checkpoints']})")
    if "eval" in result:
        lines.append(f"evaluation    {result['eval']['out_dir']}")
    log.info("outputs of this run:\n  %s", "\n  ".join(lines))


def _flush(pending, interval: _Interval, writer: MetricsWriter, total: int, saved: str) -> dict:
    """Fetch the pending steps' metrics (one device sync), write them, log one line; Diverged if not finite."""
    fetched = jax.device_get([m for _, m in pending])
    stats = interval.stats()
    for (step, _), metrics in zip(pending, fetched):
        writer.write(step, {**metrics, **stats})
    step = pending[-1][0]
    line = {**fetched[-1], **stats}
    log.info(format_line(step, total, line))
    pending_steps = [s for s, _ in pending]
    pending.clear()
    interval.reset()
    for step_done, metrics in zip(pending_steps, fetched):
        check_finite(step_done, metrics, saved)
    return {"step": step, **{k: float(v) for k, v in line.items()}}
