"""Logical axis names -> mesh PartitionSpecs."""

import pytest
from jax.sharding import PartitionSpec as P

from lca.config import load_config
from lca.parallel import make_mesh
from lca.parallel.sharding import logical_to_spec

RULES = load_config("tiny").rules
MESH = make_mesh(data=2, fsdp=2, context=2, axis_types="auto")


def test_default_rules_batch_sequence_params():
    assert logical_to_spec(("batch", "sequence", "act_embed"), RULES, MESH) == P(("data", "fsdp"), "context", None)
    assert logical_to_spec(("embed", "mlp"), RULES, MESH) == P("fsdp", None)  # tensor axis has size 1


def test_axis_used_once_and_indivisible_dims_replicated():
    rules = {"a": ["fsdp"], "b": ["fsdp", "data"]}
    assert logical_to_spec(("a", "b"), rules, MESH) == P("fsdp", "data")
    assert logical_to_spec(("batch", None), RULES, MESH, shape=(2, 5)) == P("data", None)
    assert logical_to_spec(("batch",), RULES, MESH, shape=(3,)) == P(None)


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="logical axis 'nope' has no sharding rule"):
        logical_to_spec(("nope",), RULES, MESH)
    with pytest.raises(ValueError, match="names mesh axis 'pipeline'"):
        logical_to_spec(("x",), {"x": ["pipeline"]}, MESH)
