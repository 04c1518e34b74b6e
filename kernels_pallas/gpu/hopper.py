"""The ``"mosaic_gpu"`` backend (H100/H200, sm_90): NOT yet a Mosaic GPU kernel.

Status, precisely: the TMA + wgmma (``jax.experimental.pallas.mosaic_gpu``)
flash kernel was not written in the session that built this package, because
no GPU was available to build or validate it. Until it exists, this backend
runs the portable Pallas kernels (``kernels_pallas.gpu.portable``, Triton on
GPU) for the forward, dQ and dK/dV, with the portable kernels' block rules, so
``backend="auto"`` on Hopper is correct (same code as every other GPU) but not
Hopper-tuned. Swapping in a real kernel only needs a ``forward``/``backward``
here with the portable signatures, plus running ``tests/kernels/test_gpu.py``
on an H100/H200.
"""

from kernels_pallas.gpu.portable import backward, forward

__all__ = ["backward", "forward"]
