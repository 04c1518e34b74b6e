"""Attention kernel throughput: TFLOP/s of forward and forward+backward on one GPU.

Compares lca's Pallas kernels (``"gpu_portable"``, what ``backend="auto"`` runs on
GPUs, and on Hopper the opt-in ``"mosaic_gpu"`` forward) with
``jax.nn.dot_product_attention(implementation="cudnn")``, the XLA path
(``implementation="xla"``) and ``lca.attention.blockwise_attention``: bf16,
head_dim 64 and 128, causal and not, T from 1k to 64k at a fixed number of
tokens per batch (``batch = tokens // T``, ``heads * head_dim = 2048``).

FLOPs: forward ``4 * b * h * T^2 * d`` (two matmuls), halved for causal;
forward+backward is 3.5x the forward (FlashAttention-2's count). A point that
fails (e.g. the XLA path running out of memory at long T) is recorded as such.

``--sizes issue`` measures the points of issue 15 instead (bf16 MHA, head_dim 128,
16 heads, 65,536 tokens per batch: 2k causal fwd; 8k causal, 8k full and 32k causal
fwd and fwd+bwd; 32k full fwd+bwd), adding JAX's own example kernels: the Mosaic GPU
attention (``jax.experimental.pallas.ops.gpu.attention_mgpu``, float16 inputs, no
causal backward) and the Triton one (``...ops.gpu.attention.mha``). ``--budget-s``
stops measuring once that many seconds have passed (the rest is recorded as skipped),
so a run fits a short GPU lease.

``lca_cudnn_ring1`` is lca's ``impl="cudnn"`` as the local step of ``ring_attention``
on a one-device mesh: the ring's local compute (its ``lax.cond``/``lax.switch``
plan, cuDNN's call and the float32 merge, no transfers) beside a bare cuDNN call of
the same shape (issue 15's target: within 10%); its "x cuDNN" column is that ratio.

Writes ``benchmarks/results/kernels_<device>.md`` and ``.png`` (the device name
is in the file and its title; ``--results`` another folder). On a machine without
a GPU it refuses, except in ``--smoke`` mode, which runs tiny sizes in interpret
mode and writes only where ``--results`` says.

    python benchmarks/kernels.py                # full sweep on a GPU
    python benchmarks/kernels.py --sizes issue --budget-s 240
    python benchmarks/kernels.py --smoke        # CPU plumbing check, no results
    python benchmarks/kernels.py --report benchmarks/results/kernels_<device>.md   # redraw its plot
"""

from __future__ import annotations

import argparse
import math
import pathlib
import re
import time

import jax
import jax.numpy as jnp

from kernels_pallas import flash_attention
from timing import median_seconds
from lca.attention import blockwise_attention

RESULTS = pathlib.Path(__file__).parent / "results"


def _is_hopper() -> bool:
    return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9")


