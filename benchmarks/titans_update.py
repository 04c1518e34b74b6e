"""Titans memory update: chunk-parallel vs token-by-token speed, and peak memory vs sequence length.

One memory stream (one batch row, one head): head_dim 64, a depth-2 memory MLP
(hidden 128, SiLU), float32, random tokens and gates. "chunked" is
``lca.memory.update.memorize_chunked`` (gradients at chunk-start weights, dual
form, associative scan); "sequential" is the ``lax.scan`` oracle
``lca.memory.sequential.memorize_sequential`` with the same semantics. Each point
(method, mode, T) runs in a fresh subprocess: compile, then peak extra memory of
one execution (benchmarks/peak_memory.py), then the median time of up to 4 runs.

    python benchmarks/titans_update.py                      # full sweep, writes results
    python benchmarks/titans_update.py --lengths 1024,4096 --out /tmp/r

Writes ``titans_update.md``, ``titans_update.png`` and ``titans_update.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

DIM = 64
DEPTH = 2
METHODS = ("chunked", "sequential")
MODES = ("fwd", "fwd+bwd")
LENGTHS = tuple(1024 * 2**i for i in range(7))  # 1k .. 64k
SPEED_T = 4096
SPEED_CHUNKS = (16, 64, 256)


def run_point(method: str, mode: str, t: int, chunk: int) -> dict:
    """In this (fresh) process: compile, measure one execution's peak, then time it."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from peak_memory import measure

    from lca.memory import mlp
    from lca.memory.sequential import memorize_sequential
    from lca.memory.update import MemoryTokens, memorize_chunked

    memorize = memorize_chunked if method == "chunked" else memorize_sequential
    rng = np.random.default_rng(0)

    def arr(*shape, scale=1.0):
        return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)

    sigmoid = lambda x: 1 / (1 + jnp.exp(-x))  # noqa: E731
    tokens = MemoryTokens(
        q=arr(t, DIM), k=arr(t, DIM, scale=DIM**-0.5), v=arr(t, DIM),
        lr=0.1 * sigmoid(arr(t)), momentum=sigmoid(arr(t) + 2), forget=0.05 * sigmoid(arr(t)),
    )
    weights = mlp.init_weights(jax.random.PRNGKey(0), mlp.layer_widths(DIM, DEPTH, 2))
    momentum = jax.tree.map(jnp.zeros_like, weights)
    stop = t // chunk

    def forward(weights, momentum, tokens):
        return memorize(weights, momentum, tokens, chunk_size=chunk, act=jax.nn.silu, stop=stop)

    if mode == "fwd":
        fn = forward
    else:
        fn = jax.grad(
            lambda w, s, tok: jnp.sum(forward(w, s, tok)[0]) + sum(jnp.sum(x) for x in jax.tree.leaves(forward(w, s, tok)[1])),
            argnums=(0, 1, 2),
        )
    compiled = jax.jit(fn).lower(weights, momentum, tokens).compile()
    peak, first = measure(compiled, weights, momentum, tokens)
    times = [first]
    if first < 5.0:
        for _ in range(3):
            times.append(measure(compiled, weights, momentum, tokens)[1])
    return {
        "method": method, "mode": mode, "T": t, "chunk": chunk,
        "peak_bytes": peak, "output_bytes": t * DIM * 4, "seconds": float(np.median(times)),
    }


