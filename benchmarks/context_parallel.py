"""Context-parallel attention benchmark: ring attention in lca vs the `ringattention` package.

Causal self-attention with a fixed length per device over N = 1, 2, 4, 8 devices:

* **Time on parallel devices.** Every device is its own JAX process (a
  multi-controller program over gloo, the code path of a TPU pod or a GPU
  cluster), pinned to its own CPU core with single-threaded XLA, so devices
  really run side by side and a ring step waits for the busiest one, as on
  accelerators. While N <= the core count the fwd+bwd wall time is measured
  directly. Beyond it, processes share cores, so the busiest device's CPU time
  during the call is reported instead: the critical path on dedicated devices,
  without transfer time (checked against the wall time where both exist).
  Kinds: lca zigzag with natural-order input (its layout permutations
  included), lca zigzag with input already in zigzag order (as a data pipeline
  can provide it), lca contiguous, lca's landmark attention as the ring's step
  (``landmark_step``, zigzag; another attention, so what it costs over the plain
  ring), and `ringattention`'s `ringattention_jax`, all on the same inputs,
  repeats interleaved so machine noise hits all alike; the outputs and dQ of
  the plain-attention kinds are compared too.
* **Peak memory per device**, measured in the same one-process-per-device
  runs: each device's process reads its own resident-set high-water mark
  (VmHWM, reset after compilation) around one fwd+bwd of each kind, so the
  number is one device's memory, as on an accelerator; the table gives the
  largest over the devices, and XLA's temp buffer size of the compiled step.
* **Causal work per device** (tiles computed, from the ring's skip predicate;
  tests/attention/test_ring.py checks that the ring runs exactly these).
* **Bytes each device sends per ring step** (from what the ppermutes carry).

The `ringattention` package is benchmark-only (not a dependency of lca)::

    pip install --no-deps ringattention

Its import needs ``jax.lib.xla_bridge`` aliased to ``jax._src.xla_bridge`` on
current JAX (done below). Run from the repository root::

    PYTHONPATH=$PWD python benchmarks/context_parallel.py
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
LOCAL_LEN = 2048  # tokens per device
HEADS, HEAD_DIM, BATCH = 4, 64, 1
BLOCK = 128
NS = (1, 2, 4, 8)
REPEATS = 7
LANDMARK_BLOCK = 64  # the landmark kind's block_size (the paper's 64)
KINDS = ("lca-zigzag", "lca-zigzag-prelaid", "lca-contiguous", "lca-landmark", "ringattention")
OWN_ATTENTION = ("lca-landmark",)  # kinds computing another attention: no output comparison
WORKER_TIMEOUT_S = 1500


# --- the measured call ----------------------------------------------------------------


def _import_ringattention():
    import jax
    import jax._src.xla_bridge as xla_bridge

    jax.lib.xla_bridge = xla_bridge  # removed from jax.lib; ringattention still reads it
    from ringattention import ringattention_jax

    return ringattention_jax


def _attention(kind, mesh):
    """``f(q, k, v) -> out`` for one implementation, causal, natural order in and out.

    ``lca-zigzag-prelaid`` is the exception: its inputs are in zigzag order, as a
    data pipeline using ``lca.parallel.to_layout`` hands them over.
    """
    import functools

    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from lca.attention import landmark_step, ring_attention

    if kind == "ringattention":
        ring = _import_ringattention()
        kwargs = dict(causal_block_size=1, deterministic=True, dropout_rng=None, attn_pdrop=0.0,
                      query_chunk_size=BLOCK, key_chunk_size=BLOCK,
                      policy=jax.checkpoint_policies.nothing_saveable, dtype=jnp.float32,
                      precision=None, prevent_cse=True)
        spec = P(None, "context")
        body = lambda q, k, v: ring(q, k, v, None, None, None, "context", True, kwargs)  # noqa: E731
        return jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                             check_vma=False)
    layout = "contiguous" if kind == "lca-contiguous" else "zigzag"
    input_layout = "zigzag" if kind == "lca-zigzag-prelaid" else "natural"
    impl = landmark_step(LANDMARK_BLOCK) if kind == "lca-landmark" else "blockwise"
    return functools.partial(ring_attention, mesh=mesh, causal=True, layout=layout,
                             input_layout=input_layout, impl=impl, block_q=BLOCK, block_kv=BLOCK)


def _fwd_bwd(kind, mesh):
    import jax
    import jax.numpy as jnp

    f = _attention(kind, mesh)

    def loss(q, k, v):
        out = f(q, k, v)
        return jnp.sum(out.astype(jnp.float32) ** 2), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def _global_inputs(n, mesh, kind):
    """The same q, k, v for every kind (in zigzag order for the pre-laid kind)."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from lca.parallel import to_layout

    rng = np.random.default_rng(0)
    shape = (BATCH, n * LOCAL_LEN, HEADS, HEAD_DIM)
    arrays = [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]
    if kind == "lca-zigzag-prelaid" and n > 1:
        arrays = [np.asarray(to_layout(x, "zigzag", n)) for x in arrays]
    sharding = NamedSharding(mesh, P(None, "context"))
    return [jax.make_array_from_callback(shape, sharding, lambda index, x=x: x[index],
                                         dtype=x.dtype) for x in arrays]


