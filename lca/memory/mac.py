"""Titans MAC, memory as context (paper Sec. 4.1): segment attention over [persistent || retrieved || segment].

The sequence ``x [b, l, d_model]`` is cut into segments ``S_t`` of ``segment`` tokens.
For each segment, in order, with the memory ``M_{t-1}`` left by the segments before:

    h_t = M*_{t-1}(q_t)              retrieval, no update; q_t = l2norm(SiLU(S_t W_r)) per memory head
    y_t = Attn([P || h_t || S_t])    queries from S_t; P visible to every query,
                                     h_t and S_t causal (query i sees positions j <= i)
    M_t = M_{t-1} learning from S_t + y_t   the neural memory's update (:mod:`lca.memory.neural_memory`)
    o_t = y_t * sigmoid(m_t)         m_t = the memory's output on S_t + y_t

The retrieved token ``h_t[j]`` is computed from ``S_t[j]``, so it is masked causally
like ``S_t`` itself: attending to ``h_t[j > i]`` would read the future.
Departures from the paper, and why: the paper writes ``M_t = M_{t-1}(y_t)`` and
``o_t = y_t (x) M*_t(y_t)``; we feed the memory the residual stream after attention,
``S_t + y_t`` (the attention block's output with its residual connection, which the paper
uses in every block), because from ``y_t`` alone, an average over the segment, the memory
never learned to carry a pass key between segments (benchmarks/results/titans.md); we
gate with a sigmoid (as in our MAG) so the product stays bounded; RoPE is applied to
the queries and to the keys of ``h_t`` and ``S_t`` at the tokens' positions, the
persistent keys are not rotated.

Segments run in a ``lax.scan``. On a context-split mesh (``split``) each device runs
the segments of its shard and hands the memory state on, pipelined over micro-batches
(:func:`lca.memory.context_parallel.context_parallel`): the same result as one device.
That needs each device's shard to be whole segments (``l / devices`` a multiple of
``segment``); otherwise XLA runs the global scan on the gathered sequence (exact, not
sharded), with a warning.

Inference (:func:`mac_extend`, :mod:`lca.models.generate`) keeps a :class:`MacCache` of fixed size whatever
the context length: the memory at the start of the open segment ``M_{t-1}`` (every token of a segment retrieves
from it), the memory as it has learned from the segment's ``S_t + y_t`` so far (``M_t`` once the segment is
whole), and the segment's inputs, keys and values so far. A decoded token retrieves once, attends over its
segment's cached keys and takes one memory step; a prompt of several tokens reruns the open segment.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from lca.config import ConfigError, ModelConfig
from lca.memory import neural_memory as nm
from lca.memory.context_parallel import ContextSplit, context_parallel
from lca.memory.mag import check_rope_heads, check_rope_section
from lca.memory.mixer import ContextPlacement, TitansLmmConfig, as_arrays, as_variables
from lca.models.attends import Attends
from lca.models.rope import apply_rope

if TYPE_CHECKING:
    from lca.models.mixers import MixerEnv


@dataclasses.dataclass(frozen=True)
class MacConfig:
    """MAC layer: a neural memory read as context by attention over ``segment``-token segments."""

    memory: nm.MemoryConfig
    num_heads: int = 2
    segment: int = 64
    rope_theta: float = 10000.0

    def __post_init__(self):
        check_rope_heads("MacConfig", self.memory.d_model, self.num_heads)
        if not isinstance(self.segment, int) or self.segment < 1:
            raise ValueError(f"MacConfig.segment must be a positive int, got {self.segment!r}")


@dataclasses.dataclass(frozen=True)
class TitansMacConfig(TitansLmmConfig):
    """``model.mixers.titans_mac``: the memory's fields, and the attention's segment length.

    The attention has ``model.num_heads`` heads of width ``d_model / num_heads``.
    """

    segment: int = 64  # tokens per segment; attention spans [persistent || retrieved || segment]

    def check(self, key: str, model: ModelConfig) -> None:
        super().check(key, model)
        if self.segment < 1:
            raise ConfigError(f"config key '{key}.segment' must be an int >= 1, got {self.segment!r}.")
        check_rope_section(key, model)

    def attends(self, model: ModelConfig) -> Attends:
        return Attends(width=model.d_model, prefix=self.persistent, segment=self.segment)

    def mac(self, model: ModelConfig) -> MacConfig:
        return MacConfig(memory=self.memory(model.d_model), num_heads=model.num_heads, segment=self.segment,
                         rope_theta=model.rope_theta)


def init_params(key: jax.Array, config: MacConfig) -> dict:
    d, inner = config.memory.d_model, config.memory.inner
    k_mem, k_ret, k_qkv, k_out = jax.random.split(key, 4)
    return {
        "memory": nm.init_params(k_mem, config.memory),
        "w_retrieve": jax.random.normal(k_ret, (d, inner), jnp.float32) / jnp.sqrt(d),
        "w_qkv": jax.random.normal(k_qkv, (d, 3 * d), jnp.float32) / jnp.sqrt(d),
        "w_out": jax.random.normal(k_out, (d, d), jnp.float32) / jnp.sqrt(d),
    }


def param_axes(config: MacConfig) -> dict:
    """Logical axis names of :func:`init_params`' arrays (see :func:`lca.memory.neural_memory.param_axes`)."""
    return {
        "memory": nm.param_axes(config.memory),
        "w_retrieve": ("embed", None),
        "w_qkv": ("embed", None),
        "w_out": (None, "embed"),
    }


