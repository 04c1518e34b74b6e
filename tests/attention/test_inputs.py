"""Bad input fails at trace time with a ValueError that names the argument and shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lca.attention import blockwise_attention, reference_attention
from lca.attention.mask import Mask

Q = jnp.zeros((2, 8, 4, 16))
K = jnp.zeros((2, 8, 2, 16))


@pytest.mark.parametrize("attention", [reference_attention, blockwise_attention])
@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((Q[0], K, K), {}, r"q must be 4-D .* got shape \(8, 4, 16\)"),
        ((Q, K, K[:, :, :1]), {}, r"k and v must have the same shape"),
        ((Q, K[:1], K[:1]), {}, r"same batch size"),
        ((Q, K[..., :8], K[..., :8]), {}, r"same head_dim"),
        ((Q, jnp.zeros((2, 8, 3, 16)), jnp.zeros((2, 8, 3, 16))), {}, r"num_heads must be a multiple of num_kv_heads.*\[1, 2, 4\]"),
        ((Q, K.astype(jnp.bfloat16), K), {}, r"share one dtype"),
        ((Q, K, K), {"segment_ids": jnp.zeros((2, 8), jnp.float32)}, r"q_segment_ids must be an integer array"),
        ((Q, K, K), {"segment_ids": jnp.zeros((2, 7), jnp.int32)}, r"q_segment_ids must have shape .*\(2, 8\), got \(2, 7\)"),
        ((Q, K[:, :5], K[:, :5]), {"segment_ids": jnp.zeros((2, 8), jnp.int32)}, r"single segment_ids array needs q_len == kv_len"),
        ((Q, K, K), {"window": 0}, r"window must be a positive int"),
        ((Q, K, K), {"softcap": -1.0}, r"softcap must be a positive number"),
        ((Q, K, K), {"causal": "yes"}, r"causal must be a bool"),
        ((Q, K, K), {"q_positions": jnp.arange(7)}, r"q_positions must have shape"),
    ],
)
def test_bad_input_raises_value_error(attention, args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        attention(*args, **kwargs)


@pytest.mark.parametrize("blocks", [dict(block_q=0), dict(block_kv=-4), dict(block_q=2.5)])
def test_bad_block_sizes(blocks):
    with pytest.raises(ValueError, match="must be a positive int"):
        blockwise_attention(Q, K, K, **blocks)


@pytest.mark.parametrize("attention", [reference_attention, blockwise_attention])
@pytest.mark.parametrize("option,value", [("causal", True), ("window", 4), ("softcap", 5.0),
                                          ("scale", 0.5)])
def test_traced_option_names_what_must_be_static(attention, option, value):
    with pytest.raises(ValueError, match=rf"{option} must be a static Python value, got "
                                         rf".*Tracer.*static_argnames=\('{option}',\).*"
                                         rf"functools.partial\(fn, {option}="):
        jax.jit(attention)(Q, K, K, **{option: value})


def test_numpy_integer_window():
    want = reference_attention(Q, K, K, causal=True, window=3)
    np.testing.assert_array_equal(reference_attention(Q, K, K, causal=True, window=np.int64(3)), want)
    assert Mask(window=np.int64(3)) == Mask(window=3)
