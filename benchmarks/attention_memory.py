"""Peak extra memory and time of attention vs sequence length: naive, XLA dense, lca blockwise.

Each point (method, forward or forward+backward, T) runs in a fresh subprocess
so peaks never leak between points. Batch 1, 1 head, head_dim 64, float32,
causal, as in "Self-attention Does Not Need O(n^2) Memory" (Rabe & Staats).

    python benchmarks/attention_memory.py                 # full sweep, writes results
    python benchmarks/attention_memory.py --lengths 1024,4096 --out /tmp/r

Writes ``attention_memory.md`` (table), ``attention_memory.png`` (log-log plot)
and ``attention_memory.json`` (raw points) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HEAD_DIM = 64
METHODS = ("naive", "xla", "blockwise")
MODES = ("fwd", "fwd+bwd")
LENGTHS = tuple(1024 * 2**i for i in range(8))  # 1k .. 128k
# Dense methods hold T^2 float32 logits (and more for the backward); past this
# they would take most of a 24 GB machine, so they are not run.
DENSE_MAX_T = 16384


def naive_attention(q, k, v):
    """Textbook causal softmax(q k^T / sqrt(d)) v, materialising [T, T]."""
    import jax
    import jax.numpy as jnp

    t = q.shape[1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    causal = jnp.tril(jnp.ones((t, t), bool))
    logits = jnp.where(causal, logits, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


def _attention_fn(method):
    import functools

    import jax

    from lca.attention import blockwise_attention

    if method == "naive":
        return naive_attention
    if method == "xla":
        return functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="xla")
    return functools.partial(blockwise_attention, causal=True)


def run_point(method: str, mode: str, t: int) -> dict:
    """In this (fresh) process: compile, then measure one execution, then time it."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from peak_memory import measure

    attention = _attention_fn(method)
    if mode == "fwd":
        fn = attention
    else:
        fn = jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v)), argnums=(0, 1, 2))
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, t, 1, HEAD_DIM), np.float32)) for _ in range(3))
    compiled = jax.jit(fn).lower(q, k, v).compile()
    peak, first = measure(compiled, q, k, v)
    times = [first]
    if first < 5.0:  # repeat short points; long ones are timed by the measured run
        for _ in range(3):
            times.append(measure(compiled, q, k, v)[1])
    return {"method": method, "mode": mode, "T": t, "peak_bytes": peak, "seconds": float(np.median(times))}


def _spawn(method, mode, t, timeout):
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    from peak_memory import env

    cmd = [sys.executable, os.path.abspath(__file__), "--point", f"{method},{mode},{t}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env())
    except subprocess.TimeoutExpired:
        return {"method": method, "mode": mode, "T": t, "error": f"timeout after {timeout}s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {"method": method, "mode": mode, "T": t, "error": tail[0][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt_mib(b):
    return f"{b / 2**20:,.1f}"


def write_results(points, machine, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    by = {(p["method"], p["mode"], p["T"]): p for p in points}
    lengths = sorted({p["T"] for p in points})
    lines = [
        "# Attention memory and time vs sequence length",
        "",
        f"Machine: {machine}.",
        "Batch 1, 1 head, head_dim 64, float32, causal. Peak extra memory of one execution "
        "(after compilation), each point in a fresh subprocess; time is the median of up to 4 runs. "
        f"Dense methods are not run past T={DENSE_MAX_T} (their T^2 buffers would not fit).",
        "Produced by `python benchmarks/attention_memory.py`.",
        "",
    ]
    for mode in MODES:
        lines += [
            f"## {mode}",
            "",
            "| T | naive MiB | xla MiB | blockwise MiB | naive / blockwise | naive s | xla s | blockwise s | blockwise / xla time |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for t in lengths:
            cells = [f"{t:,}"]
            row = {m: by.get((m, mode, t)) for m in METHODS}
            ok = {m: p for m, p in row.items() if p and "error" not in p}
            for m in METHODS:
                cells.append(_fmt_mib(ok[m]["peak_bytes"]) if m in ok else _cell_missing(row[m]))
            ratio = (
                f"{ok['naive']['peak_bytes'] / max(ok['blockwise']['peak_bytes'], 1):.0f}x"
                if "naive" in ok and "blockwise" in ok else "—"
            )
            cells.append(ratio)
            for m in METHODS:
                cells.append(f"{ok[m]['seconds']:.3f}" if m in ok else "—")
            cells.append(
                f"{ok['blockwise']['seconds'] / ok['xla']['seconds']:.2f}x"
                if "xla" in ok and "blockwise" in ok else "—"
            )
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["![memory and time vs T](attention_memory.png)", ""]
    with open(os.path.join(out_dir, "attention_memory.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(out_dir, "attention_memory.json"), "w") as f:
        json.dump({"machine": machine, "points": points}, f, indent=1)
    _plot(points, machine, os.path.join(out_dir, "attention_memory.png"))


def _cell_missing(p):
    if p is None:
        return "not run"
    return "failed" if "timeout" not in p.get("error", "") else "timeout"


def _plot(points, machine, path):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from log_axes import plot_memory_and_time

    styles = {"naive": "o-", "xla": "s-", "blockwise": "^-"}
    curves = [
        (f"{m} {mode}", styles[m] + dash, [p for p in points if p["method"] == m and p["mode"] == mode and "error" not in p])
        for mode, dash in (("fwd", ""), ("fwd+bwd", "-"))
        for m in METHODS
    ]
    plot_memory_and_time(curves, f"Causal attention, head_dim 64, float32 — {machine}", path, title_size=9)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--point", help=argparse.SUPPRESS)
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--timeout", type=int, default=900, help="seconds per point")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    if args.point:
        method, mode, t = args.point.split(",")
        print(json.dumps(run_point(method, mode, int(t))))
        return

    import jax

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from machine import describe

    machine = f"{describe()}; load average at start {os.getloadavg()[0]:.1f}"
    points = []
    for t in map(int, args.lengths.split(",")):
        for method in args.methods.split(","):
            if method != "blockwise" and t > DENSE_MAX_T:
                continue
            for mode in MODES:
                p = _spawn(method, mode, t, args.timeout)
                points.append(p)
                shown = p.get("error") or f"{p['peak_bytes'] / 2**20:9.1f} MiB {p['seconds']:8.3f} s"
                print(f"T={t:>7} {method:>9} {mode:>7}: {shown}", flush=True)
    write_results(points, machine, args.out)
    print(f"wrote {args.out}/attention_memory.{{md,png,json}}")
    del jax


if __name__ == "__main__":
    main()
