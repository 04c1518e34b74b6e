"""Packed rows (several documents per row, told apart by ``segment_ids``) in every Titans architecture.

Each document must see nothing of the others: not through attention, the memory's weights, its momentum,
its open chunk or its causal conv. Where the documents start on chunk and segment boundaries (and the
persistent tokens fill whole chunks) a packed row equals each document run on its own, forward and
gradients; elsewhere, changing one document leaves the others' outputs bit for bit the same.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lca.config import ModelConfig
from lca.memory import mac, mag, mal
from lca.memory import neural_memory as nm
from lca.memory.context_parallel import fresh_memory
from lca.memory.mixer import TitansLmmConfig

MODEL = ModelConfig(d_model=16, num_heads=2)
# max_lr 0.1 (default 0.003): the memory learns enough within a few tokens that a leak would show
MEMORY = dict(memory_heads=2, chunk_size=2, conv_kernel=3, persistent=2, max_lr=0.1)
BATCH = 2


def _lmm():
    config = TitansLmmConfig(**MEMORY).memory(MODEL.d_model)
    return nm.init_params, config, lambda p, x, pos, seg: fresh_memory(p, x, config=config, segment_ids=seg)


def _mixed(module, layer_fn, config):
    return module.init_params, config, lambda p, x, pos, seg: layer_fn(p, x, pos, seg, config=config)


ARCHITECTURES = {
    "lmm": _lmm,
    "mag": lambda: _mixed(mag, mag.mag_layer, mag.TitansMagConfig(**MEMORY, window=3).mag(MODEL)),
    "mal": lambda: _mixed(mal, mal.mal_layer, mal.TitansMalConfig(**MEMORY, window=3).mag(MODEL)),
    "mac": lambda: _mixed(mac, mac.mac_layer, mac.TitansMacConfig(**MEMORY, segment=4).mac(MODEL)),
}


def _packed(lengths, seed=1):
    """``x [BATCH, sum(lengths), d_model]``, per-document positions and segment ids 1, 2, ..."""
    total = sum(lengths)
    x = jax.random.normal(jax.random.PRNGKey(seed), (BATCH, total, MODEL.d_model))
    positions = np.concatenate([np.arange(n) for n in lengths])
    segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])
    as_rows = lambda a: jnp.asarray(np.broadcast_to(a, (BATCH, total)), jnp.int32)  # noqa: E731
    return x, as_rows(positions), as_rows(segments)


def _pieces(a, lengths):
    return jnp.split(a, np.cumsum(lengths)[:-1], axis=1)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_aligned_documents_equal_their_own_runs_forward_and_gradients(arch):
    init, config, layer = ARCHITECTURES[arch]()
    lengths = (8, 8)  # whole chunks (2) and MAC segments (4); one length: one compile of the lone runs
    params = init(jax.random.PRNGKey(0), config)
    x, positions, segments = _packed(lengths)
    probe = jax.random.normal(jax.random.PRNGKey(2), x.shape)

    docs = list(zip(_pieces(x, lengths), _pieces(positions, lengths), _pieces(probe, lengths)))
    one = jax.jit(lambda p, x, pos: layer(p, x, pos, None))
    packed = jax.jit(lambda p, x: layer(p, x, positions, segments))(params, x)
    alone = jnp.concatenate([one(params, xd, pd) for xd, pd, _ in docs], axis=1)
    # without the segment ids the memory carries documents into each other: the comparison can fail
    unpacked = jax.jit(lambda p, x: layer(p, x, positions, None))(params, x)
    assert float(jnp.max(jnp.abs(unpacked - alone))) > 1e-3
    np.testing.assert_allclose(packed, alone, rtol=1e-5, atol=1e-6)

    grad = jax.jit(jax.grad(lambda p, x, pos, seg, q: jnp.sum(layer(p, x, pos, seg) * q), argnums=(0, 1)))
    got = grad(params, x, positions, segments, probe)
    per_doc = [grad(params, xd, pd, None, qd) for xd, pd, qd in docs]
    want = (jax.tree.map(lambda *g: sum(g), *(g for g, _ in per_doc)), jnp.concatenate([g for _, g in per_doc], 1))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_a_document_never_sees_another(arch):
    """Documents starting mid-chunk and mid-segment: changing the first leaves the later ones exactly alone."""
    init, config, layer = ARCHITECTURES[arch]()
    lengths = (5, 7, 8)
    params = init(jax.random.PRNGKey(0), config)
    x, positions, segments = _packed(lengths)
    run = jax.jit(lambda p, x: layer(p, x, positions, segments))
    y, y2 = run(params, x), run(params, x.at[:, :5].add(1.0))
    np.testing.assert_array_equal(y2[:, 5:], y[:, 5:])
    assert float(jnp.max(jnp.abs(y2[:, :5] - y[:, :5]))) > 1e-3
