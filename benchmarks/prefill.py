"""Prefilling a prompt through an attention layer's KV cache: dense over the cache vs blockwise.

``lca.models.generate`` feeds a prompt of ``p`` tokens through each layer's ``attend_cached``
(:mod:`lca.models.kv_cache`). Two ways of attending those ``p`` queries, on the same inputs:

* ``dense``: one ``[p, slots]`` logit matrix per head over the whole cache, which is what
  ``attend_cached`` did for every call until 2026-12-08 (here: ``attend_cached`` with one tile as large
  as those logits, the dense branch it keeps for decoding a few tokens);
* ``blockwise``: ``attend_cached`` as it is now for a call whose logits exceed one 512 x 512 tile:
  ``blockwise_attention`` over the cache, key blocks past the fill or outside the window skipped.

Two layouts (``LAYOUTS``): a ``global`` layer's full buffer of ``max_len = p + 256`` slots (a prompt, then
256 new tokens), and a ``local`` layer's ring of its window's 512 slots, where the ``p`` queries attend over
the ring and themselves. Batch 1, 8 query heads over 2 KV heads of 128, float32, the cache empty before the
call. Peak extra memory of one compiled call (VmHWM, ``benchmarks/peak_memory.py``) and XLA's temporaries
of the compiled call, in a fresh subprocess per point; time: the median of ``--rounds`` calls after a
warm-up, each method in a fresh process of its own, the two one right after the other (in one process the
dense call's gigabytes slowed the blockwise call after it: ``run_timing_point``). ``dense`` is not run past
``DENSE_MAX_P``: its logits alone would take most of a 24 GB machine.

Then whole models (``MODELS``: each config's model with 2 layers, one per kind of a two-kind pattern): one
``Decoder.extend`` call of the prompt, as ``generate`` makes it (the whole prompt at once, the logits of its
last token), peak extra memory and XLA's temporaries in a fresh process per point, for ``MODEL_LENGTHS``:
every cached mixer kind should grow linearly in ``p``.

    python benchmarks/prefill.py                          # full sweep, writes results
    python benchmarks/prefill.py --lengths 1024,4096 --out /tmp/r

Writes ``prefill.md``, ``prefill.png`` and ``prefill.json`` under ``--out``.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
HEADS, KV_HEADS, HEAD_DIM = 8, 2, 128
NEW_TOKENS = 256  # room a global layer's buffer keeps past the prompt
WINDOW = 512  # a local layer's ring
LAYOUTS = ("global", "local")
METHODS = ("dense", "blockwise")
LENGTHS = tuple(1024 * 2**i for i in range(7))  # 1k .. 64k prompt tokens
DENSE_MAX_P = 8192  # dense holds [8, p, p + 256] float32 logits and their softmax: 4 GB at 8k, 16 GB at 16k
F32 = 4
MODELS = ("tiny", "titans_lmm", "titans_mag", "titans_mal", "titans_mac", "landmark")
MODEL_LENGTHS = (2048, 8192, 32768)


def _kv_len(layout: str, p: int) -> int:
    """Keys each query's logits span: the buffer's slots, or the ring's and the prompt's."""
    return p + NEW_TOKENS if layout == "global" else WINDOW + p


def _compiled(method: str, layout: str, p: int):
    """``attend_cached`` of ``p`` prompt tokens into an empty cache, compiled; and its arguments."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lca.models.kv_cache import attend_cached, empty_kv_cache

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, p, HEADS, HEAD_DIM), np.float32))
    k, v = (jnp.asarray(rng.standard_normal((1, p, KV_HEADS, HEAD_DIM), np.float32)) for _ in range(2))
    window = WINDOW if layout == "local" else None
    cache = empty_kv_cache(1, p + NEW_TOKENS, KV_HEADS, HEAD_DIM, jnp.float32, window=window)
    # Tiles as large as the logits send attend_cached down its dense branch.
    tiles = dict(block_q=p, block_kv=_kv_len(layout, p)) if method == "dense" else {}
    step = jax.jit(lambda q, k, v, cache: attend_cached(q, k, v, cache, window=window, **tiles))
    args = (q, k, v, cache)
    return step.lower(*args).compile(), args