def mac_mask(num_persistent: int, segment: int) -> jax.Array:
    """``[segment, num_persistent + 2 * segment]`` bool: which of [P || h || S] each query may see."""
    causal = jnp.tril(jnp.ones((segment, segment), bool))
    return jnp.concatenate([jnp.ones((segment, num_persistent), bool), causal, causal], axis=1)


def retrieve_context(params: dict, state: nm.MemoryState, s: jax.Array, config: MacConfig, restart=None) -> jax.Array:
    """``h = M*(q)`` for the segment ``s [b, c, d_model]``, no update -> ``[b, c, d_model]``.

    ``restart``: ``(restarts [b, c], start)`` for packed documents, ``start`` the restart state
    (:func:`lca.memory.neural_memory.restart_state`'s first item): the tokens from a restart on read its
    weights, as their document's first segment does.
    """
    mem = config.memory
    q = rearrange(jax.nn.silu(s @ params["w_retrieve"]), "b c (h d) -> b c h d", h=mem.num_heads)
    q = nm.l2_normalize(q)  # q = 0 on the zero padding of a last partial segment
    if restart is None:
        h = nm.retrieve(state, q, config=mem)
    else:
        restarts, start = restart
        restarted = jnp.cumsum(restarts.astype(jnp.int32), axis=1) > 0
        h = nm.retrieve(state, q, config=mem, start=start)  # the open chunk may hold a restart
        h = jnp.where(restarted[..., None, None], nm.read(start[0], q, config=mem), h)
    return rearrange(h, "b c h d -> b c (h d)") @ params["memory"]["w_out"]


def _heads(z: jax.Array, config: MacConfig) -> jax.Array:
    return rearrange(z, "b l (h d) -> b l h d", h=config.num_heads)


def _persistent_kv(params: dict, batch: int, config: MacConfig):
    """The persistent tokens' keys and values ``[batch, P, heads, head_dim]`` each, or None without them."""
    persistent = params["memory"].get("persistent")
    if persistent is None:
        return None
    p = jnp.broadcast_to(persistent, (batch,) + persistent.shape)
    _, pk, pv = (_heads(t, config) for t in jnp.split(p @ params["w_qkv"], 3, axis=-1))
    return pk, pv


def _segment_qkv(params: dict, s, h, positions, config: MacConfig):
    """Queries ``[b, c, heads, head_dim]`` of ``s [b, c, d_model]``, and the keys and values of [h || s]
    ``[b, 2c, heads, head_dim]``; rotary at ``positions [b, c]`` on the queries and both halves of the keys."""
    q, k, v = (_heads(t, config) for t in jnp.split(s @ params["w_qkv"], 3, axis=-1))
    _, hk, hv = (_heads(t, config) for t in jnp.split(h @ params["w_qkv"], 3, axis=-1))
    q, k, hk = (apply_rope(t, positions, config.rope_theta) for t in (q, k, hk))
    return q, jnp.concatenate([hk, k], axis=1), jnp.concatenate([hv, v], axis=1)


def _segment_mask(params: dict, segment: int, restarts=None) -> jax.Array:
    """:func:`mac_mask` for the persistent tokens ``params`` holds (none, or ``P``); with ``restarts [b, c]``
    (packed documents), ``[b, c, P + 2c]``: a query sees h and S of its own document only."""
    persistent = params["memory"].get("persistent")
    prefix = 0 if persistent is None else persistent.shape[0]
    mask = mac_mask(prefix, segment)
    if restarts is None:
        return mask
    document = jnp.cumsum(restarts.astype(jnp.int32), axis=1)
    same = document[:, :, None] == document[:, None, :]
    return mask & jnp.concatenate([jnp.ones(same.shape[:2] + (prefix,), bool), same, same], axis=2)


