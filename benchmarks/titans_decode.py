"""Titans MAC decoding: one token through the segment's cached keys vs rerunning the open segment.

A decoded token of a MAC layer (``lca.memory.mac.mac_extend`` with ``t = 1``) retrieves from the memory
once, attends over its segment's cached keys and values, and takes one memory step. Before, every token
reran its open segment from the memory at the segment's start: retrieval for every token of the segment,
the segment's attention and the memory's update over it (``_extend_rerun``, still the path of prompts).
Both are timed here side by side, per layer and token, in float32 on this machine's CPU.

Each point (segment length, batch) runs in a fresh process: both paths jitted, warmed up, checked to give
the same output, then timed in turn (``timing.interleaved_median_seconds``, so both see the same load).
The cache each path carries is counted too (``cache_bytes``): the token path adds the streamed memory and
the segment's keys and values.

The layer (``SHAPE``): d_model 256, 4 attention heads, a memory of 4 heads of 64 (depth 2, expansion 2,
chunk 16), 4 persistent tokens; the cache is half into its open segment.

    python benchmarks/titans_decode.py                  # full sweep, writes results
    python benchmarks/titans_decode.py --point 64,1     # one point, JSON on stdout
    python benchmarks/titans_decode.py --report         # rewrite the page from its JSON

Writes ``titans_decode.md``, ``titans_decode.png`` and ``titans_decode.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPE = {"d_model": 256, "num_heads": 4, "memory_heads": 4, "depth": 2, "chunk_size": 16, "persistent": 4}
SEGMENTS = (32, 64, 128, 256)
BATCHES = (1, 8)
PATHS = ("token", "rerun")


def run_point(segment: int, batch: int) -> dict:
    """In this (fresh) process: both paths of one decoded token, timed side by side."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, HERE)
    from timing import interleaved_median_seconds

    from lca.config import ModelConfig
    from lca.memory import mac

    section = mac.TitansMacConfig(memory_heads=SHAPE["memory_heads"], depth=SHAPE["depth"],
                                  chunk_size=SHAPE["chunk_size"], persistent=SHAPE["persistent"], segment=segment)
    config = section.mac(ModelConfig(d_model=SHAPE["d_model"], num_heads=SHAPE["num_heads"]))
    params = mac.init_params(jax.random.PRNGKey(0), config)
    prompt = segment + segment // 2  # one whole segment, then half of the next: the cache's count is segment / 2
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, prompt + 1, SHAPE["d_model"]))
    positions = jnp.broadcast_to(jnp.arange(prompt + 1), (batch, prompt + 1))
    _, cache = jax.jit(mac.mac_extend, static_argnames="config")(
        params, x[:, :prompt], positions[:, :prompt], mac.start_mac_cache(params, config, batch), config=config)
    token, at = x[:, prompt:], positions[:, prompt:]
    steps = {"token": jax.jit(lambda p, t, a, c: mac._extend_token(p, t, a, c, config)),
             "rerun": jax.jit(lambda p, t, a, c: mac._extend_rerun(p, t, a, c, config))}
    outs = {name: step(params, token, at, cache)[0] for name, step in steps.items()}
    np.testing.assert_allclose(outs["token"], outs["rerun"], rtol=1e-4, atol=1e-4)
    seconds = interleaved_median_seconds({name: (step, (params, token, at, cache))
                                          for name, step in steps.items()}, rounds=7)
    carried = {"token": cache, "rerun": cache[:4]}  # the rerun path needs the memory and the inputs only
    return {"segment": segment, "batch": batch, **{f"{name}_seconds": s for name, s in seconds.items()},
            **{f"{name}_cache_bytes": sum(int(leaf.nbytes) for leaf in jax.tree.leaves(c))
               for name, c in carried.items()}}


def write_report(points: list[dict], machine: str, out: str, shape: dict = SHAPE) -> None:
    """``titans_decode.md/.png`` from the points (and ``.json`` with them), measured on ``machine`` at ``shape``."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "titans_decode.json"), "w") as f:
        json.dump({"machine": machine, "shape": shape, "points": points}, f, indent=1)
    ok = [p for p in points if "error" not in p]
    lines = [
        "# Titans MAC decoding: a token through the cached segment vs rerunning the segment",
        "",
        f"Machine: {machine}. Written by `benchmarks/titans_decode.py` (its docstring says how).",
        "",
        f"One MAC layer (d_model {shape['d_model']}, {shape['num_heads']} attention heads, a memory of "
        f"{shape['memory_heads']} heads, depth {shape['depth']}, chunk {shape['chunk_size']}, "
        f"{shape['persistent']} persistent tokens), float32, one decoded token half-way into its segment. "
        "Median of 7 calls per path, the two paths timed in turn in one process per point.",
        "",
        "| segment | batch | token path (ms) | rerun (ms) | speed-up | cache, token path (KiB) | cache, rerun (KiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        if "error" in p:
            lines.append(f"| {p['segment']} | {p['batch']} | failed: {p['error']} | | | | |")
            continue
        lines.append(f"| {p['segment']} | {p['batch']} | {1e3 * p['token_seconds']:.2f} | "
                     f"{1e3 * p['rerun_seconds']:.2f} | **{p['rerun_seconds'] / p['token_seconds']:.1f}x** | "
                     f"{p['token_cache_bytes'] / 1024:,.0f} | {p['rerun_cache_bytes'] / 1024:,.0f} |")
    lines += ["", "![ms per decoded token vs segment length](titans_decode.png)", ""]
    with open(os.path.join(out, "titans_decode.md"), "w") as f:
        f.write("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 4))
    for batch in sorted({p["batch"] for p in ok}):
        rows = sorted((p for p in ok if p["batch"] == batch), key=lambda p: p["segment"])
        segs = [p["segment"] for p in rows]
        for name, style in (("token", "-o"), ("rerun", "--s")):
            ax.plot(segs, [1e3 * p[f"{name}_seconds"] for p in rows], style, label=f"{name}, batch {batch}")
    ax.set(xscale="log", yscale="log", xlabel="segment length (tokens)", ylabel="ms per decoded token (one layer)",
           title="Titans MAC decoding")
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # only the segments' own ticks
    ax.set_xticks(SEGMENTS, [str(s) for s in SEGMENTS])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.text(0.01, 0.01, machine, fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "titans_decode.png"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--point", help="SEGMENT,BATCH: one point in this process, JSON on stdout")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--report", action="store_true", help="only rewrite titans_decode.md/png from --out's JSON")
    args = parser.parse_args()
    if args.report:
        with open(os.path.join(args.out, "titans_decode.json")) as f:
            saved = json.load(f)
        write_report(saved["points"], saved["machine"], args.out, saved["shape"])
        return
    if args.point:
        segment, batch = (int(v) for v in args.point.split(","))
        print(json.dumps(run_point(segment, batch)))
        return
    sys.path.insert(0, HERE)
    from machine import describe
    from peak_memory import run_fresh

    points = []
    for batch in BATCHES:
        for segment in SEGMENTS:
            points.append(run_fresh(__file__, f"{segment},{batch}", 900, {"segment": segment, "batch": batch},
                                    timing_only=True))
            print(json.dumps(points[-1]), flush=True)
    write_report(points, describe(), args.out)


if __name__ == "__main__":
    main()
