import jax
import pytest

from lca.parallel import make_mesh, resolve_axis_sizes


def test_minus_one_takes_the_rest_of_the_devices():
    mesh = make_mesh(data=2, context=-1)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "context": 4, "tensor": 1}
    assert mesh.devices.size == jax.device_count() == 8


def test_auto_axis_types():
    mesh = make_mesh(fsdp=-1, axis_types="auto")
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize(
    "sizes,match",
    [
        (dict(data=-1, context=-1), r"at most one mesh axis may be -1.*\['data', 'context'\]"),
        (dict(data=3), r"multiply to 3 but there are 8 devices"),
        (dict(data=3, context=-1), r"not an integer"),
        (dict(context=0), r"'context' must be a positive int or -1"),
    ],
)
def test_bad_sizes_are_value_errors(sizes, match):
    with pytest.raises(ValueError, match=match):
        make_mesh(**sizes)


def test_resolve_axis_sizes_is_pure():
    assert resolve_axis_sizes({"data": -1, "tensor": 2}, 16) == {"data": 8, "tensor": 2}
