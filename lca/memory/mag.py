"""Titans MAG, memory as a gate (paper Sec. 4.2): sliding-window attention gated by the memory.

For ``x [b, l, d_model]`` with persistent tokens ``P`` (shared by both branches):

    a = SW-Attn*([P || x])   sliding-window causal attention; every query also sees P
    m = LMM([P || x])        the neural memory (:mod:`lca.memory.neural_memory`) on the same stream
    out = (rms(a) * g_a) * sigmoid(rms(m) * g_m)

``*`` is the attention with the persistent prefix: the window applies to the
sequence only, and the prefix is merged in by log-sum-exp
(:func:`lca.attention.merge_attention`), so P stays visible to every query however
long the sequence. The paper's gate is "normalise both branches with learnable
vector-valued weights, then a non-linearity"; we read it as above.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from typing import TYPE_CHECKING

from lca.attention import BlockSizes, attention, merge_attention
from lca.attention.impl import get_impl
from lca.config import ConfigError, ModelConfig
from lca.memory import neural_memory as nm
from lca.memory.context_parallel import ContextSplit, fresh_memory
from lca.memory.mixer import ContextPlacement, TitansLmmConfig, as_arrays, as_variables
from lca.models.attends import Attends
from lca.models.kv_cache import KVCache, attend_cached, empty_kv_cache
from lca.models.rope import apply_rope

if TYPE_CHECKING:
    from lca.models.mixers import MixerEnv


def check_rope_heads(owner: str, d_model: int, num_heads) -> None:
    """The attention of a Titans architecture: ``num_heads`` heads of even width ``d_model / num_heads``."""
    if not isinstance(num_heads, int) or num_heads < 1 or d_model % num_heads:
        raise ValueError(f"{owner}.num_heads={num_heads!r} must be a positive int dividing d_model={d_model}")
    if (d_model // num_heads) % 2:
        raise ValueError(f"{owner}: head_dim = d_model / num_heads = {d_model // num_heads} must be even for RoPE")


def check_rope_section(key: str, model: ModelConfig) -> None:
    """Load-time twin of :func:`check_rope_heads` for a mixer section using ``model.num_heads``."""
    try:
        check_rope_heads(f"'{key}' with model", model.d_model, model.num_heads)
    except ValueError as err:
        raise ConfigError(f"{err}.") from None


@dataclasses.dataclass(frozen=True)
class MagConfig:
    """MAG layer: a neural memory beside ``window``-token sliding-window attention."""

    memory: nm.MemoryConfig
    num_heads: int = 2
    window: int = 64
    impl: str = "blockwise"
    rope_theta: float = 10000.0
    blocks: BlockSizes = BlockSizes()  # the attention's tiles, where ``impl`` takes them; None: its default

    def __post_init__(self):
        check_rope_heads("MagConfig", self.memory.d_model, self.num_heads)
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"MagConfig.window must be a positive int, got {self.window!r}")


@dataclasses.dataclass(frozen=True)
class TitansMagConfig(TitansLmmConfig):
    """``model.mixers.titans_mag``: the memory's fields, and the attention branch's window.

    The attention branch has ``model.num_heads`` heads of width ``d_model / num_heads``,
    RoPE with ``model.rope_theta``, computed by ``model.attention.impl`` with
    ``model.attention``'s tiles (no sequence strategy: on a mesh XLA places it); the
    persistent tokens are shared by both branches.
    """

    window: int = 64  # sliding-window size of the attention branch

    def check(self, key: str, model: ModelConfig) -> None:
        super().check(key, model)
        if self.window < 1:
            raise ConfigError(f"config key '{key}.window' must be an int >= 1, got {self.window!r}.")
        if self.persistent and model.attention.impl == "xla":  # the prefix is merged in by its lse
            raise ConfigError(f"config key '{key}.persistent'={self.persistent} needs the attention's log-sum-exp, "
                              f"which model.attention.impl='xla' does not give; use impl=blockwise (or pallas, "
                              f"reference) or {key}.persistent=0.")
        check_rope_section(key, model)

    def attends(self, model: ModelConfig) -> Attends:
        """The attention branch (MAL: the attention after the memory): a window, the persistent tokens besides."""
        return Attends(width=model.d_model, window=self.window, prefix=self.persistent)

    def mag(self, model: ModelConfig) -> MagConfig:
        return MagConfig(memory=self.memory(model.d_model), num_heads=model.num_heads, window=self.window,
                         impl=model.attention.impl, rope_theta=model.rope_theta,
                         blocks=BlockSizes.of(model.attention))


def init_params(key: jax.Array, config: MagConfig) -> dict:
    d = config.memory.d_model
    k_mem, k_qkv, k_out = jax.random.split(key, 3)
    return {
        "memory": nm.init_params(k_mem, config.memory),
        "w_qkv": jax.random.normal(k_qkv, (d, 3 * d), jnp.float32) / jnp.sqrt(d),
        "w_out": jax.random.normal(k_out, (d, d), jnp.float32) / jnp.sqrt(d),
        "gain_attn": jnp.ones((d,), jnp.float32),
        "gain_memory": jnp.ones((d,), jnp.float32),
    }


def param_axes(config: MagConfig) -> dict:
    """Logical axis names of :func:`init_params`' arrays (see :func:`lca.memory.neural_memory.param_axes`)."""
    return {
        "memory": nm.param_axes(config.memory),
        "w_qkv": ("embed", None),
        "w_out": (None, "embed"),
        "gain_attn": ("norm",),
        "gain_memory": ("norm",),
    }


