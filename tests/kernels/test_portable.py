"""The portable Pallas kernels (interpret mode on CPU) against the dense oracle, and their Triton lowering."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import api, block_math, tiles
from lca.attention import inputs
from lca.attention.blocks import BlockSizes
from lca.attention.logits import LogitOptions
from lca.attention.mask import Mask, default_positions
from lca.attention.tiling import Tiling
from tests.kernels.flash_case import run_flash_case as _run
from tests.oracle import KERNEL_BF16, KERNEL_BF16_GRAD, three_documents

# (b, q_len, kv_len, h, h_kv, d), options, blocks
CASES = {
    # q_len > kv_len with bottom-right causal: the first 16 queries see no key.
    "causal_gqa_odd_empty_rows": ((2, 53, 37, 4, 2, 16), dict(causal=True), (16, 16)),
    "mqa_segments": ((1, 45, 45, 4, 1, 16), dict(segments=True), (16, 32)),
    "window_softcap_causal": ((1, 40, 40, 2, 2, 8), dict(causal=True, window=9, softcap=3.0), (16, 16)),
    # Four packed documents over 8 blocks, other ones per row: query blocks skip other documents'
    # key blocks, and blocks of one document go unmasked (tiles.by_segments, per batch row).
    "causal_packed_rows": ((2, 128, 128, 2, 1, 8), dict(causal=True, segments="per_row"), (16, 16)),
    # The backward tiled unlike the forward (flash_attention's block_q_bwd, block_kv_bwd).
    "own_backward_blocks": ((1, 45, 60, 4, 2, 16), dict(causal=True, segments=True), (16, 32, 32, 16)),
}
SLOW_CASES = {
    "full_gqa_scale": ((2, 33, 70, 6, 2, 32), dict(scale=0.3), (32, 16)),
    "window_only_segments": ((2, 64, 64, 4, 2, 16), dict(window=5, segments=True), (16, 16)),
    "causal_segments_gqa": ((1, 70, 70, 8, 2, 16), dict(causal=True, segments=True), (32, 32)),
}
# Cases where the loops' split around the blocks seen whole matters: each has such blocks
# and masked visible ones on their sides (pinned by test_plan_runs_are_exactly_the_blocks_seen_whole).
# The default suite runs one (interpret mode is slow); causal_gqa_odd_empty_rows above has
# both kinds of block too.
SPLIT_CASES = {
    # A window crossing block boundaries: masked window edge, unmasked middle, masked diagonal;
    # q and kv padded (75 = 4 x 16 + 11).
    "window_edges_padding": ((1, 75, 75, 2, 1, 8), dict(causal=True, window=40), (16, 16)),
}
SLOW_SPLIT_CASES = {
    # Bottom-right causal with q_len < kv_len, kv_len not a multiple of the key block.
    "cross_causal_kv_padding": ((1, 24, 53, 2, 1, 8), dict(causal=True), (8, 16)),
    # No mask at all: every block unmasked except the partial last key block.
    "full_kv_padding": ((1, 16, 40, 2, 2, 8), dict(), (16, 16)),
    # A two-sided window (not causal): masked edges on both sides of an unmasked run, softcap.
    "window_two_sided_softcap": ((1, 64, 64, 2, 1, 8), dict(window=30, softcap=2.0), (8, 8)),
}


ALL_SPLIT_CASES = {**SPLIT_CASES, **SLOW_SPLIT_CASES}


@pytest.mark.parametrize("name", list(CASES) + list(SPLIT_CASES))
def test_portable_matches_reference(name):
    _run(*{**CASES, **SPLIT_CASES}[name], backend="gpu_portable")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_CASES) + list(SLOW_SPLIT_CASES))
def test_portable_matches_reference_more(name):
    _run(*{**SLOW_CASES, **SLOW_SPLIT_CASES}[name], backend="gpu_portable")


@pytest.mark.slow
def test_portable_bf16():
    _run((1, 48, 48, 4, 2, 16), dict(causal=True), (16, 16), "gpu_portable", jnp.bfloat16,
         bound=KERNEL_BF16, grad_bound=KERNEL_BF16_GRAD)


# --- the block plan's runs of blocks seen whole (the loops' unmasked part) --------------


_plan = jax.jit(tiles.plan, static_argnums=(2, 3))


def _case_plan(shape, options, blocks):
    """``(tiling, mask, plan)`` of a case, the plan's arrays as NumPy."""
    _, q_len, kv_len, *_ = shape
    tiling = Tiling(q_len, kv_len, *blocks)
    mask = inputs.make_mask(options.get("causal", False), options.get("window"))
    plan = _plan(*default_positions(q_len, kv_len), tiling, mask)
    return tiling, mask, tiles.BlockPlan(*map(np.asarray, plan))


