"""Titans memory update: chunk-parallel vs token-by-token speed, and peak memory vs sequence length.

"chunked" is ``lca.memory.update.memorize_chunked`` (gradients at chunk-start
weights, dual form, associative scan); "sequential" is the ``lax.scan`` oracle
``lca.memory.sequential.memorize_sequential`` with the same semantics (one
gradient per token, at its chunk's start weights). Both are jitted and, for
several memory streams (batch rows x heads), vmapped over them as
``lca.memory.memory_layer`` runs them; random tokens and gates, float32; each
token's gradient clipped to the models' default ``max_grad_norm``
(``lca.memory.neural_memory.MAX_GRAD_NORM``).

Two shapes (``SETUPS``):

- ``issue``: one stream, head_dim 64, depth-2 memory MLP (hidden 128, SiLU), chunk 64;
- ``config``: the Titans configs' memory (``configs/titans_*.yaml``: d_model 64 over 2
  memory heads, so head_dim 32, depth 2, expansion 2, chunk 16) at their batch 8:
  16 streams.

A section on packed rows times the chunked update with the memory restarting at each
document's first token (``MemoryTokens.restart``, as ``lca.memory.memory_layer`` runs packed
batches): method ``packed/D`` restarts every D tokens (never chunk-aligned), ``packed/0`` is
the same update without restarts, its baseline in the same run.

Each point (setup, method, mode, T, chunk) runs in a fresh subprocess: compile,
one execution for the peak extra memory (benchmarks/peak_memory.py), then the
median time of further runs (at least 3). Chunked and sequential points of the
same (setup, mode, T) run back to back, so they see the same machine load.

    python benchmarks/titans_update.py                      # full sweep, writes results
    python benchmarks/titans_update.py --lengths 1024,4096 --out /tmp/r
    python benchmarks/titans_update.py --packed-only        # rerun the packed section into the JSON

Writes ``titans_update.md``, ``titans_update.png`` and ``titans_update.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SETUPS = {
    "issue": {"dim": 64, "depth": 2, "expansion": 2, "chunk": 64, "streams": 1},
    "config": {"dim": 32, "depth": 2, "expansion": 2, "chunk": 16, "streams": 16},
}
# the sequential scan's backward keeps every token's weights: GiBs beyond these T on this shared machine
SEQUENTIAL_BWD_MAX = {"issue": 4096, "config": 2048}
METHODS = ("chunked", "sequential")
MODES = ("fwd", "fwd+bwd")
SPEED_LENGTHS = (1024, 2048, 4096, 8192)
SWEEP_LENGTHS = tuple(1024 * 2**i for i in range(7))  # 1k .. 64k, forward, the issue setup
SWEEP_CHUNKS = (16, 32, 64, 128, 256)  # at T = 4k, the issue setup
SWEEP_DIMS = (32, 64, 128, 256)  # head_dim at T = 4k, otherwise the issue setup
SEQUENTIAL_BWD_MAX_DIM = 128  # its backward keeps 4096 tokens' weights: 3 GiB at 128, 12 GiB at 256
CHUNK_T = 4096
PACKED_DOCS = (0, 1000, 250, 40)  # document length of the packed section (0: no restarts), at T = CHUNK_T


def shape_of(setup: str) -> dict:
    """``SETUPS[name]``, or for ``"name/dN"`` that setup with head_dim ``N``."""
    name, _, dim = setup.partition("/d")
    return {**SETUPS[name], **({"dim": int(dim)} if dim else {})}


def dim_setup(dim: int) -> str:
    """The setup name of the head_dim sweep's point at ``dim``: the issue setup itself at its own head_dim."""
    return "issue" if dim == SETUPS["issue"]["dim"] else f"issue/d{dim}"