def _rms(x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def _heads(z, h):
    return (rearrange(t, "b l (h d) -> b l h d", h=h) for t in jnp.split(z, 3, axis=-1))


def _projected(params, x, positions, config: MagConfig):
    """``q, k, v [b, l, h, d]`` of ``x [b, l, d_model]``, rotary applied to q and k at ``positions``."""
    q, k, v = _heads(x @ params["w_qkv"], config.num_heads)
    return apply_rope(q, positions, config.rope_theta), apply_rope(k, positions, config.rope_theta), v


def _output(params, q, out, lse, config: MagConfig, dtype, options: dict):
    """The window's ``out [b, l, h, d]`` (and its ``lse``) with the persistent prefix merged in, projected.

    ``options``: how the prefix is attended (``impl`` and its tiles), as the window was.
    """
    persistent = params["memory"].get("persistent")
    if persistent is not None:
        _, pk, pv = _heads(jnp.broadcast_to(persistent, (q.shape[0],) + persistent.shape) @ params["w_qkv"],
                           config.num_heads)
        prefix, prefix_lse = attention(q, pk, pv, return_lse=True, **options)
        out = merge_attention(out, lse, prefix, prefix_lse)[0]
    return rearrange(out.astype(dtype), "b l h d -> b l (h d)") @ params["w_out"]


def attention_branch(params, x, positions, segment_ids, config: MagConfig):
    """Sliding-window causal attention over ``x [b, l, d_model]`` with the persistent prefix visible to all."""
    q, k, v = _projected(params, x, positions, config)
    has_prefix = params["memory"].get("persistent") is not None
    options = dict(impl=config.impl, **config.blocks.as_options(get_impl(config.impl)))
    result = attention(q, k, v, causal=True, window=config.window, segment_ids=segment_ids,
                       return_lse=has_prefix, **options)
    out, lse = result if has_prefix else (result, None)
    return _output(params, q, out, lse, config, x.dtype, options)


def attention_branch_cached(params, x, positions, cache: KVCache, config: MagConfig):
    """:func:`attention_branch` of the next ``t`` tokens ``x [b, t, d_model]`` over ``cache`` and themselves.

    Returns ``(out [b, t, d_model], cache)``; the cache holds the keys and values of every earlier token
    (:mod:`lca.models.kv_cache`), and one document per row is assumed, as in decoding.
    """
    q, k, v = _projected(params, x, positions, config)
    (out, lse), cache = attend_cached(q, k, v, cache, window=config.window, return_lse=True)
    # The persistent prefix dense: its few keys make [t, persistent] logits, small even for a long prefill.
    return _output(params, q, out, lse, config, x.dtype, dict(impl="reference")), cache


def start_attention_cache(config: MagConfig, batch: int, max_len: int) -> KVCache:
    """An empty float32 cache for :func:`attention_branch_cached`: a ring of the window's ``window`` slots (room
    for ``max_len`` tokens when that is fewer), so the cache stays the window's size however long the context."""
    head_dim = config.memory.d_model // config.num_heads
    return empty_kv_cache(batch, max_len, config.num_heads, head_dim, jnp.float32, window=config.window)


class TitansCache(NamedTuple):
    """A MAG or MAL layer's inference state: its memory's, and its attention's keys and values."""

    memory: nm.MemoryState
    attention: KVCache


def mag_layer(
    params: dict, x: jax.Array, positions: jax.Array, segment_ids=None, *, config: MagConfig,
    split: ContextSplit | None = None,
) -> jax.Array:
    """One MAG layer on a whole sequence ``x [b, l, d_model]`` -> ``[b, l, d_model]``.

    ``split``: run the memory branch pipelined over a mesh axis (the same result).
    """
    a = attention_branch(params, x, positions, segment_ids, config)
    m = fresh_memory(params["memory"], x, config=config.memory, split=split, segment_ids=segment_ids)
    return _gate(params, a, m)


def mag_extend(params: dict, x: jax.Array, positions: jax.Array, cache: TitansCache, *, config: MagConfig):
    """:func:`mag_layer` of the next ``t`` tokens ``x [b, t, d_model]`` after those in ``cache``:
    ``(out [b, t, d_model], cache)``; streaming a sequence so equals one call over all of it."""
    a, attention_cache = attention_branch_cached(params, x, positions, cache.attention, config)
    m, memory = nm.memory_layer(params["memory"], cache.memory, x, config=config.memory)
    return _gate(params, a, m), TitansCache(memory, attention_cache)


def _gate(params, a, m):
    return _rms(a) * params["gain_attn"] * jax.nn.sigmoid(_rms(m) * params["gain_memory"])


class MagMixer(nnx.Module):
    """MAG with the mixer call signature ``mixer(x, positions, segment_ids)``.

    Both branches honour ``segment_ids``: the attention's mask, and the memory restarts at each
    document start. MAL subclasses it with its own
    ``init_params``, ``layer`` and ``layer_extend``.
    """

    init_params = staticmethod(init_params)
    param_axes = staticmethod(param_axes)
    layer = staticmethod(mag_layer)
    layer_extend = staticmethod(mag_extend)

    def __init__(self, cfg: TitansMagConfig, env: MixerEnv, *, rngs: nnx.Rngs):
        self.config = cfg.mag(env.model)
        self.place = ContextPlacement(env, cfg.micro_batches)
        self.parameters = as_variables(self.init_params(rngs.params(), self.config), self.param_axes(self.config))

    def __call__(self, x, positions, segment_ids=None):
        y = self.layer(as_arrays(self.parameters), x.astype(jnp.float32), positions, segment_ids,
                       config=self.config, split=self.place(x))
        return y.astype(x.dtype)

    def start_cache(self, batch: int, max_len: int, dtype) -> TitansCache:
        """The memory after its persistent tokens and an empty attention cache of ``max_len`` tokens
        (inference, :mod:`lca.models.generate`); the layer computes in float32 whatever ``dtype``."""
        del dtype
        memory = nm.fresh_state(as_arrays(self.parameters)["memory"], self.config.memory, batch)
        return TitansCache(memory, start_attention_cache(self.config, batch, max_len))

    def extend(self, x, positions, cache: TitansCache):
        """The next ``t`` tokens ``x [b, t, d_model]`` at ``positions [b, t]`` -> ``(out [b, t, d_model], cache)``."""
        y, cache = self.layer_extend(as_arrays(self.parameters), x.astype(jnp.float32), positions, cache,
                                     config=self.config)
        return y.astype(x.dtype), cache
