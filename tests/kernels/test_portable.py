"""The portable Pallas kernels (interpret mode on CPU) against the dense oracle."""

import jax.numpy as jnp
import pytest

from tests.kernels.flash_case import run_flash_case as _run
from tests.oracle import KERNEL_BF16, KERNEL_BF16_GRAD

# (b, q_len, kv_len, h, h_kv, d), options, blocks
CASES = {
    # q_len > kv_len with bottom-right causal: the first 16 queries see no key.
    "causal_gqa_odd_empty_rows": ((2, 53, 37, 4, 2, 16), dict(causal=True), (16, 16)),
    "mqa_segments": ((1, 45, 45, 4, 1, 16), dict(segments=True), (16, 32)),
    "window_softcap_causal": ((1, 40, 40, 2, 2, 8), dict(causal=True, window=9, softcap=3.0), (16, 16)),
}
SLOW_CASES = {
    "full_gqa_scale": ((2, 33, 70, 6, 2, 32), dict(scale=0.3), (32, 16)),
    "window_only_segments": ((2, 64, 64, 4, 2, 16), dict(window=5, segments=True), (16, 16)),
    "causal_segments_gqa": ((1, 70, 70, 8, 2, 16), dict(causal=True, segments=True), (32, 32)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_portable_matches_reference(name):
    _run(*CASES[name], backend="gpu_portable")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_CASES))
def test_portable_matches_reference_more(name):
    _run(*SLOW_CASES[name], backend="gpu_portable")


@pytest.mark.slow
def test_portable_bf16():
    _run((1, 48, 48, 4, 2, 16), dict(causal=True), (16, 16), "gpu_portable", jnp.bfloat16,
         bound=KERNEL_BF16, grad_bound=KERNEL_BF16_GRAD)
