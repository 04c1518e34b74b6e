"""Data pipeline throughput: seconds per batch of the Grain packing iterator, after warm-up, in this process.

    PYTHONPATH=. python benchmarks/data_pipeline.py "MACHINE DESCRIPTION"   # writes benchmarks/results/data_pipeline.{md,png}

The committed results name the machine they were measured on; pass your own description when re-running elsewhere.
"""

from __future__ import annotations

import pathlib
import sys
import time

from lca.data import DataConfig, make_train_iterator

CASES = [  # (name, config, seq_len, global_batch)
    ("stdlib concat 8x2048", DataConfig(prefetch=0), 2048, 8),
    ("stdlib pad 8x2048", DataConfig(packing="pad", prefetch=0), 2048, 8),
    ("stdlib concat 8x32768", DataConfig(prefetch=0), 32768, 8),
    ("passkey 8x2048", DataConfig(source="passkey", prefetch=0), 2048, 8),
    ("passkey 1x131072", DataConfig(source="passkey", prefetch=0), 131072, 1),
]


def seconds_per_batch(cfg, seq_len, global_batch, *, warmup=3, batches=20) -> float:
    it = make_train_iterator(cfg, seq_len=seq_len, global_batch=global_batch, seed=0, process_index=0, process_count=1)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return (time.perf_counter() - start) / batches


def main(machine: str) -> None:
    out = pathlib.Path(__file__).parent / "results"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, cfg, seq_len, batch in CASES:
        s = seconds_per_batch(cfg, seq_len, batch)
        rows.append((name, s, seq_len * batch / s))
        print(f"{name}: {1e3 * s:.2f} ms/batch, {seq_len * batch / s / 1e6:.1f} M tokens/s")
    lines = [f"# Data pipeline throughput ({machine})", "",
             "One process, no prefetch, after 3 warm-up batches, mean of 20 batches. "
             "Command: `PYTHONPATH=. python benchmarks/data_pipeline.py`. The data path does not use JAX.", "",
             "| case | ms / batch | M tokens / s |", "|---|---:|---:|"]
    lines += [f"| {n} | {1e3 * s:.2f} | {t / 1e6:.1f} |" for n, s, t in rows]
    (out / "data_pipeline.md").write_text("\n".join(lines) + "\n")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.barh([n for n, _, _ in rows], [t / 1e6 for _, _, t in rows])
    ax.set_xlabel("M tokens / s (higher is better)")
    ax.set_title(f"Data pipeline throughput\n{machine}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "data_pipeline.png", dpi=120)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "2-core CPU (x86-64), 24 GB, jax 0.10.2")
