"""Landmark attention: the blockwise version and the retrieval path against the dense grouped-softmax oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lca.attention import attention, reference_attention, ring_attention, ulysses_attention, usp_attention
from lca.attention.landmark import (
    BlockCache,
    append_blocks,
    empty_block_cache,
    landmark_attention,
    landmark_decoded_attention,
    landmark_reference_attention,
    landmark_forward,
    landmark_retrieval_attention,
    landmark_step,
    landmark_weights,
)
from lca.models.rope import apply_rope
from lca.parallel import make_mesh
from tests.attention.landmark_checks import assert_close as _close
from tests.attention.landmark_checks import packed as _packed
from tests.attention.landmark_checks import qkv as _qkv
from tests.attention.landmark_checks import value_and_grads as _value_and_grads
from tests.jaxpr_sizes import intermediate_sizes


def _jit(fn, **options):
    """``fn`` with its keyword options fixed, compiled (eager dispatch is far slower on CPU)."""
    return jax.jit(lambda *arrays: fn(*arrays, **options))


# (batch, q_len, kv_len, heads, kv_heads, block_size, kv_block, q_block, packed, q_offset)
GRID = [
    (1, 16, 16, 2, 2, 4, None, None, False, None),
    (2, 23, 23, 4, 2, 5, 10, 8, True, None),  # odd length, GQA, packed, two blocks per step, padded q tiles
    (1, 7, 19, 4, 1, 3, None, 3, False, None),  # q_len < kv_len (bottom-right), MQA, chunks skipped per tile
    (2, 33, 33, 2, 1, 8, 16, 16, True, None),
    (1, 9, 9, 2, 2, 16, None, None, False, None),  # shorter than one block
    (1, 8, 24, 2, 2, 4, 8, 3, False, 9),  # queries elsewhere in the sequence (a ring step's positions)
]


@pytest.mark.parametrize("b,q_len,kv_len,h,hk,L,kv_block,q_block,packed,q_offset", GRID)
def test_blockwise_matches_oracle_forward_and_gradients(b, q_len, kv_len, h, hk, L, kv_block, q_block, packed,
                                                         q_offset):
    q, k, v = _qkv(len(GRID) + q_len, b, q_len, kv_len, h, hk)
    options = dict(block_size=L)
    if packed:
        options["segment_ids"] = _packed(q_len, b, kv_len)
    if q_offset is not None:
        options["q_positions"] = jnp.arange(q_len, dtype=jnp.int32) + q_offset
    want, want_grads = _value_and_grads(landmark_reference_attention, q, k, v, **options)
    got, got_grads = _value_and_grads(landmark_attention, q, k, v, kv_block=kv_block, q_block=q_block, **options)
    _close(got, want, 1e-5)
    for got_g, want_g in zip(got_grads, want_grads):
        _close(got_g, want_g, 1e-5)


def test_blockwise_bfloat16_is_close_to_the_float32_oracle():
    q, k, v = _qkv(3, 2, 30, 30, 4, 2, d=16, dtype=jnp.bfloat16)
    want, want_grads = _value_and_grads(landmark_reference_attention, *(x.astype(jnp.float32) for x in (q, k, v)),
                                        block_size=6)
    got, grads = _value_and_grads(landmark_attention, q, k, v, block_size=6, kv_block=12)
    assert got.dtype == jnp.bfloat16
    _close(got, want, 2e-2)
    for got_g, want_g in zip(grads, want_grads):
        assert got_g.dtype == jnp.bfloat16
        _close(got_g, want_g, 5e-2)


def _reference_recipe_weights(logits, L):
    """The reference's recipe (epfml/landmark-attention llama_mem.py), row by row, one head, default positions.

    Block ids come from counting landmarks before each key; the query's own block ("last section") is the
    latest visible one; its landmark is masked; landmarks and own-block keys share one softmax; each earlier
    ordinary key is softmaxed inside its block and scaled by its landmark's probability; landmarks get 0.
    """
    n = logits.shape[0]
    is_mem = (np.arange(n) % L) == L - 1
    mem_ids = np.cumsum(is_mem) - is_mem
    weights = np.zeros_like(logits)
    for i in range(n):
        vis = np.arange(n) <= i
        last = vis & (mem_ids == mem_ids[vis].max())
        vis = vis & ~(is_mem & last)
        first = vis & (last | is_mem)
        p0 = np.where(first, np.exp(logits[i] - logits[i][first].max()), 0.0)
        p0 /= p0.sum()
        weights[i] = np.where(last & vis, p0, 0.0)
        for j in np.unique(mem_ids[vis & ~first]):
            group = vis & ~first & (mem_ids == j)
            pg = np.exp(logits[i][group] - logits[i][group].max())
            landmark = is_mem & (mem_ids == j)
            weights[i][group] = pg / pg.sum() * p0[landmark].sum()
    return weights


def test_oracle_follows_the_reference_recipe():
    L, n, d = 4, 14, 8
    q, k, _ = _qkv(5, 1, n, n, 1, 1, d)
    logits = np.asarray(jnp.einsum("qd,kd->qk", q[0, :, 0], k[0, :, 0])) / np.sqrt(d)
    want = _reference_recipe_weights(logits.astype(np.float64), L)
    got = np.asarray(landmark_weights(q, k, block_size=L))[0, 0]
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("packed", [False, True])
def test_rows_sum_to_one_and_landmarks_carry_no_value(packed):
    L, n = 5, 31
    q, k, v = _qkv(7, 2, n, n, 4, 2)
    seg = _packed(11, 2, n) if packed else None
    weights = np.asarray(_jit(landmark_weights, block_size=L, segment_ids=seg)(q, k))
    # A landmark query that starts a document sees nothing (its own landmark is never in its group).
    seg = np.ones((2, n), np.int32) if seg is None else np.asarray(seg)
    starts = np.concatenate([np.ones((2, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    blind = starts & (np.arange(n) % L == L - 1)
    np.testing.assert_allclose(weights.sum(-1), np.broadcast_to(np.where(blind, 0.0, 1.0)[:, None], weights.shape[:-1]),
                               atol=1e-5)
    assert np.all(weights[..., L - 1::L] == 0.0)
    assert np.all(weights >= 0.0)
    landmark = (np.arange(n) % L == L - 1)[None, :, None, None]
    v_moved = jnp.where(landmark, v + 100.0, v)
    seg = jnp.asarray(seg)
    _close(_jit(landmark_attention, block_size=L, segment_ids=seg)(q, k, v_moved),
           _jit(landmark_attention, block_size=L, segment_ids=seg)(q, k, v), 1e-5)


def test_a_document_starting_on_a_landmark_drops_that_landmark():
    # Document 2 starts exactly on the landmark at position 4: it sees that landmark but no key of its block.
    L, n = 5, 12
    q, k, v = _qkv(8, 1, n, n, 2, 2)
    seg = jnp.asarray([[1] * 4 + [2] * 8], jnp.int32)
    weights = np.asarray(_jit(landmark_weights, block_size=L, segment_ids=seg)(q, k))
    sums = weights.sum(-1)[0]
    np.testing.assert_allclose(np.delete(sums, 4, axis=-1), 1.0, atol=1e-5)
    assert np.all(sums[:, 4] == 0.0)  # the landmark query itself sees nothing
    assert np.all(weights[..., 5:, 4] == 0.0)
    _close(_jit(landmark_attention, block_size=L, segment_ids=seg)(q, k, v),
           _jit(landmark_reference_attention, block_size=L, segment_ids=seg)(q, k, v), 1e-5)


def test_future_tokens_do_not_change_earlier_outputs():
    L, n, cut = 4, 26, 13
    q, k, v = _qkv(9, 1, n, n, 2, 1)
    q2, k2, v2 = _qkv(10, 1, n, n, 2, 1)
    later = (jnp.arange(n) > cut)[None, :, None, None]
    mixed = [jnp.where(later, b, a) for a, b in ((q, q2), (k, k2), (v, v2))]
    for fn in (landmark_attention, landmark_reference_attention):
        run = _jit(fn, block_size=L)
        a, b = run(q, k, v), run(*mixed)
        np.testing.assert_array_equal(np.asarray(a[:, : cut + 1]), np.asarray(b[:, : cut + 1]))
        assert np.abs(np.asarray(a[:, cut + 1:] - b[:, cut + 1:])).max() > 1e-3


@pytest.mark.parametrize("n", [1, 7])
def test_without_a_complete_earlier_block_it_is_causal_attention(n):
    L = 8  # n <= L - 1: no landmark is visible anywhere
    q, k, v = _qkv(n, 2, n, n, 4, 2)
    want = reference_attention(q, k, v, causal=True)
    _close(_jit(landmark_reference_attention, block_size=L)(q, k, v), want, 1e-6)
    _close(_jit(landmark_attention, block_size=L)(q, k, v), want, 1e-6)
    # The first L - 1 queries of a longer sequence too.
    q, k, v = _qkv(n, 1, 3 * L, 3 * L, 2, 2)
    _close(_jit(landmark_attention, block_size=L)(q, k, v)[:, : L - 1],
           reference_attention(q[:, : L - 1], k[:, : L - 1], v[:, : L - 1], causal=True), 1e-6)


# ------------------------------------------------------------------------------------------------ retrieval


def _split_for_retrieval(k, v, num_cached, L, capacity=None):
    cache = empty_block_cache(k.shape[0], L, k.shape[2], k.shape[3], capacity=capacity)
    # Append in two steps to exercise append_blocks' concatenation.
    first = (num_cached // 2) * L
    cache = append_blocks(cache, k[:, :first], v[:, :first])
    cache = append_blocks(cache, k[:, first: num_cached * L], v[:, first: num_cached * L])
    return cache, k[:, num_cached * L:], v[:, num_cached * L:]


@pytest.mark.parametrize(
    "selection,rope,num_cached,t",
    [("per_head", None, 0, 3), ("per_head", apply_rope, 1, 1), ("per_head", apply_rope, 4, 6), ("shared", None, 4, 6),
     ("shared", apply_rope, 3, 2)],
)
def test_retrieving_every_cached_block_equals_training(selection, rope, num_cached, t):
    L, n = 5, 29  # the local window ends in an incomplete block
    q, k, v = _qkv(num_cached, 2, n, n, 4, 2)
    positions = jnp.broadcast_to(jnp.arange(n), (2, n))
    rq, rk = (q, k) if rope is None else (rope(q, positions), rope(k, positions))
    want = _jit(landmark_reference_attention, block_size=L)(rq, rk, v)[:, n - t:]
    cache, k_local, v_local = _split_for_retrieval(k, v, num_cached, L)
    got = _jit(landmark_retrieval_attention, block_size=L, top_k=num_cached, selection=selection, rope=rope)(
        q[:, n - t:], k_local, v_local, cache)
    _close(got, want, 1e-5)


def test_chunked_prefill_then_token_by_token_equals_one_pass():
    # Chunks of 5 and 4 (prefill), then one token at a time: after each call the complete blocks of the local
    # window move into the cache. Retrieving every cached block, each output equals the one-pass output.
    L, n = 4, 14
    q, k, v = _qkv(31, 1, n, n, 4, 2)
    positions = jnp.arange(n)[None]
    want = _jit(landmark_reference_attention, block_size=L)(apply_rope(q, positions), apply_rope(k, positions), v)
    cache = empty_block_cache(1, L, 2, 8)
    start, outs = 0, []
    for lo, hi in [(0, 5), (5, 9), (9, 10), (10, 11), (11, 12), (12, 14)]:
        run = _jit(landmark_retrieval_attention, block_size=L, top_k=max(1, cache.slots), rope=apply_rope)
        outs.append(run(q[:, lo:hi], k[:, start:hi], v[:, start:hi], cache))
        complete = start + (hi - start) // L * L
        cache = append_blocks(cache, k[:, start:complete], v[:, start:complete])
        start = complete
    _close(jnp.concatenate(outs, axis=1), want, 1e-5)


def _decoded_block_by_block(q, k, v, L, **options):
    """The oracle of landmark_decoded_attention: each block through the retrieval path, earlier blocks cached."""
    cache, outs = empty_block_cache(k.shape[0], L, k.shape[2], k.shape[3]), []
    for start in range(0, q.shape[1], L):
        block = slice(start, start + L)
        outs.append(landmark_retrieval_attention(q[:, block], k[:, block], v[:, block], cache, block_size=L,
                                                 **options))
        cache = append_blocks(cache, k[:, block], v[:, block])
    return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize("selection,top_k,h,hk,n,L", [
    ("per_head", 1, 4, 2, 24, 4), ("per_head", 3, 2, 2, 30, 5), ("shared", 2, 4, 1, 24, 4), ("shared", 9, 2, 2, 16, 4),
])
def test_decoded_rows_equal_the_retrieval_path_block_by_block_forward_and_gradients(selection, top_k, h, hk, n, L):
    q, k, v = _qkv(40 + n, 2, n, n, h, hk)
    options = dict(top_k=top_k, selection=selection, rope=apply_rope)
    want, want_grads = _value_and_grads(lambda q, k, v: _decoded_block_by_block(q, k, v, L, **options), q, k, v)
    got, got_grads = _value_and_grads(landmark_decoded_attention, q, k, v, block_size=L, **options)
    _close(got, want, 1e-5)
    for got_g, want_g in zip(got_grads, want_grads):
        _close(got_g, want_g, 1e-5)


def test_decoded_rows_retrieving_every_block_equal_training():
    L, n = 4, 20
    q, k, v = _qkv(41, 2, n, n, 4, 2)
    positions = jnp.broadcast_to(jnp.arange(n), (2, n))
    want = _jit(landmark_attention, block_size=L)(apply_rope(q, positions), apply_rope(k, positions), v)
    got = _jit(landmark_decoded_attention, block_size=L, top_k=n // L, rope=apply_rope)(q, k, v)
    _close(got, want, 1e-5)


def _paper_shared_top1(q, landmark_keys, q_pos: int, L: int) -> int:
    """Top-1 block, one set for all heads, scored at the paper's positions (llama_mem.py) with top_k=1.

    The most recent block's landmark sits at slot 1, every older one at slot 0 (position ``slot * L + L - 1``);
    the shared choice is the block with the largest softmax probability in any head.
    """
    n = landmark_keys.shape[1]
    slots = jnp.where(jnp.arange(n) == n - 1, 1, 0)
    keys = apply_rope(landmark_keys, (slots * L + L - 1)[None])
    scores = jnp.einsum("bthd,bnhd->bhn", apply_rope(q, jnp.array([[q_pos]])), keys) / jnp.sqrt(q.shape[-1])
    return int(jnp.argmax(jnp.max(jax.nn.softmax(scores, axis=-1), axis=1)[0]))


def test_retrieved_blocks_take_the_papers_positions():
    # top_k=1 of 3 cached blocks, one set for all heads: the retrieved block sits in slot 0 (an older block)
    # or slot 1 (the most recent one); the local window starts at (k' + 1) L = 2 L. The choice must be the
    # one scored at the paper's positions, and the output the oracle's on that layout, rotated at those
    # positions. Seeds until both slots were taken.
    L, n_blocks, local = 4, 3, 5
    seen = set()
    for seed in range(12):
        q, k, v = _qkv(40 + seed, 1, n_blocks * L + local, n_blocks * L + local, 2, 2)
        cache, k_local, v_local = _split_for_retrieval(k, v, n_blocks, L)
        got, idx = _jit(landmark_retrieval_attention, block_size=L, top_k=1, selection="shared", rope=apply_rope,
                        return_indices=True)(q[:, -1:], k_local, v_local, cache)
        j = int(idx[0, 0, 0, 0])
        assert j == _paper_shared_top1(q[:, -1:], cache.landmark_keys, 2 * L + local - 1, L), seed
        slot = 1 if j == n_blocks - 1 else 0
        kv_pos = jnp.concatenate([slot * L + jnp.arange(L), 2 * L + jnp.arange(local)]).astype(jnp.int32)
        q_pos = kv_pos[-1:]
        keys = jnp.concatenate([cache.keys[:, j], k_local], axis=1)
        values = jnp.concatenate([cache.values[:, j], v_local], axis=1)
        want = _jit(landmark_reference_attention, block_size=L, q_positions=q_pos, kv_positions=kv_pos)(
            apply_rope(q[:, -1:], q_pos[None]), apply_rope(keys, kv_pos[None]), values)
        _close(got, want, 1e-5)
        seen.add(slot)
        if seen == {0, 1}:
            break
    assert seen == {0, 1}, seen


def test_a_capped_cache_keeps_the_latest_blocks():
    L = 4
    _, k, v = _qkv(0, 1, 1, 6 * L, 2, 2)
    cache, _, _ = _split_for_retrieval(k, v, 6, L, capacity=4)
    assert cache.slots == 4 and int(cache.count) == 4
    np.testing.assert_array_equal(np.asarray(cache.keys.reshape(1, -1, 2, 8)), np.asarray(k[:, 2 * L:]))
    np.testing.assert_array_equal(np.asarray(cache.landmark_keys), np.asarray(k[:, 2 * L + L - 1:: L]))


@pytest.mark.parametrize("selection", ["per_head", "shared"])
def test_a_part_filled_capped_cache_retrieves_only_its_used_blocks(selection):
    # 2 of 5 slots used, top_k=4 > 2: the same output as an unbounded cache holding the 2 blocks (which
    # retrieves min(top_k, 2)), whatever the unused slots hold; their ranks come back as -1.
    L, n = 4, 11
    q, k, v = _qkv(7, 2, n, n, 4, 2)
    grown, k_local, v_local = _split_for_retrieval(k, v, 2, L)
    capped = append_blocks(empty_block_cache(2, L, 2, 8, capacity=5), k[:, :2 * L], v[:, :2 * L])
    loud = 50.0 * jnp.ones_like(capped.keys)  # would win every score if unused slots took part
    capped = BlockCache(jnp.where(jnp.arange(5)[:, None, None, None] < 2, capped.keys, loud),
                        capped.values + 9.0 * (jnp.arange(5)[:, None, None, None] >= 2), capped.count, 5)
    run = _jit(landmark_retrieval_attention, block_size=L, top_k=4, selection=selection, rope=apply_rope,
               return_indices=True)
    want, _ = run(q[:, -3:], k_local, v_local, grown)
    got, idx = run(q[:, -3:], k_local, v_local, capped)
    _close(got, want, 1e-5)
    np.testing.assert_array_equal(np.asarray(idx[..., :2]), np.broadcast_to([0, 1], idx.shape[:-1] + (2,)))
    assert (np.asarray(idx[..., 2:]) == -1).all()


def test_a_capped_cache_appends_a_traced_number_of_blocks_in_one_compiled_step():
    # Appending 0 or 1 of 1 offered block per call, capacity 3: the cache keeps the newest 3 in age order
    # with fixed shapes, so the jitted append compiles once.
    L = 4
    _, k, v = _qkv(3, 1, 1, 5 * L, 2, 2)
    append = jax.jit(append_blocks)
    cache, kept = empty_block_cache(1, L, 2, 8, capacity=3), []
    for i, add in enumerate([1, 0, 1, 1, 0, 1, 1]):
        block = slice(len(kept) * L, len(kept) * L + L) if add else slice(0, L)
        cache = append(cache, k[:, block], v[:, block], jnp.int32(add))
        kept += [len(kept)] if add else []
        assert int(cache.count) == min(len(kept), 3) and cache.slots == 3, i
        np.testing.assert_array_equal(np.asarray(cache.keys[:, :min(len(kept), 3)]),
                                      np.asarray(k.reshape(1, 5, L, 2, 8)[:, kept[-3:]]))
    assert append._cache_size() == 1
    with pytest.raises(ValueError, match="num_blocks needs a capped cache"):
        append_blocks(empty_block_cache(1, L, 2, 8), k[:, :L], v[:, :L], 1)


@pytest.mark.parametrize("selection", ["per_head", "shared"])
def test_retrieval_picks_the_block_holding_a_planted_key(selection):
    # GQA (query heads 0, 1 read kv head 0), top_k=1 of 12 blocks. The key is planted in kv head 0 only, in a
    # block that query head 1 does not pick without it; with it, head 1 picks that block (all heads with
    # "shared"), and heads 2 and 3, which read kv head 1, keep their own choices under "per_head".
    L, num_blocks, d = 6, 12, 16
    q, k, v = _qkv(21, 1, 2 * L, num_blocks * L + 3, 4, 2, d)
    run = _jit(landmark_retrieval_attention, block_size=L, top_k=1, selection=selection, return_indices=True)
    cache, k_local, v_local = _split_for_retrieval(k, v, num_blocks, L)
    _, before = run(q[:, -1:], k_local, v_local, cache)
    target = (int(before[0, 0, 1, 0]) + num_blocks // 2) % num_blocks
    direction = q[0, -1, 1]  # the last query of head 1
    planted = k.at[0, target * L + 2, 0].set(direction).at[0, target * L + L - 1, 0].set(3.0 * direction)
    cache, k_local, v_local = _split_for_retrieval(planted, v, num_blocks, L)
    _, idx = run(q[:, -1:], k_local, v_local, cache)
    assert idx.shape == (1, 1, 4, 1)
    assert int(idx[0, 0, 1, 0]) == target
    if selection == "shared":
        np.testing.assert_array_equal(np.asarray(idx[0, 0, :, 0]), [target] * 4)
    else:
        np.testing.assert_array_equal(np.asarray(idx[0, 0, 2:]), np.asarray(before[0, 0, 2:]))


@pytest.mark.parametrize("selection", ["per_head", "shared"])
@pytest.mark.parametrize("q_tile", [1, 3, 7])
def test_query_tiles_give_the_same_retrieval(selection, q_tile):
    # 7 queries over a cache of 5 blocks (GQA, rotary): tiles of 1, 3 (the last one padded) or all 7 at once
    # retrieve the same blocks and give the same output as no tiling.
    L, n = 4, 5
    q, k, v = _qkv(17, 2, 7, n * L + 7, 4, 2)
    cache, k_local, v_local = _split_for_retrieval(k, v, n, L)
    options = dict(block_size=L, top_k=2, selection=selection, rope=apply_rope, return_indices=True)
    want, want_idx = _jit(landmark_retrieval_attention, **options)(q, k_local, v_local, cache)
    got, idx = _jit(landmark_retrieval_attention, q_tile=q_tile, **options)(q, k_local, v_local, cache)
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(want_idx))
    _close(got, want, 1e-6)


def test_query_tiles_bound_the_gathered_blocks():
    # A 64-query prefill chunk gathers [64, heads, top_k, L, d] at once; in tiles of 8, an eighth of that.
    L, d, t, h, top_k = 8, 16, 64, 2, 4
    q, k, v = _qkv(0, 1, t, t, h, h, d)
    cache = append_blocks(empty_block_cache(1, L, h, d), *_qkv(1, 1, 16 * L, 16 * L, h, h, d)[1:])
    gathered = t * h * top_k * L * d

    def biggest(**options):
        def run(q, k, v, c):
            return landmark_retrieval_attention(q, k, v, c, block_size=L, top_k=top_k, **options)
        return max(intermediate_sizes(jax.make_jaxpr(run)(q, k, v, cache).jaxpr))

    assert biggest() >= gathered
    assert biggest(q_tile=8) <= gathered // 8


def test_query_tiles_bound_the_local_window_logits():
    # A 512-token prefill chunk into an empty cache: its local window is the chunk, and all queries at once
    # hold [512 queries, 512 keys] logits per head (the whole prompt's square); tiles of 16 hold 16 rows of it.
    L, d, t, h = 8, 8, 512, 2
    q, k, v = _qkv(0, 1, t, t, h, h, d)
    cache = empty_block_cache(1, L, h, d)
    logits = t * t * h

    def biggest(**options):
        def run(q, k, v, c):
            return landmark_retrieval_attention(q, k, v, c, block_size=L, top_k=2, **options)
        return max(intermediate_sizes(jax.make_jaxpr(run)(q, k, v, cache).jaxpr))

    assert biggest() >= logits
    assert biggest(q_tile=16) <= logits // 16


def test_retrieval_memory_follows_k_not_the_cache():
    # Traced shapes: the retrieved keys are [b, t, h, k, L, d], whatever the cache length.
    L, d = 4, 8
    q, k, v = _qkv(0, 1, 2, 2, 2, 2, d)
    cache = append_blocks(empty_block_cache(1, L, 2, d), *_qkv(1, 1, 64 * L, 64 * L, 2, 2, d)[1:])
    jaxpr = jax.make_jaxpr(lambda q, k, v, c: landmark_retrieval_attention(q, k, v, c, block_size=L, top_k=2))(
        q, k, v, cache)
    biggest = max(int(np.prod(var.aval.shape)) for eqn in jaxpr.jaxpr.eqns for var in eqn.outvars)
    assert biggest <= cache.keys.size // L, biggest  # the landmark keys, 1/L of the cache


# ------------------------------------------------------------------------------------------------ errors


def test_bad_inputs_name_the_argument():
    q, k, v = _qkv(0, 1, 8, 8, 2, 2)
    with pytest.raises(ValueError, match="block_size"):
        landmark_attention(q, k, v, block_size=1)
    with pytest.raises(ValueError, match="block_size"):
        landmark_reference_attention(q, k, v, block_size=4.0)
    with pytest.raises(ValueError, match="kv_block=6 must be a multiple of block_size=4"):
        landmark_attention(q, k, v, block_size=4, kv_block=6)
    with pytest.raises(ValueError, match="q_block"):
        landmark_attention(q, k, v, block_size=4, q_block=0)
    with pytest.raises(ValueError, match="causal"):
        landmark_attention(q, k, v, block_size=4, causal=False)
    with pytest.raises(ValueError, match="kv_positions"):
        landmark_attention(q, k, v, block_size=4, kv_positions=jnp.arange(8, dtype=jnp.int32) + 2)
    with pytest.raises(ValueError, match="num_heads must be a multiple"):
        landmark_attention(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2), block_size=4)
    cache = empty_block_cache(1, 4, 2, 8, capacity=3)
    with pytest.raises(ValueError, match="top_k=4 is larger than the cache"):
        landmark_retrieval_attention(q, k, v, cache, block_size=4, top_k=4)
    with pytest.raises(ValueError, match="cache blocks"):
        landmark_retrieval_attention(q, k, v, cache, block_size=5, top_k=1)
    with pytest.raises(ValueError, match="selection"):
        landmark_retrieval_attention(q, k, v, cache, block_size=4, top_k=1, selection="max")
    for top_k in (-1, True, 1.0):
        with pytest.raises(ValueError, match=rf"top_k must be an int >= 0 .*got {top_k!r}"):
            landmark_retrieval_attention(q, k, v, cache, block_size=4, top_k=top_k)
    with pytest.raises(ValueError, match=r"q_tile must be a positive int or None, got q_tile=0 \(queries retrieved "
                                         r"for at a time; None: all\)"):
        landmark_retrieval_attention(q, k, v, cache, block_size=4, top_k=1, q_tile=0)
    with pytest.raises(ValueError, match="s >= t"):
        landmark_retrieval_attention(q, k[:, :4], v[:, :4], cache, block_size=4, top_k=1)
    with pytest.raises(ValueError, match="whole blocks"):
        append_blocks(cache, k[:, :6], v[:, :6])
    with pytest.raises(ValueError, match="capacity"):
        empty_block_cache(1, 4, 2, 8, capacity=0)
    with pytest.raises(ValueError, match=r"must share a length that is a multiple of block_size=3"):
        landmark_decoded_attention(q, k, v, block_size=3, top_k=1)
    with pytest.raises(ValueError, match=r"top_k must be an int >= 1"):
        landmark_decoded_attention(q, k, v, block_size=4, top_k=0)
    with pytest.raises(ValueError, match="selection"):
        landmark_decoded_attention(q, k, v, block_size=4, top_k=1, selection="max")
    assert isinstance(append_blocks(cache, k, v), BlockCache)


# ------------------------------------------------------------------------------------------------ sharded step


def _mesh(**axes):
    return make_mesh(**axes, devices=jax.devices()[:int(np.prod(list(axes.values())))])


def _ring(n, layout, **options):
    return lambda q, k, v, **o: ring_attention(q, k, v, mesh=_mesh(context=n), layout=layout, **o, **options)


def _ulysses(n):
    return lambda q, k, v, **o: ulysses_attention(q, k, v, mesh=_mesh(context=n), **o)


def _usp(ring, group):
    return lambda q, k, v, **o: usp_attention(q, k, v, mesh=_mesh(context=ring, tensor=group), ring_axis="context",
                                              ulysses_axis="tensor", **o)


# (name, sharded call, length, heads, kv heads, block_size, packed)
STEP_CASES = [
    ("ring1", _ring(1, "zigzag"), 24, 2, 2, 4, True),  # the only step is the whole sequence
    ("ring4-zigzag-gqa-packed", _ring(4, "zigzag"), 64, 4, 2, 4, True),
    ("ring2-contiguous-mqa-tiles", _ring(2, "contiguous", block_q=8, block_kv=16, block_q_bwd=4, block_kv_bwd=8),
     32, 4, 1, 8, False),
    ("ring8-zigzag", _ring(8, "zigzag"), 48, 2, 1, 3, True),
    ("ulysses2-partial-last-block", _ulysses(2), 30, 4, 2, 8, True),  # 30 tokens: a last block of 6
    ("usp2x2-gqa-packed", _usp(2, 2), 64, 4, 2, 4, True),
]


@pytest.mark.parametrize("name,call,length,h,hk,L,packed", STEP_CASES, ids=[c[0] for c in STEP_CASES])
def test_the_sharded_step_matches_the_oracle_forward_and_gradients(name, call, length, h, hk, L, packed):
    q, k, v = _qkv(length, 2, length, length, h, hk)
    seg = _packed(length, 2, length, mean_doc=11) if packed else None
    want, want_grads = _value_and_grads(landmark_reference_attention, q, k, v, block_size=L, segment_ids=seg)
    got, got_grads = _value_and_grads(call, q, k, v, causal=True, segment_ids=seg, impl=landmark_step(L))
    _close(got, want, 1e-5)
    for got_g, want_g in zip(got_grads, want_grads):
        _close(got_g, want_g, 1e-5)


def test_the_sharded_step_returns_group_0s_lse_with_its_gradient():
    # lse0 through the ring (its cotangent enters the backward) against plain autodiff of the blockwise forward
    q, k, v = _qkv(5, 1, 32, 32, 2, 1)
    L, seg = 4, _packed(5, 1, 32, mean_doc=9)
    pos = jnp.arange(32, dtype=jnp.int32)

    def dense(q, k, v):
        return landmark_forward(q, k, v, pos, pos, seg, seg, block_size=L, scale=8**-0.5)

    def ring(q, k, v):
        return ring_attention(q, k, v, mesh=_mesh(context=4), causal=True, segment_ids=seg, impl=landmark_step(L),
                              return_lse=True)

    def loss(fn):
        out, lse = fn(q, k, v)
        return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.cos(jnp.where(jnp.isfinite(lse), lse, 0.0)))

    _close(ring(q, k, v)[1], dense(q, k, v)[1], 1e-5)
    for got, want in zip(jax.grad(lambda *a: loss(lambda *_: ring(*a)), (0, 1, 2))(q, k, v),
                         jax.grad(lambda *a: loss(lambda *_: dense(*a)), (0, 1, 2))(q, k, v)):
        _close(got, want, 1e-5)


def test_the_sharded_step_in_bfloat16_is_close_to_the_float32_oracle():
    q, k, v = _qkv(3, 2, 64, 64, 4, 2)
    seg = _packed(3, 2, 64)
    want = landmark_reference_attention(q, k, v, block_size=8, segment_ids=seg)
    low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    got = jax.jit(_ring(4, "zigzag"), static_argnames=("impl", "causal"))(
        *low, causal=True, segment_ids=seg, impl=landmark_step(8))
    assert got.dtype == jnp.bfloat16
    _close(got, want, 3e-2)


def test_the_sharded_step_refuses_what_would_cut_a_block_or_change_the_softmax():
    q, k, v = _qkv(0, 1, 48, 48, 2, 2)
    step = landmark_step(4)
    assert landmark_step(4) is step  # one object per block size: jitted callers do not retrace
    np.testing.assert_array_equal(attention(q, k, v, causal=True, impl=step), landmark_attention(q, k, v, block_size=4))
    with pytest.raises(ValueError, match="block_size must be an int >= 2"):
        landmark_step(1)
    with pytest.raises(ValueError, match=r"needs causal=True, window=None and softcap=None .* got causal=False"):
        _ring(2, "zigzag")(q, k, v, impl=step)
    with pytest.raises(ValueError, match="window=5"):
        _ring(2, "zigzag")(q, k, v, causal=True, window=5, impl=step)
    with pytest.raises(ValueError, match="softcap=2.0"):
        _ulysses(2)(q, k, v, causal=True, softcap=2.0, impl=step)
    with pytest.raises(ValueError, match="layout='striped' deals out one token per device"):
        _ring(2, "striped")(q, k, v, causal=True, impl=step)
    with pytest.raises(ValueError, match=r"got chunks of 6 keys \(2 per device, 4 devices, layout='zigzag'\); use a "
                                         r"sequence length that is a multiple of 32"):
        _ring(4, "zigzag")(q, k, v, causal=True, impl=step)
    with pytest.raises(ValueError, match="block_kv=6 must be a multiple of block_size=4"):
        _ring(2, "zigzag", block_kv=6)(q, k, v, causal=True, impl=step)
    with pytest.raises(ValueError, match="block_kv_bwd=2 must be a multiple of block_size=4"):
        _ring(2, "zigzag", block_kv_bwd=2)(q, k, v, causal=True, impl=step)
