"""Model construction from a run config: vocabulary, sequence multiple, sharded init.

Parameters are created as a pure nested dict (``{"block_0": {"attn": ...}}``) of
float32 arrays, laid out on the mesh from the first moment: ``init_params`` runs
the initialisers under ``jit`` with the parameters' shardings as outputs, so no
device ever holds the whole model unsharded.
"""

from __future__ import annotations

import math

import jax
from flax import nnx

from lca.config import Config
from lca.models import mixers, strategies
from lca.models.decoder import Decoder, padded_vocab
from lca.parallel.sharding import Sharder, tree_shardings


def vocab_size(cfg: Config) -> int:
    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size
    from lca.data.tokenizer import VOCAB_SIZE

    return padded_vocab(VOCAB_SIZE)


def sequence_multiple(cfg: Config, mesh: jax.sharding.Mesh | None) -> int:
    """Sequence lengths must be a multiple of this on ``mesh``.

    The resolved sequence strategy's own multiple, the number of devices the
    ``sequence`` logical axis is sharded over (``cfg.rules``), and what the mixers
    need of their own (landmark blocks whole in every ring chunk).
    """
    if mesh is None:
        return 1
    sharded = math.prod(mesh.shape[axis] for axis in cfg.rules.get("sequence", []) if axis in mesh.shape)
    return math.lcm(strategies.strategy_multiple(cfg.model, mesh), sharded, mixers.sequence_multiple(cfg.model, mesh))


def attention_name(cfg: Config, mesh: jax.sharding.Mesh | None) -> str:
    """``"<impl> x <strategy>"`` as resolved on ``mesh``, for logs and messages; landmark layers, which compute
    with their own kernel, add theirs (``"...; landmark layers: blockwise x ring"``)."""
    strategy = strategies.resolve(cfg.model, mesh)
    name = f"{cfg.model.attention.impl} x {strategy}"
    if "landmark" in cfg.model.pattern:
        split = strategies.split_axis(cfg.model, mesh) is not None
        name += f"; landmark layers: {cfg.model.mixers['landmark'].impl} x {strategy if split else 'none'}"
    return name


def _decoder(cfg: Config, mesh, seed: int) -> Decoder:
    return Decoder(cfg.model, vocab_size=vocab_size(cfg), mesh=mesh, shard=Sharder(cfg.rules, mesh),
                   rngs=nnx.Rngs(seed))


def make_model(cfg: Config, mesh: jax.sharding.Mesh | None = None, *, seed: int = 0) -> Decoder:
    """The model with freshly initialised parameters (unsharded; for tests and small runs)."""
    with nnx.use_eager_sharding(False):
        return _decoder(cfg, mesh, seed)


def split_params(model: Decoder):
    """``(graphdef, params)``; a ValueError if the model holds anything but ``nnx.Param`` at construction."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if rest:
        paths = [".".join(map(str, path)) for path, _ in nnx.to_flat_state(rest)]
        raise ValueError(
            f"the model holds non-parameter state at construction (at {paths}); the train step carries "
            "nnx.Param only. A mixer creates state it keeps across calls (caches, streaming memory) in its "
            "own inference methods, not in __init__."
        )
    return graphdef, params


def abstract_model(cfg: Config, mesh: jax.sharding.Mesh | None = None):
    """``(graphdef, abstract params, logical specs)`` without allocating parameters."""
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: _decoder(cfg, mesh, 0))
    graphdef, params = split_params(model)
    logical = nnx.to_pure_dict(nnx.get_partition_spec(params))
    return graphdef, nnx.to_pure_dict(params), logical


def param_shardings(cfg: Config, mesh: jax.sharding.Mesh):
    _, abstract, logical = abstract_model(cfg, mesh)
    return tree_shardings(logical, abstract, cfg.rules, mesh)


def init_params(cfg: Config, mesh: jax.sharding.Mesh, seed: int):
    """Parameters as a pure dict, created directly in their sharded layout."""
    shardings = param_shardings(cfg, mesh)

    def init():
        with nnx.use_eager_sharding(False):
            model = _decoder(cfg, mesh, seed)
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    return jax.jit(init, out_shardings=shardings)()


def num_params(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
