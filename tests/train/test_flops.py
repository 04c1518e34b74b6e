"""Analytic training FLOPs against a hand count, and MFU against the device's peak."""

import jax
import jax.numpy as jnp
import pytest

from lca.config import load_config
from lca.train.flops import attended_pairs, train_step_flops
from lca.train.metrics import peak_flops, throughput


def _abstract_params(cfg):
    from lca.train.setup import build_mesh, make_setup

    return make_setup(cfg, build_mesh(cfg)).abstract_state["params"]


def test_tiny_config_matches_a_hand_count(tmp_path):
    # tiny: d 32, 2 layers [local(16), global], 4 heads x 8, 2 kv heads, mlp 64, vocab 384 (bytes), tied.
    cfg = load_config("tiny", [f"run_dir={tmp_path}", "train.seq_len=64", "train.global_batch=4"])
    d, heads, kv, hd, mlp, vocab, t, b = 32, 4, 2, 8, 64, 384, 64, 4
    per_layer = d * heads * hd * 2 + d * kv * hd * 2 + 3 * d * mlp  # q, o; k, v; gate, up, down
    dense = 6 * (2 * per_layer + d * vocab) * b * t  # the tied table is the output projection
    local = t * 16 - 16 * 16 / 2  # each query sees at most 16 keys, the first 16 fewer
    causal = t * t / 2
    attention = 3 * 4 * heads * hd * (local + causal) * b
    assert train_step_flops(cfg, _abstract_params(cfg)) == dense + attention


def test_untied_table_is_a_lookup_and_the_output_projection_counts(tmp_path):
    cfg = load_config("tiny", [f"run_dir={tmp_path}", "model.tie_embeddings=false", "model.pattern=[global]"])
    tied = load_config("tiny", [f"run_dir={tmp_path}", "model.pattern=[global]"])
    assert train_step_flops(cfg, _abstract_params(cfg)) == train_step_flops(tied, _abstract_params(tied))


@pytest.mark.parametrize("t, window, pairs", [(8, None, 32), (8, 8, 32), (8, 100, 32), (8, 2, 14), (8, 1, 7.5)])
def test_attended_pairs(t, window, pairs):
    assert attended_pairs(t, window) == pairs


def test_window_count_is_close_to_the_mask():
    """The formula against the causal band mask it stands for (it counts the diagonal as half a pair)."""
    t, w = 64, 16
    i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    mask = (j <= i) & (i - j < w)
    assert abs(int(mask.sum()) - attended_pairs(t, w)) <= t / 2 + 1


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("cpu", None),
])
def test_peak_tells_sxm_from_pcie(kind, peak):
    assert peak_flops(kind) == peak


def test_mfu_divides_by_devices_and_peak():
    out = throughput(989e12 * 4, 2.0, 4, "NVIDIA H100 80GB HBM3")
    assert out == pytest.approx({"tflops_per_device": 494.5, "mfu": 0.5})
    assert "mfu" not in throughput(1e12, 1.0, 1, jax.devices()[0].device_kind)
    assert throughput(None, 1.0, 1, "NVIDIA H200") == {}
