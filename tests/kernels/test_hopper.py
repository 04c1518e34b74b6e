"""The Mosaic GPU (Hopper) kernels on CPU: Mosaic GPU interpret mode vs the oracle, and CUDA lowering.

No H100/H200 backs this file. Two checks stand in for one:

* ``InterpretGPUParams`` runs the kernels' warpgroups as threads, their TMA
  copies, barriers, wgmma and register math on CPU, simulating SMEM: out, lse
  and dq/dk/dv (the Mosaic GPU forward and backward) against ``reference_attention``;
* lowering the kernels for ``cuda`` on CPU runs the Pallas -> Mosaic GPU
  lowering (layouts, TMA shapes and alignment), without compiling to PTX.

The interpret mode compiles each warpgroup's program per grid point, so one
small case runs by default and the grid runs under ``-m slow``.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import api
from kernels_pallas import tiles
from kernels_pallas.gpu import hopper
from lca.attention.blocks import BlockSizes
from lca.attention import inputs, reference_attention
from lca.attention.tiling import Tiling
from tests.kernels.flash_case import run_flash_case
from tests.oracle import KERNEL_BF16, KERNEL_BF16_GRAD, random_qkv, three_documents

# (b, q_len, kv_len, h, h_kv, d), options; blocks (64, 64): two or more key blocks each.
# The interpret mode recompiles each warpgroup's program per grid point, so the
# default case is one program pair per head: query blocks 64..127 and 128..191
# see key block 0 whole (interior), their diagonal blocks masked (edge), and key
# block 2 only from the second query block (hidden for the first consumer).
CASES = {
    "causal_interior_edge_hidden": ((1, 128, 192, 1, 1, 64), dict(causal=True)),
    # Every option at once on an odd length, so CI's default run checks them all (about a minute).
    "mqa_segments_window_softcap": ((1, 130, 130, 2, 1, 64), dict(causal=True, window=50, segments=True, softcap=4.0)),
}
SLOW_CASES = {
    # q_len > kv_len, bottom-right causal: the first 36 queries see no key (out 0, lse -inf).
    "causal_gqa_odd_empty_rows": ((1, 136, 100, 4, 2, 64), dict(causal=True)),
    "full_cross_scale": ((2, 70, 200, 2, 2, 64), dict(scale=0.2)),
    "window_only_gqa": ((1, 192, 192, 4, 2, 64), dict(window=40)),
    "segments_d128": ((1, 100, 100, 2, 1, 128), dict(segments=True)),
    # Block lists and codes per batch row: other documents' blocks are never fetched.
    "causal_packed_rows": ((2, 256, 256, 2, 1, 64), dict(causal=True, segments="per_row")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_mosaic_gpu_matches_reference(name):
    run_flash_case(*CASES[name], (64, 64), backend="mosaic_gpu")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_CASES))
def test_mosaic_gpu_matches_reference_more(name):
    run_flash_case(*SLOW_CASES[name], (64, 64), backend="mosaic_gpu")


@pytest.mark.slow
def test_mosaic_gpu_bf16():
    run_flash_case((1, 128, 128, 2, 1, 64), dict(causal=True), (64, 64), "mosaic_gpu",
                   jnp.bfloat16, bound=KERNEL_BF16, grad_bound=KERNEL_BF16_GRAD)


def _config(mask, d, blocks=(64, 64), softcap=None, interpret=True):
    return api.KernelConfig(mask, inputs.logit_options(d, None, softcap), BlockSizes(*blocks),
                            "mosaic_gpu", interpret)


@pytest.mark.slow
def test_zigzag_positions_and_key_offset():
    """Ring-step use: a query chunk at a global offset, keys in three runs, segments, softcap."""
    b, q_len, kv_len, h, h_kv, d = 1, 64, 192, 2, 1, 64
    q, k, v = random_qkv(5, b, q_len, kv_len, h, h_kv, d)
    q_pos = jnp.arange(q_len, dtype=jnp.int32) + 200
    kv_pos = jnp.concatenate([jnp.arange(64), jnp.arange(64, 128) + 1000, jnp.arange(170, 234)])
    kv_pos = kv_pos.astype(jnp.int32)  # the middle key block is in the future: never fetched
    segs = three_documents(b, 256)
    q_seg, kv_seg = segs[:, :q_len], segs[:, 40:40 + kv_len]
    mask = inputs.make_mask(True, 150)
    out, lse = jax.jit(lambda *a: api.kernel_forward(*a, cfg=_config(mask, d, softcap=5.0)))(
        q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    ref_out, ref_lse = reference_attention(
        q, k, v, causal=True, window=150, softcap=5.0, return_lse=True, q_positions=q_pos,
        kv_positions=kv_pos, segment_ids=(q_seg, kv_seg),
    )
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
    finite = np.isfinite(ref_lse)
    np.testing.assert_array_equal(np.isfinite(lse), finite)
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite], atol=2e-5)


def _lowered(fn, shape, segmented=False):
    """The text of ``fn(q, k, v, q_pos, kv_pos, q_seg, kv_seg)`` lowered for CUDA on bf16 shapes."""
    b, q_len, kv_len, h, h_kv, d = shape
    q = jax.ShapeDtypeStruct((b, q_len, h, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, kv_len, h_kv, d), jnp.bfloat16)
    q_pos, kv_pos = (jax.ShapeDtypeStruct((n,), jnp.int32) for n in (q_len, kv_len))
    q_seg, kv_seg = ((jax.ShapeDtypeStruct((b, n), jnp.int32) for n in (q_len, kv_len))
                     if segmented else (None, None))
    return jax.jit(fn).trace(q, kv, kv, q_pos, kv_pos, q_seg, kv_seg).lower(
        lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize(
    "shape, blocks, causal, window, softcap, segmented",
    [
        ((1, 256, 256, 4, 2, 64), (64, 128), True, None, None, False),
        ((2, 200, 300, 2, 1, 128), (64, 64), False, 90, 30.0, True),
        # Bug 2 of issue 15: schedule rows of 300 key blocks go to SMEM in TMA pieces of <= 256.
        ((1, 64, 300 * 64, 1, 1, 64), (64, 64), False, None, None, False),
        # 128k keys in 64-key blocks: 2049-entry schedule rows.
        ((1, 128, 128 * 1024, 2, 1, 64), (64, 64), True, None, None, False),
        # 128k causal self-attention at head_dim 128 on the default tiles, packed documents.
        ((1, 128 * 1024, 128 * 1024, 6, 2, 128), (64, 128), True, None, None, True),
    ],
)
def test_lowers_to_mosaic_gpu(shape, blocks, causal, window, softcap, segmented):
    """The bf16 forward (interpret=False) passes the Pallas -> Mosaic GPU lowering for CUDA."""
    cfg = _config(inputs.make_mask(causal, window), shape[-1], blocks, softcap, interpret=False)
    text = _lowered(lambda *a: api.kernel_forward(*a, cfg=cfg, out_dtype=jnp.bfloat16), shape, segmented)
    assert "mosaic_gpu" in text


def test_float32_output_lowers_and_too_wide_is_a_clear_error():
    """Ring steps ask for a float32 out: one extra tile, or a ValueError naming the fix, not a crash."""
    def lower(d, blocks):
        cfg = _config(inputs.make_mask(True, None), d, blocks, None, interpret=False)
        return _lowered(lambda *a: api.kernel_forward(*a, cfg=cfg), (1, 256, 1024, 2, 1, d))  # float32 out

    assert "mosaic_gpu" in lower(128, (64, 64))
    assert "mosaic_gpu" in lower(128, (64, 128))  # the default tiles: P is not in SMEM on hardware
    with pytest.raises(ValueError, match="bytes of shared memory .* float32 output .* use block_kv=64"):
        lower(128, (128, 128))


@pytest.mark.parametrize("segmented", [False, True])
@pytest.mark.parametrize("kernel", ["forward_and_dq", "dkdv"])
def test_pair_schedule_codes_match_the_element_mask(segmented, kernel):
    """HIDDEN / EDGE / INTERIOR per (owned block, listed block) agree with the dense mask.

    ``forward_and_dq``: programs own two query blocks and stream key blocks in order;
    ``dkdv``: programs own two key blocks and stream query blocks last first.
    """
    q_len, kv_len, bq, bk = 300, 250, 64, 64
    mask = inputs.make_mask(True, 150)
    tiling = Tiling(q_len, kv_len, bq, bk)
    q_pos = jnp.arange(q_len, dtype=jnp.int32) + 10
    kv_pos = jnp.arange(kv_len, dtype=jnp.int32) + 60
    plan = tiles.plan(q_pos, kv_pos, tiling, mask)
    # Row 0: two documents split at token 200; row 1: one document (interior blocks exist).
    segs = jnp.stack([(jnp.arange(400) >= 200), jnp.zeros(400, bool)]).astype(jnp.int32)
    q_seg, kv_seg = (segs[:, :q_len], segs[:, :kv_len]) if segmented else (None, None)
    q_seg, kv_seg = tiles.pad_segments(q_seg, kv_seg, tiling)
    dense = np.asarray(mask.visible(plan.q_pos, plan.kv_pos))[None]  # [1, Tq, Tk]
    dense = dense & (np.arange(tiling.kv_padded) < kv_len)[None, None]
    if segmented:
        dense = dense & (np.asarray(q_seg)[:, :, None] == np.asarray(kv_seg)[:, None, :])
    if kernel == "forward_and_dq":
        lists, codes = hopper.pair_schedule(plan, tiling, mask, q_seg, kv_seg)
        owned, own_block, streamed = tiling.num_q, bq, bk
    else:
        code = hopper.tile_codes(plan, tiling, mask, q_seg, kv_seg)
        lists, codes = hopper.pair_rows(jnp.swapaxes(code, 1, 2), reverse=True)
        dense = np.swapaxes(dense, 1, 2)
        owned, own_block, streamed = tiling.num_kv, bk, bq
    lists, codes = np.asarray(lists), np.asarray(codes)
    assert codes.shape[1] == 2 * lists.shape[1] >= owned and lists.shape[0] == codes.shape[0]
    seen_kinds, leads = set(), []
    for bi in range(codes.shape[0]):
        for i in range(owned):  # an odd count's last program pairs with an all-hidden block
            count = lists[bi, i // 2, 0]
            listed = lists[bi, i // 2, 1:1 + count]
            order = listed if kernel == "forward_and_dq" else listed[::-1]
            assert (np.diff(order) > 0).all()
            assert (codes[bi, i, 1 + count:] == hopper.HIDDEN).all()
            # the interior prefix the kernel runs without a switch
            lead = codes[bi, i, 0]
            assert (codes[bi, i, 1:1 + lead] == hopper.INTERIOR).all()
            assert lead == count or codes[bi, i, 1 + lead] != hopper.INTERIOR
            leads.append(int(lead))
            for t, j in enumerate(listed):
                tile = dense[min(bi, dense.shape[0] - 1), i * own_block:(i + 1) * own_block,
                             j * streamed:(j + 1) * streamed]
                code = codes[bi, i, 1 + t]
                seen_kinds.add(int(code))
                if code == hopper.INTERIOR:
                    assert tile.all()
                elif code == hopper.HIDDEN:
                    assert not tile.any()
            # every block the owned block sees is listed for its program
            hidden = np.setdiff1d(np.arange(dense.shape[2] // streamed), listed)
            for j in hidden:
                tile = dense[min(bi, dense.shape[0] - 1), i * own_block:(i + 1) * own_block,
                             j * streamed:(j + 1) * streamed]
                assert not tile.any()
    assert seen_kinds == {hopper.HIDDEN, hopper.EDGE, hopper.INTERIOR}
    assert max(leads) > 0  # some owned block starts with interior blocks
    if segmented:  # the row of two documents never fetches blocks of the other document
        assert lists[0, :, 0].sum() < lists[1, :, 0].sum()


def _lowered_backward(shape, blocks=(64, 64), segmented=False, softcap=None):
    b, q_len, _, h, _, d = shape
    cfg = _config(inputs.make_mask(True, None), d, (64, 64), softcap, interpret=False)
    cfg = api.KernelConfig(cfg.mask, cfg.logit, BlockSizes(64, 64, *blocks), "mosaic_gpu", False)
    out = jnp.zeros((b, q_len, h, d), jnp.bfloat16)
    lse = jnp.zeros((b, h, q_len), jnp.float32)
    return _lowered(lambda *a: api.kernel_backward(*a, out, lse, out, cfg=cfg), shape, segmented)


@pytest.mark.parametrize(
    "shape, segmented, softcap",
    [
        ((1, 200, 256, 2, 1, 64), True, 30.0),
        ((1, 300 * 64, 256, 2, 1, 64), False, None),  # 300 query blocks per key block's list
        ((1, 128, 128 * 1024, 2, 1, 128), False, None),  # 128k keys: 2049-entry schedule rows in dQ
        ((1, 128 * 1024, 128 * 1024, 6, 2, 128), True, None),  # 128k packed self-attention, both kernels long
    ],
)
def test_backward_lowers_to_mosaic_gpu(shape, segmented, softcap):
    """dQ and dK/dV (bf16, interpret=False) pass the Mosaic GPU lowering, transposed operands as SMEM views."""
    text = _lowered_backward(shape, segmented=segmented, softcap=softcap)
    assert text.count("mosaic_gpu") >= 2  # the dQ and the dK/dV kernels
    # On hardware K^T, V^T, Q^T, dO^T are transpose_ref views: no operand is transposed in HBM.
    assert not re.search(r"stablehlo\.transpose .*(bf16|f32)", text)


def test_forward_reads_k_transposed_in_smem_not_hbm():
    cfg = _config(inputs.make_mask(True, None), 64, (64, 64), None, interpret=False)
    text = _lowered(lambda *a: api.kernel_forward(*a, cfg=cfg, out_dtype=jnp.bfloat16), (1, 256, 256, 2, 1, 64))
    assert "mosaic_gpu" in text and "stablehlo.transpose" not in text


def test_backward_smem_beyond_an_sm_is_a_clear_error():
    """Schedule rows grow with the streamed length: past an SM's SMEM a ValueError names the kernel and the bytes."""
    with pytest.raises(ValueError, match=r"mosaic_gpu dQ kernel needs \d+ bytes of shared memory .* 6016 schedule"):
        _lowered_backward((1, 64, 6000 * 64, 1, 1, 128))


