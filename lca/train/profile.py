"""Profile a few training steps: a ``jax.profiler`` trace and a per-op time table.

``train.profile_at=N`` traces steps ``N .. N + train.profile_steps - 1`` (counted from 1,
so ``N >= 2`` leaves compilation out) into ``RUN_DIR/profile/``, which TensorBoard's
profile plugin and Perfetto read. After the last traced step the trace is summarised
here, without those tools: device time per XLA op (the ``hlo_op`` of each event on the
accelerator's planes, or on the host's XLA threads on CPU), written to
``RUN_DIR/profile/ops.md`` and its top lines logged. That is the table that tells which
op dominates a step (issue 15: a 32k step whose attention was under a quarter of it).
On a GPU or TPU the device planes hold kernels, which do not nest; on CPU a control-flow
op (``cond``, ``while``) also counts the ops of its body, so shares there overlap.

    python -m lca.train.profile RUN_DIR/profile     # the table again, from a saved trace
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
import sys
from pathlib import Path

import jax

log = logging.getLogger("lca.train")


@dataclasses.dataclass(frozen=True)
class OpTime:
    """Time spent in one XLA op over the traced steps."""

    op: str
    module: str
    total_ns: float
    count: int


def _device_planes(profile):
    planes = [p for p in profile.planes if p.name.startswith("/device:")]
    return planes or [p for p in profile.planes if p.name == "/host:CPU"]


def op_times(trace_dir: str | Path) -> list[OpTime]:
    """Per-op time of the newest trace under ``trace_dir``, longest first (every device summed).

    Events that name an XLA op (an ``hlo_op`` stat) are counted: kernels on a GPU or TPU,
    the thunks of XLA's CPU runtime. Raises ``FileNotFoundError`` if there is no trace.
    """
    files = sorted(Path(trace_dir).glob("**/*.xplane.pb"), key=lambda f: f.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb trace under {trace_dir}")
    profile = jax.profiler.ProfileData.from_file(str(files[-1]))
    totals: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for plane in _device_planes(profile):
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                if "hlo_op" not in stats:
                    continue
                entry = totals[(str(stats["hlo_op"]), str(stats.get("hlo_module", "")))]
                entry[0] += event.duration_ns
                entry[1] += 1
    ops = [OpTime(op, module, total, count) for (op, module), (total, count) in totals.items()]
    return sorted(ops, key=lambda o: -o.total_ns)


# XLA's numbering of op instances: ``fusion.12``, ``cond.15.clone.2``, ``command_buffer_1``.
_INSTANCE = re.compile(r"([._]\d+|\.clone)+$")
COMMAND_BUFFER_HINT = (
    "XLA ran this step as CUDA graphs (`command_buffer` ops), which hide the kernels inside: "
    "trace with `XLA_FLAGS=--xla_gpu_enable_command_buffer=` to see them."
)


def op_kind(op: str) -> str:
    """An op's name without XLA's instance numbering: ``pallas_call.196`` -> ``pallas_call``."""
    return _INSTANCE.sub("", op) or op


def kind_times(ops: list[OpTime]) -> list[tuple[str, float, int]]:
    """``(kind, total_ns, number of ops)`` per :func:`op_kind`, longest first."""
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for o in ops:
        entry = totals[op_kind(o.op)]
        entry[0] += o.total_ns
        entry[1] += 1
    return sorted(((kind, total, n) for kind, (total, n) in totals.items()), key=lambda k: -k[1])


def op_table(ops: list[OpTime], steps: int, top: int = 25, top_kinds: int = 10) -> str:
    """Markdown: time per op kind (e.g. all ``pallas_call``s together), then the ``top`` ops.

    Times are per step and as a share of all op time.
    """
    total = sum(o.total_ns for o in ops) or 1.0
    per_step = max(steps, 1)
    lines = [
        f"Op time over {steps} traced step(s): {total / 1e6 / per_step:.2f} ms per step in {len(ops)} ops.",
        "",
    ]
    if any(op_kind(o.op) == "command_buffer" for o in ops):
        lines += [COMMAND_BUFFER_HINT, ""]
    lines += ["| op kind | ms per step | share | ops |", "|---|---|---|---|"]
    for kind, kind_ns, n in kind_times(ops)[:top_kinds]:
        lines.append(f"| `{kind}` | {kind_ns / 1e6 / per_step:.3f} | {100 * kind_ns / total:.1f}% | {n} |")
    lines += [
        "",
        "| op | module | ms per step | share | calls per step |",
        "|---|---|---|---|---|",
    ]
    for o in ops[:top]:
        lines.append(f"| `{o.op}` | `{o.module}` | {o.total_ns / 1e6 / max(steps, 1):.3f} | "
                     f"{100 * o.total_ns / total:.1f}% | {o.count / max(steps, 1):g} |")
    return "\n".join(lines) + "\n"


class StepProfiler:
    """Starts a trace before step ``at`` and ends it after step ``at + steps - 1`` (1-based)."""

    def __init__(self, directory: Path, at: int, steps: int):
        if jax.process_count() > 1:  # one trace and table per process (they may share a host and run_dir)
            directory = Path(directory) / f"process_{jax.process_index()}"
        self.directory, self.at, self.last = Path(directory), at, at + steps - 1
        self.active = False

    def before(self, step: int) -> None:
        if self.at and step == self.at:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def after(self, step: int, state) -> None:
        if self.active and step == self.last:
            jax.block_until_ready(state)  # the traced steps' device work, not just their dispatch
            self.stop()

    def stop(self) -> None:
        """Ends the trace (also when the run stops early) and writes ``ops.md``."""
        if not self.active:
            return
        self.active = False
        jax.profiler.stop_trace()
        try:
            table = op_table(op_times(self.directory), self.last - self.at + 1)
        except Exception as err:  # noqa: BLE001 - the summary is a convenience; never mask the run's own outcome
            log.warning("profile trace in %s, but no op table: %s: %s", self.directory, type(err).__name__, err)
            return
        (self.directory / "ops.md").write_text(table)
        log.info("profile of steps %d-%d in %s; top ops:\n%s", self.at, self.last, self.directory,
                 "\n".join(table.splitlines()[:10]))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (1, 2):
        raise SystemExit("usage: python -m lca.train.profile TRACE_DIR [STEPS]")
    print(op_table(op_times(args[0]), int(args[1]) if len(args) > 1 else 1))


if __name__ == "__main__":
    main()
