"""Training-time cost of landmark attention's grouped softmax against plain blockwise attention.

Same inputs for both: batch 1, 1 head, head_dim 64, float32, causal, T tokens (for landmark attention
every 64th position is a landmark, block_size L = 64, the paper's). Methods:

* ``blockwise``: ``lca.attention.attention(..., impl="blockwise")``, its default 512 x 512 tiles (causal
  tiles above the diagonal skipped);
* ``landmark``: ``lca.attention.landmark_attention``, its default key chunk ``kv_block = L`` (the attention
  block is the landmark block, as in the reference kernel);
* ``landmark_kv512``: the same with ``kv_block = 512``, blockwise's key tile.

Peak extra memory of one execution (after compilation) is measured in a fresh subprocess per point
(``benchmarks/peak_memory.py``, VmHWM on CPU); XLA's own temp-buffer size of the compiled call is listed
too. Time is measured side by side: one fresh process per T compiles every (method, mode) and times them
in turn within each round (``timing.interleaved_median_seconds``), so all share the load of the moment.

    python benchmarks/landmark_train.py                       # full sweep, writes results
    python benchmarks/landmark_train.py --lengths 1024,2048 --out /tmp/r

Writes ``landmark_train.md``, ``landmark_train.png`` and ``landmark_train.json`` under ``--out``.
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
HEAD_DIM = 64
BLOCK_SIZE = 64
METHODS = ("blockwise", "landmark", "landmark_kv512")
MODES = ("fwd", "fwd+bwd")
LENGTHS = tuple(1024 * 2**i for i in range(5))  # 1k .. 16k


def _attention(method: str):
    import functools

    from lca.attention import attention, landmark_attention

    if method == "blockwise":
        return functools.partial(attention, impl="blockwise", causal=True)
    kv_block = {"landmark": None, "landmark_kv512": 512}[method]
    return functools.partial(landmark_attention, block_size=BLOCK_SIZE, kv_block=kv_block)


def _compiled(method: str, mode: str, t: int):
    """``(compiled call, its args)`` for one point; inputs are the same for every method."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    attention = _attention(method)
    if mode == "fwd":
        fn = attention
    else:
        fn = jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v)), argnums=(0, 1, 2))
    rng = np.random.default_rng(0)
    args = tuple(jnp.asarray(rng.standard_normal((1, t, 1, HEAD_DIM), np.float32)) for _ in range(3))
    return jax.jit(fn).lower(*args).compile(), args


def run_memory_point(method: str, mode: str, t: int) -> dict:
    """In this (fresh) process: compile, then the peak extra memory of one execution."""
    sys.path.insert(0, HERE)
    from peak_memory import memory_point

    compiled, args = _compiled(method, mode, t)
    return {"method": method, "mode": mode, "T": t, **memory_point(compiled, *args)}


def run_timing_point(t: int, rounds: int) -> list[dict]:
    """In this (fresh) process: every (method, mode) at length ``t``, timed side by side."""
    sys.path.insert(0, HERE)
    from timing import interleaved_median_seconds

    calls = {(m, mode): _compiled(m, mode, t) for m in METHODS for mode in MODES}
    seconds = interleaved_median_seconds(calls, rounds)
    return [{"method": m, "mode": mode, "T": t, "seconds": s} for (m, mode), s in seconds.items()]


def _mib(b):
    return f"{b / 2**20:,.1f}"


