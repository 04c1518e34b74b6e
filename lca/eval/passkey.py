"""Passkey retrieval by greedy decoding through the model's inference caches (landmark attention's protocol).

Unlike the teacher-forced grid (:func:`lca.eval.retrieval.retrieval_grid`, one full forward pass), the answer
is generated token by token after a (chunked) prefill of the prompt, so a landmark model retrieves blocks from
its cache exactly as at inference (:func:`lca.models.generate.generate`). Context lengths count the task's
tokens; landmarks, when the model was trained with them, come on top.

    results = passkey_accuracy(model, context_lengths=[512, 4096], landmark_every=cfg.data.landmark_every,
                               prefill_chunk=cfg.train.seq_len)
    write_retrieval_report(results, "runs/landmark/eval")
"""

from __future__ import annotations

import numpy as np

from lca.eval.retrieval import DEFAULT_DEPTHS, RetrievalResults, score_grid
from lca.models.generate import generate


def passkey_accuracy(model, *, task: str = "passkey", context_lengths=(512, 1024, 2048), depths=DEFAULT_DEPTHS,
                     samples_per_cell: int = 4, seed: int = 0, landmark_every: int | None = None,
                     prefill_chunk: int | None = None, jit: bool = True) -> RetrievalResults:
    """Share of examples whose whole answer the model generates greedily, per (context length, depth).

    ``landmark_every`` and ``prefill_chunk`` as in :func:`lca.models.generate.generate`; with ``jit`` each
    distinct step shape compiles once, and examples of one length repeat the same shapes.
    """

    def correct(example) -> bool:
        prompt = example.tokens[None, :example.answer_start]
        answer = generate(model, prompt, example.answer_len, landmark_every=landmark_every,
                          prefill_chunk=prefill_chunk, jit=jit)
        return bool(np.array_equal(answer[0], example.tokens[example.answer_start:]))

    return score_grid(correct, task=task, context_lengths=context_lengths, depths=depths,
                      samples_per_cell=samples_per_cell, seed=seed)


__all__ = ["passkey_accuracy"]
