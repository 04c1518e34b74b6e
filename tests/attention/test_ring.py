"""Ring attention vs the oracle: forward, lse and gradients over meshes, layouts and masks."""

import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lca.attention import (
    BlockSizes,
    LocalImpl,
    blockwise_backward,
    blockwise_forward,
    ring_attention,
    ring_attention_shard,
    ring_schedule,
)
from lca.parallel import from_layout, make_mesh, to_layout
from tests.oracle import SEQPAR, assert_matches_oracle, make_inputs, rel_err


def context_mesh(n, axis_types="explicit"):
    return make_mesh(context=n, devices=jax.devices()[:n], axis_types=axis_types)


# (mesh size, layout, causal, heads, kv heads, segments, window, axis types)
CASES = [
    (1, "zigzag", True, 4, 2, True, None, "explicit"),  # the only step is the accumulator
    (2, "zigzag", True, 2, 2, True, None, "explicit"),
    (4, "zigzag", True, 4, 2, True, None, "auto"),
    (8, "zigzag", False, 4, 1, False, None, "explicit"),
    (4, "contiguous", True, 4, 1, True, None, "explicit"),
]
SLOW_CASES = [
    (n, layout, causal, 4, hk, seg, None, "explicit")
    for n in (2, 4, 8)
    for layout in ("zigzag", "contiguous", "striped")
    for causal in (False, True)
    for hk, seg in ((4, False), (1, True))
] + [(8, "contiguous", False, 4, 2, True, None, "auto"), (4, "striped", True, 4, 2, True, 7, "auto")]


def _check_ring(n, layout, causal, heads, kv_heads, segments, window, axis_types, length=32,
                block=None):
    q, k, v, seg = make_inputs(2, length, heads, kv_heads, segments=segments, seed=n)
    mesh = context_mesh(n, axis_types)
    kwargs = dict(causal=causal, segment_ids=seg, window=window)
    assert_matches_oracle(
        lambda q, k, v: ring_attention(q, k, v, mesh=mesh, layout=layout, return_lse=True,
                                       block_q=block, block_kv=block, **kwargs),
        q, k, v, bound=SEQPAR, **kwargs,
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_ring_matches_oracle(case):
    # Small blocks in one case so the local tiles inside a ring step are skipped too.
    _check_ring(*case, block=4 if case[0] == 2 else None)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=lambda c: "-".join(map(str, c)))
def test_ring_matches_oracle_grid(case):
    _check_ring(*case, length=64, block=4)


def test_ring_zigzag_tiles_straddle_chunks_with_window_and_padding():
    # Chunks of 6 tokens under 4-token tiles: tiles straddle chunk boundaries, key blocks
    # are padded, and the window leaves steps whose visible pairs are no rectangle.
    _check_ring(4, "zigzag", True, 4, 2, True, 5, "explicit", length=48, block=4)


def test_ring_window_cross_attention_softcap_default_blocks():
    # Sliding window, q_len != kv_len (bottom-right causal), softcap, default block sizes.
    q, k, v, _ = make_inputs(1, 16, 2, 1, kv_length=32)
    mesh = context_mesh(4)
    kwargs = dict(causal=True, window=7, softcap=3.0)
    assert_matches_oracle(
        lambda q, k, v: ring_attention(q, k, v, mesh=mesh, return_lse=True, **kwargs),
        q, k, v, bound=SEQPAR, **kwargs,
    )


def test_ring_2d_mesh_presharded_batch_and_sequence():
    """data x context mesh: batch over data, sequence over context; out keeps q's sharding."""
    mesh = make_mesh(data=2, context=4)
    q, k, v, seg = make_inputs(2, 32, 4, 2, segments=True, seed=3)
    sharding = NamedSharding(mesh, P("data", "context"))
    q, k, v = (jax.device_put(x, sharding) for x in (q, k, v))
    seg = jax.device_put(seg, sharding)
    kwargs = dict(causal=True, segment_ids=seg)
    out = ring_attention(q, k, v, mesh=mesh, block_q=4, block_kv=4, **kwargs)  # eager call
    assert out.sharding.is_equivalent_to(q.sharding, q.ndim)
    got = assert_matches_oracle(
        lambda q, k, v: ring_attention(q, k, v, mesh=mesh, return_lse=True, block_q=4,
                                       block_kv=4, **kwargs),
        q, k, v, bound=SEQPAR, **kwargs,
    )
    np.testing.assert_array_equal(np.asarray(out), np.asarray(got[0]))  # deterministic


