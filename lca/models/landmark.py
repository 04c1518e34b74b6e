"""Landmark attention as a mixer kind: ``landmark`` (Mohtashami & Jaggi, 2023; :mod:`lca.attention.landmark`).

Training and teacher-forced evaluation run the grouped softmax over the whole row: the block of a key and
whether it is a landmark come from its *row index* (``s // L``, ``s % L == L - 1``), which is where the data
pipeline puts the landmark tokens (``data.landmark_every = L``, :mod:`lca.data.landmark`); rotary embeddings
use the batch's ``positions`` like every other layer. Packed documents are kept apart by ``segment_ids``.

At inference (:meth:`LandmarkAttention.extend`, driven by :func:`lca.models.generate.generate`) the layer
keeps a :class:`LandmarkCache`: complete blocks in a :class:`lca.attention.landmark.BlockCache` (keys before
rotary, capped at ``cache_blocks`` blocks or, unbounded, room for the whole generation) and the keys of the
block still being written. Both are preallocated buffers with a fill count, so a step compiles once per
chunk length however long the context grows. Each
query retrieves its ``top_k`` blocks through the landmark keys and attends over them plus its local window
(:func:`lca.attention.landmark.landmark_retrieval_attention`); positions follow the paper's scheme there,
so ``positions`` are not used when extending. With ``top_k`` at least the number of cached blocks this is
the training-time output.

Training through retrieval (``train_retrieval``, an lca addition; the paper trains the grouped softmax only):
that share of each batch's rows is attended the way greedy decoding attends it, block by block with the
``top_k`` retrieved blocks at the paper's positions (:func:`lca.attention.landmark.landmark_decoded_attention`),
so the model also learns the re-positioned blocks it meets at inference; the rest keep the grouped softmax,
which trains the landmark scores that pick the blocks. Only rows holding one document from their first index
can be attended so (packed rows keep the grouped softmax), and teacher-forced evaluation through ``__call__``
uses it too.

The layer computes with its own attention functions, not ``model.attention``'s implementation, and has no
window or softcap. Of ``model.attention``'s tiles it reads ``block_kv`` (``impl: blockwise``: keys per scan
step, a multiple of ``block_size``; null: one landmark block) and ``block_q`` (``impl: pallas``: queries per
program, forward and backward; null: 64). Its backward tiles as its forward does, so
``block_q_bwd``/``block_kv_bwd`` are an error when every layer is a landmark layer.

It does follow ``model.attention.sequence``: where the resolved strategy splits the sequence over the mesh
(ring, Ulysses, USP), the layer runs that strategy with :func:`lca.attention.landmark_step` as the local step
(``impl`` its kernel, with the same tiles), which needs every landmark block whole in one ring chunk:
sequence lengths a multiple of the ring's chunks times ``block_size``, and not the ``striped`` layout
(:meth:`LandmarkConfig.sequence_multiple`). Rows trained through retrieval (``train_retrieval``) are attended
unsplit, placed by XLA.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from lca.attention.blocks import BlockSizes
from lca.attention.landmark import (SELECTIONS, BlockCache, append_blocks, empty_block_cache, landmark_attention,
                                    landmark_decoded_attention, landmark_retrieval_attention, landmark_step)
from lca.config import ConfigError, ModelConfig, choice_error
from lca.models.attends import Attends
from lca.models import strategies
from lca.models.layers import dense
from lca.models.rope import apply_rope

if TYPE_CHECKING:
    from lca.models.mixers import MixerEnv

IMPLS = ("blockwise", "pallas")


def check_vocab_holds_landmark(model: ModelConfig, why: str) -> None:
    """ConfigError unless the model's embedding table has a row for the landmark token (``why``: who needs it)."""
    from lca.data.tokenizer import LANDMARK_ID, VOCAB_SIZE, check_token_id
    from lca.models.decoder import padded_vocab

    try:
        check_token_id(LANDMARK_ID, model.vocab_size or padded_vocab(VOCAB_SIZE))
    except ValueError as err:
        raise ConfigError(f"config key 'model.vocab_size' cannot hold the landmark token {why}: {err}") from None


