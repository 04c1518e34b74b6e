"""Titans at CPU scale: MAC, MAG, MAL, LMM and a plain transformer of the same size, same budget.

Every model trains with ``lca-train configs/titans_eval.yaml`` (the stdlib corpus with three quarters of
the batches passkey needles, seq_len 512; same steps, batch, lr and data), one after another,
each run from scratch in its own process. Then ``lca-eval`` (a fresh process) measures bits per
byte on held-out stdlib text and the passkey accuracy at 1x..16x the training length
(teacher-forced: the whole 5-digit answer is the argmax after one forward pass over the prompt,
``lca.eval.retrieval.retrieval_grid``). The paper's claim to check: the memory models keep
retrieving beyond the training length, where the transformer falls off.

    python benchmarks/titans_eval.py                        # all five models, then the report
    python benchmarks/titans_eval.py --models mac,lmm       # just these (the others' results are kept)
    python benchmarks/titans_eval.py --report               # only rewrite the report from titans.json
    python benchmarks/titans_eval.py --eval-only            # re-evaluate the trained runs (eval grid changed)
    python benchmarks/titans_eval.py --out /tmp/r --runs /tmp/runs train.steps=10 eval.samples_per_cell=1

Trailing ``key=value`` overrides go to both lca-train and lca-eval. Writes ``titans.json``
(every measurement, per model, updated in place), ``titans.md`` and ``titans.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/titans_eval.yaml"

# name -> (label, overrides). The memory layers bring their own projections, so LMM and the
# transformer get a wider MLP than the config's: then every model has 200k-216k parameters.
MODELS = {
    "mac": ("Titans MAC", ["model.pattern=[titans_mac]"]),
    "mag": ("Titans MAG", ["model.pattern=[titans_mag]"]),
    "mal": ("Titans MAL", ["model.pattern=[titans_mal]"]),
    "lmm": ("Titans LMM", ["model.pattern=[titans_lmm]", "model.mlp_dim=320"]),
    "transformer": ("transformer", ["model.pattern=[global]", "model.mlp_dim=416"]),
}


def _command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _shown(cmd: list[str]) -> str:
    """The command as a reader types it from the repository root."""
    return ("PYTHONPATH=. python " + shlex.join(cmd[1:])).replace(f"{REPO}/", "")


def _timed(cmd: list[str], log_path: Path) -> dict:
    """Run ``cmd`` from the repository root, output to ``log_path``; wall and CPU seconds, load averages."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    before, load_before = resource.getrusage(resource.RUSAGE_CHILDREN), os.getloadavg()[0]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    timing = {"wall_s": wall, "cpu_s": cpu, "load_before": load_before, "load_after": os.getloadavg()[0]}
    if proc.returncode:
        timing["failed"] = log_path.read_text().strip().splitlines()[-1]  # the launcher's one-line reason
    return timing


def recipe(overrides: list[str]) -> dict:
    """The parameter count and the training budget of the config with ``overrides``."""
    from lca.config import load_config
    from lca.models.build import abstract_model, num_params

    cfg = load_config(str(REPO / CONFIG), overrides)
    return {"params": num_params(abstract_model(cfg)[1]), "steps": cfg.train.steps, "seq_len": cfg.train.seq_len,
            "global_batch": cfg.train.global_batch, "lr": cfg.train.lr, "mixture": dict(cfg.data.mixture),
            "task_loss": cfg.data.task_loss, "task_len_jitter": cfg.data.task_len_jitter,
            "d_model": cfg.model.d_model, "num_layers": cfg.model.num_layers, "mlp_dim": cfg.model.mlp_dim}


def final_train_loss(run_dir: Path) -> float | None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    return losses[-1] if losses else None


def run_model(name: str, runs: Path, overrides: list[str], machine: str) -> dict:
    """Train ``name`` from scratch, then evaluate it; everything measured, as one dict."""
    import shutil

    label, model_overrides = MODELS[name]
    run_dir = runs / name
    shutil.rmtree(run_dir, ignore_errors=True)  # from scratch: the wall time is a whole run's
    run_dir.mkdir(parents=True)
    train_cmd = _command("launch.train", CONFIG, *model_overrides, *overrides, f"run_dir={run_dir}")
    print(f"[{name}] {_shown(train_cmd)}", flush=True)
    train = _timed(train_cmd, run_dir / "train.log")
    trained = {"label": label, "machine": machine, **recipe([*model_overrides, *overrides]), "train": train,
               "commands": {"train": _shown(train_cmd)}}
    if "failed" in train:  # e.g. a diverged run: recorded as such, not evaluated
        print(f"[{name}] failed: {train['failed']}", flush=True)
        return trained
    print(f"[{name}] trained in {train['wall_s']:.0f} s", flush=True)
    return evaluate_model(name, run_dir, overrides, trained)