def test_ring_input_already_in_layout():
    """A pipeline that reorders once (to_layout) gets output in the same order."""
    n = 4
    q, k, v, seg = make_inputs(1, 32, 2, 2, segments=True, seed=5)
    mesh = context_mesh(n)
    want = ring_attention(q, k, v, mesh=mesh, causal=True, segment_ids=seg, block_q=4, block_kv=4)
    zq, zk, zv, zseg = (to_layout(x, "zigzag", n) for x in (q, k, v, seg))
    got = ring_attention(zq, zk, zv, mesh=mesh, causal=True, segment_ids=zseg,
                         input_layout="zigzag", block_q=4, block_kv=4)
    assert rel_err(from_layout(got, "zigzag", n), want) <= SEQPAR


def test_ring_shard_level_in_user_shard_map():
    """ring_attention_shard inside the caller's own shard_map, with explicit positions."""
    n = 4
    mesh = context_mesh(n)
    q, k, v, seg = make_inputs(2, 32, 4, 2, segments=True, seed=7)
    spec = P(None, "context")

    def body(q, k, v, seg):
        index = jax.lax.axis_index("context")
        pos = jnp.arange(8, dtype=jnp.int32) + 8 * index  # contiguous shards
        return ring_attention_shard(q, k, v, axis_name="context", layout="contiguous",
                                    q_positions=pos, kv_positions=pos, segment_ids=seg,
                                    causal=True, return_lse=True, block_q=4, block_kv=4)

    def fn(q, k, v):
        args = [jax.sharding.reshard(x, NamedSharding(mesh, spec)) for x in (q, k, v, seg)]
        return jax.shard_map(body, mesh=mesh, in_specs=spec,
                             out_specs=(spec, P(None, None, "context")))(*args)

    assert_matches_oracle(fn, q, k, v, bound=SEQPAR, causal=True, segment_ids=seg)


# --- causal load balance and skipping -------------------------------------------------


def test_schedule_zigzag_balanced_contiguous_not():
    zig = ring_schedule("zigzag", 512, 8, block=16).sum(axis=1)
    contiguous = ring_schedule("contiguous", 512, 8, block=16).sum(axis=1)
    assert zig.max() == zig.min()
    assert contiguous.max() / contiguous.min() > 8
    assert zig.sum() == contiguous.sum()  # same total work, spread evenly
    full = ring_schedule("zigzag", 512, 8, causal=False, block=16).sum()
    assert zig.sum() < 0.6 * full  # causal skips about half


