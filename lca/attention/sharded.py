"""The one sharded entry: what ring, Ulysses and USP share between a user's call and their algorithm.

A sharded attention call is two things:

* a :class:`CallSpec`, its static half: the mask, the logit options, the local
  implementation (the :class:`~lca.attention.impl.LocalImpl` object, not its
  name) and its block sizes. It is built and validated once per call, is
  hashable, and is what every step receives;
* its arrays: ``q, k, v``, the segment ids (validated once, split into
  ``q_seg, kv_seg``) and the token positions (given at shard level, otherwise
  derived on each device from the layout).

Each algorithm module (``ring``, ``ulysses``, ``usp``) supplies a *shard body*

    body(spec, q, k, v, q_seg, kv_seg, *, layout, convert, **axes) -> (out, lse)

which runs inside ``jax.shard_map`` on local shards. Its shard-level entry
(``ring_attention_shard``, ...) validates local shards with
:func:`validate_shard` and calls the body; its global entry (``ring_attention``,
...) validates the global arrays with :func:`validate_global` and runs the body
over the mesh with :func:`run_global`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
from jax import lax

from lca.attention import inputs
from lca.attention.blocks import BlockSizes
from lca.attention.impl import LocalImpl, get_step
from lca.attention.logits import LogitOptions
from lca.attention.mask import Mask
from lca.parallel import layout as layouts
from lca.parallel import sequence_sharding as seqshard
from lca.parallel.vma import union_varying_axes


@dataclasses.dataclass(frozen=True)
class CallSpec:
    """The static half of a sharded attention call (hashable: a jit / ``custom_vjp`` static arg)."""

    mask: Mask
    logit: LogitOptions
    impl: LocalImpl
    blocks: BlockSizes | None

    @classmethod
    def build(cls, head_dim: int, *, causal, window, softcap, scale, impl,
              blocks: BlockSizes) -> "CallSpec":
        """Validate the user's options once and resolve ``impl`` to a step implementation."""
        local = get_step(impl)
        return cls(
            mask=inputs.make_mask(causal, window),
            logit=inputs.logit_options(head_dim, scale, softcap),
            impl=local,
            blocks=resolve_blocks(local, blocks),
        )

    def forward(self, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
        """``impl.forward`` with this call's mask, logits and blocks: ``(out f32, lse f32)``."""
        return self.impl.forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, mask=self.mask,
                                 logit=self.logit, blocks=self.blocks)

    def backward(self, q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, dlse):
        """``impl.backward`` with this call's options: ``(dq, dk, dv)`` float32."""
        return self.impl.backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse, dout, dlse,
                                  mask=self.mask, logit=self.logit, blocks=self.blocks)


def resolve_blocks(impl: LocalImpl, given: BlockSizes) -> BlockSizes | None:
    """The user's sizes (:func:`inputs.block_sizes`), with the implementation's defaults for
    the ones not given (None: the implementation's own choice, per step)."""
    if given == BlockSizes():
        return impl.default_blocks
    return given.or_defaults(impl.default_blocks or BlockSizes())


def bound_axis_size(axis_name, *, arg: str = "axis_name") -> int:
    """Size of a ``shard_map`` axis, or a ``ValueError`` when it is not bound here."""
    try:
        return lax.axis_size(axis_name)
    except NameError as err:
        raise ValueError(
            f"{arg}={axis_name!r} is not a mesh axis of the enclosing jax.shard_map ({err}); "
            f"call this inside shard_map over a mesh with that axis, or use the global form "
            f"with mesh=..."
        ) from None


def check_heads(num_heads: int, num_kv_heads: int, n: int, axis) -> int:
    """Validate a head split over ``n`` devices (Ulysses); return how often each kv head repeats.

    With fewer kv heads than that (GQA/MQA), each kv head is repeated the smallest
    number of times that lets the kv heads split evenly, ``n / gcd(n, num_kv_heads)``.
    """
    if num_heads % n:
        working = [m for m in range(1, num_heads + 1) if num_heads % m == 0]
        raise ValueError(
            f"Ulysses attention splits the {num_heads} query heads over the {n} devices of mesh "
            f"axis {axis!r}, which needs num_heads % {n} == 0; axis sizes that work for "
            f"{num_heads} heads: {working} (or use ring attention, which has no head constraint)."
        )
    return n // math.gcd(n, num_kv_heads)


def check_vma(impl: LocalImpl, *arrays) -> None:
    """``ValueError`` when ``impl`` runs in a ``shard_map`` that checks varying axes and cannot.

    Inside ``jax.shard_map(check_vma=True)`` sharded inputs carry the mesh axes they
    vary over; under ``check_vma=False`` (what the global entry points use for such
    implementations) they carry none.
    """
    if impl.check_vma:
        return
    axes = sorted(union_varying_axes(*arrays))
    if axes:
        raise ValueError(
            f"impl={impl.name!r} cannot run inside a jax.shard_map that checks varying manual "
            f"axes (the inputs vary over {axes}); pass check_vma=False to your jax.shard_map, use "
            f"the global form (ring_attention, ulysses_attention, usp_attention with mesh=...), "
            f"or impl='blockwise'."
        )