def evaluate_model(name: str, run_dir: Path, overrides: list[str], trained: dict) -> dict:
    """``trained`` (run_model's record of the training) with the evaluation of ``run_dir`` added."""
    eval_cmd = _command("launch.eval", str(run_dir), *overrides)
    print(f"[{name}] {_shown(eval_cmd)}", flush=True)
    evaluation = _timed(eval_cmd, run_dir / "eval.log")
    if "failed" in evaluation:
        raise SystemExit(f"{_shown(eval_cmd)} failed: {evaluation['failed']} (see {run_dir / 'eval.log'})")
    summary_path = max((run_dir / "eval").glob("step_*/summary.json"), key=lambda p: int(p.parent.name[5:]))
    summary = json.loads(summary_path.read_text())
    grid = summary["retrieval"]
    record = {
        **trained,
        "step": summary["step"], "final_train_loss": final_train_loss(run_dir),
        "bits_per_byte": summary["perplexity"]["bits_per_byte"], "bpb_tokens": summary["perplexity"]["tokens"],
        "context_lengths": grid["context_lengths"], "depths": grid["depths"],
        "samples_per_cell": grid["samples_per_cell"], "accuracy": grid["accuracy"], "eval": evaluation,
        "commands": {**trained["commands"], "eval": _shown(eval_cmd)},
    }
    by_length = ", ".join(f"{n}: {100 * sum(a) / len(a):.0f}%" for n, a in zip(grid["context_lengths"], grid["accuracy"]))
    print(f"[{name}] {record['bits_per_byte']:.3f} bits/byte; passkey {by_length}; "
          f"eval {evaluation['wall_s']:.0f} s", flush=True)
    return record


def _needle_distance(context_len: int) -> int:
    """Tokens from the needle's start to the answer in a passkey example of ``context_len`` at depth 0 (the farthest)."""
    from lca.data.tasks import passkey

    example = passkey(context_len, 0.0)
    start = bytes(example.tokens.astype(np.uint8)).find(b"The pass key is")
    return example.answer_start - start


def _verdict(records, failed) -> str:
    """What the table says about the paper's claim, from the numbers alone."""
    mean = {r["label"]: [sum(a) / len(a) for a in r["accuracy"]] for r in records}
    lines = []
    if failed:
        lines.append("Training diverged (NaN loss) for " + ", ".join(r["label"] for r in failed) + "; not evaluated.")
    longer = {r["label"]: [n > r["seq_len"] + 1 for n in r["context_lengths"]] for r in records}

    def best(beyond: bool) -> dict:
        """Each model's best accuracy at the lengths longer (or not) than a training example."""
        return {label: max((a for a, far in zip(acc, longer[label]) if far == beyond), default=0.0)
                for label, acc in mean.items()}

    if not any(best(beyond=False).values()):
        lines.append("No model retrieves the passkey even at the training length, so this run does not test the "
                     "paper's claim (memory models keep retrieving beyond the training length where the "
                     "transformer falls off): it needs a longer training budget first.")
    else:
        lines.append("Best accuracy beyond the training length (longer than a training example): "
                     + ", ".join(f"{label} {100 * b:.0f}%" for label, b in best(beyond=True).items()) + ".")
    return " ".join(lines)


