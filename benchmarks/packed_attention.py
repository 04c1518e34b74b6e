"""Causal attention over packed documents: time vs document length, fwd+bwd.

Packed training rows hold many documents; a token attends only within its own.
lca's blockwise attention skips every tile whose query and key blocks share no
document (their segment-id ranges are disjoint in every batch row), so its cost
follows the documents' total area rather than the row's. Side by side, on the
same inputs, in one process:

* ``lca``: ``blockwise_attention(causal=True, segment_ids=...)``;
* ``lca-no-segments``: the same call without segment ids, i.e. what a causal
  pass costs when no tile can be skipped for segments (the upper bound);
* ``xla``: ``jax.nn.dot_product_attention`` with the segment mask (dense).

``tiles`` is the fraction of the causal tiles lca computes (counted from the
segment ranges, as the loop decides), ``area`` the fraction of the causal
token pairs that are visible: the least any exact method must compute.

    python benchmarks/packed_attention.py                 # full sweep, writes results
    python benchmarks/packed_attention.py --lengths 4096 --docs 512 --out /tmp/r
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

HEADS, HEAD_DIM, BLOCK = 4, 64, 512
LENGTHS = (8192, 16384)
DOCS = (256, 512, 1024, 2048, 4096, 0)  # mean document length; 0: one document per row
KINDS = ("lca", "lca-no-segments", "xla")
DENSE_MAX_T = 8192  # xla holds [heads, T, T] float32 logits and more for the backward


def segment_ids(t: int, mean_doc: int, seed: int = 0):
    """``[1, t]`` int32 ids of documents of random length in [mean/2, 3 mean/2) (one document if 0)."""
    import numpy as np

    if mean_doc == 0:
        return np.ones((1, t), np.int32)
    rng = np.random.default_rng(seed)
    ends = np.cumsum(rng.integers(mean_doc // 2, mean_doc * 3 // 2, size=t // (mean_doc // 2) + 1))
    return (np.searchsorted(ends, np.arange(t), side="right") + 1).astype(np.int32)[None]


def fractions(seg, block: int) -> tuple[float, float]:
    """(causal tiles whose segment ranges meet, visible causal pairs) as fractions of the causal ones."""
    import numpy as np

    ids = seg[0]
    n = len(ids) // block
    lo, hi = ids.reshape(n, block).min(1), ids.reshape(n, block).max(1)
    causal_tiles = n * (n + 1) // 2
    met = sum(int(lo[i] <= hi[j] and lo[j] <= hi[i]) for i in range(n) for j in range(i + 1))
    sizes = np.bincount(ids)
    visible_pairs = float((sizes * (sizes + 1) // 2).sum())
    return met / causal_tiles, visible_pairs / (len(ids) * (len(ids) + 1) / 2)


def _attention(kind: str, seg):
    import jax

    from lca.attention import blockwise_attention

    if kind == "lca":
        return functools.partial(blockwise_attention, causal=True, segment_ids=seg, block_q=BLOCK, block_kv=BLOCK)
    if kind == "lca-no-segments":
        return functools.partial(blockwise_attention, causal=True, block_q=BLOCK, block_kv=BLOCK)
    mask = (seg[:, :, None] == seg[:, None, :])[:, None]
    return functools.partial(jax.nn.dot_product_attention, mask=mask, is_causal=True, implementation="xla")


def run(lengths, docs, kinds, repeats: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    points = []
    for t in lengths:
        rng = np.random.default_rng(t)
        q, k, v = (jnp.asarray(rng.standard_normal((1, t, HEADS, HEAD_DIM), np.float32)) for _ in range(3))
        for doc in docs:
            seg_np = segment_ids(t, doc)
            tiles, area = fractions(seg_np, BLOCK)
            seg = jnp.asarray(seg_np)
            fns = {}
            for kind in kinds:
                if kind == "xla" and t > DENSE_MAX_T:
                    continue
                attention = _attention(kind, seg)
                fns[kind] = jax.jit(jax.grad(lambda q, k, v, f=attention: jnp.sum(f(q, k, v)), argnums=(0, 1, 2)))
                jax.block_until_ready(fns[kind](q, k, v))  # compile + warm up
            # Repeats interleave the kinds, so a slow spell of the machine hits them all alike.
            times = {kind: [] for kind in fns}
            for _ in range(repeats):
                for kind, fn in fns.items():
                    start = time.perf_counter()
                    jax.block_until_ready(fn(q, k, v))
                    times[kind].append(time.perf_counter() - start)
            seconds = {kind: statistics.median(ts) for kind, ts in times.items()}
            points.append({"T": t, "doc": doc, "tiles": tiles, "area": area, "seconds": seconds})
            print(json.dumps(points[-1]), flush=True)
    return points


def write_results(points, machine, out_dir, *, elapsed: float, load: tuple[float, float]):
    os.makedirs(out_dir, exist_ok=True)
    lines = [
        "# Causal attention over packed documents: fwd+bwd time vs document length",
        "",
        f"Machine: {machine}. Run in {elapsed:.0f} s; 1-minute load average {load[0]:.1f} at the "
        f"start and {load[1]:.1f} at the end.",
        "",
        f"Batch 1, {HEADS} heads, head_dim {HEAD_DIM}, float32, causal, blocks {BLOCK}; documents of random "
        "length in [mean/2, 3 mean/2). Time of one jitted fwd+bwd (median of repeats after a warm-up), every "
        "kind on the same inputs in one process, their repeats interleaved. "
        f"xla (dense) is not run past T={DENSE_MAX_T}.",
        "`tiles`: fraction of the causal tiles lca computes; `area`: fraction of the causal token pairs that "
        "are visible. `lca-no-segments` is the same causal pass with nothing skipped for segments.",
        "Produced by `python benchmarks/packed_attention.py`.",
        "",
        "| T | mean doc | tiles | area | lca s | lca-no-segments s | xla s | speed-up vs no segments | vs xla |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        s = p["seconds"]
        base = s.get("lca-no-segments")
        cells = [
            f"{p['T']:,}", f"{p['doc']:,}" if p["doc"] else "one", f"{p['tiles']:.2f}", f"{p['area']:.2f}",
            f"{s['lca']:.3f}", f"{base:.3f}" if base else "—", f"{s['xla']:.3f}" if "xla" in s else "—",
            f"{base / s['lca']:.2f}x" if base else "—", f"{s['xla'] / s['lca']:.2f}x" if "xla" in s else "—",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![time vs document length](packed_attention.png)", ""]
    with open(os.path.join(out_dir, "packed_attention.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(out_dir, "packed_attention.json"), "w") as f:
        json.dump({"machine": machine, "elapsed": elapsed, "load": load, "points": points}, f,
                  indent=1)
    _plot(points, machine, os.path.join(out_dir, "packed_attention.png"))


def _plot(points, machine, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from log_axes import style_log_log

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in sorted({p["T"] for p in points}):
        pts = [p for p in points if p["T"] == t and p["doc"]]
        if not pts:
            continue
        docs = [p["doc"] for p in pts]
        line = ax.plot(docs, [p["seconds"]["lca"] for p in pts], "o-", label=f"lca, T={t:,}")[0]
        for kind, style in (("lca-no-segments", ":"), ("xla", "s--")):
            xy = [(p["doc"], p["seconds"][kind]) for p in pts if kind in p["seconds"]]
            if xy:
                ax.plot(*zip(*xy), style, color=line.get_color(), alpha=0.7, label=f"{kind}, T={t:,}")
    style_log_log(ax, "mean document length (tokens)", "fwd+bwd time (s)")
    ax.set_title(f"Packed causal attention — {machine}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--docs", default=",".join(map(str, DOCS)), help="mean document lengths; 0: one document")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from machine import describe

    lengths = [int(x) for x in args.lengths.split(",")]
    docs = [int(x) for x in args.docs.split(",")]
    started, load_before = time.time(), os.getloadavg()[0]
    points = run(lengths, docs, args.kinds.split(","), args.repeats)
    write_results(points, describe(), args.out, elapsed=time.time() - started,
                  load=(load_before, os.getloadavg()[0]))


if __name__ == "__main__":
    main()