def test_backward_blocks_are_its_own_and_checked():
    """The Mosaic GPU backward takes (64, 64) unless told, whatever the forward's tiles; bad sizes are clear."""
    def plan(blocks, d=128):
        return api.resolve_config(d, 1024, 1024, mask=inputs.make_mask(True, None),
                                  logit=inputs.logit_options(d, None, None), blocks=blocks,
                                  backend="mosaic_gpu", dtype=jnp.bfloat16).blocks

    assert plan(BlockSizes(64, 128)) == BlockSizes(64, 128, 64, 64)
    assert plan(BlockSizes(64, 128, 128, 64), d=64) == BlockSizes(64, 128, 128, 64)
    with pytest.raises(ValueError, match="block_q_bwd=32 is not valid for the mosaic_gpu backward"):
        plan(BlockSizes(64, 128, 32, 64))
    with pytest.raises(ValueError, match=r"block_q_bwd=128, block_kv_bwd=128 need an estimated \d+ bytes"):
        plan(BlockSizes(64, 128, 128, 128))



def _default_blocks(shape, device_kind):
    b, q_len, kv_len, h, h_kv, d = shape
    cfg = api.resolve_config(d, q_len, kv_len, mask=inputs.make_mask(True, None),
                             logit=inputs.logit_options(d, None, None), backend="mosaic_gpu",
                             dtype=jnp.bfloat16, device_kind=device_kind)
    return cfg.blocks


