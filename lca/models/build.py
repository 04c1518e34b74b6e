"""Model construction from a run config: attention kernel, vocabulary, sharded init.

Parameters are created as a pure nested dict (``{"block_0": {"attn": ...}}``) of
float32 arrays, laid out on the mesh from the first moment: ``init_params`` runs
the initialisers under ``jit`` with the parameters' shardings as outputs, so no
device ever holds the whole model unsharded.
"""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from lca.config import Config
from lca.models import attention_registry
from lca.models.decoder import Decoder, padded_vocab
from lca.parallel.sharding import Sharder, tree_shardings


def vocab_size(cfg: Config) -> int:
    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size
    from lca.data.tokenizer import VOCAB_SIZE

    return padded_vocab(VOCAB_SIZE)


def attention_kind(cfg: Config, mesh: jax.sharding.Mesh | None) -> str:
    context = 1 if mesh is None else mesh.shape.get("context", 1)
    return attention_registry.resolve_kind(cfg.model.attention.kind, context)


def sequence_chunks(cfg: Config, mesh: jax.sharding.Mesh | None) -> int:
    """How many equal pieces the attention kind cuts a sequence into (lengths must divide)."""
    if mesh is None:
        return 1
    kind = attention_kind(cfg, mesh)
    att = cfg.model.attention
    zigzag = 2 if att.layout == "zigzag" else 1
    if kind == "ring":
        return zigzag * mesh.shape["context"]
    if kind == "ulysses":
        return mesh.shape["context"]
    if kind == "usp":
        return zigzag * mesh.shape[att.ring_axis] * mesh.shape[att.ulysses_axis]
    return mesh.shape["context"]


def make_attend(cfg: Config, mesh: jax.sharding.Mesh | None) -> Callable:
    att = cfg.model.attention
    return attention_registry.make_attention(
        attention_kind(cfg, mesh), mesh=mesh, block_q=att.block_q, block_kv=att.block_kv, layout=att.layout,
        impl=att.impl, ulysses_axis=att.ulysses_axis, ring_axis=att.ring_axis,
    )


def make_model(cfg: Config, mesh: jax.sharding.Mesh | None = None, *, seed: int = 0) -> Decoder:
    """The model with freshly initialised parameters (unsharded; for tests and small runs)."""
    shard = Sharder(cfg.rules, mesh)
    with nnx.use_eager_sharding(False):
        return Decoder(cfg.model, vocab_size=vocab_size(cfg), attend=make_attend(cfg, mesh), shard=shard,
                       rngs=nnx.Rngs(seed))


def abstract_model(cfg: Config, mesh: jax.sharding.Mesh | None = None):
    """``(graphdef, abstract params, logical specs)`` without allocating parameters."""
    shard = Sharder(cfg.rules, mesh)
    attend = make_attend(cfg, mesh)
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(
            lambda: Decoder(cfg.model, vocab_size=vocab_size(cfg), attend=attend, shard=shard, rngs=nnx.Rngs(0))
        )
    graphdef, params = nnx.split(model, nnx.Param)
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
            model = Decoder(cfg.model, vocab_size=vocab_size(cfg), attend=make_attend(cfg, mesh),
                            shard=Sharder(cfg.rules, mesh), rngs=nnx.Rngs(seed))
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    return jax.jit(init, out_shardings=shardings)()


def num_params(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
