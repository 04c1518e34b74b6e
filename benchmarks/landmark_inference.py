"""Inference memory of landmark retrieval against the context (cache) length, up to 128k cached tokens.

Prefill-free: each point builds a :class:`lca.attention.BlockCache` of ``n`` random blocks (keys before
rotary, values) and measures one step of :func:`lca.attention.landmark_retrieval_attention` (rotary
embeddings through ``lca.models.rope.apply_rope``, ``selection="per_head"``, the default) for ``t``
queries: a decode step (``t = 1``, a local window of 32 keys, mid-block) or a chunk of one block
(``t = L = 64``, its own 64 keys as the window). 4 query heads, 2 kv heads, head_dim 64, float32, L = 64,
top_k = 4.

For contrast, plain full attention over the same context: the cached and local keys in one contiguous
``[1, n * L + window, 2, 64]`` array (the layout of an ordinary KV cache, keys already rotated), the queries
the last ``t`` positions, through ``attention(impl="xla")`` (dense logits) and ``impl="blockwise"``.

A retrieval step should need memory for the ``n`` landmark keys (``n * 2 * 64`` floats, 1/L of the cached
keys) and their scores, plus the ``top_k`` blocks each query and head gathers, never the whole context.
Peak extra memory of one execution after compilation (VmHWM, ``benchmarks/peak_memory.py``) in a fresh
subprocess per point; XLA's temp-buffer size of the compiled step beside it (exact, noise-free). Time:
one fresh process per (t, n) holds both layouts and times the three methods in turn per round.

    python benchmarks/landmark_inference.py                     # full sweep, writes results
    python benchmarks/landmark_inference.py --contexts 4096,16384 --out /tmp/r

Writes ``landmark_inference.md``, ``landmark_inference.png`` and ``landmark_inference.json`` under ``--out``.
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 64
BLOCK_SIZE = 64
TOP_K = 4
F32 = 4
METHODS = ("retrieval", "full_xla", "full_blockwise")
QUERIES = {1: 32, BLOCK_SIZE: BLOCK_SIZE}  # t -> local window length s
CONTEXTS = tuple(4096 * 2**i for i in range(6))  # 4k .. 128k cached tokens
TOP_KS = (1, 2, 4, 8, 16)


def _inputs(method: str, t: int, context: int):
    """Random queries, local window and context for one step; the same numbers for every method."""
    import jax.numpy as jnp
    import numpy as np

    from lca.attention import BlockCache

    s = QUERIES[t]
    rng = np.random.default_rng(0)
    normal = lambda *shape: rng.standard_normal(shape, np.float32)  # noqa: E731
    q = jnp.asarray(normal(1, t, HEADS, HEAD_DIM))
    k_local, v_local = normal(1, s, KV_HEADS, HEAD_DIM), normal(1, s, KV_HEADS, HEAD_DIM)
    n = context // BLOCK_SIZE
    keys, values = normal(1, n, BLOCK_SIZE, KV_HEADS, HEAD_DIM), normal(1, n, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    if method == "retrieval":
        cache = BlockCache(jnp.asarray(keys), jnp.asarray(values), jnp.int32(n))  # unbounded: all n slots used
        return q, jnp.asarray(k_local), jnp.asarray(v_local), cache
    flat = lambda x: x.reshape(1, n * BLOCK_SIZE, KV_HEADS, HEAD_DIM)  # noqa: E731
    return (q, jnp.asarray(np.concatenate([flat(keys), k_local], 1)),
            jnp.asarray(np.concatenate([flat(values), v_local], 1)))


def _step(method: str, top_k: int):
    import functools

    from lca.attention import attention, landmark_retrieval_attention
    from lca.models.rope import apply_rope

    if method == "retrieval":
        return functools.partial(landmark_retrieval_attention, block_size=BLOCK_SIZE, top_k=top_k, rope=apply_rope)
    return functools.partial(attention, impl=method.removeprefix("full_"), causal=True)


def _compiled(method: str, t: int, context: int, top_k: int):
    import jax

    args = _inputs(method, t, context)
    return jax.jit(_step(method, top_k)).lower(*args).compile(), args


def run_memory_point(method: str, t: int, context: int, top_k: int) -> dict:
    """In this (fresh) process: build the cache, compile, then the peak extra memory of one step."""
    sys.path.insert(0, HERE)
    from peak_memory import memory_point

    compiled, args = _compiled(method, t, context, top_k)
    return {"method": method, "t": t, "context": context, "top_k": top_k, **memory_point(compiled, *args)}


def run_timing_point(t: int, context: int, rounds: int) -> list[dict]:
    """In this (fresh) process: the three methods of one (t, context), timed side by side."""
    sys.path.insert(0, HERE)
    from timing import interleaved_median_seconds

    calls = {m: _compiled(m, t, context, TOP_K) for m in METHODS}
    return [{"method": m, "t": t, "context": context, "seconds": s}
            for m, s in interleaved_median_seconds(calls, rounds).items()]


# ------------------------------------------------------------------------------------------------ sizes


def cache_bytes(context: int) -> int:
    """K and V of the cached blocks."""
    return 2 * context * KV_HEADS * HEAD_DIM * F32


def landmark_key_bytes(context: int) -> int:
    """One landmark key per cached block and kv head."""
    return context // BLOCK_SIZE * KV_HEADS * HEAD_DIM * F32


def retrieved_bytes(t: int, top_k: int) -> int:
    """K and V of the ``top_k`` blocks every query and head gathers."""
    return 2 * t * HEADS * top_k * BLOCK_SIZE * HEAD_DIM * F32


def dense_logit_bytes(t: int, context: int) -> int:
    """Full attention's ``[t, heads, context]`` logits (dense: once more for the probabilities)."""
    return t * HEADS * (context + QUERIES[t]) * F32


