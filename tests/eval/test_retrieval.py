import numpy as np
import pytest

from lca.data.tokenizer import VOCAB_SIZE
from lca.eval.retrieval import retrieval_grid, write_retrieval_report


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