def _attend(params: dict, q, keys, values, visible, config: MacConfig) -> jax.Array:
    """``q [b, n, heads, hd]`` over [P || ``keys, values [b, 2c, heads, hd]``] where ``visible [n, P + 2c]`` or
    ``[b, n, P + 2c]`` (rows of :func:`_segment_mask`) -> ``[b, n, d_model]``."""
    prefix = _persistent_kv(params, q.shape[0], config)
    if prefix is not None:
        keys, values = (jnp.concatenate([p, t], axis=1) for p, t in zip(prefix, (keys, values)))
    if visible.ndim == 3:
        visible = visible[:, None]  # over heads
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, keys) / jnp.sqrt(q.shape[-1])
    probs = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, values)
    return rearrange(out, "b c h d -> b c (h d)") @ params["w_out"]


def segment_attention(params: dict, s, h, positions, config: MacConfig, restarts=None) -> jax.Array:
    """Attention of ``s [b, c, d_model]`` over [P || h || s] under :func:`mac_mask` (and, with ``restarts [b, c]``,
    within each document) -> ``[b, c, d_model]``."""
    q, keys, values = _segment_qkv(params, s, h, positions, config)
    return _attend(params, q, keys, values, _segment_mask(params, s.shape[1], restarts), config)


def mac_segments(params: dict, state: nm.MemoryState, x, positions, *, config: MacConfig, complete=None,
                 restarts=None):
    """MAC over whole segments from ``state``: ``x [b, n * segment, d_model]`` -> ``(y alike, end state)``.

    ``complete``: how many leading segments are whole (an int32 scalar; None: all ``n``). The state then
    stops after them, so zero padding in the segments past them never reaches the memory.
    ``restarts [b, n * segment]`` (bool; packed documents): a document starts at each flagged token, and
    from there its tokens retrieve from, attend within and write to its own memory only (see ``mac_layer``).
    """
    c = config.segment
    xs = rearrange(x, "b (n c) d -> n b c d", c=c)
    ps = rearrange(positions, "b (n c) -> n b c", c=c)
    rs = None if restarts is None else rearrange(restarts, "b (n c) -> n b c", c=c)
    # once, not in every segment's memory_layer: the persistent tokens' pass and its flush
    restart = None if restarts is None else nm.restart_state(params["memory"], config.memory)

    def step(state, inputs):
        s, pos, r, index = inputs  # r: None unless packed
        h = retrieve_context(params, state, s, config, None if r is None else (r, restart[0]))
        y = segment_attention(params, s, h, pos, config, r)
        # the memory learns from the segment's residual stream after attention (see the module docstring)
        m, new = nm.memory_layer(params["memory"], state, s + y, config=config.memory, restarts=r,
                                 restart_from=restart)
        if complete is not None:
            new = jax.tree.map(lambda a, b: jnp.where(index < complete, a, b), new, state)
        return new, y * jax.nn.sigmoid(m)

    state, out = jax.lax.scan(step, state, (xs, ps, rs, jnp.arange(xs.shape[0])))
    return rearrange(out, "n b c d -> b (n c) d"), state


class MacCache(NamedTuple):
    """A MAC layer's inference state, whatever the context length (batch ``b``, ``segment`` tokens ``c``).

    memory: the memory at the start of the open segment, ``M_{t-1}``.
    inputs: the open segment's inputs so far ``[b, c, d_model]`` float32, zeros after ``count``.
    positions: their positions ``[b, c]`` int32, zeros after ``count``.
    count: tokens in the open segment (int32 scalar, ``0 <= count < c``).
    streamed: the memory after learning from the open segment's ``S_t + y_t`` so far (``M_t`` once whole).
    keys, values: the open segment's keys and values of [h || S] ``[b, 2c, heads, head_dim]`` float32 (rotary
      applied), zeros after ``count`` in each half.
    """

    memory: nm.MemoryState
    inputs: jax.Array
    positions: jax.Array
    count: jax.Array
    streamed: nm.MemoryState
    keys: jax.Array
    values: jax.Array


