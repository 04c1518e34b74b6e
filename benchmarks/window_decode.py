"""Decoding a sliding-window layer: a ring of the window's slots vs a buffer of the whole context.

``lca.models.kv_cache`` gives a layer with window ``W`` (a ``local`` layer, Titans MAG/MAL's attention) a ring
of ``W`` slots; before, it kept a buffer of ``max_len`` slots and masked all but the window at every step.
Both are timed here side by side: one decoded token's ``attend_cached`` (jitted) with the cache filled to
``max_len - 1`` tokens, and the cache's size, for contexts of 1k-64k tokens. Each point (max_len) runs in a
fresh process; the two layouts are timed in turn (``timing.interleaved_median_seconds``) after checking
that they give the same output.

Shape (``SHAPE``): batch 1, 8 query heads over 2 KV heads of 128, window 512, float32 on this machine's CPU.

    python benchmarks/window_decode.py                  # full sweep, writes results
    python benchmarks/window_decode.py --point 4096     # one point, JSON on stdout
    python benchmarks/window_decode.py --report         # rewrite the page from its JSON

Writes ``window_decode.md``, ``window_decode.png`` and ``window_decode.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPE = {"batch": 1, "heads": 8, "kv_heads": 2, "head_dim": 128, "window": 512}
LENGTHS = (1024, 4096, 16384, 65536)


def run_point(max_len: int) -> dict:
    """In this (fresh) process: one decoded token through each layout, timed side by side."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, HERE)
    from timing import interleaved_median_seconds

    from lca.models.kv_cache import KVCache, attend_cached

    b, h, h_kv, d, w = (SHAPE[k] for k in ("batch", "heads", "kv_heads", "head_dim", "window"))
    keys = jax.random.normal(jax.random.PRNGKey(0), (b, max_len, h_kv, d))
    values = jax.random.normal(jax.random.PRNGKey(1), (b, max_len, h_kv, d))
    q = jax.random.normal(jax.random.PRNGKey(2), (b, 1, h, d))
    filled = max_len - 1  # the context before the decoded token
    # The caches as attend_cached leaves them after `filled` tokens, built directly: filling them by attention
    # would take a [filled, filled] score matrix per head.
    held = np.arange(filled - w, filled)  # the ring's tokens, in slots position mod w
    order = np.argsort(held % w)
    caches = {"ring": KVCache(keys[:, held[order]], values[:, held[order]], jnp.int32(filled),
                              jnp.asarray(held[order], jnp.int32)),
              "full buffer": KVCache(keys.at[:, filled:].set(0), values.at[:, filled:].set(0), jnp.int32(filled))}
    new_k, new_v = keys[:, filled:], values[:, filled:]
    step = jax.jit(lambda q, k, v, c: attend_cached(q, k, v, c, window=w))
    outs = {name: step(q, new_k, new_v, c)[0] for name, c in caches.items()}
    np.testing.assert_allclose(outs["ring"], outs["full buffer"], rtol=1e-5, atol=1e-5)
    seconds = interleaved_median_seconds({name: (step, (q, new_k, new_v, c)) for name, c in caches.items()},
                                         rounds=15)
    nbytes = {name: sum(int(leaf.nbytes) for leaf in jax.tree.leaves(c)) for name, c in caches.items()}
    return {"max_len": max_len, "ring_seconds": seconds["ring"], "full_seconds": seconds["full buffer"],
            "ring_cache_bytes": nbytes["ring"], "full_cache_bytes": nbytes["full buffer"]}


def write_report(points: list[dict], machine: str, out: str, shape: dict = SHAPE) -> None:
    """``window_decode.md/.png`` from the points (and ``.json`` with them), measured on ``machine`` at ``shape``."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "window_decode.json"), "w") as f:
        json.dump({"machine": machine, "shape": shape, "points": points}, f, indent=1)
    ok = sorted((p for p in points if "error" not in p), key=lambda p: p["max_len"])
    lines = [
        "# Decoding a sliding-window layer: a ring of the window vs a buffer of the whole context",
        "",
        f"Machine: {machine}. Written by `benchmarks/window_decode.py` (its docstring says how).",
        "",
        f"One decoded token's `attend_cached`, batch {shape['batch']}, {shape['heads']} query heads over "
        f"{shape['kv_heads']} KV heads of {shape['head_dim']}, window {shape['window']}, float32, with the cache "
        "holding max_len - 1 tokens. Median of 15 calls per layout, the two timed in turn in one process per point.",
        "",
        "| max_len | ring (ms) | full buffer (ms) | speed-up | ring cache (MiB) | full buffer cache (MiB) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        if "error" in p:
            lines.append(f"| {p['max_len']:,} | failed: {p['error']} | | | | |")
            continue
        lines.append(f"| {p['max_len']:,} | {1e3 * p['ring_seconds']:.3f} | {1e3 * p['full_seconds']:.3f} | "
                     f"**{p['full_seconds'] / p['ring_seconds']:.1f}x** | {p['ring_cache_bytes'] / 2**20:.2f} | "
                     f"{p['full_cache_bytes'] / 2**20:.2f} |")
    lines += ["", "![ms per decoded token and cache size vs context length](window_decode.png)", ""]
    with open(os.path.join(out, "window_decode.md"), "w") as f:
        f.write("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    lengths = [p["max_len"] for p in ok]
    for key, style, label in (("ring", "-o", "ring of the window"), ("full", "--s", "full buffer")):
        left.plot(lengths, [1e3 * p[f"{key}_seconds"] for p in ok], style, label=label)
        right.plot(lengths, [p[f"{key}_cache_bytes"] / 2**20 for p in ok], style, label=label)
    left.set(ylabel="ms per decoded token", title=f"window {shape['window']}")
    right.set(ylabel="cache (MiB)", title="cache size")
    for ax in (left, right):
        ax.set(xscale="log", yscale="log", xlabel="max_len (tokens)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.text(0.01, 0.01, machine, fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "window_decode.png"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--point", type=int, help="MAX_LEN: one point in this process, JSON on stdout")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--report", action="store_true", help="only rewrite window_decode.md/png from --out's JSON")
    args = parser.parse_args()
    if args.report:
        with open(os.path.join(args.out, "window_decode.json")) as f:
            saved = json.load(f)
        write_report(saved["points"], saved["machine"], args.out, saved["shape"])
        return
    if args.point:
        print(json.dumps(run_point(args.point)))
        return
    sys.path.insert(0, HERE)
    from machine import describe
    from peak_memory import run_fresh

    points = []
    for max_len in LENGTHS:
        points.append(run_fresh(__file__, str(max_len), 900, {"max_len": max_len}, timing_only=True))
        print(json.dumps(points[-1]), flush=True)
    write_report(points, describe(), args.out)


if __name__ == "__main__":
    main()