def write_report(results: dict, out: Path) -> None:
    """titans.md (table + commands) and titans.png (accuracy vs length, bits per byte) from ``results``."""
    models = [m for m in MODELS if m in results["models"]]
    every = [results["models"][m] for m in models]
    records = [r for r in every if "accuracy" in r]  # trained and evaluated
    failed = [r for r in every if "accuracy" not in r]
    lengths = records[0]["context_lengths"]
    first = records[0]
    train_len = first["seq_len"]
    machines = sorted({r["machine"] for r in every})
    trials = len(records[0]["depths"]) * records[0]["samples_per_cell"]
    header = ("| model | params | bits/byte | " + " | ".join(f"{n} ({n // train_len}x)" for n in lengths)
              + " | train wall (CPU) | load avg | eval wall |")
    rule = "|---|---:|---:|" + "---:|" * len(lengths) + "---:|---:|---:|"
    rows = []
    for r in records:
        acc = [f"{100 * sum(a) / len(a):.0f}%" for a in r["accuracy"]]
        t, e = r["train"], r["eval"]
        rows.append(f"| {r['label']} | {r['params']:,} | {r['bits_per_byte']:.3f} | " + " | ".join(acc)
                    + f" | {t['wall_s']:.0f} s ({t['cpu_s']:.0f} s) | {t['load_before']:.1f} -> {t['load_after']:.1f}"
                    + f" | {e['wall_s']:.0f} s |")
    for r in failed:
        t = r["train"]
        rows.append(f"| {r['label']} | {r['params']:,} | {t['failed'].split(';')[0].removeprefix('lca-train: ')} |" + " |" * len(lengths)
                    + f" {t['wall_s']:.0f} s ({t['cpu_s']:.0f} s) | {t['load_before']:.1f} -> {t['load_after']:.1f} | |")
    depth_rows = []
    for r in records:
        for n, acc in zip(r["context_lengths"], r["accuracy"]):
            depth_rows.append(f"| {r['label']} | {n} | " + " | ".join(f"{100 * a:.0f}%" for a in acc) + " |")
    commands = ["\n".join([f"# {r['label']}", *r["commands"].values()]).replace(f"{REPO}/", "") for r in every]
    text = "\n".join([
        "# Titans vs a transformer of the same size: needle retrieval beyond the training length", "",
        f"Produced by `python benchmarks/titans_eval.py` ({CONFIG}). Machine: {'; '.join(machines)}.",
        "Runs one after another, one training process at a time, on a machine shared with other jobs "
        "(load average before -> after each training run in the table; CPU time is the run's own).", "",
        f"Every model: {first['step']} steps of batch {first['global_batch']} x {train_len} tokens, lr {first['lr']:g}, "
        f"the stdlib corpus mixed with passkey examples (`data.mixture: {first['mixture']}`, a share of the batches; "
        f"`data.task_loss: {first.get('task_loss', 'all')}`: loss on {'the answer only' if first.get('task_loss') == 'answer' else 'every token'} of a passkey row"
        + (f"; `data.task_len_jitter: {first['task_len_jitter']}`: each passkey example 0..{first['task_len_jitter']} "
           "tokens shorter, the row's end padding" if first.get("task_len_jitter") else "") + "), "
        f"float32, {first['num_layers']} layers, d_model {first['d_model']}. "
        "All four Titans models use the Titans kind in every layer (no global attention layer): MAG and MAL "
        "attend through a 64-token window, MAC within 64-token segments, LMM not at all. The memory keeps lca's "
        "defaults `max_lr` 0.003 (lucidrains' 0.1 diverges within 128-256 tokens of a freshly initialised memory "
        "at 16-token chunks, and 0.01 diverged in training) and `max_grad_norm` 10, each token's memory gradient "
        "clipped to that norm: without it all four Titans models diverged in training at 256 tokens (MAC at step 53, LMM 65, "
        "MAL 242, MAG 1,169), their memories blowing up to inf within one row.",
        "",
        f"A needle at depth 0 sits {_needle_distance(train_len + 1):,} tokens before the answer in a training "
        f"example of {train_len + 1} tokens (task text, needle and question take the rest), and "
        f"{_needle_distance(lengths[-1]):,} tokens before it at {lengths[-1]:,} tokens.",
        "",
        f"bits/byte: held-out stdlib text ({records[0]['bpb_tokens']:,} tokens at length {train_len}). Passkey "
        f"accuracy: share of {trials} examples per length ({len(records[0]['depths'])} needle depths x "
        f"{records[0]['samples_per_cell']}) whose whole 5-digit key is the teacher-forced argmax (one forward pass).",
        "",
        header, rule, *rows, "",
        _verdict(records, failed), "",
        *([results["notes"], ""] if results.get("notes") else []),
        "## Passkey accuracy per needle depth", "",
        "| model | length | " + " | ".join(f"depth {d:.2f}" for d in records[0]["depths"]) + " |",
        "|---|---:|" + "---:|" * len(records[0]["depths"]),
        *depth_rows, "",
        "## Commands", "",
        "One model: `python benchmarks/titans_eval.py --models mac` (the others' results in titans.json are kept). "
        "What it runs, from the repository root (it deletes the run directory first):", "",
        "```bash", "\n\n".join(commands), "```", "",
    ])
    (out / "titans.md").write_text(text)
    _plot(records, lengths, train_len, "; ".join(machines), out / "titans.png")


