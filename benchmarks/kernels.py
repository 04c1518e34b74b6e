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

Writes ``benchmarks/results/kernels_<device>.md`` and ``.png`` (the device name
is in the file and its title). On a machine without a GPU it refuses, except in
``--smoke`` mode, which runs tiny sizes in interpret mode and writes nothing.

    python benchmarks/kernels.py                # full run on a GPU
    python benchmarks/kernels.py --smoke        # CPU plumbing check, no results
"""

from __future__ import annotations

import argparse
import pathlib
import re

import jax
import jax.numpy as jnp

from kernels_pallas import flash_attention
from timing import median_seconds
from lca.attention import blockwise_attention

RESULTS = pathlib.Path(__file__).parent / "results"


def _impls(smoke: bool):
    impls = {
        "pallas_portable": lambda q, k, v, causal: flash_attention(
            q, k, v, causal=causal, backend="gpu_portable"
        ),
        "blockwise": lambda q, k, v, causal: blockwise_attention(q, k, v, causal=causal),
        "xla": lambda q, k, v, causal: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="xla"
        ),
    }
    if not smoke and str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9"):
        # Mosaic GPU forward + portable backward (kernels_pallas.gpu.hopper).
        impls["pallas_mosaic_gpu"] = lambda q, k, v, causal: flash_attention(
            q, k, v, causal=causal, backend="mosaic_gpu"
        )
    if not smoke:
        impls["cudnn"] = lambda q, k, v, causal: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn"
        )
    return impls


def _flops(b, t, h, d, causal: bool, backward: bool) -> float:
    fwd = 4.0 * b * h * t * t * d / (2 if causal else 1)
    return fwd * (3.5 if backward else 1.0)


def measure(attn, b, t, h, d, causal: bool, backward: bool, repeats: int):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    dtype = jnp.bfloat16
    q, k, v = (jax.random.normal(key, (b, t, h, d), dtype) for key in (kq, kk, kv))
    if backward:
        loss = lambda q, k, v: attn(q, k, v, causal).astype(jnp.float32).sum()  # noqa: E731
        fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    else:
        fn = jax.jit(lambda q, k, v: attn(q, k, v, causal))
    seconds = median_seconds(fn, (q, k, v), repeats)
    return _flops(b, t, h, d, causal, backward) / seconds / 1e12


def run(smoke: bool):
    if smoke:
        lengths, tokens, head_dims, repeats = [32], 64, [16], 1
    else:
        lengths, tokens, head_dims, repeats = [2**i for i in range(10, 17)], 65536, [64, 128], 5
    rows = []
    for d in head_dims:
        h = max(1, 2048 // d) if not smoke else 2
        for causal in (False, True):
            for backward in (False, True):
                for t in lengths:
                    b = max(1, tokens // t)
                    for name, attn in _impls(smoke).items():
                        try:
                            tflops = measure(attn, b, t, h, d, causal, backward, repeats)
                        except Exception as err:  # noqa: BLE001 - recorded, e.g. OOM at long T
                            tflops, note = None, type(err).__name__
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
        "TFLOP/s (causal counted as half the FLOPs; fwd+bwd = 3.5x fwd FLOPs).",
        "",
        "| pass | causal | head_dim | T | batch | heads | impl | TFLOP/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        value = f"{r['tflops']:.1f}" if r["tflops"] is not None else f"failed ({r['note']})"
        lines.append(
            f"| {'fwd+bwd' if r['backward'] else 'fwd'} | {r['causal']} | {r['d']} | {r['t']} | "
            f"{r['b']} | {r['h']} | {r['impl']} | {value} |"
        )
    return "\n".join(lines) + "\n"


def _plot(rows, device: str, path: pathlib.Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["d"], r["causal"], r["backward"]) for r in rows})
    fig, axes = plt.subplots(2, len(panels) // 2, figsize=(5 * len(panels) // 2, 8), squeeze=False)
    for ax, (d, causal, backward) in zip(axes.T.flat, panels):
        for impl in sorted({r["impl"] for r in rows}):
            pts = [(r["t"], r["tflops"]) for r in rows if (r["d"], r["causal"], r["backward"], r["impl"])
                   == (d, causal, backward, impl) and r["tflops"] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{'fwd+bwd' if backward else 'fwd'}, d={d}, causal={causal}")
        ax.set_xlabel("T")
        ax.set_ylabel("TFLOP/s")
        ax.legend(fontsize=7)
    fig.suptitle(f"Attention kernels, bf16, {device}")
    fig.tight_layout()
    fig.savefig(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run, writes nothing")
    args = parser.parse_args()
    device = jax.devices()[0]
    if device.platform not in ("gpu", "cuda") and not args.smoke:
        raise SystemExit(
            f"benchmarks/kernels.py measures GPU kernels; found {device.platform} "
            f"({device.device_kind}). Use --smoke for a CPU plumbing check (writes nothing)."
        )
    rows = run(args.smoke)
    if args.smoke:
        print(f"smoke run on {device.device_kind}: {len(rows)} points, nothing written")
        return
    name = f"{device.device_kind}"
    slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"kernels_{slug}.md").write_text(_markdown(rows, name))
    _plot(rows, name, RESULTS / f"kernels_{slug}.png")
    print(f"wrote {RESULTS}/kernels_{slug}.md and .png")


if __name__ == "__main__":
    main()
