"""Analytic FLOPs of one training step: the numerator of tokens/s's honest cousin, MFU.

XLA's ``cost_analysis`` cannot be the source: it does not count Pallas or cuBLAS
custom calls, nor the bodies of scans, so on a GPU it reported ~0% MFU. The count
here is the usual model-FLOPs convention (PaLM, appendix B), independent of how the
step is computed (remat recomputation and a flash backward's extra matmul are not
"model" FLOPs):

* matmuls: ``6 x matmul parameters x tokens`` (forward 2, backward 4 per
  multiply-add), where the matmul parameters are every dense kernel plus the
  embedding table when it is tied (it is then also the output projection; an untied
  table is a lookup, not a matmul);
* attention, per attention layer: ``QK^T`` and ``PV`` take ``2 x 2 x heads x head_dim``
  FLOPs per attended (query, key) pair forward, three times that for training.
  Causal attention over ``T`` tokens attends ``T^2 / 2`` pairs; a sliding window
  of ``W`` attends ``T W - W^2 / 2`` with ``W = min(W, T)`` (which is ``T^2/2`` at
  ``W = T``). Packed segments are not subtracted: the count is the dense one.

Mixer kinds that are not GQA attention (``global``/``local``) contribute their
dense kernels through the parameter count and nothing for attention.
"""

from __future__ import annotations

import jax

from lca.config import Config, ModelConfig
from lca.models.gqa import GlobalAttentionConfig, LocalAttentionConfig
from lca.models.mixers import layer_mixers


def matmul_params(params, *, tied: bool) -> int:
    """Weights that take part in matrix products: every ``kernel`` leaf, plus the tied embedding table."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = getattr(path[-1], "key", getattr(path[-1], "name", None))
        if name == "kernel" or (tied and name == "embedding"):
            total += int(leaf.size)
    return total


def attended_pairs(seq_len: int, window: int | None) -> float:
    """Causal (query, key) pairs of one sequence of ``seq_len`` tokens, optionally windowed."""
    w = seq_len if window is None else min(window, seq_len)
    return seq_len * w - w * w / 2


def attention_flops(model: ModelConfig, seq_len: int, sequences: int) -> float:
    """Training FLOPs (forward + backward) of the attention products of every layer."""
    head_dim = model.head_dim or model.d_model // model.num_heads
    per_pair = 3 * 2 * 2 * model.num_heads * head_dim
    total = 0.0
    for kind in layer_mixers(model):
        section = model.mixers[kind]
        if isinstance(section, (GlobalAttentionConfig, LocalAttentionConfig)):
            total += per_pair * attended_pairs(seq_len, section.window) * sequences
    return total


def train_step_flops(cfg: Config, params) -> float:
    """Model FLOPs of one optimizer step of ``cfg`` (all devices together); ``params`` may be abstract."""
    sequences, seq_len = cfg.train.global_batch, cfg.train.seq_len
    dense = 6 * matmul_params(params, tied=cfg.model.tie_embeddings) * sequences * seq_len
    return dense + attention_flops(cfg.model, seq_len, sequences)
