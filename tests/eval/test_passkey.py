"""Passkey retrieval by greedy decoding through the caches (lca.eval.passkey)."""

import re

import numpy as np

from lca.data.tokenizer import decode, encode
from lca.eval import passkey as passkey_eval


def test_scores_generated_answers(monkeypatch):
    """A generator that reads the key from the prompt scores 1; one that answers 00000 scores 0."""
    seen = []

    def reads_the_key(model, prompt, max_new_tokens, **kw):
        seen.append((prompt.shape, max_new_tokens, kw["landmark_every"]))
        key = re.search(r"The pass key is (\d+)\.", decode(prompt[0])).group(1)
        return encode(key)[None, :max_new_tokens]

    monkeypatch.setattr(passkey_eval, "generate", reads_the_key)
    results = passkey_eval.passkey_accuracy(None, context_lengths=[300, 600], depths=[0.0, 1.0], samples_per_cell=2,
                                            landmark_every=16)
    np.testing.assert_array_equal(results.accuracy, 1.0)
    assert len(seen) == 8 and {s[1:] for s in seen} == {(5, 16)} and seen[0][0] == (1, 295)

    monkeypatch.setattr(passkey_eval, "generate", lambda model, prompt, n, **kw: encode("0" * n)[None])
    assert passkey_eval.passkey_accuracy(None, context_lengths=[300], depths=[0.5]).accuracy.max() == 0.0


def test_runs_a_landmark_model_through_its_cache():
    """Smoke test: the real generate() and a landmark model's caches run end to end at a length past one prefill
    chunk (the scoring is checked above with a generator that knows the answer; an untrained model's answer says
    nothing)."""
    from lca.config import load_config
    from lca.models import make_model

    cfg = load_config("tiny", ["model.pattern=[landmark]", "model.num_layers=1", "model.mixers.landmark.block_size=16",
                               "model.mixers.landmark.top_k=2", "data.landmark_every=16"])
    results = passkey_eval.passkey_accuracy(make_model(cfg), context_lengths=[256], depths=[0.5], samples_per_cell=1,
                                            landmark_every=16, prefill_chunk=128)
    assert results.accuracy.shape == (1, 1) and 0.0 <= results.accuracy[0, 0] <= 1.0