def _seen_whole(tiling: Tiling, mask: Mask):
    """``[nq, nk]`` bool by brute force: every real query of the block sees every key of the block."""
    q_pos, kv_pos = np.arange(tiling.q_len) + tiling.kv_len - tiling.q_len, np.arange(tiling.kv_len)
    diff = q_pos[:, None] - kv_pos[None, :]
    seen = np.ones(diff.shape, bool)
    if mask.causal:
        seen &= diff >= 0
    if mask.window is not None:
        seen &= np.abs(diff) < mask.window
    padded = np.zeros((tiling.q_padded, tiling.kv_padded), bool)  # padding keys: never seen
    padded[:tiling.q_len, :tiling.kv_len] = seen
    padded[tiling.q_len:] = True  # padded queries are dropped: they do not decide
    blocks = padded.reshape(tiling.num_q, tiling.block_q, tiling.num_kv, tiling.block_kv)
    return blocks.all(axis=(1, 3))


def _run_of(row, last):
    """``(lo, hi)`` of the one run of True in ``row`` (contiguous positions have one), else (last+1, last)."""
    idx = np.flatnonzero(row)
    if not len(idx):
        return last + 1, last
    assert (np.diff(idx) == 1).all(), row
    return idx[0], idx[-1]


@pytest.mark.parametrize("name", list(ALL_SPLIT_CASES))
def test_plan_runs_are_exactly_the_blocks_seen_whole(name):
    """The unmasked runs hold every block seen whole and nothing else; the cases have masked blocks too."""
    tiling, mask, plan = _case_plan(*ALL_SPLIT_CASES[name])
    whole = _seen_whole(tiling, mask)
    for i in range(tiling.num_q):
        assert (plan.kv_full_lo[i], plan.kv_full_hi[i]) == _run_of(whole[i], plan.kv_last[i]), (i, whole[i])
    for j in range(tiling.num_kv):
        assert (plan.q_full_lo[j], plan.q_full_hi[j]) == _run_of(whole[:, j], plan.q_last[j]), (j, whole[:, j])
    # Else the kernel cases above would not run both loop bodies.
    assert whole.any() and (plan.vis.astype(bool) & ~whole).any()


def test_only_the_first_run_of_blocks_seen_whole_is_unmasked():
    """Zigzag keys (0-15, 100-115, 16-31) under causal: blocks 0 and 2 are whole, 1 is hidden."""
    tiling = Tiling(16, 48, 16, 16)
    q_pos = jnp.arange(40, 56, dtype=jnp.int32)
    kv_pos = jnp.concatenate([jnp.arange(16), jnp.arange(100, 116), jnp.arange(16, 32)]).astype(jnp.int32)
    plan = _plan(q_pos, kv_pos, tiling, Mask(causal=True))
    assert np.asarray(plan.vis).tolist() == [[1, 0, 1]]
    assert (int(plan.kv_full_lo[0]), int(plan.kv_full_hi[0])) == (0, 0)  # block 2 goes masked