# --- one process per device -------------------------------------------------------------


def worker(rank, n, port, kinds):
    """One device of an ``n``-process ring: time every kind, print a JSON line."""
    os.sched_setaffinity(0, {rank % os.cpu_count()})
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    import jax
    import numpy as np
    import peak_memory
    from jax.experimental import multihost_utils

    jax.config.update("jax_num_cpu_devices", 1)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=n,
                               process_id=rank, initialization_timeout=120)
    from lca.parallel import from_layout, make_mesh

    mesh = make_mesh(context=n, devices=jax.devices())
    steps, inputs, outs, temp_mb = {}, {}, {}, {}
    for kind in kinds:
        inputs[kind] = _global_inputs(n, mesh, kind)
        steps[kind] = _fwd_bwd(kind, mesh).lower(*inputs[kind]).compile()
        temp_mb[kind] = steps[kind].memory_analysis().temp_size_in_bytes / 2**20
        # The first run also allocates the runtime's pools: not part of the call's peak.
        (_, out), (dq, _, _) = jax.block_until_ready(steps[kind](*inputs[kind]))
        outs[kind] = [np.asarray(multihost_utils.process_allgather(x, tiled=True))
                      for x in (out, dq)]
        if kind == "lca-zigzag-prelaid" and n > 1:
            outs[kind] = [np.asarray(from_layout(x, "zigzag", n)) for x in outs[kind]]
    peak_mb = {}
    for kind in kinds:  # this process is one device: its high-water mark is that device's
        multihost_utils.sync_global_devices("memory")
        peak_mb[kind] = peak_memory.measure(steps[kind], *inputs[kind])[0] / 2**20
    wall = {kind: [] for kind in kinds}
    cpu = {kind: [] for kind in kinds}
    for _ in range(REPEATS):
        for kind in kinds:  # interleaved: machine noise hits every kind alike
            multihost_utils.sync_global_devices("start")
            c0, t0 = time.process_time(), time.perf_counter()
            jax.block_until_ready(steps[kind](*inputs[kind]))
            wall[kind].append(time.perf_counter() - t0)
            cpu[kind].append(time.process_time() - c0)
    diff = {kind: None if kind in OWN_ATTENTION else max(float(np.abs(x - ref).max() / np.abs(ref).max())
                                                         for x, ref in zip(outs[kind], outs[kinds[0]]))
            for kind in kinds}
    print("RESULT " + json.dumps(dict(rank=rank, wall=wall, cpu=cpu, diff=diff, peak_mb=peak_mb,
                                      temp_mb=temp_mb)), flush=True)
    multihost_utils.sync_global_devices("done")
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ring(n, kinds):
    """Start ``n`` worker processes; per kind the median over repeats of the max over ranks."""
    import peak_memory

    port = _free_port()
    env = {**peak_memory.env(), "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(rank),
                               str(n), str(port), ",".join(kinds)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(n)]
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    try:
        logs = [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for p in procs]
    finally:
        for p in procs:  # never leave a worker waiting for a peer that died
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for p, log in zip(procs, logs):
        lines = [line for line in log.splitlines() if line.startswith("RESULT ")]
        if p.returncode != 0 or not lines:
            raise RuntimeError(f"worker failed (exit {p.returncode}):\n{log[-3000:]}")
        results.append(json.loads(lines[-1][len("RESULT "):]))
    return {kind: dict(
        wall=_median([max(r["wall"][kind][i] for r in results) for i in range(REPEATS)]),
        cpu=_median([max(r["cpu"][kind][i] for r in results) for i in range(REPEATS)]),
        cpu_per_rank=[_median(r["cpu"][kind]) for r in results],
        diff=results[0]["diff"][kind],
        peak_mb=max(r["peak_mb"][kind] for r in results),
        peak_mb_per_rank=[r["peak_mb"][kind] for r in results],
        temp_mb=max(r["temp_mb"][kind] for r in results),
    ) for kind in kinds}


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])


