"""End to end: the tiny config trains a few steps with every attention combination that imports."""

import math

import pytest

from lca.config import ConfigError
from lca.train.metrics import read_metrics
from tests.models.attention_cases import CASES, overrides

# usp needs a second sequence axis: Ulysses over `tensor`, the ring over `context`.
MESHES = {"usp": ["mesh.fsdp=1", "mesh.tensor=2"]}


@pytest.fixture(scope="module")
def first_losses():
    return {}


@pytest.mark.parametrize("kind", list(CASES))
def test_every_kind_trains(kind, tiny, tmp_path, first_losses):
    from lca.train import train

    cfg = tiny(tmp_path, *overrides(kind), "train.steps=3", "checkpoint.enabled=false",
               "model.num_layers=1", "model.pattern=[global]", *MESHES.get(kind, []))
    result = train(cfg)
    records = read_metrics(tmp_path)
    assert sorted(records) == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in records.values())
    assert (tmp_path / "config.yaml").is_file() and result["loss_png"].is_file()
    assert list((tmp_path / "tensorboard").iterdir()), "no TensorBoard event file"
    # Same init, same data: the first loss only depends on the attention being right.
    first_losses[kind] = records[1]["loss"]
    base = first_losses.setdefault("reference", first_losses[kind])
    assert first_losses[kind] == pytest.approx(base, rel=1e-4)


def test_loss_falls_with_training(finished_run):
    """The 8-step tiny run's loss goes down (lr 1e-3; the stdlib text is easy at first)."""
    run_dir, _ = finished_run
    losses = [r["loss"] for r in read_metrics(run_dir).values()]
    assert min(losses[-3:]) < losses[0]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["mesh.data=3"], "mesh does not fit the 8 devices"),
        (["train.seq_len=66"], "train.seq_len=66 is not divisible by 4"),
        (["train.global_batch=6"], "must be divisible by mesh.data * mesh.fsdp = 4"),
        (["model.attention.sequence=magic"], "config key 'model.attention.sequence' has unknown value 'magic'"),
        (["model.attention.impl=magic"], "config key 'model.attention.impl'"),
    ],
)
def test_shape_errors_are_config_errors(tiny, tmp_path, overrides, message):
    from lca.train import train

    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        train(tiny(tmp_path, *overrides))