def test_ring_skips_exactly_the_scheduled_chunk_pairs():
    """The area of the local calls the ring actually runs, per device, in chunk pairs.

    Equal to the schedule's count of visible chunk pairs: nothing hidden is computed,
    except that the zigzag first step is one call over the whole shard (the
    implementation skips its one hidden chunk pair tile by tile), and the steps after
    it cover their two visible pairs with one call.
    """
    n, length = 4, 32
    calls = []

    def counting_forward(q, k, v, q_pos, kv_pos, *rest, **kw):
        area = q.shape[1] * k.shape[1]
        jax.debug.callback(lambda p: calls.append((int(p), area)), q_pos[0], ordered=False)
        return blockwise_forward(q, k, v, q_pos, kv_pos, *rest, **kw)

    counting = LocalImpl("counting", None, counting_forward, blockwise_backward, BlockSizes())
    q, k, v, _ = make_inputs(1, length, 2, 2)
    for layout, calls_per_device in (("zigzag", n), ("contiguous", None)):
        calls.clear()
        out = ring_attention(q, k, v, mesh=context_mesh(n), causal=True, layout=layout,
                             impl=counting)
        jax.block_until_ready(out)
        jax.effects_barrier()
        local = length // n
        chunk = local // (2 if layout == "zigzag" else 1)
        from lca.parallel import local_positions

        owner = {}
        for dev in range(n):
            for p in local_positions(layout, local, n, dev)[::chunk]:
                owner[int(p)] = dev
        devices = [owner[p] for p, _ in calls]
        pairs = np.bincount(devices, weights=[a // chunk**2 for _, a in calls], minlength=n)
        whole_diagonal = 1 if layout == "zigzag" else 0  # its hidden pair, inside the first call
        np.testing.assert_array_equal(pairs, ring_schedule(layout, length, n).sum(axis=1) + whole_diagonal)
        if calls_per_device:  # one call per step
            np.testing.assert_array_equal(np.bincount(devices, minlength=n), calls_per_device)


def _permuted_operands(fn, *args):
    """``(dtype, shape)`` of every collective_permute operand in ``fn``'s lowered program."""
    text = jax.jit(fn).lower(*args).as_text()
    types = re.findall(r'"stablehlo\.collective_permute".* : \(tensor<([^>]*)>\)', text)
    assert types, "no collective_permute in the lowered ring"
    return Counter((t.rsplit("x", 1)[-1], tuple(int(s) for s in t.split("x")[:-1])) for t in types)


def test_ring_sends_kv_heads_positions_and_segments_only():
    """What travels around the ring, read from the lowered fwd+bwd program.

    GQA 8:2 on 4 devices, bf16: the forward and the backward each rotate K and V
    with their 2 kv heads (never repeated to the 8 query heads), their positions and
    kv segment ids; the backward adds dK and dV in float32 inside the ring and once
    more to bring them home. Contiguous layout, so no layout conversion permutes.
    """
    n, length = 4, 32
    q, k, v, seg = make_inputs(1, length, 8, 2, segments=True)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    mesh = context_mesh(n)

    def loss(q, k, v):
        out = ring_attention(q, k, v, mesh=mesh, causal=True, segment_ids=seg, layout="contiguous")
        return out.astype(jnp.float32).sum()

    kv_shard = (1, length // n, 2, 8)
    assert _permuted_operands(jax.grad(loss, argnums=(0, 1, 2)), q, k, v) == Counter({
        ("bf16", kv_shard): 4,  # K, V: forward ring and backward ring
        ("f32", kv_shard): 4,  # dK, dV: in the backward ring, then one hop home
        ("i32", (length // n,)): 2,  # kv positions, forward and backward
        ("i32", (1, length // n)): 2,  # kv segment ids, forward and backward
    })


# --- bad input ---------------------------------------------------------------------------


def test_bad_inputs_name_sizes_and_fixes():
    q, k, v, _ = make_inputs(1, 30, 2, 2)
    mesh = context_mesh(4)
    with pytest.raises(ValueError, match=r"q length 30 must be a multiple of 8 .*zigzag.*pad it to 32"):
        ring_attention(q, k, v, mesh=mesh)
    with pytest.raises(ValueError, match=r"axis='seq' is not an axis of the mesh.*'context'"):
        ring_attention(q, k, v, mesh=mesh, axis="seq")
    with pytest.raises(ValueError, match=r"mesh must be a jax.sharding.Mesh with a 'context' axis, "
                                         r"got NoneType; e.g. mesh=lca.parallel.make_mesh"):
        ring_attention(q, k, v, mesh=None)
    q, k, v, _ = make_inputs(1, 32, 2, 2)
    with pytest.raises(ValueError, match="layout must be one of"):
        ring_attention(q, k, v, mesh=mesh, layout="spiral")
    with pytest.raises(ValueError, match="input_layout must be 'natural'"):
        ring_attention(q, k, v, mesh=mesh, input_layout="striped")
    with pytest.raises(ValueError, match=r"multiple of 16 to convert natural-order input"):
        ring_attention(q[:, :24], k[:, :24], v[:, :24], mesh=mesh, layout="striped")
    with pytest.raises(ValueError, match="impl must be one of"):
        ring_attention(q, k, v, mesh=mesh, impl="nope")
    with pytest.raises(ValueError, match="axis_name='seq' is not a mesh axis of the enclosing"):
        jax.shard_map(lambda q, k, v: ring_attention_shard(q, k, v, axis_name="seq"),
                      mesh=context_mesh(4, "auto"), in_specs=P(None, "context"), out_specs=P(None, "context"))(q, k, v)


@pytest.mark.slow
def test_ring_bf16_error_does_not_grow_with_ring_size():
    """Steps merge in float32: bf16 error vs the f32 oracle stays flat from 2 to 8 devices."""
    from lca.attention import reference_attention

    q, k, v, _ = make_inputs(1, 64, 4, 2, seed=9)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    want = reference_attention(*(x.astype(jnp.float32) for x in (q, k, v)), causal=True)
    errors = [
        rel_err(ring_attention(q, k, v, mesh=context_mesh(n), causal=True, block_q=8,
                               block_kv=8).astype(jnp.float32), want)
        for n in (2, 8)
    ]
    assert max(errors) < 2e-2, errors
    assert errors[1] <= 1.5 * errors[0] + 2e-3, errors
