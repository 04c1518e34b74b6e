"""Device meshes for lca: named axes ``data``, ``fsdp``, ``context``, ``tensor``.

Attention code never builds a mesh; it receives one (or an axis name inside
``shard_map``). This module owns the policy of how devices are laid out.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import AxisType

MESH_AXES = ("data", "fsdp", "context", "tensor")

_AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}


def resolve_axis_sizes(sizes: dict[str, int], num_devices: int) -> dict[str, int]:
    """Fill in the one ``-1`` axis with the remaining devices and check the product.

    >>> resolve_axis_sizes({"data": -1, "context": 4}, 8)
    {'data': 2, 'context': 4}
    """
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(
                f"mesh axis {name!r} must be a positive int or -1 (the rest of the devices), "
                f"got {size!r}."
            )
    rest = [name for name, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise ValueError(
            f"at most one mesh axis may be -1 (the rest of the devices), got -1 for {rest} "
            f"in {sizes}."
        )
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if rest:
        if num_devices % fixed:
            raise ValueError(
                f"mesh axes {sizes} leave {num_devices} devices / {fixed} for axis "
                f"{rest[0]!r}, which is not an integer; choose sizes whose product divides "
                f"{num_devices}."
            )
        sizes = {**sizes, rest[0]: num_devices // fixed}
    elif fixed != num_devices:
        raise ValueError(
            f"mesh axes {sizes} multiply to {fixed} but there are {num_devices} devices; make "
            f"the product {num_devices} or set one axis to -1."
        )
    return dict(sizes)


def make_mesh(
    data: int = 1,
    fsdp: int = 1,
    context: int = 1,
    tensor: int = 1,
    *,
    devices=None,
    axis_types: str = "explicit",
) -> jax.sharding.Mesh:
    """A mesh with axes ``("data", "fsdp", "context", "tensor")``.

    One size may be ``-1``: the rest of the devices. ``devices`` defaults to all
    devices of all processes (multi-controller runs see the global mesh).
    ``axis_types`` is ``"explicit"`` (JAX's default: sharding in types) or
    ``"auto"`` (GSPMD propagation).

    >>> mesh = make_mesh(context=-1)   # every device on the context axis
    """
    devices = jax.devices() if devices is None else list(devices)
    if axis_types not in _AXIS_TYPES:
        raise ValueError(f"axis_types must be one of {sorted(_AXIS_TYPES)}, got {axis_types!r}.")
    sizes = resolve_axis_sizes(
        {"data": data, "fsdp": fsdp, "context": context, "tensor": tensor}, len(devices)
    )
    shape = tuple(sizes[name] for name in MESH_AXES)
    kind = _AXIS_TYPES[axis_types]
    return jax.make_mesh(shape, MESH_AXES, axis_types=(kind,) * len(MESH_AXES), devices=devices)