def weight_bytes(shape: dict) -> int:
    """One float32 copy of the memory MLP's weights of a setup ``shape``."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from lca.memory.mlp import layer_widths

    widths = layer_widths(shape["dim"], shape["depth"], shape["expansion"])
    return 4 * sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def run_point(setup: str, method: str, mode: str, t: int, chunk: int) -> dict:
    """In this (fresh) process: compile, measure one execution's peak, then time further runs."""
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from peak_memory import measure

    from lca.memory import mlp
    from lca.memory.neural_memory import MAX_GRAD_NORM
    from lca.memory.sequential import memorize_sequential
    from lca.memory.update import MemoryTokens, memorize_chunked

    shape = shape_of(setup)
    dim, streams = shape["dim"], shape["streams"]
    method, _, doc = method.partition("/")
    memorize = memorize_sequential if method == "sequential" else memorize_chunked
    rng = np.random.default_rng(0)

    def arr(*s, scale=1.0):
        return jnp.asarray(scale * rng.standard_normal((streams,) + s), jnp.float32)

    tokens = MemoryTokens(
        q=arr(t, dim), k=arr(t, dim, scale=dim**-0.5), v=arr(t, dim),
        lr=0.1 * jax.nn.sigmoid(arr(t)), momentum=jax.nn.sigmoid(arr(t) + 2), forget=0.05 * jax.nn.sigmoid(arr(t)),
    )
    one = mlp.init_weights(jax.random.PRNGKey(0), mlp.layer_widths(dim, shape["depth"], shape["expansion"]))
    weights = jax.tree.map(lambda w: jnp.broadcast_to(w, (streams,) + w.shape), one)
    momentum = jax.tree.map(jnp.zeros_like, weights)
    stop = t // chunk

    restart, busy = packed_flags(t, chunk, int(doc or 0))

    def one_stream(w, s, tok):
        if restart is None:
            return memorize(w, s, tok, chunk_size=chunk, act=jax.nn.silu, stop=stop, max_grad_norm=MAX_GRAD_NORM)
        # as a packed model row: each document restarts from the call's start state (in a model, the state
        # after the persistent tokens), its gradient included; the flags are constants, never differentiated
        return memorize(w, s, tok._replace(restart=restart), chunk_size=chunk, act=jax.nn.silu, stop=stop,
                        max_grad_norm=MAX_GRAD_NORM, start=(w, s), busy=busy)

    if streams == 1:
        # the update itself: vmap would put the stream axis before the scanned one, and the scan
        # would then copy the tokens to bring its axis first (input-sized memory, not the update's)
        weights, momentum, tokens = jax.tree.map(lambda x: x[0], (weights, momentum, tokens))
        forward = one_stream
    else:
        forward = jax.vmap(one_stream)
    if mode == "fwd":
        fn = forward
    else:

        def objective(w, s, tok):
            y, end = forward(w, s, tok)
            return jnp.sum(y) + sum(jnp.sum(x) for x in jax.tree.leaves(end))

        fn = jax.grad(objective, argnums=(0, 1, 2))
    compiled = jax.jit(fn).lower(weights, momentum, tokens).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    # XLA counts one iteration of each loop: a chunk (chunked) or a token (sequential), per direction
    per_step = 1 if method == "sequential" else chunk
    flops_per_token = float(cost.get("flops", float("nan"))) / (streams * per_step)
    peak, first = measure(compiled, weights, momentum, tokens)  # also the warm-up run
    times, cpu = [], []
    budget = time.perf_counter() + max(2.0, 3 * first)
    while len(times) < 3 or (len(times) < 10 and time.perf_counter() < budget):
        start, start_cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(compiled(weights, momentum, tokens))
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    if doc:
        method = f"{method}/{doc}"
    return {
        "setup": setup, "method": method, "mode": mode, "T": t, "chunk": chunk, "streams": streams,
        "peak_bytes": peak, "output_bytes": streams * t * dim * 4, "seconds": float(np.median(times)),
        "cpu_seconds": float(np.median(cpu)), "runs": len(times), "flops_per_token": flops_per_token,
        "max_grad_norm": MAX_GRAD_NORM,
    }


