"""Sequence strategies: how a model's attention treats a sequence split over a mesh.

Attention in a model is two independent choices (``model.attention``):

* ``impl``: the *local implementation*, how attention is computed on one device
  (``reference``, ``xla``, ``blockwise``, ``pallas``: :func:`lca.attention.impl.get_impl`);
* ``sequence``: the *sequence strategy*, an entry of :data:`STRATEGIES` below
  (``none``, ``ring``, ``ulysses``, ``usp``) or ``auto``.

A strategy turns the local implementation into the callable an attention mixer uses,
with global (natural-order) arrays ``q [b, l, h, d]``, ``k, v [b, l, h_kv, d]``::

    attend(q, k, v, *, causal, segment_ids, window, softcap, scale) -> out [b, l, h, d]

Each entry is written once, here, and owns three things: its typed config section
(``model.strategies.<name>``, validated when the config loads), how it is built
(from that section, the mesh and the ``LocalImpl`` object), and the sequence-length
multiple it needs on a mesh (derived from :mod:`lca.parallel.layout`). Mesh axis
names come from the section, never from a string in code. ``auto`` is resolved in
:func:`resolve` and nowhere else.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax

from lca.attention import BlockSizes, attention, ring_attention, ulysses_attention, usp_attention
from lca.attention.impl import LocalImpl, get_impl
from lca.config import ConfigError, ModelConfig, choice_error
from lca.parallel import layout as layouts
from lca.parallel.sequence_sharding import mesh_axis_size

# --------------------------------------------------------------------------- typed sections


def _check_axis(key: str, axis: str, mesh_axes: tuple[str, ...]) -> None:
    if axis not in mesh_axes:
        raise ConfigError(f"config key {key!r} must name a mesh axis, one of {list(mesh_axes)}, got {axis!r}.")


def _check_layout(key: str, layout: str) -> None:
    if layout not in layouts.LAYOUTS:
        raise ConfigError(f"config key {key!r} must be one of {list(layouts.LAYOUTS)}, got {layout!r}.")


@dataclasses.dataclass(frozen=True)
class NoneConfig:
    """``none``: no options; the implementation runs on the global arrays and XLA places it."""


@dataclasses.dataclass(frozen=True)
class RingConfig:
    axis: str = "context"  # mesh axis the sequence is split over
    layout: str = "zigzag"  # token layout over that axis (lca.parallel.layout)

    def check(self, key: str, mesh_axes: tuple[str, ...]) -> None:
        _check_axis(f"{key}.axis", self.axis, mesh_axes)
        _check_layout(f"{key}.layout", self.layout)


@dataclasses.dataclass(frozen=True)
class UlyssesConfig:
    axis: str = "context"  # mesh axis the sequence is split over (num_heads % its size == 0)

    def check(self, key: str, mesh_axes: tuple[str, ...]) -> None:
        _check_axis(f"{key}.axis", self.axis, mesh_axes)


@dataclasses.dataclass(frozen=True)
class UspConfig:
    ring_axis: str = "context"  # across groups (slow links)
    ulysses_axis: str = "tensor"  # within a group (fast links)
    layout: str = "zigzag"  # the ring's layout

    def check(self, key: str, mesh_axes: tuple[str, ...]) -> None:
        _check_axis(f"{key}.ring_axis", self.ring_axis, mesh_axes)
        _check_axis(f"{key}.ulysses_axis", self.ulysses_axis, mesh_axes)
        _check_layout(f"{key}.layout", self.layout)
        if self.ring_axis == self.ulysses_axis:
            raise ConfigError(
                f"config keys '{key}.ring_axis' and '{key}.ulysses_axis' must be different mesh axes, "
                f"both are {self.ring_axis!r}."
            )


# --------------------------------------------------------------------------- builders
#
# build(section, *, mesh, impl, blocks) -> attend
# multiple(section, mesh) -> int
# runs(section, mesh) -> int | None: how many runs of consecutive positions the strategy cuts the keys
#   into for its local steps (ring chunks; 1: each step sees the whole sequence); None where it deals
#   tokens out one by one (striped). Steps with LocalImpl.key_runs > 1 (landmark blocks) need them.
#
# ``blocks`` (a BlockSizes) holds model.attention's four tile sizes, None where unset.


def _build_none(section: NoneConfig, *, mesh, impl: LocalImpl, blocks: BlockSizes) -> Callable:
    del section, mesh
    return functools.partial(attention, impl=impl.name, **blocks.as_options(impl))


def _none_multiple(section: NoneConfig, mesh) -> int:
    return 1


def _none_runs(section: NoneConfig, mesh) -> int:
    return 1


def _build_ring(section: RingConfig, *, mesh, impl: LocalImpl, blocks: BlockSizes) -> Callable:
    return functools.partial(ring_attention, mesh=mesh, axis=section.axis, layout=section.layout,
                             impl=impl, **dataclasses.asdict(blocks))


def _ring_multiple(section: RingConfig, mesh) -> int:
    # The model feeds natural-order tokens, which the ring reorders into its layout in place.
    return layouts.natural_input_multiple(section.layout, mesh_axis_size(mesh, section.axis))


def _ring_runs(section: RingConfig, mesh) -> int | None:
    return layouts.position_runs(section.layout, mesh_axis_size(mesh, section.axis))


def _build_ulysses(section: UlyssesConfig, *, mesh, impl: LocalImpl, blocks: BlockSizes) -> Callable:
    return functools.partial(ulysses_attention, mesh=mesh, axis=section.axis, impl=impl,
                             **dataclasses.asdict(blocks))


def _ulysses_multiple(section: UlyssesConfig, mesh) -> int:
    return layouts.natural_input_multiple("contiguous", mesh_axis_size(mesh, section.axis))


def _ulysses_runs(section: UlyssesConfig, mesh) -> int:
    return 1  # after the all-to-all each device attends the whole sequence


def _build_usp(section: UspConfig, *, mesh, impl: LocalImpl, blocks: BlockSizes) -> Callable:
    return functools.partial(usp_attention, mesh=mesh, ring_axis=section.ring_axis,
                             ulysses_axis=section.ulysses_axis, layout=section.layout, impl=impl,
                             **dataclasses.asdict(blocks))


def _usp_multiple(section: UspConfig, mesh) -> int:
    ring = mesh_axis_size(mesh, section.ring_axis, arg="ring_axis")
    group = mesh_axis_size(mesh, section.ulysses_axis, arg="ulysses_axis")
    # The layout over the ring shards, and every ring shard split across its Ulysses group.
    return math.lcm(layouts.natural_input_multiple(section.layout, ring), ring * group)


def _usp_runs(section: UspConfig, mesh) -> int | None:
    return layouts.position_runs(section.layout, mesh_axis_size(mesh, section.ring_axis, arg="ring_axis"))


# --------------------------------------------------------------------------- the catalogue


@dataclasses.dataclass(frozen=True)
class Strategy:
    config: type  # its typed section, model.strategies.<name>
    build: Callable  # (section, *, mesh, impl, blocks) -> attend
    multiple: Callable  # (section, mesh) -> the sequence-length multiple it needs
    runs: Callable  # (section, mesh) -> runs of consecutive positions its steps see (see above)
    # Splits the sequence over a mesh and runs the implementation's step functions
    # (LocalImpl.forward/backward) on shards; otherwise it calls LocalImpl.attention.
    shards: bool = True
    # (section) -> the mesh axis over which the sequence is cut into contiguous shards, in
    # order (recurrent mixers pass their state along it); None: the sequence is not split.
    axis: Callable | None = None


STRATEGIES: dict[str, Strategy] = {
    "none": Strategy(NoneConfig, _build_none, _none_multiple, _none_runs, shards=False),
    "ring": Strategy(RingConfig, _build_ring, _ring_multiple, _ring_runs, axis=lambda s: s.axis),
    "ulysses": Strategy(UlyssesConfig, _build_ulysses, _ulysses_multiple, _ulysses_runs, axis=lambda s: s.axis),
    "usp": Strategy(UspConfig, _build_usp, _usp_multiple, _usp_runs, axis=lambda s: s.ring_axis),
}
AUTO = "auto"


def runs(strategy: Strategy, impl: LocalImpl) -> bool:
    """Whether ``strategy`` can run ``impl`` (sharded strategies need its step functions)."""
    return impl.forward is not None if strategy.shards else impl.attention is not None


def resolve(model: ModelConfig, mesh: jax.sharding.Mesh | None) -> str:
    """The strategy ``model.attention.sequence`` names on ``mesh``: the one place ``auto`` resolves.

    ``auto`` is ``ring`` when the ring's axis (``model.strategies.ring.axis``) splits
    ``mesh`` and the implementation runs ring steps, else ``none``.
    """
    name = model.attention.sequence
    if name != AUTO:
        return name
    axis = model.strategies["ring"].axis
    split = mesh is not None and mesh.shape.get(axis, 1) > 1
    return "ring" if split and runs(STRATEGIES["ring"], get_impl(model.attention.impl)) else "none"


def make_attend(model: ModelConfig, mesh: jax.sharding.Mesh | None, *, impl: LocalImpl | None = None,
                blocks: BlockSizes | None = None) -> Callable:
    """The attention callable of ``model.attention`` (local impl x sequence strategy) on ``mesh``.

    ``impl``, ``blocks``: another local implementation and its tiles under the same strategy (a mixer with its
    own attention, e.g. landmark layers' step; None: ``model.attention``'s).
    """
    name = resolve(model, mesh)
    strategy = STRATEGIES[name]
    if strategy.shards and mesh is None:
        raise ValueError(f"sequence strategy {name!r} splits the sequence over a mesh; pass mesh=.")
    att = model.attention
    impl = get_impl(att.impl) if impl is None else impl
    return strategy.build(model.strategies[name], mesh=mesh, impl=impl,
                          blocks=BlockSizes.of(att) if blocks is None else blocks)


def strategy_multiple(model: ModelConfig, mesh: jax.sharding.Mesh | None) -> int:
    """The multiple of which sequence lengths must be for the resolved strategy on ``mesh``."""
    if mesh is None:
        return 1
    name = resolve(model, mesh)
    return STRATEGIES[name].multiple(model.strategies[name], mesh)


def key_runs(model: ModelConfig, mesh: jax.sharding.Mesh | None) -> int | None:
    """How many runs of consecutive positions the resolved strategy cuts the keys into on ``mesh`` for its local
    steps (1: each sees the whole sequence; None: tokens dealt out one by one, ``striped``)."""
    if mesh is None:
        return 1
    name = resolve(model, mesh)
    return STRATEGIES[name].runs(model.strategies[name], mesh)


def split_axis(model: ModelConfig, mesh: jax.sharding.Mesh | None) -> str | None:
    """The mesh axis the resolved strategy splits the sequence over on ``mesh``; None if not split."""
    if mesh is None:
        return None
    name = resolve(model, mesh)
    strategy = STRATEGIES[name]
    axis = strategy.axis(model.strategies[name]) if strategy.axis else None
    return axis if axis is not None and mesh.shape.get(axis, 1) > 1 else None


def check(model: ModelConfig, mesh_axes: tuple[str, ...]) -> None:
    """Load-time checks: the names exist, the sections are valid, the strategy runs the impl."""
    att = model.attention
    if att.sequence != AUTO and att.sequence not in STRATEGIES:
        raise choice_error("model.attention.sequence", att.sequence, [AUTO, *STRATEGIES])
    try:
        impl = get_impl(att.impl)
    except ValueError as err:
        raise ConfigError(f"config key 'model.attention.impl': {err}") from None
    except ImportError as err:
        raise ConfigError(f"model.attention.impl={att.impl!r} is not available here ({err}).") from None
    try:
        BlockSizes.of(att)  # model.attention's tiles (ValueError naming a bad one)
    except ValueError as err:  # at load: one line, not a traceback from inside the model's trace
        raise ConfigError(f"config key 'model.attention': {err}") from None
    for name, section in model.strategies.items():
        if hasattr(section, "check"):
            section.check(f"model.strategies.{name}", mesh_axes)
    if att.sequence != AUTO and not runs(STRATEGIES[att.sequence], impl):
        raise ConfigError(
            f"model.attention.sequence={att.sequence!r} cannot run model.attention.impl={att.impl!r} "
            f"(it has no {'ring/Ulysses step functions' if STRATEGIES[att.sequence].shards else 'single-device function'}); "
            f"use impl=blockwise or sequence=none."
        )

