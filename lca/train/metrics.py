"""Where training metrics go: the console, ``metrics.jsonl``, TensorBoard, a loss-curve PNG.

``metrics.jsonl`` is append-only: a resumed run re-logs the steps after its last
checkpoint, and readers take the last record of each step
(:func:`read_metrics`), which is what the uninterrupted run would have logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger("lca.train")

# Dense (no sparsity) bf16 peak FLOP/s per device, from vendor datasheets, matched on
# jax's device_kind by longest prefix. The H100 and H200 come in SXM boards ("NVIDIA
# H100 80GB HBM3", "NVIDIA H200") and in PCIe/NVL cards with lower clocks and power.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,  # SXM5
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,  # SXM
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA GH200": 989e12,
    "NVIDIA A100": 312e12,
}


def peak_flops(device_kind: str) -> float | None:
    """The device's peak FLOP/s if known (longest matching prefix), else None (e.g. CPU)."""
    matches = [kind for kind in PEAK_FLOPS if device_kind.startswith(kind)]
    return PEAK_FLOPS[max(matches, key=len)] if matches else None


def throughput(flops_per_step: float | None, step_time: float, num_devices: int, device_kind: str) -> dict:
    """``tflops_per_device`` and, on a device of known peak, ``mfu`` for one step's analytic FLOPs.

    ``flops_per_step`` counts all devices together (:func:`lca.train.flops.train_step_flops`).
    """
    if not flops_per_step:
        return {}
    per_device = flops_per_step / num_devices / step_time
    out = {"tflops_per_device": per_device / 1e12}
    peak = peak_flops(device_kind)
    if peak:
        out["mfu"] = per_device / peak
    return out


class MetricsWriter:
    """One call per logged step: console line, JSONL record and TensorBoard scalars."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._tb = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # optional: the JSONL file has everything
                log.warning("tensorboardX is not installed; no TensorBoard event files")
            else:
                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}, "time": time.time()}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(f"train/{key}", float(value), step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


def write_tensorboard(run_dir: str | Path, step: int, scalars: dict) -> bool:
    """Add ``{"eval/name": value}`` scalars at ``step`` to ``run_dir/tensorboard`` (False without tensorboardX).

    Its own event file in the training run's log folder, so TensorBoard shows them next to the training curves.
    """
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return False
    writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
    try:
        for tag, value in scalars.items():
            writer.add_scalar(tag, float(value), step)
    finally:
        writer.close()
    return True


def format_line(step: int, total: int, m: dict) -> str:
    parts = [
        f"step {step}/{total}",
        f"loss {m['loss']:.4f}",
        f"tokens/s {m['tokens_per_s']:,.0f}",
        f"step {m['step_time_s'] * 1e3:.0f} ms",
    ]
    if "tflops_per_device" in m:
        parts.append(f"{m['tflops_per_device']:.3g} TFLOP/s/device")
    if "mfu" in m:
        parts.append(f"MFU {100 * m['mfu']:.1f}%")
    return " | ".join(parts)


class ProgressBar:
    """A tqdm bar over the training steps, drawn only on a terminal.

    While it is open, log records to the console are printed above the bar
    (tqdm's logging redirect), so log lines and the bar never share a line.
    """

    def __init__(self, total: int, *, initial: int = 0, enabled: bool = True, file=None):
        file = sys.stderr if file is None else file
        # disable=None: tqdm draws only when `file` is a terminal (not in CI logs or pipes).
        self._bar = tqdm(total=total, initial=initial, unit="step", file=file, dynamic_ncols=True,
                         disable=None if enabled else True)
        self._redirect = contextlib.ExitStack()
        if not self._bar.disable:
            self._redirect.enter_context(logging_redirect_tqdm())

    def update(self, step: int, loss: float | None = None) -> None:
        """Move the bar to ``step`` (call it every step); ``loss`` when a new one is known."""
        if self._bar.disable:
            return
        if loss is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        self._bar.close()
        self._redirect.close()


def read_metrics(run_dir: str | Path) -> dict[int, dict]:
    """``{step: record}``, the last record of each step winning (resumes re-log steps)."""
    records: dict[int, dict] = {}
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                records[record["step"]] = record
    return dict(sorted(records.items()))


def plot_loss_curve(run_dir: str | Path) -> Path | None:
    """``loss.png`` from metrics.jsonl (None without matplotlib or metrics)."""
    records = read_metrics(run_dir)
    if not records:
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone (notebooks)
    except ImportError:
        log.warning("matplotlib is not installed; no loss-curve PNG")
        return None
    steps = list(records)
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, [records[s]["loss"] for s in steps])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    path = Path(run_dir) / "loss.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
