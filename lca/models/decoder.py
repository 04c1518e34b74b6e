"""A decoder-only language model in Flax NNX, with pluggable attention.

Pre-norm blocks: ``x + attn(norm(x))`` then ``x + swiglu(norm(x))``; RMSNorm,
rotary position embeddings from the batch's ``positions`` (so packed documents
restart at 0), grouped-query attention whose kernel comes from
:mod:`lca.models.attention_registry`, tied or untied output projection.

Parameters are float32 and carry logical axis names (``nnx.with_partitioning``);
compute runs in ``cfg.dtype`` (bf16 by default) and logits are float32.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from lca.config import ModelConfig
from lca.models.rope import apply_rope
from lca.parallel.sharding import Sharder

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def padded_vocab(vocab_size: int, multiple: int = 128) -> int:
    """The embedding table size: the vocabulary rounded up so it shards evenly."""
    return -(-vocab_size // multiple) * multiple


def _dense(rngs, d_in, d_out, names, cfg: ModelConfig, scale: float = 1.0):
    init = nnx.initializers.variance_scaling(scale, "fan_in", "truncated_normal")
    return nnx.Linear(
        d_in, d_out, use_bias=False, kernel_init=nnx.with_partitioning(init, names),
        dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs,
    )


def _norm(rngs, cfg: ModelConfig):
    return nnx.RMSNorm(
        cfg.d_model, epsilon=cfg.norm_eps, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)), rngs=rngs,
    )


class Attention(nnx.Module):
    """GQA self-attention; ``window`` makes it a sliding-window ("local") layer."""

    def __init__(self, cfg: ModelConfig, *, attend: Callable, window: int | None, shard: Sharder, rngs):
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.head_dim or cfg.d_model // cfg.num_heads
        self.rope_theta, self.softcap, self.window = cfg.rope_theta, cfg.attention.softcap, window
        self.attend, self.shard = attend, shard
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q = _dense(rngs, cfg.d_model, q_dim, ("embed", "heads"), cfg)
        self.k = _dense(rngs, cfg.d_model, kv_dim, ("embed", "kv_heads"), cfg)
        self.v = _dense(rngs, cfg.d_model, kv_dim, ("embed", "kv_heads"), cfg)
        # Residual-branch output scaled down with depth (GPT-2 style) for a stable start.
        self.o = _dense(rngs, q_dim, cfg.d_model, ("heads", "embed"), cfg, scale=1.0 / (2 * cfg.num_layers))

    def __call__(self, x, positions, segment_ids):
        """``x [b, l, d_model]`` -> ``[b, l, d_model]``."""
        b, length, _ = x.shape
        q = self.q(x).reshape(b, length, self.num_heads, self.head_dim)
        k = self.k(x).reshape(b, length, self.num_kv_heads, self.head_dim)
        v = self.v(x).reshape(b, length, self.num_kv_heads, self.head_dim)
        q = self.shard(apply_rope(q, positions, self.rope_theta), ("batch", "sequence", "act_heads", None))
        k = self.shard(apply_rope(k, positions, self.rope_theta), ("batch", "sequence", "act_kv_heads", None))
        v = self.shard(v, ("batch", "sequence", "act_kv_heads", None))
        out = self.attend(
            q, k, v, causal=True, segment_ids=segment_ids, window=self.window, softcap=self.softcap, scale=None
        )
        out = self.shard(out.reshape(b, length, self.num_heads * self.head_dim), ("batch", "sequence", "act_heads"))
        return self.o(out)


class SwiGLU(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, shard: Sharder, rngs):
        self.shard = shard
        self.gate = _dense(rngs, cfg.d_model, cfg.mlp_dim, ("embed", "mlp"), cfg)
        self.up = _dense(rngs, cfg.d_model, cfg.mlp_dim, ("embed", "mlp"), cfg)
        self.down = _dense(rngs, cfg.mlp_dim, cfg.d_model, ("mlp", "embed"), cfg, scale=1.0 / (2 * cfg.num_layers))

    def __call__(self, x):
        hidden = nnx.silu(self.gate(x)) * self.up(x)
        return self.down(self.shard(hidden, ("batch", "sequence", "act_mlp")))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, attend: Callable, window: int | None, shard: Sharder, rngs):
        self.shard = shard
        self.attn_norm = _norm(rngs, cfg)
        self.attn = Attention(cfg, attend=attend, window=window, shard=shard, rngs=rngs)
        self.mlp_norm = _norm(rngs, cfg)
        self.mlp = SwiGLU(cfg, shard=shard, rngs=rngs)

    def __call__(self, x, positions, segment_ids):
        x = x + self.attn(self.attn_norm(x), positions, segment_ids)
        x = x + self.mlp(self.mlp_norm(x))
        return self.shard(x, ("batch", "sequence", "act_embed"))


def layer_windows(cfg: ModelConfig) -> list[int | None]:
    """Each layer's attention window: the pattern cycled over layers ("global" -> None)."""
    pattern = cfg.attention.pattern
    return [
        cfg.attention.window if pattern[i % len(pattern)] == "local" else None for i in range(cfg.num_layers)
    ]


class Decoder(nnx.Module):
    """Decoder-only LM: ``tokens [b, l]`` -> float32 ``logits [b, l, vocab]``.

    ``attend`` is the attention callable every layer uses (the layer pattern
    decides the window); ``shard`` constrains activations to the mesh layout.
    """

    def __init__(self, cfg: ModelConfig, *, vocab_size: int, attend: Callable, shard: Sharder | None = None, rngs):
        shard = shard or Sharder()
        self.shard, self.num_layers, self.tie = shard, cfg.num_layers, cfg.tie_embeddings
        self.remat_policy = cfg.remat
        # Table entries ~ N(0, 1/d): tied logits start at unit scale; inputs are scaled back up
        # by sqrt(d) (as in Gemma) so the residual stream starts at unit scale too.
        self.input_scale = math.sqrt(cfg.d_model)
        self.embed = nnx.Embed(
            vocab_size, cfg.d_model, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(cfg.d_model**-0.5), ("vocab", "embed")),
            rngs=rngs,
        )
        for i, window in enumerate(layer_windows(cfg)):
            setattr(self, f"block_{i}", Block(cfg, attend=attend, window=window, shard=shard, rngs=rngs))
        self.final_norm = _norm(rngs, cfg)
        if not self.tie:
            self.unembed = _dense(rngs, cfg.d_model, vocab_size, ("embed", "vocab"), cfg)

    def blocks(self) -> list[Block]:
        return [getattr(self, f"block_{i}") for i in range(self.num_layers)]

    def __call__(self, tokens, positions, segment_ids=None):
        x = self.shard(self.embed(tokens) * self.input_scale, ("batch", "sequence", "act_embed"))
        run = _call_block
        if self.remat_policy != "none":
            run = nnx.remat(_call_block, policy=_REMAT_POLICIES[self.remat_policy])
        for block in self.blocks():
            x = run(block, x, positions, segment_ids)
        x = self.final_norm(x)
        logits = self.embed.attend(x) if self.tie else self.unembed(x)
        return self.shard(logits.astype(jnp.float32), ("batch", "sequence", "act_vocab"))


def _call_block(block: Block, x, positions, segment_ids):
    return block(x, positions, segment_ids)
