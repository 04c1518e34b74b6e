"""Passkey retrieval beyond the training length: a landmark model against a plain one of the same size.

Both models are trained through the launcher (``lca-train``) the same way, on the same data mixture (the
default corpus with passkey rows, ``data.mixture``): ``configs/landmark.yaml`` (every layer a landmark layer,
a landmark token after every ``block_size - 1`` tokens) and its plain sibling ``configs/landmark_plain.yaml``
(global attention, no landmarks). The landmark model then fine-tunes with ``configs/landmark_retrieval.yaml``
(half of the passkey rows attended block by block through top-k retrieval, as decoding attends them). Then each answers passkey prompts (``lca.data.tasks.passkey``: the
paper's filler, needle and question) by greedy decoding through its inference caches
(``lca.eval.passkey.passkey_accuracy``, prefill in chunks of the training length), at context lengths of
1x .. 16x the training length ``train.seq_len`` (counted in task tokens; the landmark model's landmarks come
on top). Retrieval keeps the landmark model's positions within the trained range; the plain model meets
rotary positions it never saw.

    python benchmarks/landmark_passkey.py                       # train both, evaluate, write the results
    python benchmarks/landmark_passkey.py --skip-train          # evaluate the runs already trained
    python benchmarks/landmark_passkey.py --steps 200 --multiples 1,4 --samples 1 --out /tmp/r   # a pilot

Writes ``landmark_passkey.md``, ``.png`` and ``.json`` under ``--out``. Training runs go to
``--runs``/{landmark,landmark_retrieval,landmark_plain} (``--fresh`` deletes them first; otherwise a finished
run is resumed, i.e. not retrained).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# label -> the shipped configs that train it, in order; each later stage fine-tunes the one before
# (train.init_from): the landmark model's second stage trains through retrieval (configs/landmark_retrieval.yaml).
MODELS = {"landmark": ("landmark", "landmark_retrieval"), "plain": ("landmark_plain",)}


def train(config: str, run_dir: Path, overrides: list[str]) -> tuple[list[str], float]:
    """Train one model with the launcher in a fresh process; ``(command, wall seconds)``."""
    command = [sys.executable, "-m", "launch.train", config, f"run_dir={run_dir}", *overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    print("+", " ".join(command[1:]), flush=True)
    start = time.time()
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    return command, time.time() - start


def load_trained(run_dir: Path):
    """``(config, step, model)``: the newest checkpoint's parameters of ``run_dir`` in an ``nnx`` model."""
    from flax import nnx

    from lca.config import ConfigError, load_run_config
    from lca.train.evaluate import latest_params
    from lca.train.setup import build_mesh, make_setup

    try:
        cfg = load_run_config(run_dir, [f"run_dir={run_dir}", "runtime.cpu_devices=0"])
    except ConfigError as err:  # e.g. --skip-train with a --runs folder that holds no run
        raise SystemExit(f"{err} (--runs {run_dir.parent}: train it first, without --skip-train)") from None
    setup = make_setup(cfg, build_mesh(cfg))
    try:
        step, params = latest_params(setup)
    except ConfigError as err:
        raise SystemExit(f"{err} (drop --skip-train)") from None
    return cfg, step, nnx.merge(setup.graphdef, params)


def evaluate(run_dir: Path, lengths: list[int], samples: int, top_k: int | None, depths=None,
             selection: str | None = None) -> dict:
    """Passkey accuracy and wall time per context length for the model trained in ``run_dir``.

    ``top_k`` / ``selection``: the landmark layers' retrieval at inference (None: as trained).
    """
    import dataclasses

    from lca.eval.passkey import passkey_accuracy
    from lca.eval.retrieval import DEFAULT_DEPTHS

    cfg, step, model = load_trained(run_dir)
    retrieval = {name: value for name, value in (("top_k", top_k), ("selection", selection)) if value is not None}
    if retrieval and "landmark" in cfg.model.pattern:
        for block in model.blocks():
            block.attn.cfg = dataclasses.replace(block.attn.cfg, **retrieval)
    rows = []
    for length in lengths:
        start = time.time()
        result = passkey_accuracy(model, context_lengths=[length], samples_per_cell=samples,
                                  depths=DEFAULT_DEPTHS if depths is None else depths,
                                  landmark_every=cfg.data.landmark_every, prefill_chunk=cfg.train.seq_len)
        rows.append({"length": length, "accuracy": float(result.accuracy.mean()),
                     "by_depth": result.accuracy[0].tolist(), "trials": result.accuracy.size * samples,
                     "wall_s": time.time() - start})
        print(f"{run_dir.name}: {length} tokens: accuracy {rows[-1]['accuracy']:.2f} "
              f"({rows[-1]['wall_s']:.0f} s)", flush=True)
    return {"step": step, "depths": list(result.depths), "rows": rows}