def start_mac_cache(params: dict, config: MacConfig, batch: int) -> MacCache:
    """The cache before the first token: the memory after its persistent tokens, an empty segment."""
    c, d = config.segment, config.memory.d_model
    memory = nm.fresh_state(params["memory"], config.memory, batch)
    kv = jnp.zeros((batch, 2 * c, config.num_heads, d // config.num_heads), jnp.float32)
    return MacCache(memory, jnp.zeros((batch, c, d), jnp.float32), jnp.zeros((batch, c), jnp.int32),
                    jnp.zeros((), jnp.int32), memory, kv, kv)


def mac_extend(params: dict, x: jax.Array, positions: jax.Array, cache: MacCache, *, config: MacConfig):
    """:func:`mac_layer` of the next ``t`` tokens ``x [b, t, d_model]`` at ``positions [b, t]`` after those in
    ``cache``: ``(out [b, t, d_model], cache)``; streaming a sequence so equals one call over all of it.

    One token (decoding) attends over the cached keys of its segment and the memory learns from it alone:
    ``O(segment)`` attention and one memory step, not the segment's rerun. Several (a prompt) rerun the open
    segment from the memory at its start with them, then rebuild the cache's keys and streamed memory of the
    new open segment. One document per row, as in decoding.
    """
    b, t, d = x.shape
    rows, _, width = cache.inputs.shape
    if (b, d) != (rows, width) or positions.shape != (b, t):
        raise ValueError(f"mac_extend: x must be [batch={rows}, t, d_model={width}] with positions [batch, t] "
                         f"(the cache's batch and width); got x {x.shape} and positions {positions.shape}.")
    x, positions = x.astype(jnp.float32), positions.astype(jnp.int32)
    extend = _extend_token if t == 1 else _extend_rerun
    return extend(params, x, positions, cache, config)


def _extend_rerun(params: dict, x, positions, cache: MacCache, config: MacConfig):
    """:func:`mac_extend` of ``t >= 1`` tokens by rerunning the open segment from the memory at its start."""
    c, count, t = config.segment, cache.count, x.shape[1]
    run = c * -(-(c - 1 + t) // c)  # whole segments enough for count + t tokens, count < c
    # one more zero segment to slice the next open segment from when count + t ends on a boundary
    room = lambda z: jnp.pad(z, [(0, 0), (0, run)] + [(0, 0)] * (z.ndim - 2))  # noqa: E731
    xs = jax.lax.dynamic_update_slice_in_dim(room(cache.inputs), x, count, axis=1)
    ps = jax.lax.dynamic_update_slice_in_dim(room(cache.positions), positions, count, axis=1)
    complete = (count + t) // c
    y, memory = mac_segments(params, cache.memory, xs[:, :run], ps[:, :run], config=config, complete=complete)
    nxt = lambda z: jax.lax.dynamic_slice_in_dim(z, complete * c, c, axis=1)  # noqa: E731
    out = jax.lax.dynamic_slice_in_dim(y, count, t, axis=1)
    inputs, ps, count = nxt(xs), nxt(ps), ((count + t) % c).astype(jnp.int32)
    return out, MacCache(memory, inputs, ps, count, *_open_segment(params, memory, inputs, ps, count, config))


def _extend_token(params: dict, x, positions, cache: MacCache, config: MacConfig):
    """:func:`mac_extend` of one token ``x [b, 1, d_model]``: its segment's cached keys, one memory step."""
    c, i = config.segment, cache.count
    q, kv, vv = _segment_qkv(params, x, retrieve_context(params, cache.memory, x, config), positions, config)
    put = lambda cached, new: cached.at[:, i].set(new[:, 0]).at[:, c + i].set(new[:, 1])  # noqa: E731
    keys, values = put(cache.keys, kv), put(cache.values, vv)
    y = _attend(params, q, keys, values, jax.lax.dynamic_slice_in_dim(_segment_mask(params, c), i, 1), config)
    m, streamed = nm.memory_layer(params["memory"], cache.streamed, x + y, config=config.memory)
    whole = i + 1 == c  # the segment is complete: its streamed memory is the next segment's M_{t-1}
    memory = jax.tree.map(lambda new, old: jnp.where(whole, new, old), streamed, cache.memory)
    clear = lambda z: jnp.where(whole, jnp.zeros_like(z), z)  # noqa: E731
    inputs = clear(cache.inputs.at[:, i].set(x[:, 0]))
    ps = clear(cache.positions.at[:, i].set(positions[:, 0]))
    count = ((i + 1) % c).astype(jnp.int32)
    return y * jax.nn.sigmoid(m), MacCache(memory, inputs, ps, count, streamed, clear(keys), clear(values))


def _open_segment(params: dict, memory: nm.MemoryState, inputs, positions, count, config: MacConfig):
    """The open segment's streamed memory and keys and values (:class:`MacCache`) from the memory at its start
    and its first ``count`` tokens ``inputs [b, c, d_model]`` (zeros after them)."""
    c = config.segment
    q, keys, values = _segment_qkv(params, inputs, retrieve_context(params, memory, inputs, config), positions,
                                   config)
    y = _attend(params, q, keys, values, _segment_mask(params, c), config)
    real = jnp.tile(jnp.arange(c) < count, 2)[None, :, None, None]
    keys, values = jnp.where(real, keys, 0.0), jnp.where(real, values, 0.0)

    def learn(state, j):  # one token at a time: the memory must not learn from the zeros after count
        token = jax.lax.dynamic_slice_in_dim(inputs + y, j, 1, axis=1)
        _, new = nm.memory_layer(params["memory"], state, token, config=config.memory)
        return jax.tree.map(lambda a, b: jnp.where(j < count, a, b), new, state), None

    streamed, _ = jax.lax.scan(learn, memory, jnp.arange(c))
    return streamed, keys, values


def mac_layer(
    params: dict, x: jax.Array, positions: jax.Array, segment_ids=None, *, config: MacConfig,
    split: ContextSplit | None = None,
):
    """One MAC layer on a whole sequence ``x [b, l, d_model]`` -> ``[b, l, d_model]``.

    ``segment_ids [b, l]`` (packed rows): each document retrieves from, attends within and trains its own
    memory, which restarts at the document's first token (:mod:`lca.memory.neural_memory`). A document
    equals its own run when it starts on a segment boundary and ``segment`` and ``num_persistent`` are
    multiples of the memory's ``chunk_size``.
    ``split``: pipeline the segments over a mesh axis (the same result; see the module docstring).
    """
    b, length, _ = x.shape
    c = config.segment
    restarts = None if segment_ids is None else nm.document_starts(segment_ids)
    fresh = lambda p, rows: nm.fresh_state(p["memory"], config.memory, rows)  # noqa: E731
    if split is not None:
        devices = split.mesh.shape[split.axis]
        if length % (devices * c) == 0:
            # restarts may be None: an empty subtree the pipeline passes through
            run = lambda p, state, xp: mac_segments(p, state, xp[0], xp[1], config=config, restarts=xp[2])  # noqa: E731
            return context_parallel(run, fresh, params, (x, positions, restarts), mesh=split.mesh, axis_name=split.axis,
                                    micro_batches=split.micro_batches, batch_axes=split.batch_axes)
        # Exact, but every device runs the whole scan: say so once per trace rather than slow down unseen.
        warnings.warn(f"titans_mac: a sequence of {length} tokens over {devices} devices of mesh axis "
                      f"'{split.axis}' is not whole segments of {c} per device, so MAC runs its global segment "
                      f"scan on the gathered sequence instead of pipelining it; use a length that is a multiple "
                      f"of {devices * c}.", stacklevel=2)
    pad = -length % c  # zeros after the end: causal, so they change nothing before it
    x, positions = jnp.pad(x, ((0, 0), (0, pad), (0, 0))), jnp.pad(positions, ((0, 0), (0, pad)))
    restarts = None if restarts is None else jnp.pad(restarts, ((0, 0), (0, pad)))
    return mac_segments(params, fresh(params, b), x, positions, config=config, restarts=restarts)[0][:, :length]


class MacMixer(nnx.Module):
    """MAC with the mixer call signature ``mixer(x, positions, segment_ids)``."""

    def __init__(self, cfg: TitansMacConfig, env: MixerEnv, *, rngs: nnx.Rngs):
        self.config = cfg.mac(env.model)
        self.place = ContextPlacement(env, cfg.micro_batches)
        self.parameters = as_variables(init_params(rngs.params(), self.config), param_axes(self.config))

    def __call__(self, x, positions, segment_ids=None):
        y = mac_layer(as_arrays(self.parameters), x.astype(jnp.float32), positions, segment_ids, config=self.config,
                      split=self.place(x))
        return y.astype(x.dtype)

    def start_cache(self, batch: int, max_len: int, dtype) -> MacCache:
        """An empty :class:`MacCache` (inference, :mod:`lca.models.generate`): a fixed size whatever ``max_len``,
        float32 whatever ``dtype``."""
        del max_len, dtype
        return start_mac_cache(as_arrays(self.parameters), self.config, batch)

    def extend(self, x, positions, cache: MacCache):
        """The next ``t`` tokens ``x [b, t, d_model]`` at ``positions [b, t]`` -> ``(out [b, t, d_model], cache)``."""
        y, cache = mac_extend(as_arrays(self.parameters), x, positions, cache, config=self.config)
        return y.astype(x.dtype), cache