@dataclasses.dataclass(frozen=True)
class LandmarkConfig:
    """``model.mixers.landmark``: grouped-softmax attention over landmark blocks, top-k retrieval at inference."""

    block_size: int = 64  # L: L - 1 tokens, then their landmark (the paper uses 50 and 64)
    top_k: int = 4  # blocks each query retrieves from the cache at inference
    cache_blocks: Optional[int] = None  # blocks the inference cache keeps (oldest dropped); None: all of them
    selection: str = "per_head"  # per_head (the reference code's) | shared (one set for all heads, the paper's)
    impl: str = "blockwise"  # training-time grouped softmax: blockwise (lax.scan, custom VJP) | pallas
    # inference: queries attended at a time in a prefill chunk (each holds the chunk's local logits and gathers
    # top_k blocks per head); null: all
    q_tile: Optional[int] = 64
    # share of each batch's rows (rounded) attended as decoding attends them: block by block, top_k retrieved
    # blocks at the paper's positions (landmark_decoded_attention) instead of the grouped softmax; 0: the paper's
    train_retrieval: float = 0.0

    def check(self, key: str, model: ModelConfig) -> None:
        if self.block_size < 2:
            raise ConfigError(f"config key '{key}.block_size' must be >= 2 (L - 1 tokens, then a landmark), "
                              f"got {self.block_size}.")
        if self.top_k < 1:
            raise ConfigError(f"config key '{key}.top_k' must be >= 1, got {self.top_k}.")
        if self.cache_blocks is not None and self.cache_blocks < 1:
            raise ConfigError(f"config key '{key}.cache_blocks' must be >= 1 or null (unbounded), "
                              f"got {self.cache_blocks}.")
        if self.cache_blocks is not None and self.top_k > self.cache_blocks:
            raise ConfigError(f"config key '{key}.top_k'={self.top_k} is larger than the cache "
                              f"({key}.cache_blocks={self.cache_blocks}); use top_k <= {self.cache_blocks}.")
        if self.q_tile is not None and self.q_tile < 1:
            raise ConfigError(f"config key '{key}.q_tile' must be >= 1 or null (all queries at once), "
                              f"got {self.q_tile}.")
        if self.selection not in SELECTIONS:
            raise choice_error(f"{key}.selection", self.selection, SELECTIONS)
        if isinstance(self.train_retrieval, bool) or not 0.0 <= self.train_retrieval <= 1.0:
            raise ConfigError(f"config key '{key}.train_retrieval' must be a share of the rows in [0, 1], "
                              f"got {self.train_retrieval!r}.")
        if self.impl not in IMPLS:
            raise choice_error(f"{key}.impl", self.impl, IMPLS)
        block_kv = model.attention.block_kv  # None: landmark attention's own key chunk, one block
        if block_kv is not None and block_kv % self.block_size:
            raise ConfigError(f"config key '{key}.block_size'={self.block_size} must divide the attention block "
                              f"model.attention.block_kv={block_kv} (each holds whole landmark blocks); use e.g. "
                              f"block_kv={self.block_size * max(1, block_kv // self.block_size)}.")
        bwd = {name: getattr(model.attention, name) for name in ("block_q_bwd", "block_kv_bwd")}
        if set(model.pattern) == {"landmark"} and any(v is not None for v in bwd.values()):
            given = ", ".join(f"'model.attention.{name}'={v}" for name, v in bwd.items() if v is not None)
            raise ConfigError(f"config key {given} changes nothing: every layer of model.pattern is 'landmark', "
                              f"whose backward tiles as its forward (model.attention.block_q, block_kv); "
                              f"leave it null.")
        check_vocab_holds_landmark(model, f"that '{key}' reads")

    def attends(self, model: ModelConfig) -> Attends:
        """The grouped softmax takes the products of causal attention over the whole document. The rows
        ``train_retrieval`` also attends as decoding does (top_k blocks each) are not counted."""
        return Attends(width=model.num_heads * model.resolved_head_dim)

    def sequence_multiple(self, key: str, model: ModelConfig, mesh) -> int:
        """Lengths must be whole landmark blocks in every run of positions the sequence strategy cuts the keys
        into on ``mesh`` (its ring chunks); a ConfigError where it deals tokens out one by one."""
        runs = strategies.key_runs(model, mesh)
        name = strategies.resolve(model, mesh)
        if runs is None:
            raise ConfigError(f"config key 'model.strategies.{name}.layout'='striped' deals tokens out one per device, "
                              f"cutting every landmark block of {key}; use layout zigzag or contiguous.")
        return runs * self.block_size

    def check_run(self, key: str, cfg) -> None:
        """Checks against the rest of the run: the data insert this block size's landmarks; rows hold whole blocks."""
        if cfg.data.landmark_every != self.block_size:
            raise ConfigError(f"config key 'data.landmark_every'={cfg.data.landmark_every} must equal "
                              f"'{key}.block_size'={self.block_size} so the data hold the landmarks the layer reads; "
                              f"set data.landmark_every={self.block_size}.")
        lengths = {"train.seq_len": cfg.train.seq_len, "eval.seq_len": cfg.eval.seq_len}
        for name, length in lengths.items():
            if length is not None and length % self.block_size:
                raise ConfigError(f"config key '{name}'={length} must be a multiple of '{key}.block_size'="
                                  f"{self.block_size} (rows of whole landmark blocks).")