def _stage(config: str, overrides: list[str]) -> str:
    """A fine-tuning stage in words, for the results page."""
    from lca.config import load_config

    cfg = load_config(config, overrides)
    share = cfg.model.mixers["landmark"].train_retrieval
    return (f"`{config}`: {cfg.train.steps} more steps at lr {cfg.train.lr:g} from the previous stage's "
            f"parameters, {share:.0%} of each batch's rows trained through retrieval "
            "(`model.mixers.landmark.train_retrieval`)")


def load_final_loss(run_dir: Path) -> float | None:
    from lca.train.metrics import read_metrics

    records = read_metrics(run_dir)
    return records[max(records)]["loss"] if records else None


def _answer_slot(length: int, block_size: int) -> int:
    """Where a passkey prompt of ``length`` task tokens puts its answer's first token in a landmark block."""
    from lca.data.tasks import passkey

    return passkey(length, 0.0).answer_start % (block_size - 1)


def write_results(out: Path, data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "landmark_passkey.json").write_text(json.dumps(data, indent=1))
    seq_len = data["seq_len"]
    lm, plain = data["models"]["landmark"], data["models"]["plain"]
    lines = [
        "# Passkey retrieval beyond the training length: landmark vs plain attention",
        "",
        f"Machine: {data['machine']}. Produced by `python benchmarks/landmark_passkey.py "
        f"{' '.join(data['argv'])}`.".rstrip() + "",
        "",
        f"Both models: {data['model']}, trained {data['steps']} steps at train.seq_len={seq_len} on the same "
        f"mixture (`{data['mixture']}`), batch {data['global_batch']}, lr {data['lr']}. Landmark: block size "
        f"{data['block_size']}, top-k {data['top_k']} ({data['selection']}) at inference, unbounded cache. "
        f"Plain: global attention, no landmarks. "
        + "".join(f"The landmark model then fine-tunes: {stage}. " for stage in lm.get("stages", []))
        + f"Evaluation: greedy decoding through the caches "
        f"(`lca.eval.passkey.passkey_accuracy`, prefill chunks of {seq_len} tokens), depths "
        f"{data['depths']}, {data['samples']} samples per depth; context length in task tokens (the landmark "
        f"model's landmarks come on top).",
        "",
        "| context (tokens) | x train length | landmark accuracy | plain accuracy | trials | landmark eval (s) "
        "| plain eval (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for a, b in zip(lm["rows"], plain["rows"]):
        lines.append(f"| {a['length']} | {a['length'] / seq_len:g} | {a['accuracy']:.0%} | {b['accuracy']:.0%} | "
                     f"{a['trials']} | {a['wall_s']:.0f} | {b['wall_s']:.0f} |")
    sweep = data.get("phase_sweep")
    if sweep:
        L = data["block_size"]
        lines += ["", f"### Every offset of the answer in its landmark block, at {sweep['multiple']}x", "",
                  f"Context lengths {sweep['lengths'][0]}..{sweep['lengths'][-1]}: the answer's first token lands at "
                  f"each of the {L - 1} token slots of a landmark block (at the lengths above it lands at one "
                  f"slot per length). Depths {sweep['depths']}, {sweep['samples']} samples per depth and length.", "",
                  "| context (tokens) | answer's slot in its block | landmark accuracy | plain accuracy |",
                  "|---:|---:|---:|---:|"]
        for a, b in zip(lm["sweep"]["rows"], plain["sweep"]["rows"]):
            lines.append(f"| {a['length']} | {_answer_slot(a['length'], L)} | {a['accuracy']:.0%} | "
                         f"{b['accuracy']:.0%} |")
        mean = lambda info: sum(r["accuracy"] for r in info["sweep"]["rows"]) / len(info["sweep"]["rows"])  # noqa: E731
        lines.append(f"| all | | **{mean(lm):.0%}** | **{mean(plain):.0%}** |")
    lines += ["", "Training (the launcher, one process at a time):", ""]
    for label, info in data["models"].items():
        loss = f", final loss {info['final_loss']:.3f}" if info.get("final_loss") is not None else ""
        load = f" (load average {info['load_after']:.1f} at the end)" if info.get("load_after") else ""
        wall = f"{info['train_wall_s'] / 60:.1f} min{load}" if info.get("train_wall_s") else "not timed"
        carried = f"; results carried over from `{info['carried_from']}`" if info.get("carried_from") else ""
        lines.append(f"- {label}: `{info['command']}`: {wall}{loss} (checkpoint step {info['step']}){carried}")
    lines += ["", f"Load average before / after: {data['load'][0]:.1f} / {data['load'][1]:.1f}.", "",
              "![passkey accuracy vs context length](landmark_passkey.png)", ""]
    if data.get("notes"):
        lines += [data["notes"], ""]
    (out / "landmark_passkey.md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if sweep else 1, figsize=(11 if sweep else 6, 4), squeeze=False,
                             width_ratios=[3, 2] if sweep else None)
    ax = axes[0, 0]
    for label, info, marker in (("landmark", lm, "o"), ("plain", plain, "s")):
        ax.plot([r["length"] for r in info["rows"]], [r["accuracy"] for r in info["rows"]], marker=marker,
                label=label)
    ax.axvline(seq_len, color="grey", linestyle=":", label="training length")
    ax.set_xscale("log", base=2)
    ax.set_xticks([r["length"] for r in lm["rows"]], [f"{r['length']}\n({r['length'] / seq_len:g}x)" for r in lm["rows"]])
    ax.set_xticks([], minor=True)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("passkey accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Passkey retrieval, greedy decoding through the cache")
    ax.legend()
    if sweep:
        ax = axes[0, 1]
        slots = [_answer_slot(r["length"], L) for r in lm["sweep"]["rows"]]
        order = np.argsort(slots)
        for label, info, marker in (("landmark", lm, "o"), ("plain", plain, "s")):
            acc = [info["sweep"]["rows"][i]["accuracy"] for i in order]
            ax.plot(np.asarray(slots)[order], acc, marker=marker, label=f"{label} (mean {np.mean(acc):.0%})")
        ax.set_xticks(range(L - 1))
        ax.set_xlabel(f"answer's first token: slot in its landmark block (L = {L})")
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"Every block slot at {sweep['multiple']:g}x the training length", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "landmark_passkey.png", dpi=120)


