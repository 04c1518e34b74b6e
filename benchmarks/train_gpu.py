"""Training-step throughput of the 104M decoder at 32k tokens, one row per attention impl.

The model of issue 15: 12 layers, d_model 768, 6 heads of 128, 2 KV heads, MLP 3072,
byte vocabulary (~104M parameters), bf16 compute, one 32,768-token sequence per step
on one device, no checkpoints or evaluation. Each impl trains ``--steps`` steps through
``lca.train.train`` (the launcher's code path); the step time is the median of the
logged steps after the first, and MFU is the training log's own (analytic model FLOPs,
``lca.train.flops``, attention counted per document of each packed batch, over the
device's peak). An impl that fails (e.g. out of memory,
or not in this checkout's catalogue) is recorded with its error.

Writes ``benchmarks/results/train_gpu_<device>.md`` (``--results`` another folder).
``--smoke`` trains a tiny model on CPU for a few steps (plumbing only).

    python benchmarks/train_gpu.py
    python benchmarks/train_gpu.py --smoke --results /tmp/out
    python benchmarks/train_gpu.py --profile --impls pallas   # per-op time tables instead
    python benchmarks/train_gpu.py --impls pallas,cudnn,blockwise --budget-s 120   # a short GPU lease

``--profile`` traces the last two steps of each impl and writes only
``train_gpu_<device>_ops.md``: time per op kind and the longest ops (``lca.train.profile``).
It turns XLA's command buffers off first (``--xla_gpu_enable_command_buffer=``): with them
on, a GPU step is one CUDA-graph op that hides every kernel in it. The step times of such
a run include the kernels' launches, so the throughput table comes from a run without it.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import re
import statistics
import tempfile
import time

import jax

from lca.config import ConfigError, load_config
from lca.train.metrics import read_metrics
from machine import describe

RESULTS = pathlib.Path(__file__).parent / "results"
IMPLS = ("pallas", "cudnn", "blockwise", "xla")
MODEL_104M = [
    "model.num_layers=12", "model.d_model=768", "model.num_heads=6", "model.num_kv_heads=2",
    "model.head_dim=128", "model.mlp_dim=3072", "model.dtype=bfloat16", "train.seq_len=32768",
]
TINY = ["model.num_layers=2", "model.d_model=64", "model.num_heads=2", "model.num_kv_heads=1",
        "model.mlp_dim=128", "model.dtype=float32", "train.seq_len=256"]
COMMON = ["train.global_batch=1", "train.warmup_steps=1", "train.log_every=1", "train.progress_bar=false",
          "checkpoint.enabled=false", "eval.at_end=false", "mesh.data=1", "runtime.cpu_devices=1"]


def measure(impl: str, steps: int, smoke: bool, run_dir: pathlib.Path, profile: bool = False) -> dict:
    overrides = [f"run_dir={run_dir}", f"model.attention.impl={impl}", f"train.steps={steps}",
                 *(TINY if smoke else MODEL_104M), *COMMON]
    if profile:  # trace the last two steps: lca.train.profile writes RUN_DIR/profile/ops.md
        overrides += [f"train.profile_at={max(steps - 1, 2)}", "train.profile_steps=2"]
    try:
        cfg = load_config("base", overrides)
    except ConfigError as err:
        return {"impl": impl, "note": f"not available here: {err}"}
    from lca.train import train

    t0 = time.perf_counter()
    try:
        train(cfg)
    except Exception as err:  # noqa: BLE001 - recorded, e.g. out of memory
        return {"impl": impl, "note": f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"}
    records = list(read_metrics(run_dir).values())[1:]  # the first step warms up
    row = {"impl": impl, "note": "", "wall_s": time.perf_counter() - t0, "steps": len(records)}
    ops = run_dir / "profile" / "ops.md"
    row["ops"] = ops.read_text() if ops.is_file() else None
    for key in ("step_time_s", "tokens_per_s", "tflops_per_device", "mfu"):
        values = [r[key] for r in records if key in r]
        row[key] = statistics.median(values) if values else None
    return row


def _step_table(rows) -> str:
    """Markdown table: step time, tokens/s, TFLOP/s and MFU per impl."""

    def fmt(value, spec):
        return "" if value is None else format(value, spec)

    lines = ["| impl | step (ms) | tokens/s | TFLOP/s/device | MFU | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['impl']} | {fmt(r.get('step_time_s') and 1e3 * r['step_time_s'], '.0f')} | "
                     f"{fmt(r.get('tokens_per_s'), ',.0f')} | {fmt(r.get('tflops_per_device'), '.1f')} | "
                     f"{fmt(r.get('mfu') and 100 * r['mfu'], '.1f')}{'%' if r.get('mfu') else ''} | {r['note']} |")
    return "\n".join(lines) + "\n"


def _markdown(rows, device: str, smoke: bool) -> str:
    size = "a tiny smoke model (256 tokens)" if smoke else "the 104M decoder at 32,768 tokens"
    return (f"# Training step of {size}, one device: {device}\n\n"
            f"Machine: {describe()}. Median of the logged steps after the first; MFU from analytic model "
            "FLOPs (lca.train.flops; attention per document of each packed batch) over the device's dense bf16 "
            "peak (lca.train.metrics.PEAK_FLOPS).\n\n"
            + _step_table(rows))


# XLA's GPU command buffers (CUDA graphs) off, so a trace shows each kernel as its own op.
NO_COMMAND_BUFFERS = "--xla_gpu_enable_command_buffer="


def _ops_markdown(rows, device: str) -> str:
    sections = [f"## {r['impl']}\n\n{r['ops']}" for r in rows if r.get("ops")]
    return (f"# Per-op time of the training step: {device}\n\n"
            f"Machine: {describe()}. From lca.train.profile (train.profile_at), traced with XLA's command "
            f"buffers off (`XLA_FLAGS={NO_COMMAND_BUFFERS}`), so each kernel is its own op; the step times "
            f"of this run (below) include their launches.\n\n{_step_table(rows)}\n" + "\n".join(sections))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU; writes only with --results")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated (default {','.join(IMPLS)})")
    parser.add_argument("--results", type=pathlib.Path, default=None, help=f"output folder (default {RESULTS})")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip (and record) an impl that would start past this many seconds, judging by "
                             "the longest impl so far; the slowest impl goes last")
    parser.add_argument("--profile", action="store_true",
                        help="trace the last two steps of each impl with command buffers off; writes only "
                             "the per-op time tables, train_gpu_<device>_ops.md")
    args = parser.parse_args()
    if args.profile:  # before JAX starts its backend, which reads XLA_FLAGS once
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {NO_COMMAND_BUFFERS}".strip()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = jax.devices()[0]
    if device.platform not in ("gpu", "cuda") and not args.smoke:
        raise SystemExit(f"benchmarks/train_gpu.py measures a GPU; found {device.platform}. Use --smoke.")
    results = args.results or RESULTS
    slug = re.sub(r"[^A-Za-z0-9]+", "_", device.device_kind).strip("_").lower()
    path = results / (f"train_gpu_{slug}_ops.md" if args.profile else f"train_gpu_{slug}.md")
    write = not args.smoke or args.results is not None
    rows = []
    start = time.perf_counter()
    for impl in args.impls.split(","):
        longest = max((r.get("wall_s", 0.0) for r in rows), default=0.0)
        if args.budget_s is not None and time.perf_counter() - start + longest > args.budget_s:
            rows.append({"impl": impl, "note": f"skipped: time budget ({args.budget_s:.0f} s)"})
        else:
            with tempfile.TemporaryDirectory(prefix=f"train_gpu_{impl}_") as run_dir:
                rows.append(measure(impl, args.steps, args.smoke, pathlib.Path(run_dir), args.profile))
        print({k: v for k, v in rows[-1].items() if k != "ops"}, flush=True)
        if write:  # after every impl: a run stopped by its time limit keeps what it measured
            results.mkdir(parents=True, exist_ok=True)
            path.write_text(_ops_markdown(rows, device.device_kind) if args.profile
                            else _markdown(rows, device.device_kind, args.smoke))
    print(f"wrote {path}" if write else f"smoke run: {len(rows)} impls, nothing written")


if __name__ == "__main__":
    main()
