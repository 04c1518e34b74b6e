"""Generation through each layer's inference cache: chunked prefill, then one token at a time.

    tokens = generate(model, prompt [b, p], max_new_tokens=8, landmark_every=cfg.data.landmark_every)
    tokens = generate(model, prompt, 8, temperature=0.8, top_k=40, key=jax.random.key(0))  # sampled

Every layer's mixer keeps its own cache (``start_cache`` / ``extend``, :mod:`lca.models.mixers`): GQA
attention layers a key/value cache (:mod:`lca.models.kv_cache`; a ``local`` layer's is a ring of its window),
landmark layers a block cache from which each query retrieves its top-k blocks (:mod:`lca.models.landmark`),
Titans layers (``titans_lmm``, ``titans_mag``, ``titans_mal``) their memory's state, which streams exactly,
and MAG's and MAL's a ring of key/value slots for their window; ``titans_mac`` the memory at its open segment's start and as it
has learned from that segment so far, and the segment's inputs, keys and values (:class:`lca.memory.mac.MacCache`).
So any causal lca model can generate; the prompt is one document per row, every row the same length, at
positions ``0, 1, ...``.

A model trained on rows with landmark tokens (``data.landmark_every = L``) sees them here too: a landmark
is fed after every ``L - 1`` tokens, as in training (:mod:`lca.data.landmark`), and never generated; the
next token is predicted from the last ordinary token, whose target in training was the next text token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lca.data.landmark import insert_landmarks, with_landmarks_length
from lca.data.tokenizer import LANDMARK_ID


@functools.partial(jax.jit, static_argnums=0)
def _extend_compiled(graphdef, state, tokens, positions, caches, logits_at):
    return nnx.merge(graphdef, state).extend(tokens, positions, caches, logits_at)


def _extend_fn(model, jit: bool):
    """``(tokens [b, t], positions [b, t], caches, logits_at) -> (logits [b, vocab] of token logits_at, caches)``,
    compiled per shape when ``jit`` (``logits_at`` is traced: every chunk of one length shares a compile).

    One module-level compiled function keyed by the model's graph, so later calls with the same model and
    shapes (e.g. every example of one context length) reuse the compiled step.
    """
    if not jit:
        return model.extend
    graphdef, state = nnx.split(model)
    return lambda *args: _extend_compiled(graphdef, state, *args)


def _is_landmark(index: int, landmark_every: int | None) -> bool:
    return landmark_every is not None and index % landmark_every == landmark_every - 1


def pick_tokens(logits, *, temperature: float = 0.0, top_k: int | None = None, key=None) -> jax.Array:
    """The next token of each row from ``logits [b, vocab]`` -> int32 ``[b]``.

    ``temperature`` 0: the argmax (greedy). Otherwise a sample from ``softmax(logits / temperature)``
    restricted to the ``top_k`` largest logits (None: all), drawn with the PRNG ``key``.
    """
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _check_sampling(temperature: float, top_k: int | None, key) -> None:
    if not temperature >= 0.0:  # also refuses NaN
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}.")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None (every token), got {top_k!r}.")
    if temperature > 0.0 and key is None:
        raise ValueError(f"temperature={temperature} samples: pass key=jax.random.key(seed) (or temperature=0 "
                         f"for greedy decoding).")


def generate(model, prompt, max_new_tokens: int, *, landmark_every: int | None = None,
             prefill_chunk: int | None = None, jit: bool = True, temperature: float = 0.0,
             top_k: int | None = None, key=None) -> np.ndarray:
    """Continuation of ``prompt`` int ``[b, p]``: ``max_new_tokens`` tokens, int32 ``[b, max_new_tokens]``; greedy
    by default, sampled with a ``temperature``.

    Args:
      model: a :class:`lca.models.decoder.Decoder` whose mixers all have an inference cache.
      prompt: ``[b, p]`` token ids without landmarks, ``p >= 1``.
      max_new_tokens: how many tokens to generate (landmarks not counted).
      landmark_every: the ``L`` of ``data.landmark_every`` the model was trained with, or None.
      prefill_chunk: tokens per prefill call (landmarks included); None: the whole prompt at once. Attention
        layers' key/value caches attend a long chunk blockwise (:mod:`lca.models.kv_cache`), so their memory
        grows with the chunk's length, not with its length times the cache's.
      jit: compile each step, once per distinct chunk length (the caches have fixed shapes); ``jit=False``
        runs eagerly.
      temperature, top_k: 0 (the default) decodes greedily; above 0 each token is sampled from the
        ``top_k`` most likely (None: all) at that temperature (:func:`pick_tokens`).
      key: a ``jax.random`` key, needed to sample; token ``i`` uses ``fold_in(key, i)``, so a key gives one
        continuation.
    """
    prompt = np.asarray(prompt, np.int32)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be int [batch, len >= 1], got shape {prompt.shape}.")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
    _check_sampling(temperature, top_k, key)
    L = landmark_every
    frame = insert_landmarks({"inputs": prompt}, L)["inputs"] if L else prompt
    batch, length = frame.shape
    chunk = prefill_chunk or length
    if chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1 or None, got {prefill_chunk}.")
    total = prompt.shape[1] + max_new_tokens
    max_len = with_landmarks_length(total, L) if L else total
    step = _extend_fn(model, jit)
    caches = model.start_caches(batch, max_len)

    def run(tokens, start, caches, logits_at=0):
        """Logits of token ``logits_at`` of ``tokens`` only: a chunk's others are never needed."""
        positions = jnp.broadcast_to(jnp.arange(start, start + tokens.shape[1], dtype=jnp.int32), tokens.shape)
        return step(jnp.asarray(tokens, jnp.int32), positions, caches, jnp.int32(logits_at))

    last = max(i for i in range(length) if not _is_landmark(i, L))  # predicts the first new token
    for start in range(0, length, chunk):
        holds_last = start <= last < start + chunk  # other chunks' logits go unused: any index will do
        logits, caches = run(frame[:, start:start + chunk], start, caches, last - start if holds_last else 0)
        if holds_last:
            next_logits = logits

    out = np.zeros((batch, max_new_tokens), np.int32)
    position = length
    for i in range(max_new_tokens):
        draw = None if key is None else jax.random.fold_in(key, i)
        out[:, i] = np.asarray(pick_tokens(next_logits, temperature=temperature, top_k=top_k, key=draw))
        if i == max_new_tokens - 1:
            break
        next_logits, caches = run(out[:, i:i + 1], position, caches)
        position += 1
        if _is_landmark(position, L):
            _, caches = run(np.full((batch, 1), LANDMARK_ID, np.int32), position, caches)
            position += 1
    return out


__all__ = ["generate", "pick_tokens"]
