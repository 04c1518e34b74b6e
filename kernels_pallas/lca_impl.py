"""The Pallas kernels as lca's ``"pallas"`` local attention implementation.

``PALLAS`` is the object that the catalogue ``lca.attention.impl.IMPLS`` points
at (importing this module registers nothing): ``get_impl("pallas")`` returns
``LocalImpl("pallas", flash_attention, forward, backward, default_blocks=None)`` with

    forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, mask, logit, blocks)
        -> (out [b, q_len, h, d] float32, lse [b, h, q_len] float32)
    backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, dlse, *, mask, logit, blocks)
        -> (dq, dk, dv) float32

so ring/Ulysses/USP steps run the fused kernels on a chunk anywhere in the global
sequence (positions decide the mask). The backend is the one ``"auto"`` picks for
the first device; on CPU the kernels run in interpret mode automatically.
``blocks`` is an ``lca.attention.BlockSizes`` or None; None and None fields take
the backend's defaults.
"""

from __future__ import annotations

from kernels_pallas import api
from lca.attention.impl import LocalImpl


def _config(q, k, mask, logit, blocks) -> api.KernelConfig:
    return api.resolve_config(
        q.shape[-1], q.shape[1], k.shape[1], mask=mask, logit=logit, blocks=blocks, dtype=q.dtype,
    )


def forward(q, k, v, q_pos, kv_pos, q_seg=None, kv_seg=None, *, mask, logit, blocks=None):
    cfg = _config(q, k, mask, logit, blocks)
    return api.kernel_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, cfg=cfg)


def backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, dlse=None, *, mask, logit,
             blocks=None):
    cfg = _config(q, k, mask, logit, blocks)
    return api.kernel_backward(
        q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, dlse, cfg=cfg
    )


# Interpreted Pallas kernels (CPU) run their bodies as JAX ops whose grid indices
# vary over no mesh axis, which shard_map's varying-axes check rejects, so
# ring/Ulysses/USP run their shard_map unchecked for this implementation. Compiled
# kernels (GPU, TPU) have not been tried under the check, so it is off for them too.
PALLAS = LocalImpl("pallas", api.flash_attention, forward, backward, default_blocks=None,
                   check_vma=False)