def _jax_mosaic_gpu_example(q, k, v, causal):
    """JAX's Mosaic GPU attention example (float16; its backward blocks set so it can differentiate)."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    config = attention_mgpu.TuningConfig(
        block_q=64, block_kv=128, max_concurrent_steps=2, causal=causal,
        block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64,
    )
    return attention_mgpu.attention(q, k, v, config)


def _jax_triton_example(q, k, v, causal):
    from jax.experimental.pallas.ops.gpu import attention as triton_attention

    return triton_attention.mha(q, k, v, None, sm_scale=1 / math.sqrt(q.shape[-1]), causal=causal)


def _lca_cudnn_ring1(q, k, v, causal):
    """lca's ``impl="cudnn"`` as the ring's local step, on a one-device mesh (no transfers)."""
    from lca.attention import ring_attention
    from lca.parallel import make_mesh

    mesh = make_mesh(context=1, devices=jax.devices()[:1])
    return ring_attention(q, k, v, mesh=mesh, causal=causal, impl="cudnn")


def _impls(smoke: bool, examples: bool = False):
    """``{name: (attention(q, k, v, causal), input dtype)}``."""
    bf16 = jnp.bfloat16
    impls = {
        "pallas_portable": (lambda q, k, v, causal: flash_attention(
            q, k, v, causal=causal, backend="gpu_portable"
        ), bf16),
        "blockwise": (lambda q, k, v, causal: blockwise_attention(q, k, v, causal=causal), bf16),
    }
    if not examples:
        impls["xla"] = (lambda q, k, v, causal: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="xla"
        ), bf16)
    if not smoke and _is_hopper():
        # Mosaic GPU forward + portable backward (kernels_pallas.gpu.hopper).
        impls["pallas_mosaic_gpu"] = (lambda q, k, v, causal: flash_attention(
            q, k, v, causal=causal, backend="mosaic_gpu"
        ), bf16)
    if not smoke:
        impls["cudnn"] = (lambda q, k, v, causal: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn"
        ), bf16)
        impls["lca_cudnn_ring1"] = (_lca_cudnn_ring1, bf16)
    if examples and not smoke:
        impls["jax_triton_example"] = (_jax_triton_example, bf16)
        if _is_hopper():
            impls["jax_mosaic_gpu_example"] = (_jax_mosaic_gpu_example, jnp.float16)
        # cuDNN first (the yardstick), the slow pure-JAX path last: a time budget cuts that one.
        order = ["cudnn", "lca_cudnn_ring1", "pallas_mosaic_gpu", "pallas_portable",
                 "jax_mosaic_gpu_example", "jax_triton_example", "blockwise"]
        impls = {name: impls[name] for name in order if name in impls}
    return impls


def _flops(b, t, h, d, causal: bool, backward: bool) -> float:
    fwd = 4.0 * b * h * t * t * d / (2 if causal else 1)
    return fwd * (3.5 if backward else 1.0)


def measure(attn, b, t, h, d, causal: bool, backward: bool, repeats: int, dtype=jnp.bfloat16):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(key, (b, t, h, d), dtype) for key in (kq, kk, kv))
    if backward:
        loss = lambda q, k, v: attn(q, k, v, causal).astype(jnp.float32).sum()  # noqa: E731
        fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    else:
        fn = jax.jit(lambda q, k, v: attn(q, k, v, causal))
    seconds = median_seconds(fn, (q, k, v), repeats)
    return _flops(b, t, h, d, causal, backward) / seconds / 1e12


# Issue 15's points: (T, causal, backward), head_dim 128, 16 heads, 65,536 tokens per batch.
# The cheapest first: a time budget cuts the end of the list.
ISSUE_POINTS = [
    (2048, True, False), (8192, True, False), (8192, True, True), (32768, True, False),
    (32768, True, True), (8192, False, False), (8192, False, True), (32768, False, True),
]


def _points(sizes: str, smoke: bool):
    """``(t, b, h, d, causal, backward)`` to measure."""
    if smoke:
        return [(32, 2, 2, 16, causal, backward) for causal in (False, True) for backward in (False, True)]
    if sizes == "issue":
        return [(t, 65536 // t, 16, 128, causal, backward) for t, causal, backward in ISSUE_POINTS]
    return [(t, max(1, 65536 // t), max(1, 2048 // d), d, causal, backward)
            for d in (64, 128) for causal in (False, True) for backward in (False, True)
            for t in (2**i for i in range(10, 17))]


def run(smoke: bool, sizes: str = "sweep", budget_s: float | None = None):
    repeats = 1 if smoke else 5
    impls = _impls(smoke, examples=sizes == "issue")
    start, rows = time.perf_counter(), []
    for t, b, h, d, causal, backward in _points(sizes, smoke):
        for name, (attn, dtype) in impls.items():
            if budget_s is not None and time.perf_counter() - start > budget_s:
                tflops, note = None, "skipped: time budget"
            else:
                try:
                    tflops = measure(attn, b, t, h, d, causal, backward, repeats, dtype)
                except Exception as err:  # noqa: BLE001 - recorded, e.g. OOM at long T
                    tflops, note = None, f"{type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else ''}"
                else:
                    note = ""
            rows.append(dict(impl=name, d=d, causal=causal, backward=backward, t=t,
                             b=b, h=h, tflops=tflops, note=note))
            print(rows[-1], flush=True)
    return rows


def _markdown(rows, device: str) -> str:
    lines = [
        f"# Attention kernels, bf16, on {device} (jax {jax.__version__})",
        "",
        "TFLOP/s (causal counted as half the FLOPs; fwd+bwd = 3.5x fwd FLOPs). "
        "jax_mosaic_gpu_example runs float16 inputs, as in issue 15; everything else bfloat16.",
        "",
        "| pass | causal | head_dim | T | batch | heads | impl | TFLOP/s | x cuDNN |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    key = lambda r: (r["d"], r["causal"], r["backward"], r["t"])  # noqa: E731
    cudnn = {key(r): r["tflops"] for r in rows if r["impl"] == "cudnn" and r["tflops"]}
    for r in rows:
        if r["tflops"] is not None:
            value = f"{r['tflops']:.1f}"
        else:
            value = r["note"] if r["note"].startswith("skipped") else f"failed ({r['note']})"
        ratio = f"{r['tflops'] / cudnn[key(r)]:.2f}" if r["tflops"] and key(r) in cudnn else ""
        lines.append(
            f"| {'fwd+bwd' if r['backward'] else 'fwd'} | {r['causal']} | {r['d']} | {r['t']} | "
            f"{r['b']} | {r['h']} | {r['impl']} | {value} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def _plot(rows, device: str, path: pathlib.Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["d"], r["causal"], r["backward"]) for r in rows})
    impls = sorted({r["impl"] for r in rows})
    colors = {impl: f"C{i}" for i, impl in enumerate(impls)}  # one colour per impl in every panel
    cols = -(-len(panels) // 2)
    fig, axes = plt.subplots(2, cols, figsize=(5 * cols, 8), squeeze=False)
    for ax, (d, causal, backward) in zip(axes.T.flat, panels):
        for impl in impls:
            pts = sorted((r["t"], r["tflops"]) for r in rows if (r["d"], r["causal"], r["backward"], r["impl"])
                         == (d, causal, backward, impl) and r["tflops"] is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl, color=colors[impl])
        ax.set_xscale("log", base=2)
        ax.set_title(f"{'fwd+bwd' if backward else 'fwd'}, d={d}, causal={causal}")
        ax.set_xlabel("T")
        ax.set_ylabel("TFLOP/s")
        ax.legend(fontsize=7)
    fig.suptitle(f"Attention kernels, bf16, {device}")
    fig.tight_layout()
    fig.savefig(path)


def rows_from_markdown(text: str) -> list[dict]:
    """The measured rows of a table :func:`_markdown` wrote (``--report``: redraw its plot)."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 9 or cells[0] not in ("fwd", "fwd+bwd"):
            continue
        measured = re.fullmatch(r"[0-9.]+", cells[7]) is not None
        failed = re.fullmatch(r"failed \((.*)\)", cells[7])
        note = "" if measured else failed.group(1) if failed else cells[7]
        rows.append(dict(impl=cells[6], d=int(cells[2]), causal=cells[1] == "True", backward=cells[0] == "fwd+bwd",
                         t=int(cells[3]), b=int(cells[4]), h=int(cells[5]),
                         tflops=float(cells[7]) if measured else None, note=note))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run; writes only with --results")
    parser.add_argument("--sizes", choices=("sweep", "issue"), default="sweep",
                        help="sweep: head_dim 64/128, T 1k..64k; issue: issue 15's points with JAX's example kernels")
    parser.add_argument("--budget-s", type=float, default=None, help="stop measuring after this many seconds")
    parser.add_argument("--results", type=pathlib.Path, default=None, help=f"output folder (default {RESULTS})")
    parser.add_argument("--report", type=pathlib.Path, default=None,
                        help="redraw the plot beside this kernels_<device>.md from its table; measures nothing")
    args = parser.parse_args()
    if args.report is not None:
        text = args.report.read_text()
        name = re.search(r"bf16, on (.*) \(jax", text.splitlines()[0]).group(1)
        _plot(rows_from_markdown(text), name, args.report.with_suffix(".png"))
        print(f"wrote {args.report.with_suffix('.png')}")
        return
    device = jax.devices()[0]
    if device.platform not in ("gpu", "cuda") and not args.smoke:
        raise SystemExit(
            f"benchmarks/kernels.py measures GPU kernels; found {device.platform} "
            f"({device.device_kind}). Use --smoke for a CPU plumbing check (writes nothing)."
        )
    rows = run(args.smoke, args.sizes, args.budget_s)
    if args.smoke and args.results is None:
        print(f"smoke run on {device.device_kind}: {len(rows)} points, nothing written")
        return
    results = args.results or RESULTS
    name = f"{device.device_kind}"
    slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()
    results.mkdir(parents=True, exist_ok=True)
    (results / f"kernels_{slug}.md").write_text(_markdown(rows, name))
    _plot(rows, name, results / f"kernels_{slug}.png")
    print(f"wrote {results}/kernels_{slug}.md and .png")


if __name__ == "__main__":
    main()
