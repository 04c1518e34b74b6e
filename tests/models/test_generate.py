"""generate()'s token choice: greedy by default, sampled at a temperature from the top-k with a key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lca.config import load_config
from lca.models import make_model
from lca.models.generate import generate, pick_tokens


def test_greedy_is_the_argmax():
    logits = jax.random.normal(jax.random.PRNGKey(0), (4, 50))
    np.testing.assert_array_equal(pick_tokens(logits), jnp.argmax(logits, -1))
    np.testing.assert_array_equal(pick_tokens(logits, temperature=2.0, top_k=1, key=jax.random.key(1)),
                                  jnp.argmax(logits, -1))


def test_samples_follow_the_tempered_softmax():
    """Two tokens with probabilities 1/4 and 3/4 at temperature 1 (1/2 each as it grows large), and never a
    token outside the top-k."""
    logits = jnp.log(jnp.array([[1.0, 3.0, 1e-9]]))
    draws = lambda t, k: np.array([int(pick_tokens(logits, temperature=t, top_k=k, key=jax.random.key(i))[0])  # noqa: E731
                                   for i in range(2000)])
    ones = draws(1.0, 2)
    assert set(ones) <= {0, 1} and abs(np.mean(ones == 1) - 0.75) < 0.04
    assert abs(np.mean(draws(1e4, 2) == 1) - 0.5) < 0.05


def test_top_k_keeps_the_k_largest():
    logits = jax.random.normal(jax.random.PRNGKey(0), (3, 40))
    top3 = np.sort(np.asarray(jax.lax.top_k(logits, 3)[1]), -1)
    picks = np.stack([np.asarray(pick_tokens(logits, temperature=5.0, top_k=3, key=jax.random.key(i)))
                      for i in range(200)], 1)
    for row in range(3):
        assert set(picks[row]) == set(top3[row])  # each of the three drawn, nothing else


def test_generate_samples_one_continuation_per_key():
    model = make_model(load_config("tiny"), seed=0)
    prompt = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (2, 7), 0, 200))
    greedy = generate(model, prompt, 6)
    np.testing.assert_array_equal(generate(model, prompt, 6, temperature=0.7, top_k=1, key=jax.random.key(0)),
                                  greedy)
    a = generate(model, prompt, 6, temperature=1.0, key=jax.random.key(3))
    np.testing.assert_array_equal(a, generate(model, prompt, 6, temperature=1.0, key=jax.random.key(3)))
    assert not np.array_equal(a, generate(model, prompt, 6, temperature=1.0, key=jax.random.key(4)))


@pytest.mark.parametrize("options, message", [
    (dict(temperature=-1.0), r"temperature must be >= 0 \(0: greedy\), got -1.0"),
    (dict(temperature=float("nan")), r"temperature must be >= 0"),
    (dict(top_k=0), r"top_k must be a positive int or None \(every token\), got 0"),
    (dict(temperature=0.5), r"temperature=0.5 samples: pass key=jax.random.key\(seed\)"),
])
def test_bad_sampling_options_are_value_errors(options, message):
    model = make_model(load_config("tiny"), seed=0)
    with pytest.raises(ValueError, match=message):
        generate(model, np.zeros((1, 3), np.int32), 2, **options)


def test_extend_gives_one_tokens_logits_at_a_traced_index():
    model = make_model(load_config("tiny"), seed=0)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, 200)
    positions = jnp.broadcast_to(jnp.arange(9), tokens.shape)
    every, _ = model.extend(tokens, positions, model.start_caches(2, 9))
    one = jax.jit(lambda at: model.extend(tokens, positions, model.start_caches(2, 9), at)[0])
    for at in (0, 4, 8):
        np.testing.assert_allclose(one(jnp.int32(at)), every[:, at], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("landmark_every, chunk", [(None, None), (None, 3), (4, 5)])
def test_generate_asks_each_call_for_one_tokens_logits(landmark_every, chunk):
    """A prefill chunk's logits are one token's, never [t, vocab], and greedy decoding is unchanged by it."""
    model = make_model(load_config("tiny"), seed=0)
    prompt = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (2, 11), 0, 200))
    shapes, extend = [], model.extend

    def spy(tokens, positions, caches, logits_at=None):
        logits, caches = extend(tokens, positions, caches, logits_at)
        shapes.append(logits.shape)
        return logits, caches

    model.extend = spy
    out = generate(model, prompt, 4, landmark_every=landmark_every, prefill_chunk=chunk, jit=False)
    assert shapes and all(shape == (2, model.embed.num_embeddings) for shape in shapes), shapes
    del model.extend
    np.testing.assert_array_equal(out, generate(model, prompt, 4, landmark_every=landmark_every,
                                                prefill_chunk=chunk))


@pytest.mark.parametrize("name", ["tiny", "titans_lmm", "titans_mag", "titans_mal", "titans_mac", "landmark"])
def test_a_long_prompt_prefills_without_its_square(name):
    """One prefill call of a 2,048-token prompt, every cached mixer kind (GQA global and local, Titans, landmark):
    no value it computes holds p^2 / 2 elements; one head's [p, p] logits would be p^2, all four heads' 4 p^2."""
    from flax import nnx

    from tests.jaxpr_sizes import intermediate_sizes

    model = make_model(load_config(name, ["model.num_layers=2"]), seed=0)
    p = 2048
    tokens = jnp.zeros((1, p), jnp.int32)
    positions = jnp.arange(p, dtype=jnp.int32)[None]
    graphdef, state = nnx.split(model)

    def prefill(state, caches):
        return nnx.merge(graphdef, state).extend(tokens, positions, caches, jnp.int32(p - 1))

    jaxpr = jax.make_jaxpr(prefill)(state, model.start_caches(1, p + 8))
    assert max(intermediate_sizes(jaxpr.jaxpr)) < p * p // 2
