"""Analytic training FLOPs against a hand count, and MFU against the device's peak."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lca.config import load_config
from lca.models.attends import Attends
from lca.train.flops import (attended_pairs, attention_flops, document_lengths, layer_pairs, step_flops,
                              train_step_flops)
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


def test_titans_weights_count_and_persistent_tokens_do_not(tmp_path):
    # One titans_mag layer on tiny (d 32, mlp 64, vocab 384, tied): its memory of 2 heads of 16 features,
    # a depth-2 MLP of expansion 2 per head, conv 4, 3 persistent tokens; MAG's attention projections.
    cfg = load_config("tiny", [f"run_dir={tmp_path}", "train.seq_len=64", "train.global_batch=4",
                               "model.pattern=[titans_mag]", "model.num_layers=1",
                               "model.mixers.titans_mag.memory_heads=2", "model.mixers.titans_mag.persistent=3",
                               "model.mixers.titans_mag.window=16"])
    d, mlp, vocab, t, b = 32, 64, 384, 64, 4
    memory = d * 3 * d + d * d + d * 3 * 2 + 4 * 3 * d + 2 * (16 * 32 + 32 * 16)  # qkv, out, gates, conv, MLPs
    mag = d * 3 * d + d * d  # the attention branch's qkv and out
    weights = memory + mag + 3 * d * mlp + d * vocab
    # The attention branch: 2 heads of 16 over a window of 16, and the 3 persistent tokens every query sees.
    attention = 3 * 4 * 32 * (t * 16 - 16 * 16 / 2 + t * 3) * b
    assert train_step_flops(cfg, _abstract_params(cfg)) == 6 * weights * b * t + attention


def _model(name, *overrides):
    return load_config(name, ["run_dir=/tmp/unused", *overrides]).model


def test_landmark_layers_count_causal_attention():
    """The grouped softmax takes the products of causal attention: a landmark layer counts as a global one."""
    landmark = _model("landmark")
    plain = _model("landmark", "model.pattern=[global]")
    lengths = np.array([64, 48, 16])
    assert attention_flops(landmark, lengths, 2, 64) == attention_flops(plain, lengths, 2, 64) > 0
    width = landmark.num_heads * landmark.resolved_head_dim
    assert attention_flops(landmark, lengths, 2, 64) == (
        landmark.num_layers * 3 * 4 * width * float(np.sum(lengths ** 2 / 2)))


def test_titans_mal_counts_its_window_and_lmm_no_attention():
    mal = _model("tiny", "model.pattern=[titans_mal]", "model.mixers.titans_mal.window=8",
                 "model.mixers.titans_mal.persistent=2")
    lengths = np.array([32, 20])
    assert attention_flops(mal, lengths, 2, 32) == mal.num_layers * 3 * 4 * mal.d_model * (
        attended_pairs(32, 8) + attended_pairs(20, 8) + 2 * 52)
    assert attention_flops(_model("tiny", "model.pattern=[titans_lmm]"), lengths, 2, 32) == 0


def test_titans_mac_counts_segments_of_whole_rows():
    """Each segment attends itself and the memory's retrieval causally, and the persistent tokens; MAC cuts rows,
    so the documents a row is packed from do not change its count."""
    mac = _model("tiny", "model.pattern=[titans_mac]", "model.num_layers=1", "model.mixers.titans_mac.segment=16",
                 "model.mixers.titans_mac.persistent=3")
    d, rows, t = mac.d_model, 2, 40  # segments of 16, 16 and a last one of 8
    per_row = 2 * (16 * 16 / 2) * 2 + 2 * (8 * 8 / 2) + 3 * t
    for lengths in ([40, 40], [10, 30, 40]):
        assert attention_flops(mac, np.array(lengths), rows, t) == 3 * 4 * d * per_row * rows


def test_mac_count_is_close_to_its_mask():
    """The formula against the pairs MAC's attention sees (it counts each diagonal as half a pair)."""
    s, p = 16, 3
    i, j = jnp.arange(s)[:, None], jnp.arange(s)[None, :]
    seen = 2 * int((j <= i).sum()) + p * s  # retrieval and segment, causal; the persistent tokens
    mac = _model("tiny", "model.pattern=[titans_mac]", "model.num_layers=1", f"model.mixers.titans_mac.segment={s}",
                 f"model.mixers.titans_mac.persistent={p}")
    counted = attention_flops(mac, np.array([s]), 1, s) / (3 * 4 * mac.d_model)
    assert abs(seen - counted) <= s


@pytest.mark.parametrize("t, window, pairs", [(8, None, 32), (8, 8, 32), (8, 100, 32), (8, 2, 14), (8, 1, 7.5)])
def test_attended_pairs(t, window, pairs):
    assert attended_pairs(t, window) == pairs