def validate_shard(q, k, v, *, segment_ids, causal, window, softcap, scale, impl, blocks,
                   return_lse):
    """Trace-time checks of a shard-level call on local shards: ``(spec, q_seg, kv_seg)``."""
    b, q_len, kv_len, _, _, d = inputs.check_qkv(q, k, v)
    inputs.flag("return_lse", return_lse)
    spec = CallSpec.build(d, causal=causal, window=window, softcap=softcap, scale=scale,
                          impl=impl, blocks=blocks)
    check_vma(spec.impl, q, k, v)
    segs = inputs.split_segment_ids(segment_ids, b, q_len, kv_len)
    return (spec, *(segs if segs is not None else (None, None)))


def validate_global(q, k, v, *, n: int, axis, layout: str, input_layout: str, segment_ids,
                    causal, window, softcap, scale, impl, blocks, return_lse,
                    group: int = 1):
    """Trace-time checks shared by the global entry points, on the global shapes.

    ``n`` devices carry the layout over mesh axis ``axis``; each of their shards
    is split ``group`` ways more (USP's Ulysses axis). Returns ``(spec, (q_seg,
    kv_seg))`` (``None``s without segments).
    """
    b, q_len, kv_len, _, _, d = inputs.check_qkv(q, k, v)
    layouts.check_input_layout(input_layout, layout)
    for name, length in (("q length", q_len), ("kv length", kv_len)):
        layouts.check_global_length(layout, input_layout, length, n, name=name, axis=axis)
        if length % (n * group):
            raise ValueError(
                f"{name} {length} must be a multiple of {n * group} = {n} ring shards (axis "
                f"{axis!r}) x {group} Ulysses shards; pad it to a multiple of "
                f"{n * group * layouts.required_multiple(layout, 1)}."
            )
    segs = inputs.split_segment_ids(segment_ids, b, q_len, kv_len)
    inputs.flag("return_lse", return_lse)
    spec = CallSpec.build(d, causal=causal, window=window, softcap=softcap, scale=scale,
                          impl=impl, blocks=blocks)
    return spec, (segs if segs is not None else (None, None))


def in_layout(attend, layout: str, axis_name, convert: bool, q, k, v, q_seg, kv_seg):
    """``attend(q, k, v, q_seg, kv_seg) -> (out, lse)`` on shards in ``layout`` order.

    ``convert``: the shards are in natural order; move them to ``layout`` over
    ``axis_name`` first and the results back after.
    """
    if not convert:
        return attend(q, k, v, q_seg, kv_seg)
    to = functools.partial(layouts.shard_to_layout, layout=layout, axis_name=axis_name)
    out, lse = attend(*jax.tree.map(to, (q, k, v, q_seg, kv_seg)))
    return (layouts.shard_from_layout(out, layout, axis_name),
            layouts.shard_from_layout(lse, layout, axis_name, seq_axis=2))


@dataclasses.dataclass(frozen=True)
class GlobalCall:
    """A shard body run by a global entry point, with everything static about it (hashable)."""

    body: Callable  # body(spec, q, k, v, q_seg, kv_seg, *, layout, convert, **axes)
    spec: CallSpec
    layout: str
    convert: bool  # inputs in natural order: the body moves them to ``layout`` and back
    axes: tuple  # the body's axis keyword arguments, as sorted items


def global_shard(call: GlobalCall, q, k, v, q_seg, kv_seg):
    """Per-shard function of the global entry points."""
    return call.body(call.spec, q, k, v, q_seg, kv_seg, layout=call.layout,
                     convert=call.convert, **dict(call.axes))


def run_global(body, spec: CallSpec, q, k, v, segs, *, mesh, seq_axes: tuple, layout: str,
               input_layout: str, axes: dict, batch_axes, return_lse: bool):
    """Run ``body`` over the sequence axes ``seq_axes`` of ``mesh`` on global arrays.

    ``segs = (q_seg, kv_seg)`` from :func:`validate_global`; ``axes`` are the
    body's axis arguments. Returns ``out`` with q's sharding (and ``lse``).
    """
    call = GlobalCall(body, spec, layout, input_layout == "natural", tuple(sorted(axes.items())))
    batch = seqshard.batch_axes(mesh, seq_axes, q.shape[0], batch_axes)
    run_mesh = seqshard.mesh_for_inputs(mesh, q, k, v, *segs)
    out, lse = seqshard.run(global_shard, call, run_mesh, seq_axes, batch, q, k, v, *segs,
                            check_vma=spec.impl.check_vma)
    out = seqshard.match_sharding(out, q, run_mesh)
    return (out, lse) if return_lse else out
