import numpy as np
import pytest

from lca.data.tokenizer import VOCAB_SIZE
from lca.eval.retrieval import DEFAULT_DEPTHS, RetrievalResults, heatmap_figure, retrieval_grid, write_retrieval_report


def oracle(batch):
    """Cheats: looks one token ahead in its own inputs, so every argmax is the true next token."""
    inputs = np.asarray(batch["inputs"])
    assert inputs.shape[0] == 1
    np.testing.assert_array_equal(batch["positions"][0], np.arange(inputs.shape[1]))
    assert (batch["segment_ids"] == 1).all()
    logits = np.zeros(inputs.shape + (VOCAB_SIZE,), np.float32)
    logits[0, np.arange(inputs.shape[1] - 1), inputs[0, 1:]] = 5.0
    return logits


def uniform(batch):
    return np.zeros(np.shape(batch["inputs"]) + (VOCAB_SIZE,), np.float32)


def off_by_one_digit(batch):
    """Right everywhere except the last answer token: must not count as correct."""
    logits = oracle(batch)
    logits[0, -2] = 0.0
    return logits


@pytest.mark.parametrize("task", ["passkey", "multi_needle", "assoc_recall"])
def test_oracle_perfect_uniform_zero(task):
    kw = dict(task=task, context_lengths=(512, 1024), depths=(0.0, 0.5, 1.0), samples_per_cell=2)
    perfect = retrieval_grid(oracle, **kw)
    assert perfect.accuracy.shape == (2, 3) and (perfect.accuracy == 1.0).all()
    assert (retrieval_grid(uniform, **kw).accuracy == 0.0).all()
    assert (retrieval_grid(off_by_one_digit, **kw).accuracy == 0.0).all()


def test_report_files(tmp_path):
    results = retrieval_grid(oracle, context_lengths=(512, 768), depths=(0.0, 1.0), samples_per_cell=1)
    results.accuracy[1, 0] = 0.5
    paths = write_retrieval_report(results, tmp_path / "eval", title="demo model")
    table = paths.table.read_text()
    assert "# demo model" in table and "| 512 | 100% | 100% | 100% |" in table and "| 768 | 50% | 100% | 75% |" in table
    assert paths.heatmap.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results.to_dict()["mean_accuracy"] == pytest.approx(0.875)


def test_unknown_task():
    with pytest.raises(ValueError, match="task"):
        retrieval_grid(oracle, task="haystack")


def drawn_texts(fig):
    fig.draw_without_rendering()
    return [t for t in fig.findobj(lambda a: hasattr(a, "get_text") and hasattr(a, "get_window_extent"))
            if t.get_visible() and t.get_text()]


@pytest.mark.parametrize("lengths, depths", [((256,), (0.5,)), ((256, 512), (0.0, 1.0)), (tuple(range(64, 1088, 64)), DEFAULT_DEPTHS * 2)])
@pytest.mark.parametrize("title", [None, "passkey retrieval of a model with a long name, step 120"])
def test_heatmap_title_and_labels_inside_the_figure(lengths, depths, title):
    results = retrieval_grid(oracle, context_lengths=lengths, depths=depths, samples_per_cell=1) if len(lengths) < 3 \
        else RetrievalResults("passkey", lengths, depths, 1, np.full((len(lengths), len(depths)), 0.5))
    fig = heatmap_figure(results, title or "passkey retrieval accuracy")
    box = fig.bbox  # pixels
    texts = drawn_texts(fig)
    labels = {t.get_text() for t in texts}
    assert {"needle depth", "context length (tokens)", "accuracy", title or "passkey retrieval accuracy"} <= labels
    for text in texts:
        extent = text.get_window_extent()
        assert box.x0 - 0.5 <= extent.x0 and extent.x1 <= box.x1 + 0.5, f"{text.get_text()!r} clipped horizontally"
        assert box.y0 - 0.5 <= extent.y0 and extent.y1 <= box.y1 + 0.5, f"{text.get_text()!r} clipped vertically"


def test_heatmap_grows_with_the_grid():
    small = RetrievalResults("passkey", (256,), (0.5,), 1, np.ones((1, 1)))
    large = RetrievalResults("passkey", tuple(range(8)), tuple(range(10)), 1, np.ones((8, 10)))
    w_small, h_small = heatmap_figure(small, "t").get_size_inches()
    w_large, h_large = heatmap_figure(large, "t").get_size_inches()
    assert w_large > w_small and h_large > h_small
