"""USP (Ulysses x ring) vs the oracle on 2D and 3D meshes."""

import jax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lca.attention import usp_attention, usp_attention_shard
from lca.parallel import make_mesh
from tests.oracle import SEQPAR, assert_matches_oracle, make_inputs


def test_usp_data_x_ulysses_x_ring_batch_sharded():
    """data=2 x ring (context)=2 x Ulysses (tensor)=2, zigzag ring, GQA, packed segments."""
    mesh = make_mesh(data=2, context=2, tensor=2)
    q, k, v, seg = make_inputs(2, 32, 4, 1, segments=True, seed=2)
    q, k, v, seg = (jax.device_put(x, NamedSharding(mesh, P("data"))) for x in (q, k, v, seg))
    kwargs = dict(causal=True, segment_ids=seg)
    assert_matches_oracle(
        lambda q, k, v: usp_attention(q, k, v, mesh=mesh, ulysses_axis="tensor",
                                      ring_axis="context", return_lse=True, **kwargs),
        q, k, v, bound=SEQPAR, **kwargs,
    )


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_usp_ring4_ulysses2_auto_mesh(layout):
    mesh = make_mesh(context=4, tensor=2, axis_types="auto")
    q, k, v, seg = make_inputs(2, 64, 4, 2, segments=True, seed=4)
    kwargs = dict(causal=True, segment_ids=seg)
    assert_matches_oracle(
        lambda q, k, v: usp_attention(q, k, v, mesh=mesh, ulysses_axis="tensor",
                                      ring_axis="context", layout=layout, return_lse=True,
                                      block_q=4, block_kv=4, **kwargs),
        q, k, v, bound=SEQPAR, **kwargs,
    )


def test_usp_bad_inputs():
    mesh = make_mesh(context=4, tensor=2)
    q, k, v, _ = make_inputs(1, 32, 3, 1)
    with pytest.raises(ValueError, match=r"3 query heads over the 2 devices of mesh axis 'tensor'"):
        usp_attention(q, k, v, mesh=mesh, ulysses_axis="tensor", ring_axis="context")
    q, k, v, _ = make_inputs(1, 36, 2, 1)
    with pytest.raises(ValueError, match=r"q length 36 must be a multiple of 8"):
        usp_attention(q, k, v, mesh=mesh, ulysses_axis="tensor", ring_axis="context")
    with pytest.raises(ValueError, match="must be different mesh axes"):
        usp_attention(q, k, v, mesh=mesh, ulysses_axis="context", ring_axis="context")
    with pytest.raises(ValueError, match=r"ring_axis='ring' is not an axis of the mesh"):
        usp_attention(q, k, v, mesh=mesh, ulysses_axis="tensor", ring_axis="ring")
    assert callable(usp_attention_shard)