# ------------------------------------------------------------------------------------------------ results


def _mib(b):
    return f"{b / 2**20:,.2f}"


def _ok(p):
    return p is not None and "error" not in p


def write_results(points, top_k_points, machine, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    by = {(p["method"], p["t"], p["context"]): p for p in points}
    cell = lambda p, key, fmt: fmt(p[key]) if _ok(p) and key in p else ("failed" if p else "not run")  # noqa: E731
    lines = [
        "# Landmark retrieval at inference: memory against the context length",
        "",
        f"Machine: {machine}.",
        f"One step of `landmark_retrieval_attention` over a `BlockCache` of n blocks (no prefill): batch 1, "
        f"{HEADS} query heads, {KV_HEADS} kv heads, head_dim {HEAD_DIM}, float32, L = {BLOCK_SIZE}, "
        f"top_k = {TOP_K} per query and head (`selection=\"per_head\"`), rotary embeddings applied inside the "
        "step. Full attention: the same context as one contiguous KV array, `attention(impl=\"xla\")` (dense) "
        "and `impl=\"blockwise\"`. Peak = extra resident memory of one step after compilation (VmHWM, inputs "
        "and cache excluded, output included), each point in a fresh subprocess; XLA temp = the compiled "
        "step's temp buffers (`memory_analysis()`). Time = median of side-by-side rounds (the three methods "
        "of one row timed in turn in one process).",
        "Sizes (computed, not measured): cache = cached K + V; landmark keys = one key per block and kv head; "
        f"retrieved = K + V of top_k blocks for every query and head (t x {HEADS} x top_k x L x {HEAD_DIM}).",
        "Produced by `python benchmarks/landmark_inference.py`.",
        "",
    ]
    for t in sorted({p["t"] for p in points}):
        kind = "decode step" if t == 1 else "chunk of one block"
        lines += [
            f"## t = {t} ({kind}, local window {QUERIES[t]} keys)",
            "",
            "| cached tokens | blocks n | cache MiB | landmark keys MiB | retrieved MiB "
            "| retrieval peak MiB | retrieval XLA temp MiB | full xla peak MiB | full xla temp MiB "
            "| full blockwise peak MiB | full blockwise temp MiB | retrieval s | full xla s | full blockwise s |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for c in sorted({p["context"] for p in points if p["t"] == t}):
            row = {m: by.get((m, t, c)) for m in METHODS}
            cells = [f"{c:,}", f"{c // BLOCK_SIZE:,}", _mib(cache_bytes(c)), _mib(landmark_key_bytes(c)),
                     _mib(retrieved_bytes(t, TOP_K))]
            for m in METHODS:
                cells += [cell(row[m], "peak_bytes", _mib), cell(row[m], "xla_temp_bytes", _mib)]
            cells += [cell(row[m], "seconds", lambda s: f"{s:.4f}") for m in METHODS]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += _growth_table(by)
    lines += _reading(by)
    if top_k_points:
        context = top_k_points[0]["context"]
        lines += [
            f"## Retrieval against top_k at {context:,} cached tokens",
            "",
            "| t | top_k | retrieved MiB | retrieval peak MiB | retrieval XLA temp MiB | step s (first run, alone) |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for p in sorted(top_k_points, key=lambda p: (p["t"], p["top_k"])):
            lines.append("| " + " | ".join([
                str(p["t"]), str(p["top_k"]), _mib(retrieved_bytes(p["t"], p["top_k"])),
                cell(p, "peak_bytes", _mib), cell(p, "xla_temp_bytes", _mib),
                cell(p, "seconds_alone", lambda s: f"{s:.4f}"),
            ]) + " |")
        lines.append("")
    lines += ["![memory and time vs cached tokens](landmark_inference.png)", ""]
    with open(os.path.join(out_dir, "landmark_inference.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(out_dir, "landmark_inference.json"), "w") as f:
        json.dump({"machine": machine, "points": points, "top_k_points": top_k_points}, f, indent=1)
    _plot(points, top_k_points, machine, os.path.join(out_dir, "landmark_inference.png"))


def _growth_table(by) -> list[str]:
    """Extra memory added per cached block, between the shortest and the longest context."""
    contexts = sorted({c for (_, _, c) in by})
    if len(contexts) < 2:
        return []
    lo, hi = contexts[0], contexts[-1]
    blocks = (hi - lo) // BLOCK_SIZE
    lines = [
        f"## Growth per cached block ({lo:,} to {hi:,} cached tokens)",
        "",
        f"Extra memory added per cached block, against what one block holds: its landmark key "
        f"({landmark_key_bytes(BLOCK_SIZE):,} B) and all its K + V ({cache_bytes(BLOCK_SIZE):,} B).",
        "",
        "| t | method | XLA temp B / block | peak (VmHWM) B / block |",
        "|---:|---|---:|---:|",
    ]
    for t in sorted({t for (_, t, _) in by}):
        for m in METHODS:
            a, b = by.get((m, t, lo)), by.get((m, t, hi))
            if not (_ok(a) and _ok(b)):
                continue
            per = lambda key: f"{(b[key] - a[key]) / blocks:,.0f}"  # noqa: E731
            lines.append(f"| {t} | {m} | {per('xla_temp_bytes')} | {per('peak_bytes')} |")
    return lines + [""]


def _reading(by) -> list[str]:
    """What the tables say at the longest context, computed from them."""
    longest = max(c for (_, _, c) in by)
    rows = {(m, t): by.get((m, t, longest)) for (m, t, _) in by}
    if not all(_ok(p) for p in rows.values()):
        return []
    mib = lambda m, t: _mib(rows[(m, t)]["xla_temp_bytes"])  # noqa: E731
    shortest = min(c for (_, _, c) in by)
    growth = max((rows[(m, t)]["xla_temp_bytes"] - by[(m, t, shortest)]["xla_temp_bytes"])
                 / ((longest - shortest) // BLOCK_SIZE) for (m, t) in rows if m == "retrieval")
    return [
        "## Reading",
        "",
        f"At {longest:,} cached tokens ({_mib(cache_bytes(longest))} MiB of K + V), one decode step (t = 1) "
        f"with retrieval needs {mib('retrieval', 1)} MiB of XLA temp buffers, full attention "
        f"{mib('full_xla', 1)} MiB (xla) and {mib('full_blockwise', 1)} MiB (blockwise); a chunk of "
        f"t = {BLOCK_SIZE} queries {mib('retrieval', BLOCK_SIZE)} MiB against {mib('full_xla', BLOCK_SIZE)} / "
        f"{mib('full_blockwise', BLOCK_SIZE)} MiB.",
        "",
        f"The retrieval step's temp buffers grow by at most {growth:,.0f} B per cached block (growth table), "
        f"against a landmark key's {landmark_key_bytes(BLOCK_SIZE):,} B and a block's K + V "
        f"{cache_bytes(BLOCK_SIZE):,} B: it reads the landmark keys and their scores, and gathers only the "
        "top_k blocks of each query and head, whose K + V dominate its memory for a chunk (top_k table: "
        "linear in top_k and in t, independent of the cache). Full attention grows by about a whole block's K + V per cached block or "
        "more: beyond its logits it copies the cache into its own layout on every step. With t queries per "
        "chunk, the gather is per query and head (t x heads x top_k blocks), so a long prefill chunk costs "
        "more than one decode step by that factor.",
        "",
    ]


def _plot(points, top_k_points, machine, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sys.path.insert(0, HERE)
    from log_axes import style_log_log

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    contexts = sorted({p["context"] for p in points})
    styles = {"retrieval": "o-", "full_xla": "s--", "full_blockwise": "^:"}
    for t, color_shift in zip(sorted({p["t"] for p in points}), (0, 3)):
        for i, m in enumerate(METHODS):
            color = f"C{i + color_shift}"
            pts = sorted((p for p in points if p["method"] == m and p["t"] == t and _ok(p)), key=lambda p: p["context"])
            xs = [p["context"] for p in pts]
            axes[0].plot(xs, [max(p["xla_temp_bytes"], 1) / 2**20 for p in pts], styles[m], color=color,
                         label=f"{m}, t={t}: XLA temp")
            timed = [p for p in pts if "seconds" in p]
            axes[1].plot([p["context"] for p in timed], [p["seconds"] for p in timed], styles[m], color=color,
                         label=f"{m}, t={t}")
    axes[0].plot(contexts, [cache_bytes(c) / 2**20 for c in contexts], "-", color="gray", lw=3, alpha=0.4,
                 label="the cache itself (K + V)")
    axes[0].plot(contexts, [landmark_key_bytes(c) / 2**20 for c in contexts], ":", color="black",
                 label="landmark keys (computed)")
    style_log_log(axes[0], "cached tokens", "extra memory of one step (MiB)")
    style_log_log(axes[1], "cached tokens", "time per step (s)")
    for t in sorted({p["t"] for p in top_k_points}):
        pts = sorted((p for p in top_k_points if p["t"] == t and _ok(p)), key=lambda p: p["top_k"])
        ks = [p["top_k"] for p in pts]
        axes[2].plot(ks, [p["xla_temp_bytes"] / 2**20 for p in pts], "o-", label=f"t={t}: XLA temp")
        axes[2].plot(ks, [max(p["peak_bytes"], 1) / 2**20 for p in pts], "x--", label=f"t={t}: peak (VmHWM)")
        axes[2].plot(ks, [retrieved_bytes(t, k) / 2**20 for k in ks], ":", color="gray",
                     label=f"t={t}: retrieved K+V (computed)")
    if top_k_points:
        style_log_log(axes[2], f"top_k (at {top_k_points[0]['context']:,} cached tokens)", "extra memory (MiB)")
    fig.suptitle(f"Landmark retrieval (L={BLOCK_SIZE}, top_k={TOP_K}) vs full attention over the same "
                 f"context — {machine}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    sys.path.insert(0, HERE)
    from peak_memory import attach_seconds, point_or_rewrite, run_fresh, sweep_parser

    parser = sweep_parser(__doc__, timeout=600, out=os.path.join(HERE, "results"))
    parser.add_argument("--contexts", default=",".join(map(str, CONTEXTS)), help="cached tokens (multiples of 64)")
    parser.add_argument("--top-ks", default=",".join(map(str, TOP_KS)), help="top_k sweep at the longest context")
    parser.add_argument("--rounds", type=int, default=5, help="side-by-side timing rounds per row")
    args = parser.parse_args()
    points = {"memory": lambda method, *sizes: run_memory_point(method, *map(int, sizes)),
              "timing": lambda *sizes: run_timing_point(*map(int, sizes))}
    if point_or_rewrite(args, write_results, points):
        return

    from machine import describe

    machine = f"{describe()}; load average at start {os.getloadavg()[0]:.1f}"
    contexts = [int(c) for c in args.contexts.split(",")]
    points = []
    for t in QUERIES:
        for c in contexts:
            for m in METHODS:
                label = {"method": m, "t": t, "context": c, "top_k": TOP_K}
                p = run_fresh(__file__, f"memory,{m},{t},{c},{TOP_K}", args.timeout, label)
                points.append(p)
                shown = p.get("error") or f"peak {_mib(p['peak_bytes'])} MiB, XLA temp {_mib(p['xla_temp_bytes'])} MiB"
                print(f"t={t:>3} context={c:>7} {m:>15}: {shown}", flush=True)
            timed = run_fresh(__file__, f"timing,{t},{c},{args.rounds}", args.timeout, {"t": t, "context": c})
            for s in attach_seconds(points, timed, ("method", "t", "context")):
                shown = s.get("error") or f"{s['method']:>15}: {s['seconds']:.4f} s"
                print(f"t={t:>3} context={c:>7} {shown}", flush=True)
    top_k_points = []
    for t in QUERIES:
        for k in map(int, args.top_ks.split(",")):
            label = {"method": "retrieval", "t": t, "context": max(contexts), "top_k": k}
            same = [p for p in points if all(p[key] == value for key, value in label.items())]
            p = same[0] if same else run_fresh(__file__, f"memory,retrieval,{t},{max(contexts)},{k}", args.timeout, label)
            top_k_points.append(p)
            shown = p.get("error") or f"peak {_mib(p['peak_bytes'])} MiB, XLA temp {_mib(p['xla_temp_bytes'])} MiB"
            print(f"t={t:>3} top_k={k:>3}: {shown}", flush=True)
    machine += f", at end {os.getloadavg()[0]:.1f}"
    write_results(points, top_k_points, machine, args.out)
    print(f"wrote {args.out}/landmark_inference.{{md,png,json}}")


if __name__ == "__main__":
    main()
