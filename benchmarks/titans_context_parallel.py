"""Titans memory: context-parallel pipelined scan on P fake CPU devices against one device.

Forward of one memory layer from a fresh state (``lca.memory.memory_layer``) vs
``lca.memory.context_parallel.context_parallel_memory`` on a ``context=P`` mesh
with M micro-batches. Batch 8, d_model 64, one head, depth-2 memory, chunk 64,
float32. Each point runs in a fresh subprocess with ``P`` host devices; time is the
median of 3 runs after compilation. The idle fraction is the schedule's,
``(P - 1) / (M + P - 1)``. Fake devices share this machine's cores, so the table
shows the pipeline's overhead, not a speed-up.

    python benchmarks/titans_context_parallel.py

Writes ``titans_context_parallel.md``, ``.png`` and ``.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

BATCH, D_MODEL, LENGTH, CHUNK = 8, 64, 4096, 64
POINTS = ((1, 1), (8, 1), (8, 2), (8, 4), (8, 8))


def run_point(devices: int, micro_batches: int) -> dict:
    import time

    import jax
    import numpy as np

    from lca.memory import neural_memory as nm
    from lca.memory.context_parallel import context_parallel_memory, idle_fraction
    from lca.parallel import make_mesh

    config = nm.MemoryConfig(d_model=D_MODEL, num_heads=1, depth=2, chunk_size=CHUNK)
    params = nm.init_params(jax.random.PRNGKey(0), config)
    x = jax.random.normal(jax.random.PRNGKey(1), (BATCH, LENGTH, D_MODEL))
    if devices == 1:
        fn = jax.jit(lambda p, x: nm.memory_layer(p, nm.fresh_state(p, config, BATCH), x, config=config)[0])
    else:
        mesh = make_mesh(context=devices, devices=jax.devices()[:devices])
        fn = jax.jit(lambda p, x: context_parallel_memory(p, x, config=config, mesh=mesh, micro_batches=micro_batches))
    jax.block_until_ready(fn(params, x))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(fn(params, x))
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    return {
        "devices": devices, "micro_batches": micro_batches, "seconds": seconds,
        "tokens_per_s": BATCH * LENGTH / seconds, "idle_fraction": idle_fraction(devices, micro_batches),
    }


def _spawn(devices, micro_batches, timeout):
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(here), env.get("PYTHONPATH")]))
    cmd = [sys.executable, os.path.abspath(__file__), "--point", f"{devices},{micro_batches}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"devices": devices, "micro_batches": micro_batches, "error": f"timeout after {timeout}s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {"devices": devices, "micro_batches": micro_batches, "error": tail[0][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--point", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per point")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    if args.point:
        devices, micro = map(int, args.point.split(","))
        print(json.dumps(run_point(devices, micro)))
        return

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from machine import describe

    machine = f"{describe()}; load average at start {os.getloadavg()[0]:.1f}"
    points = []
    for devices, micro in POINTS:
        p = _spawn(devices, micro, args.timeout)
        points.append(p)
        print(json.dumps(p), flush=True)
    machine += f", at end {os.getloadavg()[0]:.1f}"
    base = next((p for p in points if p["devices"] == 1 and "error" not in p), None)
    lines = [
        "# Titans memory: context-parallel pipeline vs one device",
        "",
        f"Machine: {machine}.",
        f"Forward, batch {BATCH}, T = {LENGTH:,}, d_model {D_MODEL}, one head, depth-2 memory, chunk {CHUNK}, "
        "float32. Median of 3 runs after compilation. The fake CPU devices are concurrent host threads on the "
        "same cores, so a ratio against 1 device mixes the pipeline's overhead with how many cores each program "
        "keeps busy: it is not a multi-device speed-up. The idle fraction is the schedule's, "
        "(P - 1) / (M + P - 1) for P devices and M micro-batches: the share of pipeline steps a device waits.",
        "Produced by `python benchmarks/titans_context_parallel.py`.",
        "",
        "| devices | micro-batches | s | tokens/s | vs 1 device | schedule idle fraction |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        if "error" in p:
            lines.append(f"| {p['devices']} | {p['micro_batches']} | {p['error']} | | | |")
            continue
        rel = f"{base['seconds'] / p['seconds']:.2f}x" if base else "—"
        lines.append(
            f"| {p['devices']} | {p['micro_batches']} | {p['seconds']:.3f} | {p['tokens_per_s']:,.0f} | {rel} | "
            f"{p['idle_fraction']:.2f} |"
        )
    lines += ["", "![throughput and idle fraction](titans_context_parallel.png)"]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "titans_context_parallel.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "titans_context_parallel.json"), "w") as f:
        json.dump({"machine": machine, "points": points}, f, indent=1)
    _plot([p for p in points if "error" not in p], machine, os.path.join(args.out, "titans_context_parallel.png"))
    print("\n".join(lines))


def _plot(points, machine, path):
    """Throughput (bars) and the schedule's idle fraction (line) per (devices, micro-batches)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{p['devices']} dev\n{p['micro_batches']} mb" for p in points]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.bar(labels, [p["tokens_per_s"] for p in points], color="tab:blue", label="tokens/s")
    ax.set_ylabel("tokens/s (forward)")
    ax.grid(True, axis="y", alpha=0.3)
    idle = ax.twinx()
    idle.plot(labels, [p["idle_fraction"] for p in points], "o-", color="tab:red", label="schedule idle fraction")
    idle.set_ylim(0, 1)
    idle.set_ylabel("pipeline idle fraction")
    handles = [h for a in (ax, idle) for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper left", fontsize=8)
    ax.set_title(f"Titans memory, context-parallel pipeline on fake CPU devices\n{machine}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
