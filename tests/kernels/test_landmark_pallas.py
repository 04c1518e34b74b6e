"""The fused landmark forward (Pallas, interpreted on CPU) against the dense grouped-softmax oracle."""

import numpy as np
import pytest

from kernels_pallas.landmark import landmark_flash_attention
from lca.attention.landmark import landmark_reference_attention
from tests.attention.landmark_checks import packed, qkv, value_and_grads


@pytest.mark.parametrize(
    "b,q_len,kv_len,h,hk,L,segmented",
    [(1, 16, 16, 2, 1, 4, False), (2, 21, 21, 4, 2, 4, True), (1, 6, 18, 2, 2, 8, False)],
)
def test_kernel_matches_oracle_forward_and_gradients(b, q_len, kv_len, h, hk, L, segmented):
    q, k, v = qkv(q_len, b, q_len, kv_len, h, hk)
    options = dict(block_size=L)
    if segmented:
        options["segment_ids"] = packed(0, b, kv_len)
    want, want_grads = value_and_grads(landmark_reference_attention, q, k, v, **options)
    got, grads = value_and_grads(landmark_flash_attention, q, k, v, block_q=8, **options)
    np.testing.assert_allclose(got, want, atol=1e-5)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(g, w, atol=1e-5)


def test_kernel_errors_name_the_argument():
    q, k, v = qkv(0, 1, 8, 8, 2, 2)
    with pytest.raises(ValueError, match="block_size"):
        landmark_flash_attention(q, k, v, block_size=1)
    with pytest.raises(ValueError, match="block_q"):
        landmark_flash_attention(q, k, v, block_size=4, block_q=0)
    with pytest.raises(ValueError, match="causal"):
        landmark_flash_attention(q, k, v, block_size=4, causal=False)