@functools.partial(jax.tree_util.register_dataclass, data_fields=("blocks", "keys", "values", "length"),
                   meta_fields=())
@dataclasses.dataclass(frozen=True)
class LandmarkCache:
    """A landmark layer's inference state: complete blocks, and the open block (fixed shapes, one compile).

    ``keys``/``values`` have room for a whole block; the first ``length < L`` slots hold the tokens written
    since the last complete block.
    """

    blocks: BlockCache
    keys: jax.Array  # [b, L, num_kv_heads, head_dim] before rotary
    values: jax.Array
    length: jax.Array  # int32 scalar: tokens in the open block


@functools.lru_cache(maxsize=None)
def _rope(theta: float):
    """One rotary callable per theta, so the compiled retrieval below is reused across calls."""
    return functools.partial(apply_rope, theta=theta)


# Compiled as one unit even when the model runs eagerly.
_retrieve = jax.jit(landmark_retrieval_attention,
                    static_argnames=("block_size", "top_k", "selection", "rope", "q_tile"))


class LandmarkAttention(nnx.Module):
    """GQA landmark attention: ``x [b, l, d_model]`` -> ``[b, l, d_model]``, ``l`` a multiple of ``block_size``."""

    def __init__(self, cfg: LandmarkConfig, env: MixerEnv, *, rngs):
        model = env.model
        self.cfg = cfg
        self.num_heads, self.num_kv_heads = model.num_heads, model.num_kv_heads
        self.head_dim = model.resolved_head_dim
        self.rope_theta, self.shard = model.rope_theta, env.shard
        self.block_q, self.block_kv = model.attention.block_q, model.attention.block_kv
        # On a mesh whose sequence strategy splits the sequence: that strategy, with the landmark step.
        self.split = None
        if strategies.split_axis(model, env.mesh) is not None:
            cfg.sequence_multiple("model.mixers.landmark", model, env.mesh)  # refuses what cannot run split
            tiles = BlockSizes(block_q=self.block_q) if cfg.impl == "pallas" else BlockSizes(block_kv=self.block_kv)
            self.split = strategies.make_attend(model, env.mesh, impl=landmark_step(cfg.block_size, kernel=cfg.impl),
                                                blocks=tiles)
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q = dense(rngs, model.d_model, q_dim, ("embed", "heads"), model)
        self.k = dense(rngs, model.d_model, kv_dim, ("embed", "kv_heads"), model)
        self.v = dense(rngs, model.d_model, kv_dim, ("embed", "kv_heads"), model)
        self.o = dense(rngs, q_dim, model.d_model, ("heads", "embed"), model, scale=1.0 / (2 * model.num_layers))

    def _project(self, x):
        b, length, _ = x.shape
        q = self.q(x).reshape(b, length, self.num_heads, self.head_dim)
        k = self.k(x).reshape(b, length, self.num_kv_heads, self.head_dim)
        v = self.v(x).reshape(b, length, self.num_kv_heads, self.head_dim)
        return q, k, v

    def _output(self, out):
        b, length = out.shape[:2]
        out = self.shard(out.reshape(b, length, self.num_heads * self.head_dim), ("batch", "sequence", "act_heads"))
        return self.o(out)

    def __call__(self, x, positions, segment_ids):
        """``x [b, l, d_model]``, ``positions, segment_ids [b, l]`` -> ``[b, l, d_model]``."""
        q, k, v = self._project(x)
        q_rot = self.shard(apply_rope(q, positions, self.rope_theta), ("batch", "sequence", "act_heads", None))
        k_rot = self.shard(apply_rope(k, positions, self.rope_theta), ("batch", "sequence", "act_kv_heads", None))
        v = self.shard(v, ("batch", "sequence", "act_kv_heads", None))
        L = self.cfg.block_size
        if self.split is not None:
            out = self.split(q_rot, k_rot, v, causal=True, segment_ids=segment_ids)
        elif self.cfg.impl == "pallas":
            from kernels_pallas.landmark import landmark_flash_attention  # only when asked for

            out = landmark_flash_attention(q_rot, k_rot, v, block_size=L, segment_ids=segment_ids, block_q=self.block_q)
        else:
            out = landmark_attention(q_rot, k_rot, v, block_size=L, segment_ids=segment_ids, kv_block=self.block_kv)
        rows = round(self.cfg.train_retrieval * x.shape[0])
        if rows:
            out = self._decoded_rows(out, rows, q, k, v, segment_ids)
        return self._output(out)

    def _decoded_rows(self, out, rows: int, q, k, v, segment_ids):
        """The first ``rows`` rows attended as decoding attends them (``train_retrieval``), where they can be.

        Only a row holding one document from its first index (then padding, if any) can: the retrieval path has
        no segment mask, so rows of packed documents keep the grouped softmax.
        """
        decoded = landmark_decoded_attention(q[:rows], k[:rows], v[:rows], block_size=self.cfg.block_size,
                                             top_k=self.cfg.top_k, selection=self.cfg.selection,
                                             rope=_rope(self.rope_theta))
        if segment_ids is not None:
            seg = segment_ids[:rows]
            real = seg != 0
            one_doc = (real[:, 0] & jnp.all((seg == seg[:, :1]) | ~real, axis=1)
                       & jnp.all(real[:, :-1] | ~real[:, 1:], axis=1))  # no document after padding
            decoded = jnp.where(one_doc[:, None, None, None], decoded, out[:rows])
        return jnp.concatenate([decoded.astype(out.dtype), out[rows:]], axis=0)

    # ------------------------------------------------------------------------------------------- inference

    def start_cache(self, batch: int, max_len: int, dtype) -> LandmarkCache:
        """An empty cache with fixed-size buffers, so every step of one shape reuses its compiled program.

        The block buffer holds ``cache_blocks`` blocks (the oldest dropped beyond), or, unbounded, every
        block of ``max_len`` tokens (at least ``top_k``: retrieval ranks ``top_k`` slots).
        """
        L = self.cfg.block_size
        capacity = self.cfg.cache_blocks or max(self.cfg.top_k, -(-max_len // L))
        blocks = empty_block_cache(batch, L, self.num_kv_heads, self.head_dim, dtype=dtype, capacity=capacity)
        open_block = jnp.zeros((batch, L, self.num_kv_heads, self.head_dim), dtype)
        return LandmarkCache(blocks, open_block, open_block, jnp.zeros((), jnp.int32))

    def extend(self, x, positions, cache: LandmarkCache):
        """The next ``t`` tokens ``x [b, t, d_model]`` after those in ``cache`` -> ``(out [b, t, d_model], cache)``.

        ``positions`` are unused: retrieval places blocks at the paper's positions (module docstring).
        """
        del positions
        q, k, v = self._project(x)
        L, t = self.cfg.block_size, x.shape[1]
        most = -(-t // L)  # complete blocks this call can close (the open block holds < L tokens)
        window_k, window_v = (self._window(buf, new, cache.length, (most + 1) * L)
                              for buf, new in ((cache.keys, k), (cache.values, v)))
        filled = cache.length + t
        out = _retrieve(q, window_k, window_v, cache.blocks, block_size=L, top_k=self.cfg.top_k,
                        selection=self.cfg.selection, rope=_rope(self.rope_theta), window_len=filled,
                        q_tile=self.cfg.q_tile)
        done = filled // L
        blocks = append_blocks(cache.blocks, window_k[:, :most * L], window_v[:, :most * L], num_blocks=done)
        open_k, open_v = (jax.lax.dynamic_slice_in_dim(w, done * L, L, axis=1) for w in (window_k, window_v))
        return self._output(out.astype(x.dtype)), LandmarkCache(blocks, open_k, open_v, filled - done * L)

    @staticmethod
    def _window(open_block, new, length, size: int):
        """``[b, size, ...]``: the open block's ``length`` tokens, then ``new``, then unused room."""
        room = jnp.zeros((open_block.shape[0], size, *open_block.shape[2:]), open_block.dtype)
        room = jax.lax.dynamic_update_slice_in_dim(room, open_block, 0, axis=1)
        return jax.lax.dynamic_update_slice_in_dim(room, new.astype(open_block.dtype), length, axis=1)
