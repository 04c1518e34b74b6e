import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lca.data.pipeline import row_features
from lca.data.tokenizer import EOS_ID, VOCAB_SIZE
from lca.eval.perplexity import bits_per_byte, token_nll


def hand_batch():
    # Two documents and padding: 6 targets scored, of which one is EOS (not a byte).
    rows = [row_features([np.array([10, 11, 12, EOS_ID]), np.array([20, 21, 22])], seq_len=8),
            row_features([np.array([30, 31, 32, 33, 34])], seq_len=8)]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def test_uniform_logits_is_log2_vocab_per_scored_token():
    batch = hand_batch()
    mask = batch["loss_mask"] > 0
    assert mask.sum() == 9 and (batch["targets"][mask] == EOS_ID).sum() == 1
    result = bits_per_byte(lambda b: jnp.zeros(b["inputs"].shape + (VOCAB_SIZE,)), [batch])
    # 9 scored targets each cost ln(V) nats; 8 of them are bytes.
    assert result["tokens"] == 9 and result["bytes"] == 8
    assert result["bits_per_byte"] == pytest.approx(9 * math.log(VOCAB_SIZE) / (math.log(2) * 8))
    assert result["nats_per_token"] == pytest.approx(math.log(VOCAB_SIZE))


def test_confident_logits_by_hand():
    batch = hand_batch()

    def logits_fn(b):  # the right token gets logit ln 2, every other 0: p = 2 / (V + 1)
        logits = np.zeros(b["inputs"].shape + (VOCAB_SIZE,))
        np.put_along_axis(logits, b["targets"][..., None], math.log(2), axis=-1)
        return logits

    result = bits_per_byte(logits_fn, [batch, batch])
    assert result["bytes"] == 16
    assert result["bits_per_byte"] == pytest.approx(18 * math.log((VOCAB_SIZE + 1) / 2) / (math.log(2) * 16))


def test_token_nll_matches_log_softmax_and_checks_shapes():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, VOCAB_SIZE)) * 4
    targets = rng.integers(0, VOCAB_SIZE, (3, 5))
    expected = -np.take_along_axis(np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32))),
                                   targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(token_nll(logits, targets), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="logits shape"):
        token_nll(logits[..., :100], targets)


def test_no_scored_bytes_is_an_error():
    batch = hand_batch()
    batch["loss_mask"] = np.zeros_like(batch["loss_mask"])
    with pytest.raises(ValueError, match="loss_mask"):
        bits_per_byte(lambda b: np.zeros(b["inputs"].shape + (VOCAB_SIZE,)), [batch])