# --- traffic and schedule ------------------------------------------------------------------


def bytes_per_step():
    """Bytes one device sends per ring step: forward (K, V, positions) and backward (+ dK, dV f32)."""
    kv = 2 * BATCH * LOCAL_LEN * HEADS * HEAD_DIM * 4  # f32 K and V (MHA here; GQA sends h_kv)
    positions = LOCAL_LEN * 4
    return dict(forward=kv + positions, backward=kv + positions + kv)


def causal_work():
    from lca.attention import ring_schedule

    rows = []
    for n in NS[1:]:
        for layout in ("zigzag", "contiguous"):
            per_device = ring_schedule(layout, n * LOCAL_LEN, n, block=BLOCK).sum(axis=1)
            rows.append((n, layout, int(per_device.max()), int(per_device.min()),
                         float(per_device.max() / per_device.min())))
    return rows


# --- main ------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=4, metavar=("RANK", "N", "PORT", "KINDS"))
    parser.add_argument("--ns", default=",".join(map(str, NS)), help="device counts to run")
    parser.add_argument("--render", action="store_true",
                        help="rewrite the table and plot from results/context_parallel.json")
    args = parser.parse_args()
    if args.worker:
        rank, n, port, kinds = args.worker
        worker(int(rank), int(n), int(port), kinds.split(","))
        return
    if args.render:
        with open(os.path.join(RESULTS, "context_parallel.json")) as f:
            render(json.load(f))
        return

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import machine

    started, load_before = time.time(), os.getloadavg()[0]
    try:
        _import_ringattention()
        kinds = KINDS
    except Exception as err:  # noqa: BLE001 - recorded in the results
        print(f"ringattention unavailable: {err!r}")
        kinds = tuple(k for k in KINDS if k != "ringattention")
    ns = [int(n) for n in args.ns.split(",")]
    timing = {}
    for n in ns:
        timing[n] = run_ring(n, kinds)
        print(n, json.dumps(timing[n]), flush=True)
    raw = dict(kinds=list(kinds), ns=ns, cores=os.cpu_count(), machine=machine.describe(),
               local_len=LOCAL_LEN, repeats=REPEATS, work=causal_work(),
               elapsed=time.time() - started, load=(load_before, os.getloadavg()[0]),
               timing={str(n): t for n, t in timing.items()})
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "context_parallel.json"), "w") as f:
        json.dump(raw, f, indent=1)
    render(raw)