# The blocks the backend picks on an H100 at head_dim 128 (an interpret-mode run of them
# needs tests/conftest.py's XLA flag on a 2-core machine).
DEFAULT_BLOCK_CASES = {
    "causal_padded_keys": ((1, 128, 200, 1, 1, 128), dict(causal=True)),
    "packed_rows_gqa": pytest.param((2, 256, 256, 2, 1, 128), dict(segments="per_row"), marks=pytest.mark.slow),
    "window_softcap_segments": pytest.param((1, 200, 200, 2, 1, 128),
                                            dict(causal=True, window=90, segments=True, softcap=5.0),
                                            marks=pytest.mark.slow),
    # q_len > kv_len: the first rows see no key (out 0, lse -inf) in a 128-key tile.
    "empty_rows": pytest.param((1, 200, 130, 2, 2, 128), dict(causal=True), marks=pytest.mark.slow),
}


@pytest.mark.parametrize("shape, options", list(DEFAULT_BLOCK_CASES.values()), ids=list(DEFAULT_BLOCK_CASES))
def test_mosaic_gpu_default_blocks(shape, options):
    """Forward (64, 128) tiles, backward its own (64, 64): the hardware defaults, not only 64 x 64."""
    for device_kind in (None, "NVIDIA H100 80GB HBM3"):  # this run's, and an H100's
        assert _default_blocks(shape, device_kind) == BlockSizes(64, 128, 64, 64)
    run_flash_case(shape, options, (None, None), backend="mosaic_gpu")


def test_interpret_mode_warns_when_it_may_hang(monkeypatch):
    """Without the scheduler flag (tests/conftest.py sets it) the user is told how to avoid a hang."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    hopper._warn_if_the_interpret_mode_may_hang.cache_clear()
    with pytest.warns(RuntimeWarning, match="xla_cpu_enable_concurrency_optimized_scheduler=false"):
        hopper.kernel_options(interpret=True)
    hopper._warn_if_the_interpret_mode_may_hang.cache_clear()
