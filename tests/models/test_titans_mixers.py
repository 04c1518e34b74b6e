"""The Titans mixer kinds (``titans_lmm``, ``titans_mag``, ``titans_mal``): config, model forward, causality,
the exact memory on a context-split mesh, generation through their caches, and training through ``lca.train.train``."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lca.config import ConfigError, load_config
from lca.memory.mag import MagMixer, TitansMagConfig
from lca.memory.mixer import MemoryMixer
from lca.models import make_model
from lca.parallel import make_mesh
from lca.train.metrics import read_metrics
from tests.models.streaming import assert_streams_and_generates

KINDS = ["titans_lmm", "titans_mag", "titans_mal", "titans_mac"]
# small and quick to compile: 2 linear memories, chunk 4, no persistent tokens (each doubles
# the memory's compile time); tests/memory covers deeper memories and persistent tokens
SMALL = ["chunk_size=4", "persistent=0", "memory_heads=2", "conv_kernel=2", "depth=1"]


def _overrides(kind, *extra):
    small = SMALL + (["segment=8"] if kind == "titans_mac" else [])
    return [f"model.mixers.{kind}.{o}" for o in small] + [f"model.pattern=[{kind},global]", *extra]


def _inputs(b=4, length=16, seed=0):
    tokens = jax.random.randint(jax.random.PRNGKey(seed), (b, length), 0, 200)
    return tokens, jnp.broadcast_to(jnp.arange(length), tokens.shape), jnp.ones_like(tokens)


def test_shipped_titans_configs_load():
    assert load_config("titans_lmm").model.pattern == ["titans_lmm", "global"]
    cfg = load_config("titans_mag")
    assert isinstance(cfg.model.mixers["titans_mag"], TitansMagConfig) and cfg.model.mixers["titans_mag"].window == 64


@pytest.mark.parametrize(
    "kind, override, message",
    [
        ("titans_lmm", "chunk_size=0", r"'model.mixers.titans_lmm.chunk_size' must be an int >= 1, got 0"),
        ("titans_lmm", "depth=0", r"'model.mixers.titans_lmm.depth' must be an int >= 1, got 0"),
        ("titans_lmm", "persistent=-1", r"'model.mixers.titans_lmm.persistent' must be an int >= 0"),
        ("titans_lmm", "memory_heads=3", r"'model.mixers.titans_lmm.memory_heads' \(3\) must divide model.d_model"),
        ("titans_lmm", "max_lr=0", r"'model.mixers.titans_lmm.max_lr' must be > 0"),
        ("titans_mac", "max_grad_norm=-1", r"'model.mixers.titans_mac.max_grad_norm' must be > 0 or null"),
        ("titans_mal", "init_forget=1.5", r"'model.mixers.titans_mal.init_forget' must be in \(0, 1\)"),
        ("titans_lmm", "activation=relu", r"model.mixers.titans_lmm.activation"),
        ("titans_lmm", "chunk=4", r"did you mean 'model.mixers.titans_lmm.chunk_size'"),
        ("titans_mag", "window=0", r"'model.mixers.titans_mag.window' must be an int >= 1, got 0"),
        ("titans_mag", "micro_batches=0", r"'model.mixers.titans_mag.micro_batches' must be an int >= 1"),
        ("titans_mac", "segment=0", r"'model.mixers.titans_mac.segment' must be an int >= 1, got 0"),
        ("titans_mal", "depth=0", r"'model.mixers.titans_mal.depth' must be an int >= 1, got 0"),
    ],
)
def test_bad_sections_are_one_line_config_errors(kind, override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config("tiny", [f"model.pattern=[{kind}]", f"model.mixers.{kind}.{override}"])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["titans_mag", "titans_mal"])
def test_persistent_tokens_with_an_impl_without_lse_are_a_config_error(kind):
    # The window attention merges the persistent prefix in by log-sum-exp, which impl=xla cannot give.
    overrides = [f"model.pattern=[{kind}]", f"model.mixers.{kind}.persistent=2", "model.attention.impl=xla"]
    with pytest.raises(ConfigError, match=rf"'model.mixers.{kind}.persistent'=2 needs the attention's log-sum-exp"):
        load_config("tiny", overrides)
    load_config("tiny", [*overrides[:2], "model.attention.impl=blockwise"])
    load_config("tiny", [overrides[0], overrides[2]])  # no persistent tokens: nothing to merge


@pytest.mark.parametrize("kind", ["titans_mag", "titans_mal", "titans_mac"])
def test_attention_heads_of_odd_width_are_a_config_error(kind):
    with pytest.raises(ConfigError, match=rf"'model.mixers.{kind}' with model: head_dim = .* = 9 must be even"):
        load_config("tiny", [f"model.pattern=[{kind}]", "model.d_model=36", f"model.mixers.{kind}.memory_heads=1"])


def test_unused_titans_sections_are_not_checked():
    load_config("tiny", ["model.mixers.titans_lmm.chunk_size=0"])  # pattern [local, global] does not use it


def test_pattern_mixing_titans_and_attention_is_causal():
    """Perturbing future tokens leaves earlier logits unchanged, through LMM, MAG and attention layers."""
    cfg = load_config("tiny", _overrides("titans_lmm", "model.num_layers=3",
                                         "model.pattern=[titans_lmm,titans_mag,local]"))
    model = make_model(cfg)
    assert [b.kind for b in model.blocks()] == ["titans_lmm", "titans_mag", "local"]
    assert isinstance(model.block_0.attn, MemoryMixer) and isinstance(model.block_1.attn, MagMixer)
    assert model.block_0.attn.config.chunk_size == 4 and model.block_1.attn.config.window == 64
    tokens, positions, segments = _inputs(b=2)
    forward = jax.jit(lambda t: model(t, positions, segments))
    logits = forward(tokens)
    assert logits.shape[:2] == (2, 16) and bool(jnp.isfinite(logits).all())
    changed = forward(tokens.at[:, 9:].set((tokens[:, 9:] + 7) % 200))
    np.testing.assert_array_equal(changed[:, :9], logits[:, :9])
    assert not np.allclose(changed[:, 9:], logits[:, 9:])


@pytest.mark.parametrize("kind", KINDS)
def test_a_packed_document_never_sees_another(kind):
    """Two documents in a row (the second starting mid-chunk and mid-segment): changing the first leaves the
    second's logits alone, through the mixer (its memory restarts) and the global layer."""
    model = make_model(load_config("tiny", _overrides(kind)))
    tokens, _, _ = _inputs(b=2)
    segments = jnp.broadcast_to(jnp.repeat(jnp.array([1, 2]), jnp.array([7, 9]), total_repeat_length=16), (2, 16))
    positions = jnp.where(segments == 1, jnp.arange(16), jnp.arange(16) - 7)
    forward = jax.jit(lambda t: model(t, positions, segments))
    logits = forward(tokens)
    changed = forward(tokens.at[:, :7].set((tokens[:, :7] + 7) % 200))
    np.testing.assert_allclose(changed[:, 7:], logits[:, 7:], rtol=0, atol=1e-6)
    assert not np.allclose(changed[:, :7], logits[:, :7])


