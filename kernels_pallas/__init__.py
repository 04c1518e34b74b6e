"""lca's fused Pallas attention kernels (GPU portable/Triton, Mosaic GPU Hopper, Mosaic TPU).

``flash_attention(q [b, q_len, h, d], k, v [b, kv_len, h_kv, d], ...)`` has the
semantics of :func:`lca.attention.reference_attention`; see ``kernels_pallas.api``
for the backends and where each runs.

Block sizes are :class:`lca.attention.BlockSizes`, shared with every backend.
"""

from kernels_pallas.api import default_backend, flash_attention

__all__ = ["default_backend", "flash_attention"]
