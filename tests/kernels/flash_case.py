"""One case of the kernel test grids: ``flash_attention`` vs the oracle (see ``tests/oracle.py``)."""

import functools

import jax.numpy as jnp

from kernels_pallas import flash_attention
from tests.oracle import (KERNEL_F32, KERNEL_F32_GRAD, assert_matches_oracle, make_inputs, random_qkv,
                          three_documents)


def run_flash_case(shape, options, blocks, backend, dtype=jnp.float32, bound=KERNEL_F32,
                   grad_bound=KERNEL_F32_GRAD):
    """Compare ``flash_attention`` on ``shape = (b, q_len, kv_len, h, h_kv, d)`` with the oracle.

    ``blocks``: ``(block_q, block_kv)``, or with the backward's own ``(block_q_bwd, block_kv_bwd)`` after.

    ``options`` may hold ``segments=True`` (the same three packed documents in
    every row) or ``segments="per_row"`` (even rows four documents of random lengths,
    odd rows one: a kernel that read another row's block plan would drop blocks an
    odd row needs); the bounds are those of :func:`tests.oracle.assert_matches_oracle`.
    """
    b, q_len, kv_len, h, h_kv, d = shape
    q, k, v = random_qkv(0, b, q_len, kv_len, h, h_kv, d, dtype)
    options = dict(options)
    segments = options.pop("segments", False)
    if segments:
        n = max(q_len, kv_len)
        if segments == "per_row":
            segs = make_inputs(b, n, 1, 1, segments=True, seed=3)[3].at[1::2].set(0)
        else:
            segs = three_documents(b, n)
        options["segment_ids"] = segs[:, :q_len] if q_len == kv_len else (segs[:, :q_len], segs[:, :kv_len])
    bwd = dict(zip(("block_q_bwd", "block_kv_bwd"), blocks[2:]))
    attn = functools.partial(
        flash_attention, block_q=blocks[0], block_kv=blocks[1], **bwd, backend=backend,
        return_lse=True, **options,
    )
    assert_matches_oracle(attn, q, k, v, bound=bound, grad_bound=grad_bound, **options)