def test_segment_plan_visits_only_the_row_documents_blocks():
    """Per batch row, by brute force: every block pair that shares a visible (query, key) pair is
    visited, blocks of other documents are not, and the unmasked runs hold only blocks seen whole."""
    n, blk = 128, 16
    tiling = Tiling(n, n, blk, blk)
    mask = Mask(causal=True)
    plan = _plan(*default_positions(n, n), tiling, mask)
    # Row 0: three packed documents; row 1: ids 0, 1, 0 (a document coming back: ranges only
    # narrow conservatively); row 2: one document (nothing to narrow).
    back = jnp.where((jnp.arange(n) >= 40) & (jnp.arange(n) < 90), 1, 0)
    segs = jnp.stack([three_documents(1, n)[0], back, jnp.zeros(n, jnp.int32)]).astype(jnp.int32)
    rows = tiles.BlockPlan(*map(np.asarray, tiles.by_segments(plan, segs, segs, tiling)))
    q_pos, kv_pos = map(np.asarray, default_positions(n, n))
    seg = np.asarray(segs)
    dense = (q_pos[:, None] >= kv_pos[None, :])[None] & (seg[:, :, None] == seg[:, None, :])
    tiles_ = dense.reshape(3, tiling.num_q, blk, tiling.num_kv, blk)
    shares, whole = tiles_.any(axis=(2, 4)), tiles_.all(axis=(2, 4))
    for b in range(3):
        for own, n_own, first, last, lo, hi, vis in (
            ("query", tiling.num_q, rows.kv_first, rows.kv_last, rows.kv_full_lo, rows.kv_full_hi, rows.vis[b]),
            ("key", tiling.num_kv, rows.q_first, rows.q_last, rows.q_full_lo, rows.q_full_hi, rows.vis[b].T),
        ):
            for i in range(n_own):
                seen = np.flatnonzero(shares[b, i] if own == "query" else shares[b, :, i])
                assert ((seen >= first[b, i]) & (seen <= last[b, i])).all(), (b, own, i)
                assert vis[i, seen].all(), (b, own, i)
                run = np.arange(lo[b, i], hi[b, i] + 1)
                assert (whole[b, i, run] if own == "query" else whole[b, run, i]).all(), (b, own, i)
    positional = np.asarray(plan.vis).sum()
    assert rows.vis[0].sum() < positional and rows.vis[2].sum() == positional
    assert (rows.kv_full_hi[0] >= rows.kv_full_lo[0]).any()  # some blocks of one document go unmasked
    assert rows.vis[1].sum() <= positional


# --- base-2 softmax -------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(5, 6))
def _dense_and_tiled(q, k, v, do, ok, scale, softcap):
    """The dense softmax's (out, lse, p) and base-2 tiles' (out, lse, p, ds), natural tiles' ds."""
    logit = LogitOptions(scale, softcap)
    s = jnp.where(ok, logit.apply(q @ k.T), -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=1, keepdims=True)
    p = jnp.where(ok, jnp.exp(s - jnp.where(ok.any(1, keepdims=True), lse, 0.0)), 0.0)
    delta = jnp.sum(do * (p @ v), axis=1, keepdims=True)
    dense = (p @ v, lse, p)

    bq, d = q.shape
    carry = (jnp.full((bq, 1), -jnp.inf), jnp.zeros((bq, 1)), jnp.zeros((bq, d)))
    half = k.shape[0] // 2
    for keys in (slice(0, half), slice(half, None)):  # two key tiles through the online softmax
        s2, _ = block_math.logits(q, k[keys], logit, ok[:, keys], base2=True)
        carry = block_math.online_softmax_step(*carry, s2, v[keys], base2=True)
    out2, lse2 = block_math.finalize(*carry, base2=True)
    lse0 = jnp.where(jnp.isfinite(lse2), lse2, 0.0)
    p2, ds2 = block_math.probs_and_dlogits(q, k, v, do, lse0 * block_math.LOG2E, delta, logit, ok, base2=True)
    _, ds = block_math.probs_and_dlogits(q, k, v, do, lse0, delta, logit, ok)
    return dense, (out2, lse2, p2, ds2), ds


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_base2_softmax_gives_the_natural_out_lse_and_gradients(softcap):
    """exp2 with log2(e) folded in, lse back in natural units: the dense softmax's numbers."""
    rng = np.random.default_rng(0)
    q, k, v, do = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in [(8, 16), (32, 16), (32, 16), (8, 16)])
    ok = jnp.asarray(rng.random((8, 32)) < 0.7).at[3].set(False)  # row 3 sees no key
    (want_out, want_lse, want_p), (out, lse, p, ds2), ds = _dense_and_tiled(q, k, v, do, ok, 0.4, softcap)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
    finite = np.isfinite(want_lse)
    np.testing.assert_array_equal(np.isfinite(lse), finite)
    np.testing.assert_allclose(lse[finite], want_lse[finite], rtol=1e-6)
    np.testing.assert_allclose(p, want_p, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ds2, ds, rtol=1e-5, atol=1e-6)


