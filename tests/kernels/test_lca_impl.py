"""The registered ``"pallas"`` LocalImpl with explicit positions, as ring steps call it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lca.attention import BlockSizes, get_impl, reference_attention
from lca.attention.inputs import logit_options
from lca.attention.mask import Mask
from tests.oracle import SEQPAR, assert_matches_oracle, make_inputs, random_qkv, three_documents


@pytest.mark.parametrize("segmented", [False, True])
def test_pallas_impl_with_key_offset_and_zigzag_positions(segmented):
    b, q_len, kv_len, h, h_kv, d = 1, 24, 40, 4, 2, 16
    q, k, v = random_qkv(3, b, q_len, kv_len, h, h_kv, d)
    # Queries: a chunk at global offset 60. Keys: zigzag, two monotone runs (0..19, 100..119).
    q_pos = jnp.arange(q_len, dtype=jnp.int32) + 60
    kv_pos = jnp.concatenate([jnp.arange(20), jnp.arange(100, 120)]).astype(jnp.int32)
    segs = three_documents(b, 64)
    q_seg, kv_seg = (segs[:, :q_len], segs[:, 20:20 + kv_len]) if segmented else (None, None)
    mask, logit = Mask(causal=True, window=50), logit_options(d)
    impl = get_impl("pallas")
    kw = dict(mask=mask, logit=logit, blocks=BlockSizes(16, 16))

    out, lse = impl.forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, **kw)
    ref = lambda q, k, v: reference_attention(  # noqa: E731
        q, k, v, causal=True, window=50, return_lse=True, q_positions=q_pos, kv_positions=kv_pos,
        segment_ids=None if q_seg is None else (q_seg, kv_seg),
    )
    (ref_out, ref_lse), pullback = jax.vjp(ref, q, k, v)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))
    assert not np.isfinite(np.asarray(lse)).all()  # the window hides some rows entirely
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite], atol=2e-5)

    dout = jax.random.normal(jax.random.PRNGKey(1), out.shape)
    dlse = jnp.where(finite, jax.random.normal(jax.random.PRNGKey(2), lse.shape), 0.0)
    grads = impl.backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, dlse, **kw)
    for name, g, rg in zip("qkv", grads, pullback((dout, dlse))):
        np.testing.assert_allclose(g, rg, atol=2e-4, rtol=2e-4, err_msg=f"d{name}")


@pytest.mark.slow
def test_pallas_impl_default_blocks_and_no_dlse():
    q, k, v = random_qkv(4, 1, 20, 20, 2, 1, 8)
    q_pos, kv_pos = jnp.arange(20, dtype=jnp.int32), jnp.arange(20, dtype=jnp.int32)
    impl = get_impl("pallas")
    kw = dict(mask=Mask(causal=True), logit=logit_options(8), blocks=impl.default_blocks)
    out, lse = impl.forward(q, k, v, q_pos, kv_pos, None, None, **kw)
    (ref_out, _), pullback = jax.vjp(
        lambda q, k, v: reference_attention(q, k, v, causal=True, return_lse=True), q, k, v
    )
    np.testing.assert_allclose(out, ref_out, atol=2e-5)
    dout = jnp.ones_like(out)
    grads = impl.backward(q, k, v, q_pos, kv_pos, None, None, out, lse, dout, None, **kw)
    for g, rg in zip(grads, pullback((dout, jnp.zeros_like(lse)))):
        np.testing.assert_allclose(g, rg, atol=2e-4, rtol=2e-4)


# --- the kernels as the step of ring, Ulysses and USP -----------------------------------


def _seqpar_cases():
    from lca.attention import ring_attention, ulysses_attention, usp_attention
    from lca.parallel import make_mesh

    return {
        "ring-zigzag": lambda **kw: ring_attention(mesh=make_mesh(data=2, context=4), **kw),
        "ulysses": lambda **kw: ulysses_attention(mesh=make_mesh(data=2, context=4), **kw),
        "usp": lambda **kw: usp_attention(mesh=make_mesh(data=2, context=2, tensor=2),
                                          ulysses_axis="tensor", ring_axis="context", **kw),
    }


@pytest.mark.parametrize("variant", ["ring-zigzag", "ulysses", "usp"])
def test_sequence_parallel_with_pallas_steps_matches_oracle(variant):
    """impl='pallas' end to end: forward, lse and all gradients, GQA, packed segments."""
    q, k, v, seg = make_inputs(2, 32, 4, 2, segments=True, seed=1)
    call = _seqpar_cases()[variant]
    kwargs = dict(causal=True, segment_ids=seg)
    assert_matches_oracle(
        lambda q, k, v: call(q=q, k=k, v=v, impl="pallas", block_q=4, block_kv=4,
                             return_lse=True, **kwargs),
        q, k, v, bound=SEQPAR, **kwargs,
    )


def test_pallas_step_in_a_checked_user_shard_map_says_what_to_do():
    from jax.sharding import NamedSharding, PartitionSpec as P

    from lca.attention import ring_attention_shard, ulysses_attention_shard
    from lca.parallel import make_mesh

    mesh = make_mesh(context=4, devices=jax.devices()[:4])
    spec = P(None, "context")
    q, k, v, _ = make_inputs(1, 32, 4, 2)
    q, k, v = (jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v))
    for shard_fn in (ring_attention_shard, ulysses_attention_shard):
        body = lambda q, k, v, f=shard_fn: f(q, k, v, axis_name="context", impl="pallas")  # noqa: E731
        with pytest.raises(ValueError, match=r"impl='pallas' cannot run inside a jax.shard_map "
                                             r"that checks .*\['context'\].*check_vma=False"):
            jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec)(q, k, v)
    # Unchecked, as the error suggests, the shard-level ring runs and is exact.
    body = lambda q, k, v: ring_attention_shard(  # noqa: E731
        q, k, v, axis_name="context", layout="contiguous", causal=True, impl="pallas",
        block_q=4, block_kv=4)
    out = jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)(q, k, v)
    want = reference_attention(*(np.asarray(x) for x in (q, k, v)), causal=True)
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=2e-5)
