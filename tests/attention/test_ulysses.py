"""Ulysses attention vs the oracle: forward, lse and gradients; kv-head replication; errors."""

import jax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lca.attention import ulysses_attention, ulysses_attention_shard
from lca.parallel import make_mesh
from tests.oracle import SEQPAR, assert_matches_oracle, make_inputs


def context_mesh(n, axis_types="explicit"):
    return make_mesh(context=n, devices=jax.devices()[:n], axis_types=axis_types)


# (mesh size, causal, heads, kv heads, segments, window, axis types)
CASES = [
    (2, True, 2, 1, True, None, "explicit"),  # MQA, 1 kv head repeated to 2
    (4, False, 8, 2, True, None, "auto"),  # GQA, 2 kv heads repeated to 4
    (8, True, 8, 8, False, 5, "explicit"),  # MHA, window
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_ulysses_matches_oracle(case):
    n, causal, heads, kv_heads, segments, window, axis_types = case
    q, k, v, seg = make_inputs(2, 32, heads, kv_heads, segments=segments, seed=n)
    mesh = context_mesh(n, axis_types)
    kwargs = dict(causal=causal, segment_ids=seg, window=window)
    assert_matches_oracle(
        lambda q, k, v: ulysses_attention(q, k, v, mesh=mesh, return_lse=True, **kwargs),
        q, k, v, bound=SEQPAR, **kwargs,
    )


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["zigzag", "striped"])
@pytest.mark.parametrize("n", [2, 4, 8])
def test_ulysses_layouts_grid(n, layout):
    q, k, v, seg = make_inputs(2, 64, 8, 2, segments=True, seed=n)
    mesh = context_mesh(n)
    kwargs = dict(causal=True, segment_ids=seg)
    assert_matches_oracle(
        lambda q, k, v: ulysses_attention(q, k, v, mesh=mesh, layout=layout, return_lse=True,
                                          **kwargs),
        q, k, v, bound=SEQPAR, **kwargs,
    )


def test_ulysses_cross_attention_window_softcap():
    # q_len != kv_len (bottom-right causal), sliding window, softcap, GQA 4:2 on 4 devices.
    q, k, v, _ = make_inputs(2, 32, 4, 2, kv_length=64, seed=5)
    kwargs = dict(causal=True, window=9, softcap=5.0)
    assert_matches_oracle(
        lambda q, k, v: ulysses_attention(q, k, v, mesh=context_mesh(4), return_lse=True, **kwargs),
        q, k, v, bound=SEQPAR, **kwargs,
    )


def test_ulysses_2d_mesh_presharded_batch():
    mesh = make_mesh(data=2, context=4)
    q, k, v, seg = make_inputs(2, 32, 4, 1, segments=True, seed=11)
    sharding = NamedSharding(mesh, P("data", "context"))
    q, k, v, seg = (jax.device_put(x, sharding) for x in (q, k, v, seg))
    kwargs = dict(causal=True, segment_ids=seg)
    out = ulysses_attention(q, k, v, mesh=mesh, **kwargs)
    assert out.sharding.is_equivalent_to(q.sharding, q.ndim)
    assert_matches_oracle(
        lambda q, k, v: ulysses_attention(q, k, v, mesh=mesh, return_lse=True, **kwargs),
        q, k, v, bound=SEQPAR, **kwargs,
    )


def test_heads_not_divisible_says_which_sizes_work():
    q, k, v, _ = make_inputs(1, 32, 6, 2)
    with pytest.raises(ValueError, match=r"6 query heads over the 4 devices .*\[1, 2, 3, 6\]"):
        ulysses_attention(q, k, v, mesh=context_mesh(4))
    with pytest.raises(ValueError, match=r"axis='seq' is not an axis of the mesh"):
        ulysses_attention(q, k, v, mesh=context_mesh(2), axis="seq")
    with pytest.raises(ValueError, match=r"mesh must be a jax.sharding.Mesh"):
        ulysses_attention(q, k, v, mesh="context")
    with pytest.raises(ValueError, match=r"6 query heads over the 4 devices"):
        jax.shard_map(lambda q, k, v: ulysses_attention_shard(q, k, v, axis_name="context"),
                      mesh=context_mesh(4, "auto"), in_specs=P(None, "context"),
                      out_specs=P(None, "context"))(q, k, v)