def _shown_args(argv: list[str]) -> list[str]:
    """The command line without ``--notes TEXT`` (the notes are printed below the table)."""
    shown, skip = [], False
    for arg in argv:
        if not skip and arg != "--notes" and not arg.startswith("--notes="):
            shown.append(arg)
        skip = arg == "--notes"
    return shown


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="training steps of every stage (default: the configs')")
    parser.add_argument("--multiples", default="1,2,4,8,16", help="context lengths as multiples of train.seq_len")
    parser.add_argument("--samples", type=int, default=4, help="samples per depth (5 depths)")
    parser.add_argument("--top-k", type=int, help="landmark blocks retrieved at inference (default: the config's)")
    parser.add_argument("--selection", choices=["per_head", "shared"],
                        help="landmark block selection at inference (default: the config's)")
    parser.add_argument("--sweep-samples", type=int, default=2, help="samples per depth of the --phase-sweep")
    parser.add_argument("--runs", default="runs/landmark_passkey", help="where the two training runs go")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--skip-train", action="store_true", help="evaluate the runs already in --runs")
    parser.add_argument("--fresh", action="store_true", help="delete the runs in --runs before training")
    parser.add_argument("--only", choices=list(MODELS), help="train and evaluate one model (a pilot)")
    parser.add_argument("--notes", default="", help="a paragraph appended to the markdown")
    parser.add_argument("--carry-plain", metavar="JSON",
                        help="with --only landmark: take the plain model's results from this landmark_passkey.json "
                             "of an earlier run (same config and data) instead of training and evaluating it again")
    parser.add_argument("--phase-sweep", type=float, default=8,
                        help="also evaluate at this multiple of train.seq_len plus 0..block_size-2 tokens, so the "
                             "answer meets every slot of a landmark block (0: skip)")
    parser.add_argument("--report", action="store_true",
                        help="only rewrite landmark_passkey.md/.png in --out from its landmark_passkey.json")
    parser.add_argument("override", nargs="*", help="config overrides for both models, key=value")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.report:
        out = Path(args.out)
        write_results(out, json.loads((out / "landmark_passkey.json").read_text()))
        return

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from machine import describe

    from lca.config import load_config

    overrides = [*args.override, *([f"train.steps={args.steps}"] if args.steps else [])]
    runs = Path(args.runs).resolve()
    load_before = os.getloadavg()[0]
    models = {}
    for label, configs in MODELS.items():
        if args.only and label != args.only:
            continue
        info, commands, run_dir = {"config": configs[-1]}, [], None
        for config in configs:
            stage = [*overrides, *([f"train.init_from={run_dir}"] if run_dir else [])]
            run_dir = runs / config
            if args.fresh and run_dir.exists():
                shutil.rmtree(run_dir)
            commands.append(" ".join(["lca-train", config, *stage]))
            timing = run_dir / "train_wall.json"  # kept with the run, so --skip-train still reports it
            if not args.skip_train:
                _, wall = train(config, run_dir, stage)
                timing.write_text(json.dumps({"train_wall_s": wall, "load_after": os.getloadavg()[0]}))
            if timing.is_file():
                for key, value in json.loads(timing.read_text()).items():  # walls add up, the last load stays
                    info[key] = info.get(key, 0) + value if key == "train_wall_s" else value
        info["command"] = " && ".join(commands)
        info["stages"] = [_stage(config, overrides) for config in configs[1:]]
        info["final_loss"] = load_final_loss(run_dir)
        models[label] = (run_dir, info)

    cfg = load_config("landmark", overrides)
    seq_len = cfg.train.seq_len
    lengths = [int(float(m) * seq_len) for m in args.multiples.split(",")]
    section = cfg.model.mixers["landmark"]
    sweep_depths = (0.0, 0.5, 1.0)
    sweep_lengths = [int(args.phase_sweep * seq_len) + j for j in range(section.block_size - 1)]
    carried = {}
    if args.carry_plain:  # the plain model's results as an earlier run of this driver recorded them
        if args.only != "landmark":
            raise SystemExit("--carry-plain goes with --only landmark (the landmark model evaluated, the plain one kept).")
        carried["plain"] = json.loads(Path(args.carry_plain).read_text())["models"]["plain"]
        carried["plain"]["carried_from"] = str(args.carry_plain)
    for label, (run_dir, info) in models.items():
        top_k, selection = (args.top_k, args.selection) if label == "landmark" else (None, None)
        info.update(evaluate(run_dir, lengths, args.samples, top_k, selection=selection))
        if args.phase_sweep:
            info["sweep"] = evaluate(run_dir, sweep_lengths, args.sweep_samples, top_k, depths=sweep_depths,
                                     selection=selection)
    data = {
        "machine": describe(), "argv": _shown_args(sys.argv[1:] if argv is None else list(argv)), "seq_len": seq_len,
        "steps": cfg.train.steps, "global_batch": cfg.train.global_batch, "lr": cfg.train.lr,
        "mixture": (f"data.source={cfg.data.source}, data.mixture={dict(cfg.data.mixture)}, "
                    f"data.task_loss={cfg.data.task_loss}, data.task_len_jitter={cfg.data.task_len_jitter}, "
                    f"data.task_start_jitter={cfg.data.task_start_jitter}"),
        "model": (f"d_model {cfg.model.d_model}, {cfg.model.num_layers} layers, {cfg.model.num_heads} heads "
                  f"({cfg.model.num_kv_heads} kv), mlp {cfg.model.mlp_dim}, {cfg.model.dtype}"),
        "block_size": section.block_size, "top_k": args.top_k or section.top_k, "selection": args.selection or section.selection,
        "samples": args.samples, "depths": next(iter(models.values()))[1]["depths"],
        "load": (load_before, os.getloadavg()[0]), "notes": args.notes,
        "phase_sweep": ({"multiple": args.phase_sweep, "lengths": sweep_lengths, "depths": list(sweep_depths),
                         "samples": args.sweep_samples} if args.phase_sweep else None),
        "models": {**{label: info for label, (_, info) in models.items()}, **carried},
    }
    if len(data["models"]) == len(MODELS):
        write_results(Path(args.out), data)
    else:
        print(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
