"""Perplexity of a language model on packed batches, in bits per byte."""

from __future__ import annotations

import math

import numpy as np

from lca.data.tokenizer import NUM_BYTES, VOCAB_SIZE


def token_nll(logits, targets) -> np.ndarray:
    """Cross-entropy in nats float64 [...] of `targets` int [...] under `logits` [..., V] (V >= VOCAB_SIZE)."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.shape[:-1] != np.shape(targets) or logits.shape[-1] < VOCAB_SIZE:
        raise ValueError(f"logits shape {logits.shape} must be targets shape {np.shape(targets)} + [V >= {VOCAB_SIZE}].")
    top = logits.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]
    return log_z - np.take_along_axis(logits, np.asarray(targets)[..., None], axis=-1)[..., 0]


def bits_per_byte(logits_fn, batches) -> dict:
    """Bits per byte of held-out text: sum of cross-entropy (nats) over loss_mask / (ln 2 * scored byte targets).

    logits_fn(batch) -> logits [B, L, V] (jax or numpy) for a batch dict from `lca.data.eval_batches` (keys inputs,
    targets, segment_ids, positions, loss_mask, each [B, L]). The numerator includes the cost of predicting EOS (the end
    of a document), the denominator counts only targets that are bytes (id < 256), so the number is comparable with
    byte-level results elsewhere. Returns dict(bits_per_byte, nats_per_token, tokens (scored targets), bytes).
    """
    nats, tokens, num_bytes = 0.0, 0, 0
    for batch in batches:
        mask = np.asarray(batch["loss_mask"]) > 0
        targets = np.asarray(batch["targets"])
        nll = token_nll(logits_fn(batch), targets)
        nats += float(nll[mask].sum())
        tokens += int(mask.sum())
        num_bytes += int((mask & (targets < NUM_BYTES)).sum())
    if num_bytes == 0:
        raise ValueError("bits_per_byte: the batches have no scored byte targets (loss_mask is all 0 or batches is empty).")
    return {
        "bits_per_byte": nats / (math.log(2) * num_bytes),
        "nats_per_token": nats / tokens,
        "tokens": tokens,
        "bytes": num_bytes,
    }
