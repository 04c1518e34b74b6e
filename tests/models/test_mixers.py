"""The mixer slot: ``model.pattern`` names a mixer per layer, and the README recipe adds a new one."""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lca.config import ConfigError, load_config
from lca.models import MIXERS, Mixer, MixerEnv, layer_mixers, make_model
from lca.models.build import abstract_model
from lca.models.layers import dense
from lca.train.metrics import read_metrics


# --- the README recipe, step 1: the config dataclass ---------------------------------
@dataclasses.dataclass(frozen=True)
class ShiftConfig:
    gate_init: float = 0.5

    def check(self, key, model):
        if not 0 <= self.gate_init <= 1:
            raise ConfigError(f"config key '{key}.gate_init' must be in [0, 1], got {self.gate_init}.")


# --- step 2: the module ----------------------------------------------------------------
class ShiftMixer(nnx.Module):
    """Each token plus a gated copy of the previous token of its document, projected."""

    def __init__(self, cfg: ShiftConfig, env: MixerEnv, *, rngs):
        d = env.model.d_model
        gate = nnx.with_partitioning(nnx.initializers.constant(cfg.gate_init), ("norm",))
        self.gate = nnx.Param(gate(rngs.params(), (d,), jnp.float32))
        self.proj = dense(rngs, d, d, ("embed", "mlp"), env.model)
        self.shard = env.shard

    def __call__(self, x, positions, segment_ids):
        prev = jnp.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1]
        prev_seg = jnp.pad(segment_ids, ((0, 0), (1, 0)))[:, :-1]
        same_doc = (prev_seg == segment_ids)[..., None]
        return self.proj(x + self.gate * jnp.where(same_doc, prev, 0))


# --- step 3: the catalogue entry (a test adds it for its own duration) -------------------
@pytest.fixture
def shift_mixer(monkeypatch):
    monkeypatch.setitem(MIXERS, "shift", Mixer(ShiftConfig, ShiftMixer))


def test_pattern_names_a_mixer_per_layer():
    cfg = load_config("tiny", ["model.num_layers=3", "model.pattern=[local,global]"])
    assert layer_mixers(cfg.model) == ["local", "global", "local"]
    model = make_model(cfg)
    assert [b.kind for b in model.blocks()] == ["local", "global", "local"]
    assert [b.attn.window for b in model.blocks()] == [16, None, 16]


def test_unused_sections_are_not_checked():
    # tiny's local window is set; a global-only model may leave it unset.
    load_config("tiny", ["model.pattern=[global]", "model.mixers.local.window=null"])


def test_new_mixer_by_the_recipe_configures_forwards_and_trains(shift_mixer, tmp_path):
    from lca.train import train

    overrides = ["model.pattern=[shift]", "model.mixers.shift.gate_init=0.25"]
    cfg = load_config("tiny", [f"run_dir={tmp_path}", *overrides, "model.num_layers=1", "train.steps=2",
                               "checkpoint.enabled=false"])
    assert cfg.model.mixers["shift"] == ShiftConfig(gate_init=0.25)
    with pytest.raises(ConfigError, match=r"did you mean 'model.mixers.shift.gate_init'"):
        load_config("tiny", [*overrides, "model.mixers.shift.gate=0.1"])
    with pytest.raises(ConfigError, match=r"'model.mixers.shift.gate_init' must be in \[0, 1\]"):
        load_config("tiny", [*overrides, "model.mixers.shift.gate_init=2"])

    model = make_model(cfg)
    assert isinstance(model.block_0.attn, ShiftMixer)
    tokens = jnp.zeros((2, 8), jnp.int32)
    logits = model(tokens, jnp.broadcast_to(jnp.arange(8), tokens.shape), jnp.ones_like(tokens))
    assert logits.shape[:2] == (2, 8) and bool(jnp.isfinite(logits).all())

    assert set(abstract_model(cfg)[1]["block_0"]["attn"]) == {"gate", "proj"}
    train(cfg)  # sharded init, compiled step, two optimizer steps on the 8-device tiny mesh
    records = read_metrics(tmp_path)
    assert sorted(records) == [1, 2] and all(math.isfinite(r["loss"]) for r in records.values())


def test_state_made_at_construction_is_a_clear_error(monkeypatch):
    class Stateful(ShiftMixer):
        def __init__(self, cfg, env, *, rngs):
            super().__init__(cfg, env, rngs=rngs)
            self.cache = nnx.Cache(jnp.zeros(3))

    monkeypatch.setitem(MIXERS, "stateful", Mixer(ShiftConfig, Stateful))
    cfg = load_config("tiny", ["model.pattern=[stateful]"])
    with pytest.raises(ValueError, match=r"non-parameter state at construction \(at \['block_0.attn.cache'"):
        abstract_model(cfg)
    np.testing.assert_array_equal(make_model(cfg).block_0.attn.cache[...], 0)  # eager use is fine
