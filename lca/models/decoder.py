"""A decoder-only language model in Flax NNX with a token-mixer slot per layer.

Pre-norm blocks: ``x + mixer(norm(x))`` then ``x + swiglu(norm(x))``; RMSNorm, tied
or untied output projection. Each layer's mixer is built from the catalogue
:data:`lca.models.mixers.MIXERS` by the kind ``model.pattern`` gives that layer;
the GQA attention kinds (``global``, ``local``) compute attention through
``model.attention`` (local implementation x sequence strategy, :mod:`lca.models.strategies`).

Parameters are float32 and carry logical axis names (``nnx.with_partitioning``);
compute runs in ``cfg.dtype`` (bf16 by default) and logits are float32. A layer's
mixer sits in the slot named ``attn`` (parameter paths ``block_<i>.attn.*``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lca.config import ModelConfig
from lca.models import strategies
from lca.models.layers import dense, embed_tokens, rms_norm
from lca.models.mixers import MixerEnv, layer_mixers, make_mixer
from lca.parallel.sharding import Sharder

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def padded_vocab(vocab_size: int, multiple: int = 128) -> int:
    """The embedding table size: the vocabulary rounded up so it shards evenly."""
    return -(-vocab_size // multiple) * multiple


class SwiGLU(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, shard: Sharder, rngs):
        self.shard = shard
        self.gate = dense(rngs, cfg.d_model, cfg.mlp_dim, ("embed", "mlp"), cfg)
        self.up = dense(rngs, cfg.d_model, cfg.mlp_dim, ("embed", "mlp"), cfg)
        self.down = dense(rngs, cfg.mlp_dim, cfg.d_model, ("mlp", "embed"), cfg, scale=1.0 / (2 * cfg.num_layers))

    def __call__(self, x):
        hidden = nnx.silu(self.gate(x)) * self.up(x)
        return self.down(self.shard(hidden, ("batch", "sequence", "act_mlp")))


class Block(nnx.Module):
    """``x + mixer(norm(x))``, then ``x + swiglu(norm(x))``; the mixer is ``kind`` from the catalogue."""

    def __init__(self, kind: str, env: MixerEnv, *, rngs):
        cfg, self.shard, self.kind = env.model, env.shard, kind
        self.attn_norm = rms_norm(rngs, cfg)
        self.attn = make_mixer(kind, env, rngs=rngs)  # the token-mixer slot
        self.mlp_norm = rms_norm(rngs, cfg)
        self.mlp = SwiGLU(cfg, shard=env.shard, rngs=rngs)

    def __call__(self, x, positions, segment_ids):
        return self._mlp(x + self.attn(self.attn_norm(x), positions, segment_ids))

    def _mlp(self, x):
        x = x + self.mlp(self.mlp_norm(x))
        return self.shard(x, ("batch", "sequence", "act_embed"))

    def extend(self, x, positions, cache):
        """Inference: the block on the next tokens after those in its mixer's ``cache``; ``(x, cache)``."""
        mixed, cache = self.attn.extend(self.attn_norm(x), positions, cache)
        return self._mlp(x + mixed), cache


class Decoder(nnx.Module):
    """Decoder-only LM: ``tokens [b, l]`` -> float32 ``logits [b, l, vocab]``.

    ``mesh`` is what sharded sequence strategies split over (None: one device, or
    XLA's placement); ``shard`` constrains activations to the mesh layout.
    """

    def __init__(self, cfg: ModelConfig, *, vocab_size: int, mesh: jax.sharding.Mesh | None = None,
                 shard: Sharder | None = None, rngs):
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
        env = MixerEnv(model=cfg, attend=strategies.make_attend(cfg, mesh), mesh=mesh, shard=shard)
        for i, kind in enumerate(layer_mixers(cfg)):
            setattr(self, f"block_{i}", Block(kind, env, rngs=rngs))
        self.final_norm = rms_norm(rngs, cfg)
        if not self.tie:
            self.unembed = dense(rngs, cfg.d_model, vocab_size, ("embed", "vocab"), cfg)

    def blocks(self) -> list[Block]:
        return [getattr(self, f"block_{i}") for i in range(self.num_layers)]

    def __call__(self, tokens, positions, segment_ids=None):
        x = self._embed(tokens)
        run = _call_block
        if self.remat_policy != "none":
            run = nnx.remat(_call_block, policy=_REMAT_POLICIES[self.remat_policy])
        for block in self.blocks():
            x = run(block, x, positions, segment_ids)
        return self._logits(x)

    def _embed(self, tokens):
        table = self.embed.embedding[...].astype(self.embed.dtype)  # compute dtype, as nnx.Embed does
        return self.shard(embed_tokens(table, tokens) * self.input_scale, ("batch", "sequence", "act_embed"))

    def _logits(self, x):
        x = self.final_norm(x)
        logits = self.embed.attend(x) if self.tie else self.unembed(x)
        return self.shard(logits.astype(jnp.float32), ("batch", "sequence", "act_vocab"))

    # ------------------------------------------------------------------------------------------- inference

    def start_caches(self, batch: int, max_len: int) -> list:
        """Each layer's empty inference cache (the mixer's ``start_cache``); a ValueError for a mixer without one."""
        caches = []
        for i, block in enumerate(self.blocks()):
            if not hasattr(block.attn, "extend"):
                raise ValueError(f"layer {i}'s mixer {block.kind!r} has no inference cache (start_cache/extend); "
                                 "generation needs one in every layer.")
            caches.append(block.attn.start_cache(batch, max_len, self.embed.dtype))
        return caches

    def extend(self, tokens, positions, caches: list, logits_at=None):
        """The next tokens ``[b, t]`` (one document, at ``positions [b, t]``) after those in ``caches``.

        Returns ``(logits [b, t, vocab] float32, caches)``; chunk by chunk this equals one full call.
        ``logits_at``: an int32 index into the ``t`` tokens (traced or not): only that token's logits,
        ``[b, vocab]``. A prefill needs one token's, and a long prompt's ``[t, vocab]`` float32 logits
        would be its largest array (32k tokens x 32k vocab: 4 GiB).
        """
        x = self._embed(tokens)
        new_caches = []
        for block, cache in zip(self.blocks(), caches):
            x, cache = block.extend(x, positions, cache)
            new_caches.append(cache)
        if logits_at is not None:
            return self._logits(jax.lax.dynamic_slice_in_dim(x, logits_at, 1, axis=1))[:, 0], new_caches
        return self._logits(x), new_caches


def _call_block(block: Block, x, positions, segment_ids):
    return block(x, positions, segment_ids)
