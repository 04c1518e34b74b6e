"""The inference check every cached mixer meets: ``extend`` in pieces, then ``generate``, against whole forwards."""

import jax.numpy as jnp
import numpy as np


def assert_streams_and_generates(model, tokens, positions, want, pieces, *, prompt: int, new: int = 4):
    """``model.extend`` over ``tokens [b, l]`` in ``pieces`` (from fresh caches) gives the forward's logits
    ``want``; ``generate`` from the first ``prompt`` tokens gives greedy decoding by whole forwards."""
    from lca.models.generate import generate

    caches, outs, start = model.start_caches(tokens.shape[0], tokens.shape[1]), [], 0
    for size in pieces:
        logits, caches = model.extend(tokens[:, start:start + size], positions[:, start:start + size], caches)
        outs.append(logits)
        start += size
    np.testing.assert_allclose(jnp.concatenate(outs, 1), want, rtol=2e-4, atol=2e-4)
    seq = np.asarray(tokens[:, :prompt])
    out = generate(model, seq, new)
    for _ in range(new):  # greedy decoding by whole forwards over the growing sequence
        pos = jnp.broadcast_to(jnp.arange(seq.shape[1]), seq.shape)
        nxt = np.asarray(jnp.argmax(model(jnp.asarray(seq), pos, jnp.ones_like(pos))[:, -1], -1))
        seq = np.concatenate([seq, nxt[:, None]], 1)
    np.testing.assert_array_equal(out, seq[:, prompt:])
