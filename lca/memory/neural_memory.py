"""Titans neural long-term memory as a pure-functional layer (LMM: the memory alone).

``memory_layer(params, state, x, config=...) -> (y, new_state)`` for ``x [b, l, d_model]``:

1. q, k, v = SiLU(causal depthwise conv(x W_{q,k,v})) split into heads; q and k are
   l2-normalised (paper Sec. 4.4).
2. theta_t = max_lr * sigmoid(x_t w_theta + b), eta_t = sigmoid(...), alpha_t = sigmoid(...),
   one scalar per head and token (data-dependent, paper Eq. 13-14).
3. The memory (an MLP per head, :mod:`lca.memory.mlp`) learns k -> v with the
   chunk-parallel update (:mod:`lca.memory.update`); the output is ``M_t(q_t)``, after
   the token's own update, heads merged by ``W_o``.

The state carries across calls: chunk-start memory weights and momentum, the
tokens of the open (partial) chunk and the conv tail. The chunk grid is counted
from the first token ever streamed, so streaming a sequence in pieces gives the
same outputs and state as one call. Persistent memory tokens (learned,
data-independent) are the first tokens the memory sees: :func:`fresh_state`
streams them.

Departures from the paper, and why: no biases in the memory MLP (the paper does
not specify them); ``theta`` is scaled by ``max_lr`` (as in lucidrains) because a
raw sigmoid step of up to 1 diverges for a deep memory; the output has no extra
normalisation or gate (those belong to the MAG/MAL/MAC wrappers).

Packed rows (several documents in one row): ``memory_layer(..., restarts=...)`` with
``restarts [b, l]`` (:func:`document_starts` of the segment ids) restarts the memory at
each flagged token. The memory there is the one a sequence starts with
(:func:`restart_state`: the learned weights after the persistent tokens, their conv tail
included), and the causal conv does not reach back over the restart, so no document sees
another's tokens. The chunk grid stays the row's: a document equals its own run exactly
when it starts on a chunk boundary and ``num_persistent`` is a multiple of ``chunk_size``;
otherwise the gradients of its first (partial) chunk are taken at the restart weights, as a
chunk start's are (:mod:`lca.memory.update`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from einops import rearrange

from lca.attention.mask import segment_begins
from lca.memory import mlp
from lca.memory.update import MemoryTokens, chunk_step, memorize_chunked

MAX_GRAD_NORM = 10.0  # see MemoryConfig.max_grad_norm
INIT_FORGET = 0.0025  # see MemoryConfig.init_forget

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": jax.nn.gelu,
    "tanh": jnp.tanh,
}


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """Shape and update rule of one neural memory layer.

    chunk_size: tokens whose gradients share the chunk-start weights; 1 is fully
        online gradient descent, larger is more parallel (fewer sequential steps).
    depth: layers of the memory MLP (1 = linear memory); hidden width is
        ``expansion * head_dim``.
    conv_kernel: width of the causal depthwise conv after the q/k/v projections (0: none).
    max_lr: upper bound of the data-dependent learning rate theta. The default is small because a chunk
        sums ``chunk_size`` gradients taken at its start weights and momentum (eta near 0.9) multiplies the
        step about tenfold: a fresh depth-2 memory on N(0, 1) input blew up within 128 tokens at 0.1 with
        chunk 16, and training diverged at 0.01; 0.003 trained stably (benchmarks/titans_eval.py).
    max_grad_norm: each token's memory gradient (all layers) is clipped to this norm, i.e. theta_t is
        scaled by ``min(1, max_grad_norm / ||grad_t||)`` (None: no clipping, the paper's rule). A bound on
        every step keeps the memory finite however large its targets grow: MAC, whose retrievals feed its
        next targets, blew up to inf within one 256-token row after 52 training steps without it.
    init_forget: the forgetting rate alpha (per token) at initialisation, through the bias of its sigmoid.
        It sets how far back the fresh memory reaches: a write fades as ``(1 - alpha)^distance``, so
        about ``1 / alpha`` tokens, and so do the learned initial weights, which small steps (``max_lr``)
        do not replace quickly. At 0.05 (this layer's start until 2026-11-27) a fresh depth-2 memory on
        N(0, 1) input had weights of 2e-35 after 2,048 tokens, and a MAG model's memory never learned to
        bridge a needle 368 tokens back (answer loss at ln 10 for 3,000 steps); at 0.0025 its weights stay
        near 0.4 and MAG and MAL learned the passkey (benchmarks/results/titans.md).
    """

    d_model: int
    num_heads: int = 1
    head_dim: int | None = None
    depth: int = 2
    expansion: int = 2
    chunk_size: int = 16
    conv_kernel: int = 4
    num_persistent: int = 0
    max_lr: float = 0.003
    max_grad_norm: float | None = MAX_GRAD_NORM
    activation: str = "silu"
    init_forget: float = INIT_FORGET

    def __post_init__(self):
        positive = {
            "d_model": self.d_model,
            "num_heads": self.num_heads,
            "depth": self.depth,
            "expansion": self.expansion,
            "chunk_size": self.chunk_size,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MemoryConfig.{name} must be a positive int, got {value!r}")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(
                f"MemoryConfig: d_model={self.d_model} is not divisible by num_heads={self.num_heads}; "
                "pick num_heads dividing d_model or set head_dim"
            )
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim < 1):
            raise ValueError(f"MemoryConfig.head_dim must be a positive int or None, got {self.head_dim!r}")
        for name in ("conv_kernel", "num_persistent"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"MemoryConfig.{name} must be an int >= 0, got {value!r}")
        if not self.max_lr > 0:
            raise ValueError(f"MemoryConfig.max_lr must be > 0, got {self.max_lr!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"MemoryConfig.max_grad_norm must be > 0 or None (no clipping), got {self.max_grad_norm!r}")
        if not 0 < self.init_forget < 1:
            raise ValueError(
                f"MemoryConfig.init_forget must be in (0, 1) (a sigmoid's value), got {self.init_forget!r}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"MemoryConfig.activation={self.activation!r}; expected one of {sorted(ACTIVATIONS)}")

    @property
    def dim(self) -> int:
        """Per-head width of q, k, v."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

    @property
    def inner(self) -> int:
        return self.num_heads * self.dim

    @property
    def act(self):
        return ACTIVATIONS[self.activation]


class MemoryState(NamedTuple):
    """What a memory layer carries between calls (batch ``b``, heads ``h``, chunk ``c``).

    weights, momentum: per layer ``[b, h, d_out, d_in]``, at the start of the open chunk.
    pending: the open chunk's tokens, ``MemoryTokens`` with leaves ``[b, h, c, ...]`` (their restart
        flags included, so that a restart inside the open chunk holds in the next call).
    count: how many of ``pending`` are real (int32 scalar, ``0 <= count < c``).
    conv_tail: the last ``conv_kernel - 1`` pre-conv projections ``[b, conv_kernel - 1, 3 * inner]``.
    """

    weights: mlp.Weights
    momentum: mlp.Weights
    pending: MemoryTokens
    count: jax.Array
    conv_tail: jax.Array


def init_params(key: jax.Array, config: MemoryConfig) -> dict:
    """Outer (trained) parameters of one memory layer, float32."""
    d, inner, h = config.d_model, config.inner, config.num_heads
    keys = jax.random.split(key, 8)

    def dense(k, fan_in, fan_out):
        return jax.random.normal(k, (fan_in, fan_out), jnp.float32) / jnp.sqrt(fan_in)

    params = {
        "w_qkv": dense(keys[0], d, 3 * inner),
        "w_out": dense(keys[1], inner, d),
        "w_gates": dense(keys[2], d, 3 * h) * 0.1,
        # theta starts near max_lr / 2, eta (momentum) near 0.9, alpha (forgetting) at init_forget
        "b_gates": jnp.concatenate(
            [jnp.zeros(h), jnp.full(h, 2.2), jnp.full(h, math.log(config.init_forget / (1 - config.init_forget)))]
        ).astype(jnp.float32),
        "memory": mlp.init_weights(
            keys[3], mlp.layer_widths(config.dim, config.depth, config.expansion), leading=(h,)
        ),
    }
    if config.conv_kernel:
        # identity-like start: the last tap passes the token through
        taps = jnp.zeros((config.conv_kernel, 3 * inner)).at[-1].set(1.0)
        params["conv"] = taps + 0.02 * jax.random.normal(keys[4], taps.shape)
    if config.num_persistent:
        params["persistent"] = jax.random.normal(keys[5], (config.num_persistent, d), jnp.float32) * 0.02
    return params


def param_axes(config: MemoryConfig) -> dict:
    """Logical axis names (:mod:`lca.parallel.sharding`) of :func:`init_params`' arrays, the same tree.

    As in ``lca.models``' dense layers, the ``d_model`` side of a projection is ``"embed"``
    (sharded over fsdp by the default rules) and per-head weights lead with ``"heads"``.
    The fused q|k|v and gate columns stay whole (None): they are split into q, k, v and
    heads after the matmul, and a shard boundary inside them would not follow that split.
    """
    axes = {
        "w_qkv": ("embed", None),
        "w_out": (None, "embed"),
        "w_gates": ("embed", None),
        "b_gates": (None,),
        "memory": tuple(("heads", None, None) for _ in range(config.depth)),
    }
    if config.conv_kernel:
        axes["conv"] = (None, None)
    if config.num_persistent:
        axes["persistent"] = (None, "embed")
    return axes


def init_state(params: dict, config: MemoryConfig, batch: int) -> MemoryState:
    """The empty state: memory at its learned initial weights, zero momentum, nothing pending."""
    weights = tuple(jnp.broadcast_to(w, (batch,) + w.shape) for w in params["memory"])
    c, h, dim = config.chunk_size, config.num_heads, config.dim
    zeros = jnp.zeros((batch, h, c, dim), jnp.float32)
    gate = jnp.zeros((batch, h, c), jnp.float32)
    return MemoryState(
        weights=weights,
        momentum=jax.tree.map(jnp.zeros_like, weights),
        pending=MemoryTokens(zeros, zeros, zeros, gate, gate, gate, jnp.zeros((batch, h, c), bool)),
        count=jnp.zeros((), jnp.int32),
        conv_tail=jnp.zeros((batch, max(config.conv_kernel - 1, 0), 3 * config.inner), jnp.float32),
    )


def fresh_state(params: dict, config: MemoryConfig, batch: int) -> MemoryState:
    """The state a sequence starts from: the empty state after the persistent tokens."""
    state = init_state(params, config, batch)
    if not config.num_persistent:
        return state
    persistent = jnp.broadcast_to(params["persistent"], (batch,) + params["persistent"].shape)
    return memory_layer(params, state, persistent, config=config)[1]


def _check_input(x: jax.Array, config: MemoryConfig, state: MemoryState | None = None) -> None:
    if x.ndim != 3 or x.shape[-1] != config.d_model:
        raise ValueError(f"memory x must be [batch, length, d_model={config.d_model}], got shape {x.shape}")
    if state is not None and state.conv_tail.shape[0] != x.shape[0]:
        raise ValueError(
            f"memory state is for batch {state.conv_tail.shape[0]} but x has batch {x.shape[0]}; "
            "build the state with init_state(params, config, batch=x.shape[0])"
        )


def _causal_conv(taps, tail, z, restarts=None, restart_tail=None):
    """Depthwise causal conv of ``z [b, l, ch]`` continuing ``tail [b, kernel-1, ch]``.

    Returns the conv and the tail the next call continues. With ``restarts [b, l]`` (bool), a
    flagged token's document begins there: its taps that would reach further back read
    ``restart_tail [kernel-1, ch]`` instead (the tail a fresh sequence has), and so does the
    returned tail.
    """
    kernel = taps.shape[0]
    full = jnp.concatenate([tail, z], axis=1)
    length = z.shape[1]
    if restarts is None or kernel == 1:
        out = sum(taps[i] * full[:, i : i + length] for i in range(kernel))
        return out, full[:, full.shape[1] - (kernel - 1) :]
    # tokens from each position (the last one is the next call's first token) back to its document's
    # start; `kernel` (every tap in reach) for the document this call continues
    index = jnp.arange(length + 1)
    flags = jnp.pad(restarts, ((0, 0), (0, 1)))
    latest = jax.lax.cummax(jnp.where(flags, index, -1), axis=1)
    since = jnp.where(latest >= 0, index - latest, kernel)

    def tap(back, lo, hi):
        """What the tap ``back`` tokens behind positions ``lo..hi-1`` sees, ``[b, hi - lo, ch]``."""
        own = full[:, lo + kernel - 1 - back : hi + kernel - 1 - back]
        if back == 0:
            return own
        seen = since[:, lo:hi, None]
        # reaching over the document's start: the fresh tail's entry as far before its end
        fresh = sum(jnp.where(seen == back - kernel + 1 + m, restart_tail[m], 0.0) for m in range(kernel - 1))
        return jnp.where(seen >= back, own, fresh)

    out = sum(taps[kernel - 1 - back] * tap(back, 0, length) for back in range(kernel))
    new_tail = jnp.concatenate([tap(back, length, length + 1) for back in range(kernel - 1, 0, -1)], axis=1)
    return out, new_tail


def document_starts(segment_ids: jax.Array) -> jax.Array:
    """``restarts [b, l]`` (bool) for :func:`memory_layer` from packed ``segment_ids [b, l]``: True where a
    token's segment differs from the one before it (never at the first token: the call's start is the
    sequence's, or continues it)."""
    if segment_ids.ndim != 2:
        raise ValueError(f"segment_ids must be [batch, length], got shape {segment_ids.shape}")
    # Elementwise, not ``.at[:, 0].set(False)``: on jax 0.10.2's CPU SPMD partitioner that scatter, after the
    # concatenate segment_begins then used, wrote the first column into every shard's first column of a
    # sequence-sharded row (false restarts at each shard start; test_neural_memory.py checks the sharded call).
    return segment_begins(segment_ids) & (jnp.arange(segment_ids.shape[1]) > 0)


def l2_normalize(x: jax.Array) -> jax.Array:
    """``x / ||x||`` over the last axis, 0 at 0 with a finite gradient there.

    ``x / max(norm(x), eps)`` would be 0 at 0 too, but its gradient is NaN: the norm's derivative
    ``x / norm(x)`` is 0/0 even where ``max`` passes it a zero cotangent.
    """
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


def project(params: dict, config: MemoryConfig, tail: jax.Array, x: jax.Array, restarts=None, restart_tail=None):
    """Tokens ``MemoryTokens`` with leaves ``[b, h, l, ...]`` from ``x [b, l, d_model]``, and the new conv tail.

    ``restarts [b, l]`` and ``restart_tail`` as in :func:`_causal_conv`; the tokens carry the flags.
    """
    z = x @ params["w_qkv"]
    if config.conv_kernel:
        z, tail = _causal_conv(params["conv"], tail, z, restarts, restart_tail)
    z = jax.nn.silu(z)
    q, k, v = (rearrange(t, "b l (h d) -> b h l d", h=config.num_heads) for t in jnp.split(z, 3, axis=-1))
    q, k = l2_normalize(q), l2_normalize(k)
    gates = jax.nn.sigmoid(x @ params["w_gates"] + params["b_gates"])
    lr, momentum, forget = (rearrange(g, "b l h -> b h l") for g in jnp.split(gates, 3, axis=-1))
    flags = jnp.zeros(x.shape[:2], bool) if restarts is None else restarts
    flags = jnp.broadcast_to(flags[:, None], lr.shape)
    return MemoryTokens(q, k, v, config.max_lr * lr, momentum, forget, flags), tail


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _chunk_buffer(pending: jax.Array, new: jax.Array, count, chunk: int) -> jax.Array:
    """``pending [chunk, ...]``'s first ``count`` entries, then ``new [l, ...]``, zeros after them, along axis 0:
    whole chunks of the stream an update runs over (``ceil((l + chunk - 1) / chunk)`` of them, whatever ``count``)."""
    padded = _round_up(new.shape[0] + chunk - 1, chunk)
    buf = jnp.zeros((padded,) + pending.shape[1:], pending.dtype).at[:chunk].set(pending)
    return jax.lax.dynamic_update_slice_in_dim(buf, new, count, axis=0)


def _stream_one(weights, momentum, pending, count, new, start, busy, *, config: MemoryConfig, memorize):
    """One (batch row, head): prepend the open chunk to ``new`` and run the update (``start``: the
    restart state, or None; ``busy``: :func:`_busy_chunks`)."""
    c = config.chunk_size
    length = new.q.shape[0]
    tokens = jax.tree.map(lambda p, x: _chunk_buffer(p, x, count, c), pending, new)
    end = count + length
    open_chunk = end // c
    y, (w, s) = memorize(weights, momentum, tokens, chunk_size=c, act=config.act, stop=open_chunk,
                         max_grad_norm=config.max_grad_norm, start=start, busy=busy)
    valid = jnp.arange(c) < end - open_chunk * c
    new_pending = jax.tree.map(
        lambda x: jnp.where(
            valid.reshape((c,) + (1,) * (x.ndim - 1)),
            jax.lax.dynamic_slice_in_dim(x, open_chunk * c, c, axis=0),
            jnp.zeros((), x.dtype),
        ),
        tokens,
    )
    return jax.lax.dynamic_slice_in_dim(y, count, length, axis=0), w, s, new_pending


def _busy_chunks(state: MemoryState, restarts: jax.Array, config: MemoryConfig) -> jax.Array:
    """``[chunks]`` bool: which chunks of :func:`_stream_one`'s buffer (the open chunk, then ``restarts [b, l]``'s
    tokens) hold a restart in any row. One flag for the whole batch, so that the chunks without any skip the
    restart terms as a branch, not a select (about twice the memory update's work)."""
    c = config.chunk_size
    pending = jnp.any(state.pending.restart, axis=1)  # the same for every head
    buffer = jax.vmap(lambda p, r: _chunk_buffer(p, r, state.count, c))(pending, restarts)
    return jnp.any(buffer.reshape(buffer.shape[0], -1, c), axis=(0, 2))


def memory_layer(
    params: dict, state: MemoryState, x: jax.Array, *, config: MemoryConfig, memorize=memorize_chunked,
    restarts: jax.Array | None = None, restart_from=None,
) -> tuple[jax.Array, MemoryState]:
    """Stream ``x [b, l, d_model]`` through the memory: ``(y [b, l, d_model], new state)``.

    ``memorize`` is the update rule (the chunk-parallel one, or the sequential oracle in tests).
    ``restarts [b, l]`` (bool, e.g. :func:`document_starts`): the memory restarts at these tokens
    from :func:`restart_state` (packed documents; see the module docstring). Streaming a packed
    row in pieces needs ``restarts`` in every call: without it the open chunk's flags are ignored.
    ``restart_from``: :func:`restart_state` of these ``params``, for a caller that streams many pieces
    (MAC's segments) and computes it once; None: computed here when ``restarts`` is given.
    """
    _check_input(x, config, state)
    start, restart_tail = None, None
    if restarts is not None:
        if restarts.shape != x.shape[:2]:
            raise ValueError(f"restarts must be [batch, length] = {x.shape[:2]} like x, got shape {restarts.shape}")
        start, restart_tail = restart_state(params, config) if restart_from is None else restart_from
        restarts = restarts.astype(bool)
    tokens, tail = project(params, config, state.conv_tail, x, restarts, restart_tail)
    busy = None if restarts is None else _busy_chunks(state, restarts, config)
    one = functools.partial(_stream_one, config=config, memorize=memorize)
    per_head = jax.vmap(lambda w, s, p, n, r: one(w, s, p, state.count, n, r, busy), in_axes=(0, 0, 0, 0, 0))
    run = jax.vmap(lambda w, s, p, n: per_head(w, s, p, n, start))
    y, weights, momentum, pending = run(state.weights, state.momentum, state.pending, tokens)
    y = rearrange(y, "b h l d -> b l (h d)") @ params["w_out"]
    count = (state.count + x.shape[1]) % config.chunk_size
    return y, MemoryState(weights, momentum, pending, count.astype(jnp.int32), tail)


def _flushed(state: MemoryState, config: MemoryConfig, start=None):
    """``(weights, momentum)`` after every token streamed so far (open chunk included), ``[b, h, ...]`` per layer;
    ``start``: the restart state (:func:`restart_state`) the open chunk's flagged tokens return to."""

    def one(w, s, pending, r):
        return chunk_step(w, s, pending, config.act, row=state.count - 1, max_grad_norm=config.max_grad_norm,
                          start=r)[1]

    per_head = jax.vmap(one)
    return jax.vmap(lambda w, s, p: per_head(w, s, p, start))(state.weights, state.momentum, state.pending)


def restart_state(params: dict, config: MemoryConfig):
    """Where a restart (a packed document's first token) takes the memory: ``((weights, momentum), conv_tail)``,
    the memory's weights and momentum ``[h, ...]`` per layer after the persistent tokens (their open chunk
    applied) and the conv tail ``[conv_kernel - 1, 3 * inner]`` they leave."""
    fresh = fresh_state(params, config, 1)
    weights, momentum = jax.tree.map(lambda a: a[0], _flushed(fresh, config))
    return (weights, momentum), fresh.conv_tail[0]


def current_weights(state: MemoryState, config: MemoryConfig, start=None) -> mlp.Weights:
    """The memory after every token streamed so far (open chunk included), ``[b, h, ...]`` per layer.

    ``start``: for a packed stream, the restart state (``restart_state(...)[0]``) of the open chunk's restarts.
    """
    return _flushed(state, config, start)[0]


def retrieve(state: MemoryState, q: jax.Array, *, config: MemoryConfig, start=None) -> jax.Array:
    """``M*(q)``: read the current memory with queries ``q [b, l, h, dim]``, no update -> ``[b, l, h, d_out]``
    (``start`` as in :func:`current_weights`)."""
    return read(current_weights(state, config, start), q, config=config)


def read(weights: mlp.Weights, q: jax.Array, *, config: MemoryConfig) -> jax.Array:
    """``M(q)`` for memory ``weights`` (``[b, h, ...]`` or ``[h, ...]`` per layer) and queries ``q [b, l, h, dim]``
    -> ``[b, l, h, d_out]``."""
    if q.ndim != 4 or q.shape[2:] != (config.num_heads, config.dim):
        raise ValueError(
            f"retrieve q must be [batch, length, num_heads={config.num_heads}, dim={config.dim}], got {q.shape}"
        )
    weights = tuple(jnp.broadcast_to(w, q.shape[:1] + w.shape[-3:]) for w in weights)
    per_head = jax.vmap(lambda w, qh: mlp.apply(w, qh, config.act), in_axes=(0, 1), out_axes=1)
    return jax.vmap(per_head)(weights, q)
