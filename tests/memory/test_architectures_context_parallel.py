"""Every Titans architecture on a context-split mesh equals one device: LMM, MAG, MAL and MAC on 2, 4 and 8
fake devices, forward, and the gradients of all parameters and inputs on 8.

The memory learns fast here (``max_lr`` 0.1, against the default 0.003) so that its carried state matters:
each case first checks that the last token's output depends, through the memory alone, on the first
token, which sits on another device.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lca.config import ModelConfig
from lca.memory import mac, mag, mal
from lca.memory import neural_memory as nm
from lca.memory.context_parallel import ContextSplit, fresh_memory
from lca.memory.mixer import TitansLmmConfig
from lca.parallel import make_mesh

MODEL = ModelConfig(d_model=16, num_heads=2)
# chunk 3 does not line up with the 4-token shards; window 3 and segment 4 keep the attention of the
# last token inside the last shard, so only the memory carries the first token to it
MEMORY = dict(memory_heads=2, chunk_size=3, conv_kernel=2, persistent=2, max_lr=0.1)
SEGMENT = 4
BATCH = 2


def _lmm():
    config = TitansLmmConfig(**MEMORY).memory(MODEL.d_model)
    layer = lambda p, x, pos, split, seg=None: fresh_memory(p, x, config=config, split=split, segment_ids=seg)  # noqa: E731
    return nm.init_params, config, layer


def _mixed(module, layer_fn, config):
    return module.init_params, config, lambda p, x, pos, split, seg=None: layer_fn(p, x, pos, seg, config=config,
                                                                                    split=split)


ARCHITECTURES = {
    "lmm": _lmm,
    "mag": lambda: _mixed(mag, mag.mag_layer, mag.TitansMagConfig(**MEMORY, window=3).mag(MODEL)),
    "mal": lambda: _mixed(mal, mal.mal_layer, mal.TitansMalConfig(**MEMORY, window=3).mag(MODEL)),
    "mac": lambda: _mixed(mac, mac.mac_layer, mac.TitansMacConfig(**MEMORY, segment=SEGMENT).mac(MODEL)),
}


def _case(arch, devices):
    init, config, layer = ARCHITECTURES[arch]()
    length = SEGMENT * devices  # one MAC segment per device
    params = init(jax.random.PRNGKey(0), config)
    x = jax.random.normal(jax.random.PRNGKey(1), (BATCH, length, MODEL.d_model))
    positions = jnp.broadcast_to(jnp.arange(length), (BATCH, length))
    return params, x, lambda split: lambda p, x: layer(p, x, positions, split)


def _split(devices):
    return ContextSplit(make_mesh(context=devices, devices=jax.devices()[:devices]), "context", micro_batches=2)


@pytest.mark.parametrize("devices", [2, 4, 8])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_context_split_equals_one_device(arch, devices):
    """Forward, after checking that the first token reaches the last one's output through the memory alone."""
    params, x, layer = _case(arch, devices)
    one = jax.jit(layer(None))
    nudged = x.at[:, 0].add(1.0)
    assert float(jnp.max(jnp.abs(one(params, nudged)[:, -1] - one(params, x)[:, -1]))) > 1e-4
    pipelined = jax.jit(layer(_split(devices)))
    assert "ppermute" in str(jax.make_jaxpr(pipelined)(params, x))
    np.testing.assert_allclose(pipelined(params, x), one(params, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_context_split_gradients_equal_one_device(arch):
    # the longest chain of hand-offs, 8 devices, 2 micro-batches each
    params, x, layer = _case(arch, 8)
    split = _split(8)
    probe = jax.random.normal(jax.random.PRNGKey(2), x.shape)

    def loss(split):
        return lambda p, x: jnp.sum(layer(split)(p, x) * probe)

    got = jax.jit(jax.grad(loss(split), argnums=(0, 1)))(params, x)
    want = jax.jit(jax.grad(loss(None), argnums=(0, 1)))(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def _packed_case(arch):
    """Documents starting mid-shard and on a shard boundary: the restart flags and the open chunk's travel."""
    init, config, layer = ARCHITECTURES[arch]()
    params = init(jax.random.PRNGKey(0), config)
    lengths = (3, 5, 8)  # starts at 3 (inside the first 4-token shard) and 8 (a shard boundary)
    x = jax.random.normal(jax.random.PRNGKey(1), (BATCH, 16, MODEL.d_model))
    positions = jnp.broadcast_to(jnp.concatenate([jnp.arange(n) for n in lengths]), (BATCH, 16))
    segments = jnp.broadcast_to(jnp.repeat(jnp.arange(1, 4), jnp.array(lengths), total_repeat_length=16), (BATCH, 16))
    return params, x, lambda split: lambda p, x: layer(p, x, positions, split, segments)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_packed_rows_context_split_equal_one_device(arch):
    params, x, layer = _packed_case(arch)
    np.testing.assert_allclose(jax.jit(layer(_split(4)))(params, x), jax.jit(layer(None))(params, x),
                               rtol=1e-5, atol=1e-6)


# MAG and MAL pipeline the memory as LMM does: theirs run with the slow tests
@pytest.mark.parametrize("arch", ["lmm", "mac", *(pytest.param(a, marks=pytest.mark.slow) for a in ("mag", "mal"))])
def test_packed_rows_context_split_gradients_equal_one_device(arch):
    """Devices whose chunks hold no restart skip that branch, and must not skip a collective with it
    (a psum inside the branch hung the pipelined MAC's training step)."""
    params, x, layer = _packed_case(arch)
    probe = jax.random.normal(jax.random.PRNGKey(2), x.shape)
    grad = lambda split: jax.jit(jax.grad(lambda p, x: jnp.sum(layer(split)(p, x) * probe), argnums=(0, 1)))  # noqa: E731
    for a, b in zip(jax.tree.leaves(grad(_split(4))(params, x)), jax.tree.leaves(grad(None)(params, x)), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
