"""Evaluate a trained model: bits per byte on held-out text and a needle-retrieval grid.

Used at the end of ``lca-train`` and by ``lca-eval RUN_DIR`` (which restores the
newest good checkpoint of the run onto this machine's mesh, reading checkpoints
only: a corrupt one is skipped, never moved). Results of checkpoint ``N`` go to
``<run_dir>/eval/step_N/``: ``summary.json``, the retrieval table (markdown) and
heatmap; the headline numbers also go to TensorBoard (``eval/*`` at step ``N``),
next to the training curves.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from lca.config import Config, ConfigError, load_run_config
from lca.train.checkpoint import Checkpointer, checkpoint_steps
from lca.train.metrics import write_tensorboard
from lca.train.setup import build_mesh, check_data, check_eval_fits, make_setup
from lca.train.step import make_logits_fn

log = logging.getLogger("lca.eval")


def make_eval_logits_fn(setup, params):
    """``logits_fn(batch dict of numpy [b, l]) -> numpy logits [b, l, vocab]`` on the run's mesh."""
    # Eval batches are small and of any shape: replicate them; the model's
    # sharding constraints spread the work where the shapes divide. The logits
    # come back replicated too, so that every process of a multi-controller run
    # can read them (a sharded array spans devices other processes own).
    replicated = NamedSharding(setup.mesh, P())
    jitted = jax.jit(make_logits_fn(setup.graphdef), out_shardings=replicated)

    def logits_fn(batch):
        inputs = np.asarray(batch["inputs"], np.int32)
        positions = batch.get("positions")
        if positions is None:
            positions = np.broadcast_to(np.arange(inputs.shape[1], dtype=np.int32), inputs.shape)
        segments = batch.get("segment_ids")
        if segments is None:
            segments = np.ones_like(inputs)
        arrays = {
            "inputs": inputs,
            "positions": np.asarray(positions, np.int32),
            "segment_ids": np.asarray(segments, np.int32),
        }
        arrays = jax.device_put(arrays, replicated)
        return np.asarray(jitted(params, arrays))

    return logits_fn


def held_out_batches(cfg: Config) -> list[dict]:
    """The eval batches: held-out ``data.source`` text only, each process reading its own rows, all getting the whole batch.

    ``data.mixture`` (and the task knobs with it) is left out: its synthetic task rows would make the bits
    per byte a blend of text and passkeys, and the retrieval grid measures the tasks already.
    """
    from lca.data.pipeline import eval_batches, without_tasks

    local = eval_batches(
        without_tasks(cfg.data), seq_len=cfg.eval.seq_len or cfg.train.seq_len, batch=cfg.eval.batch,
        num_batches=cfg.eval.num_batches, seed=cfg.eval.seed,
    )
    if jax.process_count() == 1:
        return local
    # Rows of process p are rows [p * B, (p + 1) * B) of the batch: concatenated in process order.
    return [multihost_utils.process_allgather(batch, tiled=True) for batch in local]


def check_eval(cfg: Config, mesh) -> None:
    """What would make the evaluation fail, as ConfigErrors, before anything is trained or written."""
    check_eval_fits(cfg, mesh)
    if cfg.eval.batch % jax.process_count():
        raise ConfigError(
            f"eval.batch={cfg.eval.batch} must be divisible by the {jax.process_count()} processes, "
            "which read its rows between them."
        )
    check_data(cfg, splits=("eval",))


def evaluate(cfg: Config, params, setup, *, step: int) -> dict:
    """Bits per byte and the retrieval grid for ``params`` (checkpoint ``step``); writes ``eval/step_<step>/``."""
    from lca.eval.perplexity import bits_per_byte
    from lca.eval.retrieval import retrieval_grid, write_retrieval_report

    check_eval(cfg, setup.mesh)
    logits_fn = make_eval_logits_fn(setup, params)
    ppl = bits_per_byte(logits_fn, held_out_batches(cfg))
    log.info("eval: %.4f bits per byte on %d held-out tokens", ppl["bits_per_byte"], ppl["tokens"])
    grid = retrieval_grid(
        logits_fn, task=cfg.eval.retrieval_task, context_lengths=tuple(cfg.eval.context_lengths),
        depths=tuple(cfg.eval.depths), samples_per_cell=cfg.eval.samples_per_cell, seed=cfg.eval.seed,
    )
    out_dir = Path(cfg.run_dir) / "eval" / f"step_{step}"
    summary = {"step": step, "perplexity": ppl, "retrieval": grid.to_dict()}
    accuracy = float(grid.accuracy.mean())
    if jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = write_retrieval_report(grid, out_dir, title=f"{cfg.name}: {grid.task} retrieval accuracy")
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        summary["report"] = [str(p) for p in paths]
        write_tensorboard(cfg.run_dir, step, {"eval/bits_per_byte": ppl["bits_per_byte"],
                                              f"eval/{grid.task}_accuracy": accuracy})
    summary["out_dir"] = str(out_dir)
    log.info("eval: %s accuracy %.3f over the grid; results in %s", grid.task, accuracy, out_dir)
    return summary


def evaluate_run(run_dir: str | Path, overrides=()) -> dict:
    """``lca-eval``: evaluate the newest good checkpoint of ``run_dir`` (read-only on its checkpoints)."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, [*overrides, f"run_dir={run_dir}"])
    mesh = build_mesh(cfg)
    check_eval(cfg, mesh)  # what the config asks that cannot run here (impl=cudnn on CPU), before the checkpoints
    ckpt_dir = run_dir / "checkpoints"
    if not checkpoint_steps(ckpt_dir):
        raise ConfigError(f"{ckpt_dir} has no checkpoint to evaluate; train first (lca-train) or check the path.")
    setup = make_setup(cfg, mesh)
    step, params = latest_params(setup)
    log.info("evaluating checkpoint %d of %s", step, run_dir)
    return evaluate(cfg, params, setup, step=step)


def latest_params(setup) -> tuple[int, dict]:
    """``(step, params)`` of the newest readable checkpoint of ``setup.cfg.run_dir``, on ``setup``'s mesh.

    Reads the parameters only (the optimizer's moments would double or triple the memory) and never
    moves a checkpoint; ConfigError when none is readable.
    """
    cfg = setup.cfg
    ckpt_dir = Path(cfg.run_dir) / "checkpoints"
    ckpt = Checkpointer(ckpt_dir, every=cfg.checkpoint.every, keep=cfg.checkpoint.keep, read_only=True)
    try:
        step, state = ckpt.restore_latest({"params": setup.abstract_state["params"]}, partial=True)
    finally:
        ckpt.close()
    if state is None:
        unreadable = f" ({len(ckpt.set_aside)} unreadable: {ckpt.set_aside[0][1]})" if ckpt.set_aside else ""
        raise ConfigError(f"{ckpt_dir} has no readable checkpoint to evaluate{unreadable}; train first (lca-train).")
    return step, state["params"]