def test_window_count_is_close_to_the_mask():
    """The formula against the causal band mask it stands for (it counts the diagonal as half a pair)."""
    t, w = 64, 16
    i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    mask = (j <= i) & (i - j < w)
    assert abs(int(mask.sum()) - attended_pairs(t, w)) <= t / 2 + 1


def test_document_lengths_count_each_document_piece_and_no_padding():
    # Row 0: documents of 3 and 5 tokens; row 1: 6 tokens, then padding (id 0) of 2.
    ids = np.array([[1, 1, 1, 2, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 0, 0]])
    assert sorted(document_lengths(ids)) == [3, 5, 6]
    causal, local = Attends(width=1), Attends(width=1, window=2)
    assert layer_pairs(causal, document_lengths(ids), 2, 8) == 3 * 3 / 2 + 5 * 5 / 2 + 6 * 6 / 2
    assert layer_pairs(local, document_lengths(ids), 2, 8) == sum(attended_pairs(n, 2) for n in (3, 5, 6))
    # One document per row is the dense count; the same id in two rows is two documents.
    assert layer_pairs(causal, document_lengths(np.ones((2, 8), int)), 2, 8) == 2 * attended_pairs(8, None)


def test_step_flops_count_the_batch_documents(tmp_path):
    """Packed rows count attention per document, scaled from this process's rows to the global batch."""
    cfg = load_config("tiny", [f"run_dir={tmp_path}", "train.seq_len=64", "train.global_batch=4"])
    flops = step_flops(cfg, _abstract_params(cfg))
    assert flops.of(None) == flops.dense == train_step_flops(cfg, _abstract_params(cfg))
    assert flops.of(np.ones((4, 64), int)) == flops.dense
    assert flops.of(np.ones((2, 64), int)) == flops.dense  # two of four rows, scaled
    heads, hd = 4, 8
    halves = np.repeat([[1, 2]], 32, axis=1).repeat(4, axis=0)  # two documents of 32 per row
    pairs = 4 * 2 * (attended_pairs(32, 16) + attended_pairs(32, None))  # local(16) and global layers
    assert flops.of(halves) == flops.matmuls + 3 * 4 * heads * hd * pairs
    assert flops.of(halves) < flops.dense


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


class _TwoDocumentsPerRow:
    """The config's data with every row's ids replaced by two documents, of half a row each."""

    def __init__(self, cfg):
        from lca.train.loop import make_data_iterator

        self.inner = make_data_iterator(cfg)

    def __next__(self):
        batch = dict(next(self.inner))
        ids = np.ones_like(batch["segment_ids"])
        ids[:, ids.shape[1] // 2:] = 2
        batch["segment_ids"] = ids
        return batch

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def test_logged_throughput_counts_each_batch_documents(tmp_path):
    """metrics.jsonl's TFLOP/s are the model FLOPs of the rows trained, documents and all."""
    from lca.train import train
    from lca.train.metrics import read_metrics
    from lca.train.setup import build_mesh, make_setup

    cfg = load_config("tiny", [f"run_dir={tmp_path}", "train.steps=2", "train.log_every=1",
                               "checkpoint.enabled=false", "eval.at_end=false"])
    train(cfg, data_iterator=_TwoDocumentsPerRow(cfg))
    setup = make_setup(cfg, build_mesh(cfg))
    flops = step_flops(cfg, setup.abstract_state["params"])
    halves = np.ones((cfg.train.global_batch, cfg.train.seq_len), int)
    halves[:, cfg.train.seq_len // 2:] = 2
    records = list(read_metrics(tmp_path).values())
    assert len(records) == 2
    for r in records:
        logged = r["tflops_per_device"] * 1e12 * r["step_time_s"] * setup.mesh.size
        assert logged == pytest.approx(flops.of(halves), rel=1e-6)
    assert flops.of(halves) < flops.dense


def test_logged_mfu_is_the_throughput_over_the_device_peak(tmp_path, monkeypatch, caplog):
    """On a device of known peak (the CPU given one here) metrics.jsonl and the log line carry MFU."""
    import logging

    from lca.train import metrics, train
    from lca.train.metrics import read_metrics

    peak = 1e9  # FLOP/s: the tiny model's few GFLOP/s on CPU make a visible fraction
    monkeypatch.setitem(metrics.PEAK_FLOPS, jax.devices()[0].device_kind, peak)
    cfg = load_config("tiny", [f"run_dir={tmp_path}", "train.steps=2", "train.log_every=1",
                               "checkpoint.enabled=false", "eval.at_end=false"])
    with caplog.at_level(logging.INFO):
        train(cfg)
    records = list(read_metrics(tmp_path).values())
    assert len(records) == 2
    for r in records:
        assert r["mfu"] == pytest.approx(r["tflops_per_device"] * 1e12 / peak, rel=1e-9)
        assert f"MFU {100 * r['mfu']:.1f}%" in caplog.text
