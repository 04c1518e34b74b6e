"""Longest trainable context and training throughput of the demo model, per attention kind.

For each kind (dense XLA, blockwise, ring) the context length doubles from
``--start`` until a point fails, runs out of time, or exceeds the memory cap.
Every point runs in a fresh subprocess on 8 fake CPU devices (mesh: context=8,
so the sequence is split over the devices; batch 1): it compiles the train
step, runs ``--steps`` steps and reports tokens/s (after the first step) and
the process's peak resident memory (VmHWM). A watchdog thread in the child
kills it when its resident memory passes ``--mem-cap-gb``, so the machine
never swaps or OOMs.

    python benchmarks/max_context.py                 # writes benchmarks/results/max_context.{md,png}
    python benchmarks/max_context.py --kinds ring --start 65536 --budget 600
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


# --------------------------------------------------------------------------- one point (child process)


def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def _watchdog(cap_kib: int) -> None:
    import threading

    def watch():
        while True:
            if _rss_kib("VmRSS:") > cap_kib:
                print(json.dumps({"status": "memory cap"}), flush=True)
                os._exit(3)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()


# Single-device kinds run on one device: splitting their sequence over a mesh
# only makes the compiler gather it back. Context-parallel kinds get all 8.
SINGLE_DEVICE_KINDS = ("reference", "xla", "blockwise", "pallas")


def devices_for(kind: str) -> int:
    return 1 if kind in SINGLE_DEVICE_KINDS else 8


def attention_overrides(kind: str) -> list[str]:
    """A kind is a local implementation run unsplit, or a sequence strategy over blockwise."""
    impl, sequence = (kind, "none") if kind in SINGLE_DEVICE_KINDS else ("blockwise", kind)
    return [f"model.attention.impl={impl}", f"model.attention.sequence={sequence}"]


def run_point(kind: str, seq_len: int, steps: int, cap_gb: float) -> dict:
    from lca.train.runtime import set_cpu_devices

    devices = devices_for(kind)
    set_cpu_devices(devices)
    _watchdog(int(cap_gb * 2**20))
    import jax
    import numpy as np

    from lca.config import load_config
    from lca.train.loop import build_mesh, check_fits, compile_step, init_state, make_setup, to_global_batch

    cfg = load_config("demo", [
        *attention_overrides(kind), f"train.seq_len={seq_len}", "train.global_batch=1", "mesh.data=1",
        f"mesh.context={devices}", "model.attention.block_q=512", "model.attention.block_kv=512",
    ])
    mesh = build_mesh(cfg)
    check_fits(cfg, mesh)
    base_kib = _rss_kib("VmRSS:")
    setup = make_setup(cfg, mesh)
    state = init_state(setup, 0)
    compiled, _ = compile_step(setup)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (1, seq_len + 1), dtype=np.int32)
    local = {
        "inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((1, seq_len), np.int32),
        "positions": np.arange(seq_len, dtype=np.int32)[None], "loss_mask": np.ones((1, seq_len), np.float32),
    }
    batch = to_global_batch(local, setup)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t0)
    step_time = min(times[1:] or times)
    return {
        "status": "ok", "kind": kind, "seq_len": seq_len, "step_time_s": step_time,
        "tokens_per_s": seq_len / step_time, "peak_extra_gib": (_rss_kib("VmHWM:") - base_kib) / 2**20,
        "loss": float(metrics["loss"]),
    }


# --------------------------------------------------------------------------- sweep (parent process)


def sweep(kinds, start: int, max_len: int, steps: int, cap_gb: float, point_timeout: int, budget: float) -> list[dict]:
    deadline = time.monotonic() + budget
    rows = []
    for kind in kinds:
        seq_len = start
        while seq_len <= max_len:
            left = deadline - time.monotonic()
            if left < 10:
                rows.append({"kind": kind, "seq_len": seq_len, "status": "not run (benchmark time budget)"})
                break
            cmd = [sys.executable, __file__, "--point", kind, str(seq_len), "--steps", str(steps),
                   "--mem-cap-gb", str(cap_gb)]
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=min(point_timeout, left), env=env)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
                row = json.loads(lines[-1]) if lines else {"status": f"failed (exit {proc.returncode})"}
                if proc.returncode not in (0, 3) and row.get("status") == "ok":
                    row["status"] = f"failed (exit {proc.returncode})"
                if not lines:
                    row["error"] = proc.stderr.strip().splitlines()[-1:] or [""]
            except subprocess.TimeoutExpired:
                row = {"status": f"timeout (> {min(point_timeout, left):.0f} s)"}
            row.update(kind=kind, seq_len=seq_len)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if row["status"] != "ok":
                break
            seq_len *= 2
    return rows


MACHINE = f"{os.cpu_count()}-core CPU ({platform.machine()})"


def _status_text(row: dict) -> str:
    error = row.get("error") or [""]
    detail = error[0].split("RESOURCE_EXHAUSTED:")[-1].strip() if "RESOURCE_EXHAUSTED" in error[0] else ""
    return f"{row['status']}: {detail}" if detail else row["status"]


def write_report(rows: list[dict], args) -> None:
    import jax

    RESULTS.mkdir(parents=True, exist_ok=True)
    machine = f"{MACHINE}, jax {jax.__version__}, load average at the end {os.getloadavg()[0]:.1f}"
    longest = {}
    for row in rows:
        if row["status"] == "ok":
            longest[row["kind"]] = max(longest.get(row["kind"], 0), row["seq_len"])
    lines = [
        "# Longest training context of the demo model",
        "",
        f"Machine: {machine}. Demo model (configs/demo.yaml: d_model 128, 4 layers, windowed pattern), batch 1; "
        f"{', '.join(SINGLE_DEVICE_KINDS)} on one CPU device, the context-parallel kinds on 8 fake CPU devices "
        f"(mesh context=8) of the same machine; memory cap {args.mem_cap_gb} GB per point, "
        f"{args.point_timeout} s per point, {args.steps} step(s) after compilation (step time: fastest after the first, or the only one), "
        f"context doubled from {args.start}. Peak extra memory is the whole process's (all its devices). "
        f"Measured by `python benchmarks/max_context.py "
        f"--kinds {' '.join(args.kinds)} --start {args.start} --steps {args.steps} --mem-cap-gb {args.mem_cap_gb} "
        f"--point-timeout {args.point_timeout} --budget {args.budget:.0f}`.",
        "",
        "| kind | longest context trained | ",
        "|---|---|",
        *[f"| {kind} | {longest.get(kind, 0):,} |" for kind in args.kinds],
        "",
        "| kind | context | status | step time (s) | tokens/s | peak extra memory (GiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ok = r["status"] == "ok"
        lines.append(
            f"| {r['kind']} | {r['seq_len']:,} | {_status_text(r)} | "
            + (f"{r['step_time_s']:.2f} | {r['tokens_per_s']:,.0f} | {r['peak_extra_gib']:.2f} |" if ok else "| | |")
        )
    (RESULTS / "max_context.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for kind in args.kinds:
        ok = [r for r in rows if r["kind"] == kind and r["status"] == "ok"]
        if ok:
            axes[0].plot([r["seq_len"] for r in ok], [r["tokens_per_s"] for r in ok], "o-", label=kind)
            axes[1].plot([r["seq_len"] for r in ok], [r["peak_extra_gib"] for r in ok], "o-", label=kind)
    for ax, label in zip(axes, ("training tokens/s", "peak extra memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Demo model training: {machine}", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "max_context.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--point", nargs=2, metavar=("KIND", "SEQ_LEN"), help=argparse.SUPPRESS)
    parser.add_argument("--kinds", nargs="+", default=["xla", "blockwise", "ring"])
    parser.add_argument("--start", type=int, default=1024)
    parser.add_argument("--max-len", type=int, default=2**20)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--mem-cap-gb", type=float, default=10.0)
    parser.add_argument("--point-timeout", type=int, default=240)
    parser.add_argument("--budget", type=float, default=840.0, help="seconds for the whole sweep")
    args = parser.parse_args()
    if args.point:
        print(json.dumps(run_point(args.point[0], int(args.point[1]), args.steps, args.mem_cap_gb)), flush=True)
        return
    rows = sweep(args.kinds, args.start, args.max_len, args.steps, args.mem_cap_gb, args.point_timeout, args.budget)
    write_report(rows, args)
    print((RESULTS / "max_context.md").read_text())


if __name__ == "__main__":
    main()