def _plot(records, lengths, train_len, machine, path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    acc_ax, bpb_ax = fig.subplots(1, 2, width_ratios=[2, 1])
    shown = [i for i, n in enumerate(lengths) if n + 1 not in lengths]  # 512 beside 513: the table has it
    lengths = [lengths[i] for i in shown]
    markers = "osD^vP*X"
    for j, r in enumerate(records):
        acc = [100 * sum(r["accuracy"][i]) / len(r["accuracy"][i]) for i in shown]
        style = "--" if r["label"] == "transformer" else "-"
        # each model a little to the side (in log2 x), so that equal accuracies do not hide each other
        dodge = 2 ** (0.05 * (j - (len(records) - 1) / 2))
        acc_ax.plot([n * dodge for n in lengths], acc, style, marker=markers[j % len(markers)], label=r["label"])
    acc_ax.axvline(train_len, color="grey", lw=0.8, ls=":")
    acc_ax.text(train_len, 102, " training length", color="grey", fontsize=8, va="bottom")
    acc_ax.set_xscale("log", base=2)
    acc_ax.set_xticks(lengths, [f"{n}\n({n // train_len}x)" for n in lengths])
    acc_ax.set_ylim(-3, 110)
    acc_ax.set_xlabel("context length (tokens)")
    acc_ax.set_ylabel("passkey accuracy (%)")
    acc_ax.legend()
    acc_ax.set_title("needle retrieval vs context length")
    labels = [r["label"] for r in records]
    bars = bpb_ax.bar(labels, [r["bits_per_byte"] for r in records], color=[f"C{i}" for i in range(len(records))])
    bpb_ax.bar_label(bars, fmt="%.3f", fontsize=8)
    bpb_ax.set_ylabel("bits per byte (held-out stdlib)")
    bpb_ax.tick_params(axis="x", labelrotation=30)
    bpb_ax.set_title("language modelling")
    fig.suptitle(f"Titans vs transformer, same size and budget: {machine}", fontsize=9)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {list(MODELS)}")
    parser.add_argument("--report", action="store_true", help="only rewrite titans.md/png from titans.json")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--runs", default=str(REPO / "runs" / "titans_eval"), help="the run directories")
    parser.add_argument("--eval-only", action="store_true",
                        help="re-evaluate the trained runs in --runs (the config's eval grid now), keeping their "
                             "training records in titans.json")
    parser.add_argument("--notes", help="a paragraph for titans.md after the verdict (kept in titans.json)")
    parser.add_argument("overrides", nargs="*", help="key=value for lca-train and lca-eval")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; use some of {list(MODELS)}")
    out, runs = Path(args.out), Path(args.runs).resolve()
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "titans.json"
    results = json.loads(json_path.read_text()) if json_path.exists() else {"models": {}}
    if args.notes is not None:
        results["notes"] = args.notes
    if args.eval_only:
        for name in models:
            trained = results["models"].get(name)
            if trained is None or "failed" in trained["train"]:
                print(f"[{name}] no trained run recorded in {json_path}; skipped", flush=True)
                continue
            results["models"][name] = evaluate_model(name, runs / name, args.overrides, trained)
            json_path.write_text(json.dumps(results, indent=1))
    elif not args.report:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from machine import describe

        for name in models:
            results["models"][name] = run_model(name, runs, args.overrides, describe())
            json_path.write_text(json.dumps(results, indent=1))  # each model's result as soon as it has one
    write_report(results, out)
    print(f"wrote {out / 'titans.md'} and {out / 'titans.png'}")


if __name__ == "__main__":
    main()
