"""The decoder: every attention combination matches the model with reference attention; packing; remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lca.config import load_config
from lca.models import layer_mixers, make_model
from lca.models.build import abstract_model
from lca.parallel import make_mesh
from lca.train.step import make_logits_fn, token_losses
from tests.models.attention_cases import CASES, overrides

SEQ = 64


def tiny(*overrides):
    return load_config("tiny", ["model.vocab_size=384", *overrides])


def batch(seed=0, b=2, length=SEQ):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, 256, (b, length), dtype=np.int32)
    # Two packed documents per row: positions restart, segment ids change.
    cut = length // 3
    positions = np.concatenate([np.arange(cut), np.arange(length - cut)])[None].repeat(b, 0).astype(np.int32)
    segments = np.concatenate([np.ones(cut), 2 * np.ones(length - cut)])[None].repeat(b, 0).astype(np.int32)
    return {"inputs": jnp.asarray(inputs), "positions": jnp.asarray(positions), "segment_ids": jnp.asarray(segments)}


def logits_of(cfg, mesh, data):
    model = make_model(cfg, mesh, seed=3)
    graphdef, params = nnx.split(model, nnx.Param)
    return jax.jit(make_logits_fn(graphdef))(nnx.to_pure_dict(params), data)


@pytest.fixture(scope="module")
def reference_logits():
    return logits_of(tiny(*overrides("reference")), None, batch())


# The two axes combine: a fused kernel as the ring's local implementation.
MORE = {"pallas_ring": ["model.attention.impl=pallas", "model.attention.sequence=ring"]} if "pallas" in CASES else {}


@pytest.mark.parametrize("case", [c for c in CASES if c != "reference"] + list(MORE))
def test_attention_matches_reference_model(case, reference_logits):
    # One mesh that every case can use: usp takes tensor as its Ulysses axis.
    mesh = make_mesh(data=2, context=2, tensor=2, axis_types="auto")
    got = logits_of(tiny(*(MORE[case] if case in MORE else overrides(case))), mesh, batch())
    np.testing.assert_allclose(np.asarray(got), np.asarray(reference_logits), atol=2e-4, rtol=2e-4)


def test_packed_document_equals_document_alone():
    """RoPE positions and segment ids make a packed document see only itself, from position 0."""
    model = make_model(tiny(*overrides("blockwise")), seed=1)
    graphdef, params = nnx.split(model, nnx.Param)
    fn = jax.jit(make_logits_fn(graphdef))
    params = nnx.to_pure_dict(params)
    data = batch(b=1)
    cut = SEQ // 3
    alone_inputs = data["inputs"][:, cut:]
    alone = fn(params, {"inputs": alone_inputs, "positions": jnp.arange(SEQ - cut)[None],
                        "segment_ids": jnp.ones_like(alone_inputs)})
    packed = fn(params, data)
    np.testing.assert_allclose(np.asarray(packed[:, cut:]), np.asarray(alone), atol=1e-5, rtol=1e-5)
    # Without segment ids the second document would see the first (the test can fail).
    leaky = fn(params, {**data, "segment_ids": jnp.ones_like(data["inputs"])})
    assert not np.allclose(np.asarray(leaky[:, cut:]), np.asarray(alone), atol=1e-3)


def test_remat_changes_memory_not_math():
    data = {**batch(), "targets": batch(seed=1)["inputs"], "loss_mask": jnp.ones((2, SEQ))}

    def loss_and_grads(remat):
        cfg = tiny(f"model.remat={remat}", *overrides("reference"), "model.num_layers=1", "model.pattern=[global]")
        model = make_model(cfg, seed=2)
        graphdef, params = nnx.split(model, nnx.Param)
        fn = make_logits_fn(graphdef)
        return jax.jit(jax.value_and_grad(lambda p: token_losses(fn(p, data), data)[0]))(nnx.to_pure_dict(params))

    (loss0, g0), (loss1, g1) = loss_and_grads("none"), loss_and_grads("full")
    np.testing.assert_allclose(loss0, loss1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g0, g1)


def test_layer_pattern_cycles_over_layers():
    cfg = load_config("tiny", ["model.num_layers=8", "model.pattern=[local,local,local,global]",
                               "model.mixers.local.window=32"])
    assert layer_mixers(cfg.model) == ["local", "local", "local", "global"] * 2
    model = make_model(cfg)
    assert [b.attn.window for b in model.blocks()] == [32, 32, 32, None] * 2


def test_params_carry_logical_axes_and_float32():
    cfg = tiny("model.tie_embeddings=false", "model.dtype=bfloat16")
    _, params, logical = abstract_model(cfg)
    flat_params = jax.tree_util.tree_leaves_with_path(params)
    flat_specs = dict(jax.tree_util.tree_leaves_with_path(logical, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
    for path, leaf in flat_params:
        assert leaf.dtype == jnp.float32, path
        spec = flat_specs[path]
        assert len(spec) == leaf.ndim and all(name in cfg.rules for name in spec), (path, spec)
    assert "unembed" in params  # untied output has its own matrix
    tied = abstract_model(tiny())[1]
    assert "unembed" not in tied


def test_bf16_compute_gives_float32_logits():
    cfg = tiny("model.dtype=bfloat16", *overrides("reference"), "model.num_layers=1", "model.pattern=[global]")
    graphdef, params = nnx.split(make_model(cfg), nnx.Param)
    logits = jax.jit(make_logits_fn(graphdef))(nnx.to_pure_dict(params), batch())
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())


def test_cudnn_training_step_runs_packed_documents_through_cudnn(monkeypatch):
    """model.attention.impl=cudnn on an sm_90 GPU: the batch's segment ids take cuDNN's packed layout.

    Lowered for CUDA from this CPU (as if on a Hopper GPU): the gradient of the logits has
    cuDNN's packed forward and backward calls (PADDING_CAUSAL), not only the Pallas fallback.
    """
    from lca.attention import cudnn

    monkeypatch.setattr(cudnn, "require_cuda", lambda: None)
    monkeypatch.setattr(cudnn, "packs_documents", lambda device=None: True)
    cfg = tiny("model.attention.impl=cudnn", "model.dtype=bfloat16", "model.head_dim=64")
    graphdef, params = nnx.split(make_model(cfg, None, seed=3), nnx.Param)
    logits = make_logits_fn(graphdef)
    data = batch()
    grad = jax.grad(lambda p: logits(p, data).astype(jnp.float32).mean())
    hlo = jax.jit(grad).trace(nnx.to_pure_dict(params)).lower(lowering_platforms=("cuda",)).as_text()
    assert "PADDING_CAUSAL" in hlo
    assert "__cudnn$fmhaSoftmax(" in hlo and "__cudnn$fmhaSoftmaxBackward(" in hlo