def packed_flags(t: int, chunk: int, doc: int):
    """``(restart [t], busy [t // chunk])`` for documents of ``doc`` tokens packed into one row (None, None
    for ``doc`` 0): the models' restarts (``document_starts``), and the chunks that hold one."""
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from lca.memory.neural_memory import document_starts

    if not doc:
        return None, None
    restart = np.asarray(document_starts(np.arange(t)[None] // doc))[0]
    return restart, restart.reshape(-1, chunk).any(axis=1)


def busy_share(t: int, chunk: int, doc: int) -> float:
    """The share of chunks holding a restart (the ones that take the restart branch)."""
    return float(packed_flags(t, chunk, doc)[1].mean()) if doc else 0.0


def _spawn(setup, method, mode, t, chunk, timeout):
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    from peak_memory import env

    point = {"setup": setup, "method": method, "mode": mode, "T": t, "chunk": chunk}
    cmd = [sys.executable, os.path.abspath(__file__), "--point", f"{setup},{method},{mode},{t},{chunk}"]
    environment = env()
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(here), environment.get("PYTHONPATH")]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=environment)
    except subprocess.TimeoutExpired:
        return {**point, "error": f"timeout after {timeout}s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {**point, "error": tail[0][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ok(p):
    return p is not None and "error" not in p


def _find(points, **match):
    return next((p for p in points if all(p.get(k) == v for k, v in match.items())), None)


def _pair(points, setup, mode, t):
    """(chunked, sequential) points of a setup at its chunk size."""
    chunk = SETUPS[setup]["chunk"]
    return tuple(_find(points, setup=setup, method=m, mode=mode, T=t, chunk=chunk) for m in METHODS)


def _mib(b):
    return f"{b / 2**20:,.2f}"


def _secs(p):
    return f"{p['seconds']:.4f}" if _ok(p) else ("not run" if p is None else "failed")


def _ratio(seq, chunked):
    return f"**{seq['seconds'] / chunked['seconds']:.1f}x**" if _ok(seq) and _ok(chunked) else "—"


def _rate(p):
    if not _ok(p):
        return "—"
    return f"{p['flops_per_token'] * p['T'] * p['streams'] / p['cpu_seconds'] / 1e9:.1f}"


def _setup_line(name):
    s = SETUPS[name]
    hidden = s["dim"] * s["expansion"]
    return (f"`{name}`: {s['streams']} stream{'s' if s['streams'] > 1 else ''}, head_dim {s['dim']}, depth-{s['depth']} "
            f"memory MLP (hidden {hidden}, SiLU), chunk {s['chunk']}")


def _clip(points):
    return ", ".join(sorted({f"{p['max_grad_norm']:g}" if p.get("max_grad_norm") else "none" for p in points if _ok(p)}))


def _verdict(points) -> str:
    """The issue's target (>= 10x at 4k tokens on CPU) against this run, per mode at the `issue` shape."""
    said = []
    for mode in MODES:
        c, s = _pair(points, "issue", mode, 4096)
        if _ok(c) and _ok(s):
            said.append(f"{mode} {s['seconds'] / c['seconds']:.1f}x")
    if not said:
        return "Target (>= 10x at 4k tokens): not measured in this run."
    return ("Target (>= 10x at 4k tokens), at the `issue` shape and T = 4,096: " + ", ".join(said) + ". A training step "
            "runs fwd+bwd, where the target holds; the forward alone is capped well below it, because the chunked "
            "update does as much arithmetic as the token scan and gains only the matmul rate over the scan's rate "
            "(next section).")


def _packed_lines(points, machine) -> list[str]:
    """The packed section: the chunked update with restarts vs without, run side by side."""
    packed = [p for p in points if p["method"].startswith("packed/")]
    if not packed:
        return []
    lines = [
        "",
        f"## Packed documents (T = {CHUNK_T:,})",
        "",
        "The chunked update on a packed row: the memory restarts at each document's first token (from the "
        "call's start state, as `lca.memory.memory_layer` does with `restarts`), documents of the given "
        "length back to back, so restarts fall mid-chunk. A chunk holding a restart takes each gradient "
        "twice (at the chunk-start weights, and at the restart weights for the tokens after it); the others "
        "take the plain branch. \"none\" is the same update without restarts, run just before the packed "
        "points of its row. Peak: the extra memory of one execution.",
        "",
        *([f"Machine: {machine}."] if machine else []),
        "",
        "| setup | mode | document tokens | chunks with a restart | s | vs none | peak MiB | vs none |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for setup in SETUPS:
        for mode in MODES:
            chunk = SETUPS[setup]["chunk"]
            base = _find(packed, setup=setup, mode=mode, method="packed/0")
            for doc in PACKED_DOCS:
                p = _find(packed, setup=setup, mode=mode, method=f"packed/{doc}")
                if p is None:
                    continue
                ok = _ok(p) and _ok(base)
                cells = [setup, mode, f"{doc:,}" if doc else "none", f"{busy_share(CHUNK_T, chunk, doc):.0%}",
                         _secs(p), f"{p['seconds'] / base['seconds']:.2f}x" if ok else "—",
                         _mib(p["peak_bytes"]) if _ok(p) else "—",
                         f"{p['peak_bytes'] / base['peak_bytes']:.2f}x" if ok else "—"]
                lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_results(points, machine, out_dir, packed_machine=None):
    os.makedirs(out_dir, exist_ok=True)
    lines = [
        "# Titans memory update: chunk-parallel vs sequential",
        "",
        f"Machine: {machine}.",
        "Both methods have the same chunk semantics (every gradient of a chunk at its start weights), are jitted "
        "and, for several streams (batch rows x heads), vmapped over them; float32; each token's gradient is "
        f"clipped to the models' default max_grad_norm ({_clip(points)}). Each point runs in a fresh "
        "subprocess; "
        "time is the median of at least 3 runs after a warm-up run; peak is the extra memory of the warm-up run "
        "(inputs excluded, output included). Chunked and sequential points of a row ran back to back.",
        "Produced by `python benchmarks/titans_update.py`. Shapes:",
        "",
        *[f"- {_setup_line(name)}" + (" (this benchmark's shape since it was written)" if name == "issue" else
                                      " (the `configs/titans_*.yaml` memory at their batch 8: 8 rows x 2 memory heads)")
          for name in SETUPS],
        "",
        "## Speed-up vs sequence length",
        "",
        "fwd+bwd is the gradient of the outputs and end state with respect to the start weights, momentum and "
        "tokens. The sequential scan's backward keeps every token's weights (GiBs), so its fwd+bwd runs only up to "
        "T = " + ", ".join(f"{t:,} ({name})" for name, t in SEQUENTIAL_BWD_MAX.items()) + " (\"not run\" beyond).",
        "",
        "| setup | mode | T | chunked s | sequential s | speed-up | speed-up in process CPU time |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for setup in SETUPS:
        for mode in MODES:
            for t in SPEED_LENGTHS:
                c, s = _pair(points, setup, mode, t)
                if c is None and s is None:
                    continue
                cpu = f"{s['cpu_seconds'] / c['cpu_seconds']:.1f}x" if _ok(s) and _ok(c) else "—"
                lines.append(f"| {setup} | {mode} | {t:,} | {_secs(c)} | {_secs(s)} | {_ratio(s, c)} | {cpu} |")
    lines += ["", _verdict(points)]
    lines += [
        "",
        f"## Work per token and achieved rate (T = {CHUNK_T:,})",
        "",
        "FLOPs per token and stream as XLA's cost analysis counts them (one iteration of each loop: "
        "a chunk of the chunked update, a token of the sequential one), and the rate each method reaches per "
        "second of process CPU time (all its threads; less sensitive than wall time to the machine's load). "
        "The chunked update does not do less arithmetic than the token-by-token scan (its outputs still "
        "see every token's own weights, through the c x c dual form, and it still forms the chunk's whole "
        "weight update); it gains only by running it as matmuls. So its forward speed-up is the ratio of "
        "the two rates divided by the ratio of the two FLOP counts, and it is capped by how far the scan "
        "is below the matmul rate of this CPU. The backward is another story: autodiff of the token scan "
        "keeps and reloads every token's weights.",
        "",
        "| setup | mode | chunked kFLOP/token | sequential kFLOP/token | chunked GFLOP/CPU-s | sequential GFLOP/CPU-s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for setup in SETUPS:
        for mode in MODES:
            c, s = _pair(points, setup, mode, CHUNK_T)
            cells = [setup, mode]
            cells += [f"{p['flops_per_token'] / 1e3:,.0f}" if _ok(p) else "—" for p in (c, s)]
            cells += [_rate(p) for p in (c, s)]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## Chunk size (setup `issue`, T = {CHUNK_T:,})",
        "",
        "The sequential scan does the same work for any chunk size (one gradient per token); the chunked "
        "update trades fewer sequential steps against O(chunk) more work per token.",
        "",
        "| mode | chunk | chunked s | sequential s | speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        s = _find(points, setup="issue", method="sequential", mode=mode, T=CHUNK_T, chunk=SETUPS["issue"]["chunk"])
        for chunk in SWEEP_CHUNKS:
            c = _find(points, setup="issue", method="chunked", mode=mode, T=CHUNK_T, chunk=chunk)
            if c is not None:
                lines.append(f"| {mode} | {chunk} | {_secs(c)} | {_secs(s)} | {_ratio(s, c)} |")
    lines += [
        "",
        f"## Memory size (setup `issue` but for head_dim, T = {CHUNK_T:,})",
        "",
        "The same two methods on a bigger or smaller memory: head_dim d, hidden 2d, so 4d^2 weights per copy "
        "(the scan reads and writes the weights, the momentum and its chunk-start copy every token). The token "
        "scan's rate (last column) decides the forward speed-up, and it peaks in the middle: at a small "
        "memory each token's work is too little to hide a scan step's fixed cost, and once the weights outgrow "
        "a core's cache every token streams them from memory, while the chunked update's matmuls reuse each "
        "weight across a chunk. The sequential fwd+bwd is not run beyond head_dim "
        f"{SEQUENTIAL_BWD_MAX_DIM} (it keeps every token's weights).",
        "",
        "| head_dim | weights per copy (KiB) | mode | chunked s | sequential s | speed-up | sequential GFLOP/CPU-s |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for dim in SWEEP_DIMS:
        setup = dim_setup(dim)
        for mode in MODES:
            c, s = (_find(points, setup=setup, method=m, mode=mode, T=CHUNK_T, chunk=SETUPS["issue"]["chunk"])
                    for m in METHODS)
            if c is None and s is None:
                continue
            kib = weight_bytes(shape_of(setup)) / 1024
            lines.append(f"| {dim} | {kib:,.0f} | {mode} | {_secs(c)} | {_secs(s)} | {_ratio(s, c)} | {_rate(s)} |")
    lines += _packed_lines(points, packed_machine)
    lines += [
        "",
        "## Peak memory vs sequence length (setup `issue`, forward)",
        "",
        "The state is constant (the MLP weights and momentum); beyond the output ``y [T, 64]`` "
        "the chunked update needs O(chunk) activations per step, whatever T.",
        "",
        "| T | output MiB | chunked peak MiB | chunked peak - output MiB | sequential peak MiB | chunked s | sequential s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    chunk = SETUPS["issue"]["chunk"]
    sweep = [p for p in points if p["setup"] == "issue" and p["mode"] == "fwd" and p["chunk"] == chunk]
    for t in sorted({p["T"] for p in sweep}):
        c = _find(sweep, method="chunked", T=t)
        s = _find(sweep, method="sequential", T=t)
        out = t * SETUPS["issue"]["dim"] * 4
        lines.append(
            "| " + " | ".join([
                f"{t:,}", _mib(out),
                _mib(c["peak_bytes"]) if _ok(c) else _secs(c),
                _mib(c["peak_bytes"] - out) if _ok(c) else "—",
                _mib(s["peak_bytes"]) if _ok(s) else _secs(s),
                _secs(c), _secs(s),
            ]) + " |"
        )
    lines += ["", "![peak memory and time vs T](titans_update.png)", ""]
    with open(os.path.join(out_dir, "titans_update.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(out_dir, "titans_update.json"), "w") as f:
        json.dump({"machine": machine, "packed_machine": packed_machine, "setups": SETUPS, "points": points}, f,
                  indent=1)
    _plot(sweep, machine, os.path.join(out_dir, "titans_update.png"))


def _plot(sweep, machine, path):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from log_axes import plot_memory_and_time

    curves = [
        (method, style, [p for p in sweep if p["method"] == method and _ok(p)])
        for method, style in (("chunked", "o-"), ("sequential", "s--"))
    ]
    ts = sorted({p["T"] for p in sweep})
    dim = SETUPS["issue"]["dim"]
    plot_memory_and_time(
        curves,
        f"Titans memory update, head_dim {dim}, depth 2, chunk {SETUPS['issue']['chunk']}, forward — {machine}",
        path,
        reference=("output y", ts, [t * dim * 4 / 2**20 for t in ts]),
    )


def plan(args) -> list[tuple[str, str, str, int, int]]:
    """Every (setup, method, mode, T, chunk), chunked and sequential of a row adjacent."""
    todo = []
    lengths = [int(t) for t in args.lengths.split(",")]
    for setup, shape in SETUPS.items():
        for mode in MODES:
            for t in lengths:
                for method in METHODS:
                    if method == "sequential" and mode == "fwd+bwd" and t > SEQUENTIAL_BWD_MAX[setup]:
                        continue
                    todo.append((setup, method, mode, t, shape["chunk"]))
    issue = SETUPS["issue"]["chunk"]
    for mode in MODES:
        todo += [("issue", "chunked", mode, CHUNK_T, c) for c in SWEEP_CHUNKS if c != issue]
    for dim in SWEEP_DIMS:
        for mode in MODES:
            for method in METHODS:
                if method == "sequential" and mode == "fwd+bwd" and dim > SEQUENTIAL_BWD_MAX_DIM:
                    continue
                todo.append((dim_setup(dim), method, mode, CHUNK_T, issue))
    for t in (int(t) for t in args.sweep.split(",")):
        for method in METHODS:
            if method == "sequential" and t > args.sequential_max:
                continue
            todo.append(("issue", method, "fwd", t, issue))
    todo += packed_plan()
    seen = set()
    return [p for p in todo if not (p in seen or seen.add(p))]


def packed_plan() -> list[tuple[str, str, str, int, int]]:
    """The packed section's points, each row's baseline (``packed/0``) first."""
    return [(setup, f"packed/{doc}", mode, CHUNK_T, shape["chunk"])
            for setup, shape in SETUPS.items() for mode in MODES for doc in PACKED_DOCS]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--point", help=argparse.SUPPRESS)
    parser.add_argument("--lengths", default=",".join(map(str, SPEED_LENGTHS)), help="T of the speed table")
    parser.add_argument("--sweep", default=",".join(map(str, SWEEP_LENGTHS)), help="T of the memory sweep")
    parser.add_argument("--sequential-max", type=int, default=16384, help="longest T for the sequential memory sweep")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per point")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--report", action="store_true", help="only rewrite titans_update.md/png from --out's JSON")
    parser.add_argument("--packed-only", action="store_true",
                        help="run only the packed section, replacing its points in --out's JSON")
    args = parser.parse_args()
    saved = os.path.join(args.out, "titans_update.json")
    if args.report:
        with open(saved) as f:
            data = json.load(f)
        write_results(data["points"], data["machine"], args.out, data.get("packed_machine"))
        return
    if args.point:
        setup, method, mode, t, chunk = args.point.split(",")
        print(json.dumps(run_point(setup, method, mode, int(t), int(chunk))))
        return

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from machine import describe

    if args.packed_only:  # the other sections keep their run and its machine line: read them first
        with open(saved) as f:
            data = json.load(f)
    machine = f"{describe()}; load average at start {os.getloadavg()[0]:.1f}"
    points = []
    for setup, method, mode, t, chunk in packed_plan() if args.packed_only else plan(args):
        p = _spawn(setup, method, mode, t, chunk, args.timeout)
        points.append(p)
        shown = p.get("error") or f"{p['peak_bytes'] / 2**20:9.2f} MiB {p['seconds']:.4f} s"
        print(f"{setup:>6} {method:>10} {mode:>7} T={t:>6} chunk {chunk:>4}: {shown}", flush=True)
    machine += f", at end {os.getloadavg()[0]:.1f}"
    if args.packed_only:
        kept = [p for p in data["points"] if not p["method"].startswith("packed/")]
        write_results(kept + points, data["machine"], args.out, packed_machine=machine)
    else:
        write_results(points, machine, args.out, packed_machine=machine)
    print(f"wrote {args.out}/titans_update.{{md,png,json}}")


if __name__ == "__main__":
    main()
