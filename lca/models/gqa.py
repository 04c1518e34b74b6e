"""Grouped-query self-attention: the ``global`` and ``local`` mixer kinds.

``q`` has ``num_heads`` heads, ``k, v`` share ``num_kv_heads``; rotary embeddings
come from the batch's ``positions``. How attention is computed (local implementation
x sequence strategy) is ``env.attend`` (:mod:`lca.models.strategies`); this module
only decides the projections and the window.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional, Union

from flax import nnx

from lca.config import ConfigError, ModelConfig
from lca.models.attends import Attends
from lca.models.kv_cache import KVCache, attend_cached, empty_kv_cache
from lca.models.layers import dense
from lca.models.rope import apply_rope

if TYPE_CHECKING:
    from lca.models.mixers import MixerEnv


@dataclasses.dataclass(frozen=True)
class GlobalAttentionConfig:
    """``model.mixers.global``: causal attention over the whole context."""

    softcap: Optional[float] = None  # tanh logit cap (Gemma 2); None: none
    window = None  # not a field: a global layer has no window

    def attends(self, model: ModelConfig) -> Attends:
        return Attends(width=model.num_heads * model.resolved_head_dim)


@dataclasses.dataclass(frozen=True)
class LocalAttentionConfig:
    """``model.mixers.local``: causal sliding-window attention over the last ``window`` tokens."""

    window: Optional[int] = None  # required when a layer uses it
    softcap: Optional[float] = None

    def check(self, key: str, model: ModelConfig) -> None:
        if self.window is None or self.window < 1:
            raise ConfigError(
                f"config key '{key}.window' must be a positive int when model.pattern has "
                f"'local' layers, got {self.window!r}."
            )

    def attends(self, model: ModelConfig) -> Attends:
        return Attends(width=model.num_heads * model.resolved_head_dim, window=self.window)


class Attention(nnx.Module):
    """GQA self-attention: ``x [b, l, d_model]`` -> ``[b, l, d_model]``; a window makes it local."""

    def __init__(self, cfg: Union[GlobalAttentionConfig, LocalAttentionConfig], env: MixerEnv, *, rngs):
        model = env.model
        self.num_heads, self.num_kv_heads = model.num_heads, model.num_kv_heads
        self.head_dim = model.resolved_head_dim
        self.rope_theta, self.softcap, self.window = model.rope_theta, cfg.softcap, cfg.window
        self.attend, self.shard = env.attend, env.shard
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q = dense(rngs, model.d_model, q_dim, ("embed", "heads"), model)
        self.k = dense(rngs, model.d_model, kv_dim, ("embed", "kv_heads"), model)
        self.v = dense(rngs, model.d_model, kv_dim, ("embed", "kv_heads"), model)
        # Residual-branch output scaled down with depth (GPT-2 style) for a stable start.
        self.o = dense(rngs, q_dim, model.d_model, ("heads", "embed"), model, scale=1.0 / (2 * model.num_layers))

    def _qkv(self, x, positions):
        """Projections with rotary embeddings at ``positions``: ``q [b, l, h, d]``, ``k, v [b, l, h_kv, d]``."""
        b, length, _ = x.shape
        q = self.q(x).reshape(b, length, self.num_heads, self.head_dim)
        k = self.k(x).reshape(b, length, self.num_kv_heads, self.head_dim)
        v = self.v(x).reshape(b, length, self.num_kv_heads, self.head_dim)
        q = self.shard(apply_rope(q, positions, self.rope_theta), ("batch", "sequence", "act_heads", None))
        k = self.shard(apply_rope(k, positions, self.rope_theta), ("batch", "sequence", "act_kv_heads", None))
        return q, k, self.shard(v, ("batch", "sequence", "act_kv_heads", None))

    def _output(self, out):
        b, length = out.shape[:2]
        out = self.shard(out.reshape(b, length, self.num_heads * self.head_dim), ("batch", "sequence", "act_heads"))
        return self.o(out)

    def __call__(self, x, positions, segment_ids):
        """``x [b, l, d_model]``, ``positions, segment_ids [b, l]`` -> ``[b, l, d_model]``."""
        q, k, v = self._qkv(x, positions)
        out = self.attend(
            q, k, v, causal=True, segment_ids=segment_ids, window=self.window, softcap=self.softcap, scale=None
        )
        return self._output(out)

    def start_cache(self, batch: int, max_len: int, dtype) -> KVCache:
        """An empty KV cache with room for ``max_len`` tokens, or for a local layer a ring of its window
        (inference, :mod:`lca.models.generate`)."""
        return empty_kv_cache(batch, max_len, self.num_kv_heads, self.head_dim, dtype, window=self.window)

    def extend(self, x, positions, cache: KVCache):
        """The next ``t`` tokens ``x [b, t, d_model]`` at ``positions [b, t]`` -> ``(out [b, t, d_model], cache)``."""
        q, k, v = self._qkv(x, positions)
        out, cache = attend_cached(q, k, v, cache, window=self.window, softcap=self.softcap)
        return self._output(out), cache
