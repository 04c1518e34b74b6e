"""Evaluate a trained model: bits per byte on held-out text and a needle-retrieval grid.

Used at the end of ``lca-train`` and by ``lca-eval RUN_DIR`` (which restores the
newest checkpoint of the run onto this machine's mesh). Results go to
``<run_dir>/eval/``: ``summary.json``, the retrieval table (markdown) and heatmap.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from lca.config import Config, ConfigError, load_run_config
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


def check_eval_fits(cfg: Config, mesh) -> None:
    from lca.models.build import sequence_multiple

    chunks = sequence_multiple(cfg, mesh)
    lengths = [cfg.eval.seq_len or cfg.train.seq_len, *cfg.eval.context_lengths]
    bad = [n for n in lengths if n % chunks]
    if bad:
        raise ConfigError(
            f"eval lengths {bad} (eval.seq_len / eval.context_lengths) are not divisible by {chunks} "
            f"(the attention's sequence pieces on mesh {dict(mesh.shape)}); use multiples of {chunks}."
        )


def evaluate(cfg: Config, params, setup) -> dict:
    """Bits per byte and the retrieval grid for ``params``; writes ``<run_dir>/eval/``."""
    from lca.data.pipeline import eval_batches
    from lca.eval.perplexity import bits_per_byte
    from lca.eval.retrieval import retrieval_grid, write_retrieval_report

    check_eval_fits(cfg, setup.mesh)
    logits_fn = make_eval_logits_fn(setup, params)
    batches = eval_batches(
        cfg.data, seq_len=cfg.eval.seq_len or cfg.train.seq_len, batch=cfg.eval.batch,
        num_batches=cfg.eval.num_batches, seed=cfg.eval.seed,
    )
    ppl = bits_per_byte(logits_fn, batches)
    log.info("eval: %.4f bits per byte on %d held-out tokens", ppl["bits_per_byte"], ppl["tokens"])
    grid = retrieval_grid(
        logits_fn, task=cfg.eval.retrieval_task, context_lengths=tuple(cfg.eval.context_lengths),
        depths=tuple(cfg.eval.depths), samples_per_cell=cfg.eval.samples_per_cell, seed=cfg.eval.seed,
    )
    out_dir = Path(cfg.run_dir) / "eval"
    summary = {"perplexity": ppl, "retrieval": grid.to_dict()}
    if jax.process_index() == 0:
        paths = write_retrieval_report(grid, out_dir, title=f"{cfg.name}: {grid.task} retrieval accuracy")
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        summary["report"] = [str(p) for p in paths]
    log.info("eval: %s accuracy %.3f over the grid; report in %s", grid.task, float(grid.accuracy.mean()), out_dir)
    return summary


def evaluate_run(run_dir: str | Path, overrides=()) -> dict:
    """``lca-eval``: evaluate the newest good checkpoint of ``run_dir``."""
    from lca.train.checkpoint import Checkpointer
    from lca.train.loop import build_mesh, make_setup

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir, [*overrides, f"run_dir={run_dir}"])
    mesh = build_mesh(cfg)
    setup = make_setup(cfg, mesh)
    ckpt = Checkpointer(run_dir / "checkpoints", every=cfg.checkpoint.every, keep=cfg.checkpoint.keep)
    step, state = ckpt.restore_latest(setup.abstract_state)
    ckpt.close()
    if state is None:
        raise ConfigError(f"{run_dir}/checkpoints has no usable checkpoint to evaluate.")
    log.info("evaluating checkpoint %d of %s", step, run_dir)
    return {"step": step, **evaluate(cfg, state["params"], setup)}

