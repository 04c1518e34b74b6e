"""The run's set-up (lca.train.setup): the model built once, initialised as before, and no import loop."""

import ast
from pathlib import Path

import jax
import numpy as np

from lca.models import decoder
from lca.train.setup import build_mesh, init_state, make_setup


def test_the_decoder_is_built_once(tiny, tmp_path, monkeypatch):
    """Set-up and initialisation together call the constructor once (it used to be three times)."""
    built = []
    original = decoder.Decoder.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    cfg = tiny(tmp_path)
    mesh = build_mesh(cfg)
    monkeypatch.setattr(decoder.Decoder, "__init__", counting)
    setup = make_setup(cfg, mesh)
    params = init_state(setup, 3)["params"]
    assert len(built) == 1
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(setup.abstract_state["params"])):
        assert (got.shape, got.dtype, got.sharding) == (want.shape, want.dtype, want.sharding)
        assert np.isfinite(np.asarray(got)).all()


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module} | {
        alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}


def test_evaluate_does_not_import_the_loop():
    train_dir = Path(__file__).resolve().parents[2] / "lca" / "train"
    assert "lca.train.loop" not in imported_modules(train_dir / "evaluate.py")
    assert not {"lca.train.loop", "lca.train.evaluate"} & imported_modules(train_dir / "setup.py")
