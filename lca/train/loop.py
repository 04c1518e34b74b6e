"""The training run: mesh, sharded state, compiled step, loop, checkpoints, evaluation.

``train(cfg)`` is what ``lca-train`` runs. It resumes from the newest good
checkpoint in ``cfg.run_dir`` if there is one; given the same config, a resumed
run computes exactly the losses of an uninterrupted one (same parameters, same
optimizer state, data iterator at the same position, same compiled program).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from lca.config import Config, ConfigError, save_config
from lca.models.build import abstract_model, attention_name, init_params, num_params, sequence_multiple
from lca.parallel import make_mesh
from lca.parallel.sharding import logical_to_spec, tree_shardings
from lca.train.checkpoint import Checkpointer
from lca.train.metrics import MetricsWriter, ProgressBar, format_line, peak_flops, plot_loss_curve
from lca.train.optimizer import learning_rate, make_optimizer
from lca.train.runtime import initialize_distributed
from lca.train.step import BATCH_KEYS, make_train_step

log = logging.getLogger("lca.train")

# Fault injection for the resume tests: SIGKILL this process right after this step.
KILL_AT_STEP_ENV = "LCA_FAULT_KILL_AT_STEP"


# --------------------------------------------------------------------------- mesh and checks


def build_mesh(cfg: Config) -> jax.sharding.Mesh:
    """The mesh from ``cfg.mesh``; a size that does not fit the devices is a ConfigError."""
    try:
        return make_mesh(**dataclasses.asdict(cfg.mesh), axis_types="auto")
    except ValueError as err:
        raise ConfigError(f"mesh does not fit the {jax.device_count()} devices: {err}") from None


def check_fits(cfg: Config, mesh: jax.sharding.Mesh) -> None:
    """Shapes the mesh cannot divide, as ConfigErrors naming the keys to change."""
    multiple = sequence_multiple(cfg, mesh)
    seq_len = cfg.train.seq_len
    if seq_len % multiple:
        raise ConfigError(
            f"train.seq_len={seq_len} is not divisible by {multiple}, the sequence-length multiple that "
            f"attention {attention_name(cfg, mesh)!r} needs on mesh {dict(mesh.shape)}; use a multiple of {multiple}."
        )
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = cfg.train.global_batch // cfg.train.grad_accum
    if micro % batch_shards or micro % jax.process_count():
        raise ConfigError(
            f"the micro-batch train.global_batch / train.grad_accum = {micro} must be divisible by "
            f"mesh.data * mesh.fsdp = {batch_shards} and by the {jax.process_count()} processes."
        )
    from lca.data.pipeline import validate

    try:
        validate(cfg.data, seq_len=seq_len, global_batch=cfg.train.global_batch, process_count=jax.process_count())
    except ValueError as err:
        raise ConfigError(str(err)) from None


# --------------------------------------------------------------------------- state


@dataclasses.dataclass
class Setup:
    """Everything a run derives from its config and mesh before the first step."""

    cfg: Config
    mesh: jax.sharding.Mesh
    graphdef: object
    tx: object
    state_shardings: dict
    abstract_state: dict
    batch_sharding: NamedSharding


def _replicated(mesh):
    return NamedSharding(mesh, P())


def make_setup(cfg: Config, mesh: jax.sharding.Mesh) -> Setup:
    graphdef, abstract_params, logical = abstract_model(cfg, mesh)
    param_sh = tree_shardings(logical, abstract_params, cfg.rules, mesh)
    tx = make_optimizer(cfg.train)
    rep = _replicated(mesh)
    opt_abstract = jax.eval_shape(tx.init, abstract_params)
    # Moments are laid out like their parameters; counts and other scalars are replicated.
    opt_sh = optax.tree_map_params(
        tx, lambda _, sharding: sharding, opt_abstract, param_sh, transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
    )
    shardings = {"params": param_sh, "opt_state": opt_sh, "step": rep, "rng": rep}
    abstract = {
        "params": abstract_params,
        "opt_state": opt_abstract,
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
    }
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    batch_spec = logical_to_spec((None, "batch", "sequence"), cfg.rules, mesh)
    return Setup(cfg, mesh, graphdef, tx, shardings, abstract, NamedSharding(mesh, batch_spec))


def init_state(setup: Setup, seed: int) -> dict:
    params = init_params(setup.cfg, setup.mesh, seed)
    opt_state = jax.jit(setup.tx.init, out_shardings=setup.state_shardings["opt_state"])(params)
    rep = _replicated(setup.mesh)
    rng = jax.random.key_data(jax.random.key(seed))
    return {
        "params": params,
        "opt_state": opt_state,
        "step": jax.device_put(jnp.zeros((), jnp.int32), rep),
        "rng": jax.device_put(rng, rep),
    }


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


def abstract_batch(setup: Setup) -> dict:
    accum = setup.cfg.train.grad_accum
    shape = (accum, setup.cfg.train.global_batch // accum, setup.cfg.train.seq_len)
    dtypes = {"loss_mask": jnp.float32}
    return {
        key: jax.ShapeDtypeStruct(shape, dtypes.get(key, jnp.int32), sharding=setup.batch_sharding)
        for key in BATCH_KEYS
    }


# --------------------------------------------------------------------------- compile


def compile_step(setup: Setup):
    """The train step compiled ahead of time, with its FLOPs per call (None if unknown)."""
    step = make_train_step(setup.graphdef, setup.tx, learning_rate(setup.cfg.train))
    rep = _replicated(setup.mesh)
    jitted = jax.jit(
        step,
        in_shardings=(setup.state_shardings, setup.batch_sharding),
        out_shardings=(setup.state_shardings, rep),
        donate_argnums=0,
    )
    t0 = time.perf_counter()
    compiled = jitted.lower(setup.abstract_state, abstract_batch(setup)).compile()
    log.info("compiled the train step in %.1f s", time.perf_counter() - t0)
    _log_memory(compiled)
    return compiled, _flops(compiled)


def _log_memory(compiled) -> None:
    try:
        mem = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        mem = None
    if mem is None:
        return
    log.info(
        "memory per device: arguments %s, outputs %s, temporaries %s, code %s",
        *map(_bytes, (mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.temp_size_in_bytes,
                      mem.generated_code_size_in_bytes)),
    )


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024


def _flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


# --------------------------------------------------------------------------- loop


class _Interval:
    """Timing and throughput over the steps since the last log line."""

    def __init__(self, setup: Setup, flops_per_step: float | None):
        self.tokens_per_step = setup.cfg.train.global_batch * setup.cfg.train.seq_len
        self.flops_per_step = flops_per_step
        self.num_devices = setup.mesh.size
        self.peak = peak_flops(jax.devices()[0].device_kind)
        self.reset()

    def reset(self):
        self.t0, self.steps = time.perf_counter(), 0

    def stats(self) -> dict:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        step_time = elapsed / max(self.steps, 1)
        out = {"step_time_s": step_time, "tokens_per_s": self.tokens_per_step / step_time}
        if self.flops_per_step:
            # cost_analysis counts the FLOPs of one device's program.
            per_device = self.flops_per_step / step_time
            out["tflops_per_device"] = per_device / 1e12
            if self.peak:
                out["mfu"] = per_device / self.peak
        return out


def train(cfg: Config, *, data_iterator=None) -> dict:
    """Train (or resume) the run ``cfg`` describes; returns the final metrics and paths.

    ``data_iterator`` replaces the config's data pipeline (it must yield this
    process's rows and have ``get_state``/``set_state``).
    """
    initialize_distributed(cfg.runtime)
    mesh = build_mesh(cfg)
    check_fits(cfg, mesh)
    run_dir = Path(cfg.run_dir)
    is_main = jax.process_index() == 0
    if is_main:
        save_config(cfg, run_dir)
    setup = make_setup(cfg, mesh)
    data = data_iterator if data_iterator is not None else make_data_iterator(cfg)

    ckpt = None
    if cfg.checkpoint.enabled:
        ckpt = Checkpointer(run_dir / "checkpoints", every=cfg.checkpoint.every, keep=cfg.checkpoint.keep,
                            async_save=cfg.checkpoint.async_save)
    start, state = (None, None) if ckpt is None else ckpt.restore_latest(setup.abstract_state, data)
    if state is None:
        start, state = 0, init_state(setup, cfg.train.seed)
    else:
        log.info("resumed from checkpoint %d in %s", start, ckpt.directory)
    log.info(
        "model: %s parameters, attention %r, mesh %s",
        f"{num_params(state['params']):,}", attention_name(cfg, mesh), dict(mesh.shape),
    )

    compiled, flops = compile_step(setup)
    writer = MetricsWriter(run_dir, enabled=is_main)
    bar = ProgressBar(cfg.train.steps, enabled=cfg.train.progress_bar and is_main)
    interval = _Interval(setup, flops)
    kill_at = int(os.environ.get(KILL_AT_STEP_ENV, "0"))
    pending: list[tuple[int, dict]] = []
    last: dict = {}
    for step in range(start, cfg.train.steps):
        batch = to_global_batch(next(data), setup)
        state, metrics = compiled(state, batch)
        pending.append((step + 1, metrics))
        interval.steps += 1
        done = step + 1
        if done % cfg.train.log_every == 0 or done == cfg.train.steps:
            last = _flush(pending, interval, writer, cfg.train.steps)
            bar.update(done, last["loss"])
        if ckpt is not None and ckpt.should_save(done, final=done == cfg.train.steps):
            ckpt.save(done, state, data)
        if done == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    if ckpt is not None:
        ckpt.close()
    writer.close()
    result = {"final": last, "run_dir": str(run_dir)}
    if is_main:
        result["loss_png"] = plot_loss_curve(run_dir)
    if cfg.eval.at_end:
        from lca.train.evaluate import evaluate

        result["eval"] = evaluate(cfg, state["params"], setup)
    return result


def _flush(pending, interval: _Interval, writer: MetricsWriter, total: int) -> dict:
    """Fetch the pending steps' metrics (one device sync), write them, log one line."""
    fetched = jax.device_get([m for _, m in pending])
    stats = interval.stats()
    for (step, _), metrics in zip(pending, fetched):
        writer.write(step, {**metrics, **stats})
    step = pending[-1][0]
    line = {**fetched[-1], **stats}
    log.info(format_line(step, total, line))
    pending.clear()
    interval.reset()
    return {"step": step, **{k: float(v) for k, v in line.items()}}
