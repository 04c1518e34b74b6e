"""The shared sharded entry: eager gradients, the step catalogue, option checks (ring, Ulysses, USP)."""

import jax
import numpy as np
import pytest

from lca.attention import (
    BlockSizes,
    LocalImpl,
    blockwise_backward,
    blockwise_forward,
    reference_attention,
    ring_attention,
    ulysses_attention,
    usp_attention,
)
from lca.parallel import make_mesh
from tests.oracle import SEQPAR, make_inputs, rel_err


def _usp(q, k, v, **kw):
    return usp_attention(q, k, v, ulysses_axis="tensor", ring_axis="context", **kw)


VARIANTS = {"ring": ring_attention, "ulysses": ulysses_attention, "usp": _usp}
MESHES = {
    # Both constructors give Explicit axes by default.
    "jax.make_mesh": lambda: jax.make_mesh((2, 2), ("context", "tensor")),
    "lca.make_mesh": lambda: make_mesh(context=2, tensor=2, devices=jax.devices()[:4]),
}


# Every variant and both mesh constructors; the remaining pairs run with the slow tests.
EAGER_CASES = [("ring", "jax.make_mesh"), ("ring", "lca.make_mesh"), ("ulysses", "jax.make_mesh"),
               ("usp", "lca.make_mesh"),
               pytest.param("ulysses", "lca.make_mesh", marks=pytest.mark.slow),
               pytest.param("usp", "jax.make_mesh", marks=pytest.mark.slow)]


@pytest.mark.parametrize("variant,mesh_name", EAGER_CASES)
def test_eager_grad_matches_oracle(variant, mesh_name):
    """jax.grad outside jit on plain arrays (as in a notebook): all gradients equal the oracle's."""
    mesh, fn = MESHES[mesh_name](), VARIANTS[variant]
    q, k, v, seg = make_inputs(1, 16, 4, 2, segments=True, seed=3)
    kwargs = dict(causal=True, segment_ids=seg)
    weights = np.random.default_rng(0).standard_normal(q.shape).astype(np.float32)

    def loss(attn):
        return lambda q, k, v: (attn(q, k, v, **kwargs) * weights).sum()

    got = jax.grad(loss(lambda *a, **kw: fn(*a, mesh=mesh, **kw)), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(reference_attention), argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got, want):
        assert rel_err(g, w) <= SEQPAR, (f"d{name}", rel_err(g, w))


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_dense_impl_as_a_step_says_which_work(impl):
    q, k, v, _ = make_inputs(1, 16, 2, 2)
    mesh = make_mesh(context=2, devices=jax.devices()[:2])
    with pytest.raises(ValueError, match=rf"impl='{impl}' computes attention on one device only "
                                         r"and has no ring/Ulysses step.*\['blockwise', 'pallas', 'cudnn'\]"):
        ring_attention(q, k, v, mesh=mesh, impl=impl)
    with pytest.raises(ValueError, match=rf"impl='{impl}' computes attention on one device only"):
        ulysses_attention(q, k, v, mesh=mesh, impl=impl)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("blocks,match", [
    (dict(block_q=0), r"block_q must be a positive int or None, got block_q=0"),
    (dict(block_kv=-8), r"block_kv must be a positive int or None, got block_kv=-8"),
    (dict(block_q=2.5), r"block_q must be a positive int or None"),
    (dict(block_q=True), r"block_q must be a positive int or None"),
    (dict(block_q_bwd=0), r"block_q_bwd must be a positive int or None, got block_q_bwd=0"),
    (dict(block_kv_bwd=1.5), r"block_kv_bwd must be a positive int or None"),
])
def test_bad_block_sizes_are_refused_not_replaced(variant, blocks, match):
    q, k, v, _ = make_inputs(1, 16, 4, 2)
    with pytest.raises(ValueError, match=match):
        VARIANTS[variant](q, k, v, mesh=MESHES["lca.make_mesh"](), **blocks)


def test_numpy_integers_for_blocks_and_window():
    q, k, v, _ = make_inputs(1, 16, 2, 2)
    mesh = make_mesh(context=2, devices=jax.devices()[:2])
    got = ring_attention(q, k, v, mesh=mesh, causal=True, window=np.int64(5),
                         block_q=np.int64(4), block_kv=np.int32(4))
    want = reference_attention(q, k, v, causal=True, window=5)
    assert rel_err(got, want) <= SEQPAR


def test_traced_options_say_to_make_them_static():
    q, k, v, _ = make_inputs(1, 16, 2, 2)
    mesh = make_mesh(context=2, devices=jax.devices()[:2])
    with pytest.raises(ValueError, match=r"causal must be a static Python value.*static_argnames="
                                         r"\('causal',\).*functools.partial"):
        jax.jit(lambda q, k, v, causal: ring_attention(q, k, v, mesh=mesh, causal=causal))(
            q, k, v, True)
    with pytest.raises(ValueError, match=r"block_q must be a static Python value"):
        jax.jit(lambda q, k, v, b: ring_attention(q, k, v, mesh=mesh, block_q=b))(q, k, v, 4)


def _spying_step(seen: dict) -> LocalImpl:
    """Blockwise steps that record the tiles each pass was given."""

    def forward(*args, blocks, **kw):
        seen.setdefault("forward", set()).add(blocks)
        return blockwise_forward(*args, blocks=blocks, **kw)

    def backward(*args, blocks, **kw):
        seen.setdefault("backward", set()).add(blocks)
        return blockwise_backward(*args, blocks=blocks, **kw)

    return LocalImpl("spy", None, forward, backward, BlockSizes())


@pytest.mark.parametrize("variant", VARIANTS)
def test_backward_tiles_reach_every_step(variant):
    """block_q_bwd/block_kv_bwd travel to the steps' backward, and the gradients stay exact."""
    q, k, v, seg = make_inputs(1, 32, 4, 2, segments=True, seed=5)
    seen = {}
    kwargs = dict(causal=True, segment_ids=seg)
    tiles = dict(block_q=4, block_kv=8, block_q_bwd=8, block_kv_bwd=2)
    weights = np.random.default_rng(1).standard_normal(q.shape).astype(np.float32)

    def loss(attn):
        return lambda q, k, v: (attn(q, k, v, **kwargs) * weights).sum()

    sharded = lambda *a, **kw: VARIANTS[variant](  # noqa: E731
        *a, mesh=MESHES["lca.make_mesh"](), impl=_spying_step(seen), **tiles, **kw)
    got = jax.grad(loss(sharded), argnums=(0, 1, 2))(q, k, v)
    assert seen == {"forward": {BlockSizes(4, 8, 8, 2)}, "backward": {BlockSizes(4, 8, 8, 2)}}
    want = jax.grad(loss(reference_attention), argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got, want):
        assert rel_err(g, w) <= SEQPAR, (f"d{name}", rel_err(g, w))
