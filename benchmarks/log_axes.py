"""The one style of lca's benchmark plots: log2 x, log y, grid, small legend; memory and time vs T."""

from __future__ import annotations


def style_log_log(ax, xlabel: str, ylabel: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def plot_memory_and_time(curves, title: str, path: str, *, reference=None, title_size: int = 8,
                         xlabel: str = "sequence length T") -> None:
    """Two log-log panels, peak extra memory and time vs sequence length T.

    ``curves``: ``(label, style, points)`` with points dicts holding ``T``,
    ``peak_bytes`` and ``seconds``. ``reference``: optional ``(label, ts, mib)``
    drawn dotted on the memory panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for label, style, pts in curves:
        pts = sorted(pts, key=lambda p: p["T"])
        if not pts:
            continue
        ts = [p["T"] for p in pts]
        axes[0].plot(ts, [max(p["peak_bytes"], 1) / 2**20 for p in pts], style, label=label)
        axes[1].plot(ts, [p["seconds"] for p in pts], style, label=label)
    if reference is not None:
        label, ts, mib = reference
        axes[0].plot(ts, mib, ":", color="gray", label=label)
    for ax, ylabel in zip(axes, ("peak extra memory (MiB)", "time per call (s)")):
        style_log_log(ax, xlabel, ylabel)
    fig.suptitle(title, fontsize=title_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
