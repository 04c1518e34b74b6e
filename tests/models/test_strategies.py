"""Sequence strategies: one catalogue that builds attention, resolves auto and knows its multiple."""

import jax
import numpy as np
import pytest

from lca.attention import BlockSizes, reference_attention
from lca.attention.impl import get_impl
from lca.config import load_config
from lca.models import STRATEGIES, sequence_multiple
from lca.models import strategies
from lca.models.strategies import NoneConfig, RingConfig, UlyssesConfig, UspConfig
from lca.parallel import make_mesh
from tests.models.attention_cases import CASES

OPTS = dict(causal=True, segment_ids=None, window=None, softcap=None, scale=None)


def qkv(b=2, length=48, h=4, h_kv=2, d=8, seed=1):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (b, length, h, d)), jax.random.normal(keys[1], (b, length, h_kv, d)),
            jax.random.normal(keys[2], (b, length, h_kv, d)))


@pytest.mark.parametrize("impl", [i for i in ("reference", "blockwise", "pallas") if i in CASES])
def test_none_runs_each_local_impl_like_reference(impl):
    q, k, v = qkv()
    attend = STRATEGIES["none"].build(NoneConfig(), mesh=None, impl=get_impl(impl), blocks=BlockSizes(16, 16))
    got = jax.jit(lambda *a: attend(*a, **OPTS))(q, k, v)
    want = jax.jit(lambda *a: reference_attention(*a, **OPTS))(q, k, v)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def model_cfg(*overrides):
    return load_config("tiny", list(overrides)).model


def test_auto_resolves_in_one_place_by_the_ring_axis():
    one, four = make_mesh(data=2, context=1, tensor=4), make_mesh(data=2, context=4)
    assert strategies.resolve(model_cfg(), None) == "none"
    assert strategies.resolve(model_cfg(), one) == "none"
    assert strategies.resolve(model_cfg(), four) == "ring"
    # The ring's axis comes from its section: auto follows it.
    assert strategies.resolve(model_cfg("model.strategies.ring.axis=tensor"), one) == "ring"
    # An implementation without ring steps stays unsplit; an explicit name is kept.
    assert strategies.resolve(model_cfg("model.attention.impl=xla"), four) == "none"
    assert strategies.resolve(model_cfg("model.attention.sequence=ulysses"), one) == "ulysses"


def test_sharded_strategy_needs_a_mesh():
    with pytest.raises(ValueError, match="pass mesh="):
        strategies.make_attend(model_cfg("model.attention.sequence=ring"), None)


def test_sequence_multiple_on_a_mesh_with_renamed_axes():
    """Each entry reads its axes from its section and its multiple from lca.parallel.layout."""
    mesh = jax.make_mesh((2, 4), ("dp", "sp"))
    multiple = {name: entry.multiple for name, entry in STRATEGIES.items()}
    assert multiple["none"](NoneConfig(), mesh) == 1
    assert multiple["ring"](RingConfig(axis="sp", layout="zigzag"), mesh) == 8  # 2 chunks per device
    assert multiple["ring"](RingConfig(axis="sp", layout="contiguous"), mesh) == 4
    assert multiple["ring"](RingConfig(axis="sp", layout="striped"), mesh) == 16  # natural -> striped in place
    assert multiple["ring"](RingConfig(axis="dp", layout="zigzag"), mesh) == 4
    assert multiple["ulysses"](UlyssesConfig(axis="sp"), mesh) == 4
    assert multiple["usp"](UspConfig(ring_axis="sp", ulysses_axis="dp", layout="zigzag"), mesh) == 8
    assert multiple["usp"](UspConfig(ring_axis="dp", ulysses_axis="sp", layout="zigzag"), mesh) == 8
    with pytest.raises(ValueError, match="'context' is not an axis of the mesh"):
        multiple["ring"](RingConfig(), mesh)


def test_ring_built_on_renamed_axes_matches_reference():
    mesh = jax.make_mesh((4, 2), ("dp", "sp"))
    q, k, v = qkv(length=32)
    attend = STRATEGIES["ring"].build(RingConfig(axis="sp"), mesh=mesh, impl=get_impl("blockwise"),
                                      blocks=BlockSizes(8, 8))
    got = jax.jit(lambda *a: attend(*a, **OPTS))(q, k, v)
    want = reference_attention(q, k, v, **OPTS)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_model_multiple_adds_the_sequence_sharding_of_the_rules():
    mesh = make_mesh(data=2, fsdp=2, context=2)
    assert sequence_multiple(load_config("tiny"), mesh) == 4  # auto -> zigzag ring over 2
    assert sequence_multiple(load_config("tiny", ["model.attention.sequence=none"]), mesh) == 2  # rules: sequence -> context
    assert sequence_multiple(load_config("tiny", ["model.attention.sequence=none"]), None) == 1


def test_strategy_that_cannot_run_the_impl_fails_at_load():
    from lca.config import ConfigError

    with pytest.raises(ConfigError, match="sequence='ring' cannot run model.attention.impl='xla'"):
        load_config("tiny", ["model.attention.sequence=ring", "model.attention.impl=xla"])


@pytest.mark.parametrize("sequence,mesh_shape", [("none", None), ("ring", dict(context=2)),
                                                 ("ulysses", dict(context=2))])
def test_config_tiles_reach_the_attention_call(sequence, mesh_shape):
    """model.attention's forward and backward tiles are the built call's arguments."""
    mesh = None if mesh_shape is None else make_mesh(devices=jax.devices()[:2], **mesh_shape)
    model = model_cfg(f"model.attention.sequence={sequence}", "model.attention.block_q=8",
                      "model.attention.block_q_bwd=16", "model.attention.block_kv_bwd=4")
    attend = strategies.make_attend(model, mesh)
    want = dict(block_q=8, block_kv=16, block_q_bwd=16, block_kv_bwd=4)  # tiny.yaml: block_kv 16
    assert {name: attend.keywords.get(name) for name in want} == want


@pytest.mark.parametrize("key", ["block_q", "block_kv", "block_q_bwd", "block_kv_bwd"])
def test_a_bad_tile_size_fails_at_load_naming_the_key(key):
    from lca.config import ConfigError

    with pytest.raises(ConfigError, match=rf"config key 'model.attention': {key} must be a positive int, "
                                          rf"got {key}=0"):
        load_config("tiny", [f"model.attention.{key}=0"])
