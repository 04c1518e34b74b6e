"""The LMM mixer: the model's mixer signature around the functional memory layer."""

import jax
import pytest
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from lca.config import ModelConfig, load_config
from lca.memory import neural_memory as nm
from lca.memory.mixer import MemoryMixer, TitansLmmConfig, as_arrays
from lca.models.build import abstract_model, param_shardings
from lca.models.mixers import MixerEnv
from lca.parallel import make_mesh
from lca.parallel.sharding import Sharder

CONFIG = nm.MemoryConfig(d_model=16, num_heads=2, chunk_size=4, num_persistent=2)
SECTION = TitansLmmConfig(memory_heads=2, chunk_size=4, persistent=2)
ENV = MixerEnv(model=ModelConfig(d_model=16), attend=None, mesh=None, shard=Sharder())


def test_section_gives_the_memory_config():
    assert SECTION.memory(16) == CONFIG


def test_mixer_is_the_functional_layer_from_a_fresh_state():
    mixer = MemoryMixer(SECTION, ENV, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 16))
    positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
    y = nnx.jit(lambda m, x, p: m(x, p, jnp.zeros_like(p)))(mixer, x, positions)
    params = as_arrays(mixer.parameters)
    want = jax.jit(lambda p, x: nm.memory_layer(p, nm.fresh_state(p, CONFIG, 2), x, config=CONFIG)[0])(params, x)
    assert y.shape == x.shape
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_mixer_gradients_reach_every_parameter():
    mixer = MemoryMixer(SECTION, ENV, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(2), (1, 7, 16))
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(mixer)
    leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
    assert len(leaves) == 8  # w_qkv, w_out, w_gates, b_gates, conv, persistent, 2 memory layers
    for g in leaves:
        assert np.all(np.isfinite(g)) and np.any(g != 0)


@pytest.mark.parametrize("kind", ["titans_lmm", "titans_mac", "titans_mag", "titans_mal"])
def test_memory_params_are_sharded_like_the_model(kind):
    """Every param has logical names the rules know; the d_model side of projections goes over fsdp."""
    cfg = load_config("tiny", [f"model.pattern=[{kind}]", "model.num_layers=1", f"model.mixers.{kind}.persistent=2"])
    _, params, logical = abstract_model(cfg)
    layer, names = params["block_0"]["attn"]["parameters"], logical["block_0"]["attn"]["parameters"]
    for path, leaf in jax.tree_util.tree_leaves_with_path(layer):
        spec = dict(jax.tree_util.tree_leaves_with_path(names, is_leaf=lambda x: isinstance(x, P)))[path]
        assert len(spec) == leaf.ndim and all(n is None or n in cfg.rules for n in spec), (path, spec)
    mesh = make_mesh(fsdp=2, devices=jax.devices()[:2])
    shardings = param_shardings(cfg, mesh)["block_0"]["attn"]["parameters"]
    # MAC/MAG/MAL nest the memory's params under "memory"; in LMM that key holds the MLP weights
    memory = shardings["memory"] if "w_qkv" in shardings["memory"] else shardings
    for sharded in (shardings["w_qkv"], shardings["w_out"], memory["w_qkv"], memory["persistent"]):
        assert "fsdp" in sharded.spec, sharded.spec