def _time_of(raw, n, kind):
    """Wall time while every device has its own core, else the busiest device's CPU time."""
    point = raw["timing"][str(n)][kind]
    return point["wall"] if n <= raw["cores"] else point["cpu"]


def render(raw):
    """Markdown table and plot from the raw measurements (``--render`` redoes only this)."""
    kinds, ns, cores = raw["kinds"], raw["ns"], raw["cores"]
    has_ref = "ringattention" in kinds
    lines = [
        "# Context-parallel attention (ring) benchmark",
        "",
        f"Machine: {raw['machine']}. Generated by `benchmarks/context_parallel.py` in "
        f"{raw['elapsed']:.0f} s; 1-minute load average {raw['load'][0]:.1f} at the start and "
        f"{raw['load'][1]:.1f} at the end.",
        "",
        f"Setup: causal self-attention, batch {BATCH}, {HEADS} heads (MHA: `ringattention` has no "
        f"GQA), head_dim {HEAD_DIM}, float32, {raw['local_len']} tokens per device (total N x "
        f"{raw['local_len']}), blocks {BLOCK} x {BLOCK} for both libraries. Each device is its own "
        f"JAX process (multi-controller over gloo) pinned to one core with single-threaded XLA, "
        f"so devices run side by side and each ring step waits for the busiest one. "
        f"`lca-zigzag` takes natural-order input (its layout permutations are timed); "
        f"`lca-zigzag-prelaid` gets input already in zigzag order (`lca.parallel.to_layout` in "
        f"the data pipeline, as MaxText does). `lca-landmark` is another attention: landmark "
        f"attention (block_size {LANDMARK_BLOCK}) as the zigzag ring's local step "
        f"(`impl=landmark_step({LANDMARK_BLOCK})`), what its grouped softmax costs over the plain ring; "
        f"its output is checked against the landmark oracle in `tests/attention/test_landmark.py`, "
        f"not here.",
        "",
        "## Causal fwd+bwd time per call (median of "
        f"{raw['repeats']} interleaved repeats)",
        "",
        f"N <= {cores} (one core per device): **wall time**, measured. N > {cores}: devices "
        f"share the {cores} cores, so the time given is the **busiest device's CPU time** during "
        f"the call, the critical path on N dedicated devices without transfer time (where both "
        f"exist, compare the wall and CPU columns below).",
        "",
        "| N | total tokens | measure | " + " | ".join(f"{k} (s)" for k in kinds)
        + (" | lca-zigzag speed-up vs ringattention | lca-zigzag-prelaid speed-up"
           if has_ref else "") + " |",
        "|" + "---|" * (3 + len(kinds) + 2 * has_ref),
    ]
    for n in ns:
        measure = "wall" if n <= cores else "busiest-device CPU"
        row = [str(n), str(n * raw["local_len"]), measure]
        row += [f"{_time_of(raw, n, k):.3f}" for k in kinds]
        if has_ref:
            ref = _time_of(raw, n, "ringattention")
            row += [f"**{ref / _time_of(raw, n, 'lca-zigzag'):.2f}x**",
                    f"{ref / _time_of(raw, n, 'lca-zigzag-prelaid'):.2f}x"]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Both measures at every N (wall / busiest-device CPU, seconds), the per-device CPU "
        "seconds, and the largest difference of each plain-attention kind's output and dQ from "
        "`lca-zigzag`'s (relative to the largest value):",
        "",
        "| N | kind | wall | busiest CPU | CPU per device | max rel. diff |",
        "|---|---|---|---|---|---|",
    ]
    for n in ns:
        for k in kinds:
            point = raw["timing"][str(n)][k]
            per_rank = " ".join(f"{c:.2f}" for c in point["cpu_per_rank"])
            diff = "n/a (another attention)" if point["diff"] is None else f"{point['diff']:.1e}"
            lines.append(f"| {n} | {k} | {point['wall']:.3f} | {point['cpu']:.3f} | {per_rank} | {diff} |")
    lines += [
        "",
        "## Peak memory per device (MiB: VmHWM growth / XLA temp)",
        "",
        "Measured in the same runs: each device is its own process, which reads its own "
        "resident-set high-water mark (reset after compilation) around one fwd+bwd of each kind; "
        "the largest over the N devices is given, then the XLA temp buffer size of the compiled "
        "step. Inputs (q, k, v) are not counted; per device they stay "
        f"{3 * BATCH * raw['local_len'] * HEADS * HEAD_DIM * 4 / 2**20:.0f} MiB at every N.",
        "",
        "| N | " + " | ".join(kinds) + " |",
        "|" + "---|" * (1 + len(kinds)),
    ]
    for n in ns:
        cells = [raw["timing"][str(n)][k] for k in kinds]
        lines.append(f"| {n} | " + " | ".join(
            f"{c['peak_mb']:.1f} / {c['temp_mb']:.1f}" for c in cells) + " |")
    lines += [
        "",
        f"## Causal work per device (tiles of {BLOCK} x {BLOCK} computed over the whole ring)",
        "",
        "| N | layout | max | min | max/min |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {n} | {layout} | {mx} | {mn} | {ratio:.2f} |"
              for n, layout, mx, mn, ratio in raw["work"]]
    busiest = {(n, layout): mx for n, layout, mx, _, _ in raw["work"]}
    lines += [
        "",
        "`ringattention` shards contiguously and skips the same causal tiles as lca's "
        "contiguous layout, so the tile counts alone predict zigzag's advantage as "
        "max(contiguous) / max(zigzag): "
        + ", ".join(f"N={n}: {busiest[(n, 'contiguous')] / busiest[(n, 'zigzag')]:.2f}x"
                    for n in NS[1:])
        + "; the rest of the measured speed-up is lca's faster tile (compare N = 1).",
    ]
    sent = bytes_per_step()
    lines += [
        "",
        "## Bytes each device sends per ring step",
        "",
        f"Forward: K and V shards plus their int32 positions = {sent['forward']:,} bytes "
        f"({sent['forward'] / 2**20:.2f} MiB) per step, independent of N (N-1 steps; none after "
        f"the last). Backward: the same plus dK and dV in float32 = {sent['backward']:,} bytes "
        f"per step (N-1 steps, then one dK/dV-only hop home). With segment ids add 4 bytes per "
        f"token and row; with GQA K/V shrink by num_heads / num_kv_heads.",
        "",
        "![plot](context_parallel.png)",
    ]
    with open(os.path.join(RESULTS, "context_parallel.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(raw)


def plot(raw):
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds, ns, cores = raw["kinds"], raw["ns"], raw["cores"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind in kinds:
        ax_t.plot(ns, [_time_of(raw, n, kind) for n in ns], marker="o", label=kind)
        ax_m.plot(ns, [raw["timing"][str(n)][kind]["peak_mb"] for n in ns],
                  marker="o", label=kind)
    if max(ns) > cores:
        ax_t.axvspan(cores * 1.3, max(ns) * 1.15, color="0.92", zorder=0)
        ax_t.text(cores * 1.4, 0.04, "busiest device's CPU time\n(devices share cores)",
                  fontsize=8, transform=ax_t.get_xaxis_transform())
    ax_t.set(xlabel=f"N devices ({raw['local_len']} tokens each)",
             ylabel="causal fwd+bwd time (s)", title="time per call (lower is better)",
             xscale="log", yscale="log")
    ax_m.set(xlabel=f"N devices ({raw['local_len']} tokens each)",
             ylabel="peak extra MiB per device", title="memory per device (own process VmHWM)",
             xscale="log")
    ax_m.set_ylim(bottom=0)  # flat is the claim: do not zoom into the noise
    for ax in (ax_t, ax_m):
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend(fontsize=8)
    fig.suptitle(raw["machine"], fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(RESULTS, "context_parallel.png"), dpi=120)


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