def run_memory_point(method: str, layout: str, p: int) -> dict:
    """In this (fresh) process: compile, then the peak extra memory of one call."""
    sys.path.insert(0, HERE)
    from peak_memory import memory_point

    compiled, args = _compiled(method, layout, p)
    return {"method": method, "layout": layout, "p": p, **memory_point(compiled, *args)}


def run_timing_point(method: str, layout: str, p: int, rounds: int) -> list[dict]:
    """In this (fresh) process: one method's median time over ``rounds`` calls after a warm-up.

    One process per method: in one process with the dense call, the blockwise call after it took up to 2.9x
    its time alone (8k, local: 0.50 s next to dense, 0.17 s alone), whatever the malloc settings.
    """
    sys.path.insert(0, HERE)
    from timing import median_seconds

    compiled, args = _compiled(method, layout, p)
    return [{"method": method, "layout": layout, "p": p, "seconds": median_seconds(compiled, args, rounds)}]


def _compiled_model(name: str, p: int):
    """One jitted ``Decoder.extend`` of ``p`` prompt tokens into fresh caches (config ``name``, 2 layers)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from lca.config import load_config
    from lca.models import make_model

    cfg = load_config(name, ["model.num_layers=2"])
    graphdef, state = nnx.split(make_model(cfg, seed=0))
    model = nnx.merge(graphdef, state)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, p)), jnp.int32)
    positions = jnp.arange(p, dtype=jnp.int32)[None]

    def prefill(state, tokens, positions, caches):
        return nnx.merge(graphdef, state).extend(tokens, positions, caches, jnp.int32(p - 1))

    args = (state, tokens, positions, model.start_caches(1, p + NEW_TOKENS))
    return jax.jit(prefill).lower(*args).compile(), args, cfg.model


def run_model_point(name: str, p: int) -> dict:
    """In this (fresh) process: compile one model's prefill, then the peak extra memory of one call."""
    sys.path.insert(0, HERE)
    from peak_memory import memory_point

    compiled, args, model = _compiled_model(name, p)
    return {"model": name, "p": p, "pattern": list(model.pattern), "d_model": model.d_model,
            **memory_point(compiled, *args)}


def dense_logit_bytes(layout: str, p: int) -> int:
    """The dense pass's ``[heads, p, kv_len]`` float32 logits (once; the softmax holds more)."""
    return HEADS * p * _kv_len(layout, p) * F32


# ------------------------------------------------------------------------------------------------ results


def _mib(b) -> str:
    return f"{b / 2**20:,.1f}"


def _ok(p) -> bool:
    return p is not None and "error" not in p


def _cell(point, key: str, fmt) -> str:
    """One table cell: ``fmt(point[key])``, or why there is no number."""
    if point is None:
        return "not run"
    if "error" in point:
        return f"failed: {point['error'][:60]}"
    return fmt(point[key]) if key in point else "—"