def write_results(points, machine, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    by = {(p["method"], p["mode"], p["T"]): p for p in points}
    ok = lambda p: p is not None and "error" not in p  # noqa: E731
    lines = [
        "# Landmark attention vs blockwise attention: training-time memory and time",
        "",
        f"Machine: {machine}.",
        f"Batch 1, 1 head, head_dim {HEAD_DIM}, float32, causal; landmark block_size L = {BLOCK_SIZE}. "
        "`blockwise`: `attention(impl=\"blockwise\")`, 512 x 512 tiles; `landmark`: `landmark_attention`, "
        f"key chunk kv_block = L = {BLOCK_SIZE} (its default); `landmark_kv512`: kv_block = 512. "
        "Peak = extra resident memory of one execution after compilation (VmHWM), each point in a fresh "
        "subprocess; XLA temp = the compiled call's temp buffers (`memory_analysis()`). Time = median of "
        "the side-by-side rounds, all methods and modes of one T in one process, timed in turn.",
        "Produced by `python benchmarks/landmark_train.py`.",
        "",
    ]
    for mode in MODES:
        lines += [
            f"## {mode}",
            "",
            "| T | blockwise MiB | landmark MiB | landmark_kv512 MiB | landmark / blockwise memory "
            "| blockwise s | landmark s | landmark_kv512 s | landmark / blockwise time "
            "| XLA temp MiB (blockwise / landmark / kv512) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for t in sorted({p["T"] for p in points}):
            row = {m: by.get((m, mode, t)) for m in METHODS}
            cells = [f"{t:,}"]
            cells += [_mib(row[m]["peak_bytes"]) if ok(row[m]) and "peak_bytes" in row[m] else "failed" for m in METHODS]
            b, lm = row["blockwise"], row["landmark"]
            both = ok(b) and ok(lm)
            cells.append(f"{lm['peak_bytes'] / max(b['peak_bytes'], 1):.1f}x" if both and "peak_bytes" in b else "—")
            cells += [f"{row[m]['seconds']:.3f}" if ok(row[m]) and "seconds" in row[m] else "—" for m in METHODS]
            cells.append(f"{lm['seconds'] / b['seconds']:.1f}x" if both and "seconds" in b and "seconds" in lm else "—")
            cells.append(" / ".join(_mib(row[m]["xla_temp_bytes"]) if ok(row[m]) and "xla_temp_bytes" in row[m]
                                    else "—" for m in METHODS))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += _reading(by, ok)
    lines += ["![memory and time vs T](landmark_train.png)", ""]
    with open(os.path.join(out_dir, "landmark_train.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(out_dir, "landmark_train.json"), "w") as f:
        json.dump({"machine": machine, "points": points}, f, indent=1)
    _plot(points, machine, os.path.join(out_dir, "landmark_train.png"))


def _reading(by, ok) -> list[str]:
    """What the tables say, computed from them: memory and time ratios at the longest T, and why."""
    longest = max(t for (_, _, t) in by)
    b, lm, wide = (by.get((m, "fwd+bwd", longest)) for m in METHODS)
    if not all(ok(p) and "peak_bytes" in p for p in (b, lm, wide)):
        return []
    ratios = [by[("landmark", "fwd+bwd", t)]["seconds"] / by[("blockwise", "fwd+bwd", t)]["seconds"]
              for (m, mode, t) in by if m == "blockwise" and mode == "fwd+bwd"
              and "seconds" in by[(m, mode, t)] and "seconds" in by.get(("landmark", mode, t), {})]
    return [
        "## Reading",
        "",
        f"At T = {longest:,}, fwd+bwd: landmark attention's peak is {lm['peak_bytes'] / b['peak_bytes']:.1f}x "
        f"blockwise's ({_mib(lm['peak_bytes'])} vs {_mib(b['peak_bytes'])} MiB), with kv_block = 512 "
        f"{wide['peak_bytes'] / b['peak_bytes']:.1f}x; both grow linearly in T (O(n) memory)."
        + (f" Its fwd+bwd time is {min(ratios):.1f}x to {max(ratios):.1f}x blockwise's over the lengths run."
           if ratios else ""),
        "",
        "Why: `landmark_attention` tiles the queries (q_block = 512) and, like blockwise, skips the key "
        "chunks wholly after a tile (about half of them, causal); its working set is q_block x kv_block per "
        "step. The rest of its cost is the grouped softmax's second (within-block) softmax and the landmark "
        "pseudo-keys of every chunk. "
        "Times come from a shared 2-core machine at the load given above: compare within a row; a single "
        "row can be off.",
        "",
    ]


def _plot(points, machine, path):
    sys.path.insert(0, HERE)
    from log_axes import plot_memory_and_time

    styles = {"blockwise": "o-", "landmark": "s-", "landmark_kv512": "^-"}
    curves = [
        (f"{m} {mode}", styles[m] + dash,
         [p for p in points if p["method"] == m and p["mode"] == mode and "peak_bytes" in p and "seconds" in p])
        for mode, dash in (("fwd", ""), ("fwd+bwd", "-"))
        for m in METHODS
    ]
    plot_memory_and_time(curves, f"Landmark (L={BLOCK_SIZE}) vs blockwise attention, head_dim {HEAD_DIM}, "
                                 f"float32 — {machine}", path, title_size=7)


def main():
    sys.path.insert(0, HERE)
    from peak_memory import attach_seconds, point_or_rewrite, run_fresh, sweep_parser

    parser = sweep_parser(__doc__, timeout=1200, out=os.path.join(HERE, "results"))
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--rounds", type=int, default=3, help="side-by-side timing rounds per T")
    args = parser.parse_args()
    points = {"memory": lambda method, mode, t: run_memory_point(method, mode, int(t)),
              "timing": lambda t, rounds: run_timing_point(int(t), int(rounds))}
    if point_or_rewrite(args, write_results, points):
        return

    from machine import describe

    machine = f"{describe()}; load average at start {os.getloadavg()[0]:.1f}"
    points = []
    for t in map(int, args.lengths.split(",")):
        for method in METHODS:
            for mode in MODES:
                label = {"method": method, "mode": mode, "T": t}
                p = run_fresh(__file__, f"memory,{method},{mode},{t}", args.timeout, label)
                points.append(p)
                print(f"T={t:>6} {method:>15} {mode:>7}: {p.get('error') or _mib(p['peak_bytes']) + ' MiB'}",
                      flush=True)
        timed = run_fresh(__file__, f"timing,{t},{args.rounds}", args.timeout, {"T": t})
        for s in attach_seconds(points, timed, ("method", "mode", "T")):
            shown = s.get("error") or f"{s['method']:>15} {s['mode']:>7}: {s['seconds']:.3f} s"
            print(f"T={t:>6} {shown}", flush=True)
    machine += f", at end {os.getloadavg()[0]:.1f}"
    write_results(points, machine, args.out)
    print(f"wrote {args.out}/landmark_train.{{md,png,json}}")


if __name__ == "__main__":
    main()
