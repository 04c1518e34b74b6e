"""The Mosaic TPU kernels under the TPU interpret mode (CPU) against the dense oracle.

This is the only check of the TPU kernels: no TPU can be reached from CI.
"""

import pytest

from tests.kernels.flash_case import run_flash_case as _run

CASES = {
    # Odd lengths over two 128-blocks, GQA, packed documents, causal (empty rows too).
    "causal_gqa_segments_odd": ((1, 150, 140, 4, 2, 16), dict(causal=True, segments=True)),
}
SLOW_CASES = {
    "window_softcap_mqa": ((1, 200, 200, 4, 1, 16), dict(causal=True, window=60, softcap=5.0)),
    "full_cross": ((2, 130, 260, 2, 2, 32), dict()),
    # Four 128-blocks, other documents in each row: first/last per batch row (tiles.by_segments).
    "causal_packed_rows": ((2, 512, 512, 2, 1, 16), dict(causal=True, segments="per_row")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_tpu_kernel_matches_reference(name):
    shape, options = CASES[name]
    _run(shape, options, (128, 128), backend="tpu")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_CASES))
def test_tpu_kernel_matches_reference_more(name):
    shape, options = SLOW_CASES[name]
    _run(shape, options, (128, 128), backend="tpu")
