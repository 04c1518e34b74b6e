"""Needle-retrieval accuracy over a grid of context length x needle depth, with a markdown table and heatmap PNG."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import NamedTuple

import numpy as np

from lca.data.tasks import get_task

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclasses.dataclass
class RetrievalResults:
    """accuracy[i, j] in [0, 1]: share of the samples at context_lengths[i], depths[j] answered exactly."""

    task: str
    context_lengths: tuple
    depths: tuple
    samples_per_cell: int
    accuracy: np.ndarray  # float64 [len(context_lengths), len(depths)]

    def to_dict(self) -> dict:
        return {"task": self.task, "context_lengths": list(self.context_lengths), "depths": list(self.depths),
                "samples_per_cell": self.samples_per_cell, "accuracy": self.accuracy.tolist(),
                "mean_accuracy": float(self.accuracy.mean())}


def answered(logits, example) -> bool:
    """Teacher-forced check: argmax of logits [L, V] at each answer position's predecessor equals the answer token."""
    tokens, start, n = example
    predicted = np.asarray(logits)[start - 1:start - 1 + n].argmax(axis=-1)
    return bool((predicted == tokens[start:start + n]).all())


def retrieval_grid(logits_fn, *, task: str = "passkey", context_lengths=(512, 1024, 2048), depths=DEFAULT_DEPTHS,
                   samples_per_cell: int = 4, seed: int = 0) -> RetrievalResults:
    """Accuracy of `logits_fn` on `task` (lca.data.tasks) for every (context length, depth).

    logits_fn({"inputs": int32 [1, L], "segment_ids": ones [1, L], "positions": arange [1, L]}) -> logits [1, L, V].
    A sample is correct iff every answer token is the argmax (equivalent to greedy generation of the answer).
    Samples are seeded by (seed, context length, depth index, sample index), so grids are reproducible.
    """

    def correct(example) -> bool:
        length = len(example.tokens)
        batch = {"segment_ids": np.ones((1, length), np.int32), "positions": np.arange(length, dtype=np.int32)[None],
                 "inputs": example.tokens[None]}
        return answered(np.asarray(logits_fn(batch))[0], example)

    return score_grid(correct, task=task, context_lengths=context_lengths, depths=depths,
                      samples_per_cell=samples_per_cell, seed=seed)


def score_grid(correct, *, task: str = "passkey", context_lengths=(512, 1024, 2048), depths=DEFAULT_DEPTHS,
               samples_per_cell: int = 4, seed: int = 0) -> RetrievalResults:
    """Share of `correct(example) -> bool` over `task` examples at every (context length, depth).

    Samples are seeded by (seed, context length, depth index, sample index), so grids are reproducible.
    """
    make = get_task(task)
    if samples_per_cell < 1:
        raise ValueError(f"samples_per_cell={samples_per_cell!r} must be >= 1.")
    accuracy = np.zeros((len(context_lengths), len(depths)))
    for i, length in enumerate(context_lengths):
        for j, depth in enumerate(depths):
            hits = sum(bool(correct(make(length, depth, np.random.default_rng([seed, length, j, s]))))
                       for s in range(samples_per_cell))
            accuracy[i, j] = hits / samples_per_cell
    return RetrievalResults(task, tuple(context_lengths), tuple(depths), samples_per_cell, accuracy)


class ReportPaths(NamedTuple):
    table: pathlib.Path
    heatmap: pathlib.Path


def markdown_table(results: RetrievalResults, title: str) -> str:
    header = "| context length \\ depth | " + " | ".join(f"{d:.2f}" for d in results.depths) + " | mean |"
    rule = "|---:|" + "---:|" * (len(results.depths) + 1)
    rows = [f"| {length} | " + " | ".join(f"{100 * a:.0f}%" for a in acc) + f" | {100 * acc.mean():.0f}% |"
            for length, acc in zip(results.context_lengths, results.accuracy)]
    return "\n".join([
        f"# {title}", "",
        f"Task `{results.task}`: accuracy (answer tokens all equal to the teacher-forced argmax) over "
        f"{results.samples_per_cell} samples per cell; depth 0 = needle at the start of the text, 1 = at the end.",
        f"Mean accuracy: {100 * results.accuracy.mean():.1f}%.", "",
        header, rule, *rows, "",
    ])


# Heatmap geometry in inches: each grid cell, and the room around the cells for the
# tick labels, axis labels, title and colorbar.
CELL_SIZE = (0.9, 0.5)  # (per depth, per context length)
MARGINS = (2.4, 1.3)  # (width, height)


def heatmap_figure(results: RetrievalResults, title: str):
    """The accuracy heatmap (context length x depth) as a matplotlib Figure sized to its grid."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's matplotlib backend alone

    rows, cols = results.accuracy.shape
    fig = Figure(figsize=(MARGINS[0] + CELL_SIZE[0] * cols, MARGINS[1] + CELL_SIZE[1] * rows), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(results.accuracy, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="lower")
    ax.set_xticks(range(cols), [f"{d:.2f}" for d in results.depths])
    ax.set_yticks(range(rows), [str(n) for n in results.context_lengths])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("context length (tokens)")
    ax.set_title(title)
    for (i, j), a in np.ndenumerate(results.accuracy):
        ax.text(j, i, f"{100 * a:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="accuracy")
    _grow_to_fit(fig)
    return fig


def _grow_to_fit(fig) -> None:
    """Widen or heighten the figure until every label lies inside it (a long title over a small grid)."""
    for _ in range(3):
        fig.draw_without_rendering()
        needed = fig.get_tightbbox()  # inches, the extent of everything drawn
        width, height = fig.get_size_inches()
        pad = 0.1
        if needed.x0 >= 0 and needed.y0 >= 0 and needed.x1 <= width and needed.y1 <= height:
            return
        fig.set_size_inches(max(width, needed.width + 2 * pad), max(height, needed.height + 2 * pad))


def write_retrieval_report(results: RetrievalResults, out_dir, *, title: str | None = None) -> ReportPaths:
    """Write `<task>_retrieval.md` (table) and `<task>_retrieval.png` (heatmap, context length x depth) in out_dir."""
    title = title or f"{results.task} retrieval accuracy"
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / f"{results.task}_retrieval.md"
    table.write_text(markdown_table(results, title))
    heatmap = out_dir / f"{results.task}_retrieval.png"
    heatmap_figure(results, title).savefig(heatmap, dpi=120)
    return ReportPaths(table, heatmap)