def write_results(points, machine, out_dir, rounds: int, model_points=(), model_machine: str = ""):
    import json

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "prefill.json"), "w") as f:
        json.dump({"points": points, "machine": machine, "rounds": rounds, "model_points": list(model_points),
                   "model_machine": model_machine}, f, indent=1)
    by = {(p["method"], p["layout"], p["p"]): p for p in points}
    lines = [
        "# Prefilling a prompt through a KV cache: dense over the cache vs blockwise",
        "",
        f"Machine: {machine}. Written by `benchmarks/prefill.py` (its docstring says how).",
        "",
        f"One `attend_cached` call of p prompt tokens into an empty cache: batch 1, {HEADS} query heads over "
        f"{KV_HEADS} KV heads of {HEAD_DIM}, float32. `global`: a full buffer of p + {NEW_TOKENS} slots; "
        f"`local`: a ring of a {WINDOW}-token window. `dense` is one [p, slots] logit matrix per head (what "
        "`attend_cached` did for every call before 2026-12-08); `blockwise` is `attend_cached` now. Peak extra "
        "memory of one call (VmHWM) and XLA's temporaries of the compiled call, in a fresh process per point; "
        f"time: median of {rounds} calls after a warm-up, each method in a fresh process of its own, the two one right "
        "after the other (in one process, the dense call's gigabytes slowed the blockwise call after it). "
        f"`dense` is not run past p = {DENSE_MAX_P:,}.",
        "",
        "| layout | p | dense logits (MiB) | dense peak (MiB) | blockwise peak (MiB) | dense XLA temp (MiB) | "
        "blockwise XLA temp (MiB) | dense (s) | blockwise (s) | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for layout in LAYOUTS:
        for p in sorted({q["p"] for q in points if q["layout"] == layout}):
            dense, block = by.get(("dense", layout, p)), by.get(("blockwise", layout, p))
            speed = "—"
            if _ok(dense) and _ok(block) and "seconds" in dense and "seconds" in block:
                speed = f"**{dense['seconds'] / block['seconds']:.1f}x**"
            lines.append(
                f"| {layout} | {p:,} | {_mib(dense_logit_bytes(layout, p))} | {_cell(dense, 'peak_bytes', _mib)} | "
                f"{_cell(block, 'peak_bytes', _mib)} | {_cell(dense, 'xla_temp_bytes', _mib)} | "
                f"{_cell(block, 'xla_temp_bytes', _mib)} | {_cell(dense, 'seconds', lambda s: f'{s:.3f}')} | "
                f"{_cell(block, 'seconds', lambda s: f'{s:.3f}')} | {speed} |")
    lines += ["", "![peak memory and time vs prompt length](prefill.png)", ""]
    if model_points:
        lines += _model_table(model_points, model_machine)
    with open(os.path.join(out_dir, "prefill.md"), "w") as f:
        f.write("\n".join(lines))
    _plot(points, machine, os.path.join(out_dir, "prefill.png"))


def _model_table(model_points, machine: str) -> list[str]:
    lengths = sorted({p["p"] for p in model_points})
    lines = [
        "## Whole models: one prefill call",
        "",
        f"Machine: {machine}.",
        "",
        "Each config's model with 2 layers (`model.num_layers=2`: a two-kind pattern has one layer of each), one "
        "jitted `Decoder.extend` of the whole prompt into fresh caches with room for 256 more tokens, the logits "
        "of its last token only (as `generate` makes it): peak extra memory (VmHWM) and XLA's temporaries, a "
        "fresh process per point. Small models (d_model 32-128), so what grows with p is the mixers' own state.",
        "",
        "| config | pattern | d_model | " + " | ".join(f"p = {p:,} peak / XLA temp (MiB)" for p in lengths) + " |",
        "|---|---|---:|" + "---:|" * len(lengths),
    ]
    for name in dict.fromkeys(p["model"] for p in model_points):
        rows = {p["p"]: p for p in model_points if p["model"] == name}
        first = next((p for p in rows.values() if _ok(p)), {})  # one measured point names the pattern
        cells = [f"{_mib(rows[p]['peak_bytes'])} / {_mib(rows[p]['xla_temp_bytes'])}" if _ok(rows.get(p))
                 else (f"failed: {rows[p]['error'][:40]}" if p in rows else "not run") for p in lengths]
        lines.append(f"| {name} | {', '.join(first.get('pattern', []))} | {first.get('d_model', '')} | "
                     + " | ".join(cells) + " |")
    return lines + [""]


def _plot(points, machine, path):
    sys.path.insert(0, HERE)
    from log_axes import plot_memory_and_time

    curves = []
    for layout, colour in zip(LAYOUTS, ("C0", "C1")):
        for method, style in (("dense", "s--"), ("blockwise", "o-")):
            pts = [{"T": p["p"], "peak_bytes": p["peak_bytes"], "seconds": p.get("seconds", float("nan"))}
                   for p in points if p["layout"] == layout and p["method"] == method and _ok(p)]
            curves.append((f"{method}, {layout}", style + colour, pts))
    ps = sorted({p["p"] for p in points if p["layout"] == "global"})
    reference = ("dense logits alone, global", ps, [dense_logit_bytes("global", p) / 2**20 for p in ps])
    plot_memory_and_time(curves, f"Prefill of p prompt tokens through a KV cache — {machine}", path,
                         reference=reference, xlabel="prompt tokens p")


def main():
    sys.path.insert(0, HERE)
    from peak_memory import attach_seconds, point_or_rewrite, run_fresh, sweep_parser

    parser = sweep_parser(__doc__, timeout=900, out=os.path.join(HERE, "results"))
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="prompt lengths p")
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per method and row")
    parser.add_argument("--model-lengths", default=",".join(map(str, MODEL_LENGTHS)),
                        help="prompt lengths of the whole-model section (empty: skip it)")
    parser.add_argument("--models-only", action="store_true",
                        help="run only the whole-model section, into the prefill.json already in --out")
    args = parser.parse_args()
    points = {"memory": lambda method, layout, p: run_memory_point(method, layout, int(p)),
              "model": lambda name, p: run_model_point(name, int(p)),
              "timing": lambda method, layout, p, rounds: run_timing_point(method, layout, int(p), int(rounds))}
    if point_or_rewrite(args, write_results, points):
        return

    from machine import describe

    if args.models_only:
        import json

        with open(os.path.join(args.out, "prefill.json")) as f:
            saved = json.load(f)
        model_points, model_machine = _run_models(args, run_fresh, describe)
        write_results(saved["points"], saved["machine"], args.out, saved["rounds"], model_points, model_machine)
        print(f"wrote {args.out}/prefill.{{md,png,json}}")
        return
    machine = f"{describe()}; load average at start {os.getloadavg()[0]:.1f}"
    points = []
    for layout in LAYOUTS:
        for p in map(int, args.lengths.split(",")):
            for method in METHODS:
                if method == "dense" and p > DENSE_MAX_P:
                    continue
                label = {"method": method, "layout": layout, "p": p}
                point = run_fresh(__file__, f"memory,{method},{layout},{p}", args.timeout, label)
                points.append(point)
                shown = point.get("error") or (f"peak {_mib(point['peak_bytes'])} MiB, "
                                               f"XLA temp {_mib(point['xla_temp_bytes'])} MiB")
                print(f"{layout:>6} p={p:>6} {method:>9}: {shown}", flush=True)
            for method in METHODS:  # each in its own process, one right after the other (run_timing_point)
                if method == "dense" and p > DENSE_MAX_P:
                    continue
                label = {"method": method, "layout": layout, "p": p}
                timed = run_fresh(__file__, f"timing,{method},{layout},{p},{args.rounds}", args.timeout, label,
                                  timing_only=True)
                for s in attach_seconds(points, timed, ("method", "layout", "p")):
                    shown = s.get("error") or f"{s['seconds']:.3f} s"
                    print(f"{layout:>6} p={p:>6} {method:>9}: {shown}", flush=True)
    machine += f", at end {os.getloadavg()[0]:.1f}"
    model_points, model_machine = _run_models(args, run_fresh, describe)
    write_results(points, machine, args.out, args.rounds, model_points, model_machine)
    print(f"wrote {args.out}/prefill.{{md,png,json}}")


def _run_models(args, run_fresh, describe):
    """The whole-model section's points (fresh process each) and its machine line."""
    machine = f"{describe()}; load average at start {os.getloadavg()[0]:.1f}"
    model_points = []
    for name in MODELS:
        for p in (int(x) for x in args.model_lengths.split(",") if x):
            point = run_fresh(__file__, f"model,{name},{p}", args.timeout, {"model": name, "p": p})
            model_points.append(point)
            shown = point.get("error") or (f"peak {_mib(point['peak_bytes'])} MiB, "
                                           f"XLA temp {_mib(point['xla_temp_bytes'])} MiB")
            print(f"{name:>10} p={p:>6}: {shown}", flush=True)
    return model_points, machine + f", at end {os.getloadavg()[0]:.1f}"


if __name__ == "__main__":
    main()
