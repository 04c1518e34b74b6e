"""The ``landmark`` mixer kind: config checks at load, causality, training, and generation through its cache."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lca.models.generate as generate_module
from lca.config import ConfigError, load_config
from lca.data.landmark import insert_landmarks
from lca.models import make_model, sequence_multiple
from lca.models.build import attention_name
from lca.models.generate import generate
from lca.models.landmark import LandmarkAttention
from lca.parallel import make_mesh
from lca.train.step import make_logits_fn

L = 8
LANDMARK = ["model.pattern=[landmark,global]", f"model.mixers.landmark.block_size={L}", f"data.landmark_every={L}"]


def tiny(*overrides):
    return load_config("tiny", [*LANDMARK, *overrides])


def forward(model, tokens):
    tokens = jnp.asarray(tokens)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return model(tokens, positions, jnp.ones_like(tokens))


def test_config_builds_landmark_layers():
    cfg = tiny("model.mixers.landmark.top_k=3", "model.mixers.landmark.selection=shared")
    model = make_model(cfg)
    assert [b.kind for b in model.blocks()] == ["landmark", "global"]
    assert isinstance(model.block_0.attn, LandmarkAttention) and model.block_0.attn.cfg.selection == "shared"
    load_config("landmark")  # the shipped config loads


@pytest.mark.parametrize("overrides, match", [
    (["model.mixers.landmark.block_size=6"], r"'model.mixers.landmark.block_size'=6 must divide the attention block"),
    (["model.mixers.landmark.top_k=5", "model.mixers.landmark.cache_blocks=4"], r"top_k'=5 is larger than the cache"),
    (["model.vocab_size=258"], r"landmark_id=258 does not fit an embedding table of vocab_size=258"),
    (["data.landmark_every=null"], r"'data.landmark_every'=None must equal 'model.mixers.landmark.block_size'=8"),
    (["train.seq_len=60"], r"'train.seq_len'=60 must be a multiple of 'model.mixers.landmark.block_size'=8"),
    (["model.mixers.landmark.selection=share"], r"did you mean 'shared'"),
    (["model.mixers.landmark.q_tile=0"], r"'model.mixers.landmark.q_tile' must be >= 1 or null"),
    (["model.mixers.landmark.impl=xla"], r"'model.mixers.landmark.impl' has unknown value 'xla'"),
    (["model.mixers.landmark.top_kk=2"], r"did you mean 'model.mixers.landmark.top_k'"),
    (["model.mixers.landmark.train_retrieval=1.5"], r"'model.mixers.landmark.train_retrieval' must be a share"),
    (["model.pattern=[landmark]", "model.attention.block_kv_bwd=32"],
     r"config key 'model.attention.block_kv_bwd'=32 changes nothing: every layer of model.pattern is 'landmark'"),
])
def test_config_errors_at_load(overrides, match):
    with pytest.raises(ConfigError, match=match) as info:
        tiny(*overrides)
    assert "\n" not in str(info.value)


def test_backward_tiles_are_accepted_where_another_layer_reads_them():
    cfg = tiny("model.attention.block_q_bwd=8", "model.attention.block_kv_bwd=16")  # pattern [landmark, global]
    assert (cfg.model.attention.block_q_bwd, cfg.model.attention.block_kv_bwd) == (8, 16)


def test_landmark_rows_need_a_vocabulary_holding_the_landmark_even_without_landmark_layers():
    """A plain model may read landmark rows (``landmark_plain``); an id past its table would be clamped silently."""
    load_config("tiny", ["model.pattern=[global]", f"data.landmark_every={L}"])
    with pytest.raises(ConfigError, match=r"landmark token that data.landmark_every inserts: landmark_id=258 does "
                                          r"not fit an embedding table of vocab_size=258"):
        load_config("tiny", ["model.pattern=[global]", f"data.landmark_every={L}", "model.vocab_size=258"])


def test_causal_at_the_model_level():
    model = make_model(tiny(), seed=2)
    rng = np.random.default_rng(0)
    tokens = insert_landmarks({"inputs": rng.integers(0, 256, (2, 42))}, L)["inputs"]  # 48 with landmarks
    changed = tokens.copy()
    changed[:, 29:] = rng.integers(0, 256, changed[:, 29:].shape)
    a, b = forward(model, tokens), forward(model, changed)
    np.testing.assert_allclose(a[:, :29], b[:, :29], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[:, 29:], b[:, 29:])


def test_trains_two_steps(tmp_path):
    from lca.train import train
    from lca.train.metrics import read_metrics

    cfg = tiny(f"run_dir={tmp_path}", "train.steps=2", "checkpoint.enabled=false")
    train(cfg)  # sharded init (nnx.Param only), compiled step, two optimizer steps on the 8-device tiny mesh
    records = read_metrics(tmp_path)
    assert sorted(records) == [1, 2] and all(math.isfinite(r["loss"]) for r in records.values())


def ordinary_predictions(model, prompt, out, landmark_every):
    """Greedy predictions of one full forward pass over prompt + out, at the positions that predicted ``out``."""
    full = np.concatenate([prompt, out], axis=1)
    frame = insert_landmarks({"inputs": full}, landmark_every)["inputs"] if landmark_every else full
    ordinary = [i for i in range(frame.shape[1]) if not (landmark_every and i % landmark_every == landmark_every - 1)]
    predicted = np.asarray(forward(model, frame).argmax(-1))[:, ordinary]
    return predicted[:, prompt.shape[1] - 1:-1]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("landmark", [False, True], ids=["plain", "landmark"])
def test_chunked_prefill_and_generation_equal_one_forward_pass(landmark, jit, monkeypatch):
    overrides = ["model.mixers.landmark.top_k=16"] if landmark else ["model.pattern=[local,global]",
                                                                   "model.mixers.local.window=5"]
    cfg = load_config("tiny", [*(LANDMARK if landmark else []), *overrides, "model.num_layers=2"])
    model = make_model(cfg, seed=1)
    prompt = np.random.default_rng(0).integers(0, 256, (2, 13))
    every = L if landmark else None
    # (positions, logits_at, logits) of every cached step generate() takes, landmark steps included; each
    # step asks for one token's logits.
    steps = []
    compiled = generate_module._extend_fn

    def recording(model, jit):
        step = compiled(model, jit)

        def run(tokens, positions, caches, logits_at):
            logits, caches = step(tokens, positions, caches, logits_at)
            steps.append((np.asarray(positions[0]), int(logits_at), np.asarray(logits)))
            return logits, caches
        return run

    monkeypatch.setattr(generate_module, "_extend_fn", recording)
    # Prefill in chunks of 6 (14 tokens with 1 landmark), then 6 tokens one by one (a landmark after the 1st).
    out = generate(model, prompt, 6, landmark_every=every, prefill_chunk=6, jit=jit)
    np.testing.assert_array_equal(out, ordinary_predictions(model, prompt, out, every))
    # The logits of every step, not only their argmax, are those of one pass over the whole frame.
    full = np.concatenate([prompt, out], axis=1)
    frame = insert_landmarks({"inputs": full}, every)["inputs"] if every else full
    want = np.asarray(forward(model, frame))
    seen = np.concatenate([positions for positions, _, _ in steps])
    np.testing.assert_array_equal(seen, np.arange(frame.shape[1] - 1))
    for positions, at, logits in steps:
        np.testing.assert_allclose(logits, want[:, positions[at]], rtol=2e-4, atol=2e-4)


def test_retrieval_of_every_cached_block_equals_training_output():
    # top_k >= the blocks in the cache: chunk by chunk through the block cache is the training-time forward
    # (chunks of 11 and 18 queries retrieve in tiles of 4, the last one padded).
    model = make_model(tiny("model.mixers.landmark.top_k=8", "model.mixers.landmark.q_tile=4"), seed=4)
    tokens = insert_landmarks({"inputs": np.random.default_rng(1).integers(0, 256, (2, 35))}, L)["inputs"]  # 40
    full = forward(model, tokens)
    caches = model.start_caches(2, tokens.shape[1])
    pieces = []
    for start, stop in [(0, 11), (11, 29), (29, 40)]:
        positions = jnp.broadcast_to(jnp.arange(start, stop), (2, stop - start))
        logits, caches = model.extend(jnp.asarray(tokens[:, start:stop]), positions, caches)
        pieces.append(logits)
    assert int(caches[0].blocks.count) == 5 and int(caches[0].length) == 0
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, rtol=2e-4, atol=2e-4)


def test_token_by_token_extend_compiles_once_and_equals_training():
    # The layer's caches have fixed shapes: a jitted one-token step is traced once for 3 blocks and a bit,
    # and retrieving every block (top_k >= blocks) gives the training-time layer output.
    model = make_model(tiny("model.num_layers=1", "model.mixers.landmark.top_k=4"), seed=6)
    layer, n = model.block_0.attn, 3 * L + 3
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, n, model.block_0.attn.q.in_features)), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(n), (2, n))
    want = layer(x, positions, jnp.ones((2, n), jnp.int32))
    graphdef, state = nnx.split(layer)
    step = jax.jit(lambda state, x, cache: nnx.merge(graphdef, state).extend(x, None, cache))
    cache, outs = layer.start_cache(2, n, jnp.float32), []
    for i in range(n):
        out, cache = step(state, x[:, i:i + 1], cache)
        outs.append(out)
    assert step._cache_size() == 1
    assert int(cache.blocks.count) == 3 and int(cache.length) == 3
    np.testing.assert_allclose(jnp.concatenate(outs, 1), want, rtol=2e-4, atol=2e-4)


def test_pallas_impl_equals_blockwise():
    tokens = insert_landmarks({"inputs": np.random.default_rng(2).integers(0, 256, (2, 28))}, L)["inputs"]  # 32
    blockwise = forward(make_model(tiny("model.num_layers=1"), seed=5), tokens)
    pallas = forward(make_model(tiny("model.num_layers=1", "model.mixers.landmark.impl=pallas"), seed=5), tokens)
    np.testing.assert_allclose(pallas, blockwise, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["blockwise", "pallas"])
def test_unset_tiles_take_each_impls_default(impl):
    # null is model.attention's documented default; the pallas kernel once rejected it as block_q=None.
    tokens = insert_landmarks({"inputs": np.random.default_rng(2).integers(0, 256, (2, 28))}, L)["inputs"]  # 32
    want = forward(make_model(tiny("model.num_layers=1"), seed=5), tokens)
    got = forward(make_model(tiny("model.num_layers=1", f"model.mixers.landmark.impl={impl}",
                                  "model.attention.block_q=null", "model.attention.block_kv=null"), seed=5), tokens)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_rows_trained_through_retrieval_are_attended_as_decoding_attends_them():
    # train_retrieval=1: every one-document row is attended block by block through the retrieval path, which is
    # what extending the caches one block at a time computes (top_k=2 of up to 4 earlier blocks: re-positioned).
    cfg = tiny("model.mixers.landmark.top_k=2", "model.mixers.landmark.train_retrieval=1.0",
               "model.pattern=[landmark]")
    model = make_model(cfg, seed=7)
    tokens = insert_landmarks({"inputs": np.random.default_rng(4).integers(0, 256, (2, 35))}, L)["inputs"]  # 40
    full = forward(model, tokens)
    caches, pieces = model.start_caches(2, tokens.shape[1]), []
    for start in range(0, tokens.shape[1], L):
        positions = jnp.broadcast_to(jnp.arange(start, start + L), (2, L))
        logits, caches = model.extend(jnp.asarray(tokens[:, start:start + L]), positions, caches)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, rtol=2e-4, atol=2e-4)
    # ... which differs from the grouped softmax over every block at its true distance
    grouped = make_model(tiny("model.mixers.landmark.top_k=2", "model.pattern=[landmark]"), seed=7)
    assert not np.allclose(forward(grouped, tokens), full, atol=1e-3)


def test_only_the_share_of_one_document_rows_is_trained_through_retrieval():
    # train_retrieval=0.5 of 4 rows: rows 0-1 may go through retrieval, rows 2-3 keep the grouped softmax; of
    # rows 0-1, the one holding two documents keeps it too (the retrieval path has no segment mask).
    rng = np.random.default_rng(5)
    tokens = jnp.asarray(insert_landmarks({"inputs": rng.integers(0, 256, (4, 35))}, L)["inputs"])
    segments = np.ones(tokens.shape, np.int32)
    segments[1, 20:] = 2
    segments[0, 36:] = 0  # padding after the document: still one document
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    args = ("model.mixers.landmark.top_k=1", "model.pattern=[landmark]")
    mixed = make_model(tiny(*args, "model.mixers.landmark.train_retrieval=0.5"), seed=8)
    grouped = make_model(tiny(*args), seed=8)
    got, want = (m(tokens, positions, jnp.asarray(segments)) for m in (mixed, grouped))
    np.testing.assert_allclose(got[1:], want[1:], rtol=1e-5, atol=1e-5)
    assert not np.allclose(got[0, :36], want[0, :36], atol=1e-3)


# (sequence strategy, mesh axes): every strategy that splits the sequence, over 4 devices
SPLITS = [("ring", dict(data=2, context=4)), ("ring-contiguous", dict(context=4)), ("ulysses", dict(context=2)),
          ("usp", dict(context=2, tensor=2)), ("ring-pallas", dict(context=2))]


@pytest.mark.parametrize("sequence,axes", SPLITS, ids=[s for s, _ in SPLITS])
def test_a_split_sequence_gives_the_unsplit_logits_and_gradients(sequence, axes):
    name, _, variant = sequence.partition("-")
    split = [f"model.attention.sequence={name}"]
    if variant == "pallas":  # the fused kernels as the ring's step: the same model, computed by the kernels
        split += ["model.mixers.landmark.impl=pallas", "model.attention.block_q=16"]
    elif variant:
        split += [f"model.strategies.ring.layout={variant}"]
    rng = np.random.default_rng(4)
    tokens = insert_landmarks({"inputs": rng.integers(0, 256, (2, 56))}, L)["inputs"]  # 64: 8 blocks
    cut = 20  # two packed documents per row; roles come from the row index, rotary from the positions
    data = {"inputs": jnp.asarray(tokens),
            "positions": jnp.asarray(np.r_[np.arange(cut), np.arange(64 - cut)][None].repeat(2, 0), jnp.int32),
            "segment_ids": jnp.asarray(np.r_[np.ones(cut), 2 * np.ones(64 - cut)][None].repeat(2, 0), jnp.int32)}
    probe = jnp.sin(jnp.arange(2 * 64 * 384, dtype=jnp.float32)).reshape(2, 64, 384)

    def logits_and_grads(cfg, mesh):
        model = make_model(cfg, mesh, seed=7)
        graphdef, params = nnx.split(model, nnx.Param)
        logits_fn = make_logits_fn(graphdef)
        loss = lambda p: jnp.sum(logits_fn(p, data) * probe)  # noqa: E731
        return model, jax.jit(lambda p: (logits_fn(p, data), jax.grad(loss)(p)))(nnx.to_pure_dict(params))

    overrides = ("model.vocab_size=384", "model.attention.impl=blockwise")
    _, (want, want_grads) = logits_and_grads(tiny(*overrides), None)
    mesh = make_mesh(**axes, devices=jax.devices()[:math.prod(axes.values())], axis_types="auto")
    model, (got, got_grads) = logits_and_grads(tiny(*overrides, *split), mesh)
    assert model.block_0.attn.split is not None  # the landmark layer ran the strategy, not the unsplit path
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-4)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-3, atol=2e-4)


def test_a_split_sequence_needs_whole_blocks_per_ring_chunk_and_no_striped_layout():
    mesh = make_mesh(context=4, devices=jax.devices()[:4])
    assert sequence_multiple(tiny("model.attention.sequence=ring"), mesh) == 2 * 4 * L  # zigzag: 2 chunks a device
    assert sequence_multiple(tiny("model.attention.sequence=ulysses"), mesh) == L  # whole sequence per device
    assert attention_name(tiny("model.attention.sequence=ring"), mesh) == (
        "blockwise x ring; landmark layers: blockwise x ring")
    assert attention_name(tiny(), None).endswith("; landmark layers: blockwise x none")
    with pytest.raises(ConfigError, match=r"'model.strategies.ring.layout'='striped' deals tokens out one per device"):
        sequence_multiple(tiny("model.attention.sequence=ring", "model.strategies.ring.layout=striped"), mesh)
    # the run refuses such a length before it writes anything
    from lca.train.setup import check_fits

    with pytest.raises(ConfigError, match=r"train.seq_len=32 is not divisible by 64"):
        check_fits(tiny("model.attention.sequence=ring", "train.seq_len=32", "train.global_batch=8",
                        "mesh.context=4", "mesh.data=2"), make_mesh(data=2, context=4))