@pytest.mark.parametrize("kind", ["titans_lmm", "titans_mag", "titans_mac"])  # MAL's memory runs as MAG's
def test_context_split_model_equals_one_device(kind):
    """On data=2 x context=4 with ring attention: LMM/MAG/MAL pipeline the memory over 'context',
    MAC its segments (4 tokens per device: one segment each)."""
    segment = ["model.mixers.titans_mac.segment=4"] if kind == "titans_mac" else []
    cfg = load_config("tiny", _overrides(kind, "mesh.data=2", "mesh.fsdp=1", "mesh.context=4",
                                         f"model.mixers.{kind}.micro_batches=2",
                                         f"model.mixers.{kind}.persistent=3", *segment))  # chunks unaligned
    mesh = make_mesh(data=2, context=4, axis_types="auto")
    split = make_model(cfg, mesh)
    assert split.block_0.attn.place.axis == "context"
    assert split.block_0.attn.place(jnp.zeros((4, 16, 32))).batch_axes == ("data",)
    args = _inputs()
    with jax.set_mesh(mesh):
        got = jax.jit(lambda t, p, s: split(t, p, s))(*args)
    want = jax.jit(lambda t, p, s: make_model(cfg)(t, p, s))(*args)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_titans_mixer_trains_on_the_tiny_mesh(kind, tmp_path):
    from lca.train import train

    cfg = load_config("tiny", _overrides(kind, f"run_dir={tmp_path}", "model.num_layers=1", f"model.pattern=[{kind}]",
                                         "train.steps=2", "checkpoint.enabled=false"))
    train(cfg)  # 8 fake devices, mesh.context=2: ring attention and the pipelined memory
    records = read_metrics(tmp_path)
    assert sorted(records) == [1, 2] and all(math.isfinite(r["loss"]) for r in records.values())


@pytest.mark.parametrize("kind", KINDS)
def test_streaming_through_the_caches_equals_one_forward(kind):
    """``extend`` in pieces that cut chunks, cross the window or MAC's segments (and a persistent prefix) gives
    the forward's logits; ``generate`` then decodes from those caches with one compiled step per piece length."""
    cfg = load_config("tiny", _overrides(kind, f"model.mixers.{kind}.persistent=2",
                                         *([f"model.mixers.{kind}.window=5"] if kind in ("titans_mag", "titans_mal") else [])))
    model = make_model(cfg, seed=3)
    tokens, positions, segment_ids = _inputs(b=2, length=19, seed=4)
    # chunk 4: the pieces end mid-chunk; window 5: the last one reaches past it; MAC's segment 8: 6+1+1 ends
    # on a segment's boundary, the last piece runs past the next one and ends inside a third
    assert_streams_and_generates(model, tokens, positions, model(tokens, positions, segment_ids), (6, 1, 1, 11),
                                 prompt=9)