# --- lowering for a GPU from the CPU ----------------------------------------------------------


def _lowered(cfg, b, q_len, kv_len, h, h_kv, d, segmented):
    """StableHLO text of the bf16 forward and backward (interpret off) lowered for CUDA."""
    q = jax.ShapeDtypeStruct((b, q_len, h, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, kv_len, h_kv, d), jnp.bfloat16)
    q_pos, kv_pos = (jax.ShapeDtypeStruct((n,), jnp.int32) for n in (q_len, kv_len))
    segs = [jax.ShapeDtypeStruct((b, n), jnp.int32) for n in (q_len, kv_len)] if segmented else []

    def fwd_bwd(q, k, v, q_pos, kv_pos, *segs):
        segs = segs or (None, None)
        out, lse = api.kernel_forward(q, k, v, q_pos, kv_pos, *segs, cfg=cfg, out_dtype=q.dtype)
        return api.kernel_backward(q, k, v, q_pos, kv_pos, *segs, out, lse, out, lse, cfg=cfg)

    return jax.jit(fwd_bwd).trace(q, kv, kv, q_pos, kv_pos, *segs).lower(lowering_platforms=("cuda",)).as_text()


def _triton_calls(text):
    """``{kernel name: ((grid_x, grid_y, grid_z), num_warps)}`` of the Triton custom calls in ``text``."""
    calls = {}
    for line in text.splitlines():
        if "xla.gpu.triton" not in line:
            continue
        config = re.sub(r'ir = "[^"]*"', "", line)  # the serialized kernel
        field = lambda key: re.search(key + r' = "?(\w+)', config).group(1)  # noqa: E731
        calls[field("name")] = (tuple(int(field(f"grid_{a}")) for a in "xyz"), int(field("num_warps")))
    return calls


@pytest.mark.parametrize("segmented", [False, True])
def test_lowers_to_triton_with_the_block_axis_first(segmented):
    """The three kernels pass the Pallas -> Triton lowering for CUDA, grids ``(own blocks, heads, b)``.

    The own block on ``grid_x`` (launched fastest) is what lets neighbouring programs share K/V in L2.
    """
    b, q_len, kv_len, h, h_kv, d = 2, 200, 300, 4, 2, 64
    cfg = api.KernelConfig(inputs.make_mask(True, 120), inputs.logit_options(d, None, 30.0),
                           BlockSizes(64, 32, 32, 64), "gpu_portable", False, 4, 8)
    calls = _triton_calls(_lowered(cfg, b, q_len, kv_len, h, h_kv, d, segmented))
    assert calls == {
        "lca_flash_fwd_portable": ((4, h, b), 4),  # 200 queries / 64
        "lca_flash_dq_portable": ((7, h, b), 8),  # 200 queries / 32 (the backward's own blocks)
        "lca_flash_dkdv_portable": ((5, h_kv, b), 8),  # 300 keys / 64
    }