def _spawn(method, mode, t, chunk, timeout):
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    from peak_memory import env

    cmd = [sys.executable, os.path.abspath(__file__), "--point", f"{method},{mode},{t},{chunk}"]
    environment = env()
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(here), environment.get("PYTHONPATH")]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=environment)
    except subprocess.TimeoutExpired:
        return {"method": method, "mode": mode, "T": t, "chunk": chunk, "error": f"timeout after {timeout}s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {"method": method, "mode": mode, "T": t, "chunk": chunk, "error": tail[0][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mib(b):
    return f"{b / 2**20:,.2f}"


def write_results(speed, sweep, machine, chunk, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    ok = lambda p: p and "error" not in p  # noqa: E731
    lines = [
        "# Titans memory update: chunk-parallel vs sequential",
        "",
        f"Machine: {machine}.",
        f"One memory stream: head_dim {DIM}, depth-{DEPTH} memory MLP (hidden {2 * DIM}, SiLU), float32, "
        f"chunk size {chunk}. Each point in a fresh subprocess; time is the median of up to 4 runs after "
        "compilation; peak is the extra memory of one execution (inputs excluded, output included).",
        "Produced by `python benchmarks/titans_update.py`.",
        "",
        f"## Speed at T = {SPEED_T:,}",
        "",
        "Same chunk semantics in both; the sequential scan's cost does not depend on the chunk size.",
        "",
        "| mode | chunk | chunked s | sequential s | speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        s = next((p for (m, md, _), p in speed.items() if m == "sequential" and md == mode), None)
        for c in (p for (m, md, _), p in speed.items() if m == "chunked" and md == mode):
            cells = [mode, str(c["chunk"]), f"{c['seconds']:.4f}" if ok(c) else "failed"]
            cells.append(f"{s['seconds']:.4f}" if ok(s) else "failed")
            cells.append(f"{s['seconds'] / c['seconds']:.1f}x" if ok(c) and ok(s) else "—")
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Peak memory vs sequence length (forward)",
        "",
        "The state is constant (the MLP weights and momentum); beyond the output ``y [T, 64]`` "
        "the update needs O(chunk) activations per step.",
        "",
        "| T | output MiB | chunked peak MiB | chunked peak - output MiB | sequential peak MiB | chunked s | sequential s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in sorted({p["T"] for p in sweep}):
        c = next((p for p in sweep if p["T"] == t and p["method"] == "chunked"), None)
        s = next((p for p in sweep if p["T"] == t and p["method"] == "sequential"), None)
        out = t * DIM * 4
        lines.append(
            "| " + " | ".join([
                f"{t:,}", _mib(out),
                _mib(c["peak_bytes"]) if ok(c) else "failed",
                _mib(c["peak_bytes"] - out) if ok(c) else "—",
                _mib(s["peak_bytes"]) if ok(s) else ("not run" if s is None else "failed"),
                f"{c['seconds']:.4f}" if ok(c) else "—",
                f"{s['seconds']:.4f}" if ok(s) else "—",
            ]) + " |"
        )
    lines += ["", "![peak memory and time vs T](titans_update.png)", ""]
    with open(os.path.join(out_dir, "titans_update.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(out_dir, "titans_update.json"), "w") as f:
        json.dump({"machine": machine, "speed": list(speed.values()), "sweep": sweep}, f, indent=1)
    _plot(sweep, machine, chunk, os.path.join(out_dir, "titans_update.png"))


def _plot(sweep, machine, chunk, path):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from log_axes import plot_memory_and_time

    curves = [
        (method, style, [p for p in sweep if p["method"] == method and "error" not in p])
        for method, style in (("chunked", "o-"), ("sequential", "s--"))
    ]
    ts = sorted({p["T"] for p in sweep})
    plot_memory_and_time(
        curves,
        f"Titans memory update, head_dim {DIM}, depth {DEPTH}, chunk {chunk}, forward — {machine}",
        path,
        reference=("output y", ts, [t * DIM * 4 / 2**20 for t in ts]),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--point", help=argparse.SUPPRESS)
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--chunk", type=int, default=64, help="chunk size of the update")
    parser.add_argument("--sequential-max", type=int, default=16384, help="longest T for the sequential sweep")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per point")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    if args.point:
        method, mode, t, chunk = args.point.split(",")
        print(json.dumps(run_point(method, mode, int(t), int(chunk))))
        return

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from machine import describe

    machine = f"{describe()}; load average at start {os.getloadavg()[0]:.1f}"
    speed = {}
    for mode in MODES:
        # the sequential oracle's cost does not depend on the chunk size: run it once
        runs = [("sequential", args.chunk)] + [("chunked", c) for c in SPEED_CHUNKS]
        for method, chunk in runs:
            p = _spawn(method, mode, SPEED_T, chunk, args.timeout)
            speed[(method, mode, chunk)] = p
            shown = p.get("error") or f"{p['seconds']:.4f} s"
            print(f"speed T={SPEED_T} {method:>10} chunk {chunk:>4} {mode:>7}: {shown}", flush=True)
    sweep = []
    for t in map(int, args.lengths.split(",")):
        for method in METHODS:
            if method == "sequential" and t > args.sequential_max:
                continue
            p = _spawn(method, "fwd", t, args.chunk, args.timeout)
            sweep.append(p)
            shown = p.get("error") or f"{p['peak_bytes'] / 2**20:8.2f} MiB {p['seconds']:.4f} s"
            print(f"sweep T={t:>6} {method:>10}: {shown}", flush=True)
    machine += f", at end {os.getloadavg()[0]:.1f}"
    write_results(speed, sweep, machine, args.chunk, args.out)
    print(f"wrote {args.out}/titans_update.{{md,png,json}}")


if __name__ == "__main__":
    main()
