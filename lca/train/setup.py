"""What a run derives from its config once, before the first step: mesh, model, optimizer, compiled step.

``lca-train`` (``lca.train.loop``) and ``lca-eval`` (``lca.train.evaluate``) both
start here, so neither imports the other. The model is built exactly once per
run: its constructor is traced into a program (``jax.make_jaxpr``) from which
the graph definition, the abstract parameters and their logical axes are read,
and which, jitted with the parameters' shardings as outputs, initialises them
directly in their sharded layout when a run starts fresh.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

import jax
import jax.numpy as jnp
import optax
import jax.extend.core as jax_core
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lca.attention.impl import get_impl
from lca.config import Config, ConfigError
from lca.models.build import attention_name, make_model, sequence_multiple, split_params
from lca.parallel import make_mesh
from lca.parallel.sharding import logical_to_spec, tree_shardings
from lca.train.flops import step_flops
from lca.train.optimizer import learning_rate, make_optimizer
from lca.train.step import BATCH_KEYS, make_train_step

log = logging.getLogger("lca.train")


# --------------------------------------------------------------------------- mesh and checks


def build_mesh(cfg: Config) -> jax.sharding.Mesh:
    """The mesh from ``cfg.mesh``; a size that does not fit the devices is a ConfigError."""
    try:
        return make_mesh(**dataclasses.asdict(cfg.mesh), axis_types="auto")
    except ValueError as err:
        made = cfg.runtime.cpu_devices * jax.process_count()
        source = (f" (runtime.cpu_devices={cfg.runtime.cpu_devices} per process sets that count: raise it, "
                  f"or resize the mesh)" if made and made == jax.device_count() else "")
        raise ConfigError(f"mesh does not fit the {jax.device_count()} devices{source}: {err}") from None


def check_runs_here(cfg: Config) -> None:
    """``model.attention.impl`` can run on these devices (cudnn needs a CUDA GPU), else a ConfigError."""
    impl = get_impl(cfg.model.attention.impl)
    if impl.require is None:
        return
    try:
        impl.require()
    except ValueError as err:
        raise ConfigError(f"config key 'model.attention.impl': {err}") from None


def check_fits(cfg: Config, mesh: jax.sharding.Mesh) -> None:
    """Shapes the mesh cannot divide, and an impl these devices cannot run, as ConfigErrors naming the keys."""
    check_runs_here(cfg)
    multiple = sequence_multiple(cfg, mesh)
    seq_len = cfg.train.seq_len
    if seq_len % multiple:
        raise ConfigError(
            f"train.seq_len={seq_len} is not divisible by {multiple}, the sequence-length multiple that "
            f"attention {attention_name(cfg, mesh)!r} needs on mesh {dict(mesh.shape)}; use a multiple of {multiple}."
        )
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = cfg.train.global_batch // cfg.train.grad_accum
    if micro % batch_shards or micro % jax.process_count():
        raise ConfigError(
            f"the micro-batch train.global_batch / train.grad_accum = {micro} must be divisible by "
            f"mesh.data * mesh.fsdp = {batch_shards} and by the {jax.process_count()} processes."
        )
    from lca.data.pipeline import validate

    try:
        validate(cfg.data, seq_len=seq_len, global_batch=cfg.train.global_batch, process_count=jax.process_count())
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_eval_fits(cfg: Config, mesh: jax.sharding.Mesh) -> None:
    check_runs_here(cfg)
    chunks = sequence_multiple(cfg, mesh)
    lengths = [cfg.eval.seq_len or cfg.train.seq_len, *cfg.eval.context_lengths]
    bad = [n for n in lengths if n % chunks]
    if bad:
        raise ConfigError(
            f"eval lengths {bad} (eval.seq_len / eval.context_lengths) are not divisible by {chunks} "
            f"(the attention's sequence pieces on mesh {dict(mesh.shape)}); use multiples of {chunks}."
        )


def check_data(cfg: Config, *, splits: tuple[str, ...]) -> None:
    """Open the data sources of ``splits`` now, so that an empty folder fails before anything is written."""
    from lca.data.pipeline import check_sources

    try:
        check_sources(cfg.data, splits=splits)
    except ValueError as err:
        raise ConfigError(str(err)) from None


# --------------------------------------------------------------------------- state


@dataclasses.dataclass
class Setup:
    """Everything a run derives from its config and mesh before the first step."""

    cfg: Config
    mesh: jax.sharding.Mesh
    graphdef: object
    tx: optax.GradientTransformation
    state_shardings: dict
    abstract_state: dict
    batch_sharding: NamedSharding
    init_params: Callable  # seed (int32 scalar) -> params, already sharded
    kind: str  # the attention "<impl> x <strategy>" resolved on this mesh


def _replicated(mesh):
    return NamedSharding(mesh, P())


def _trace_model(cfg: Config, mesh: jax.sharding.Mesh):
    """``(graphdef, abstract params, logical axes, init program)`` from one call of the model's constructor."""
    built = {}

    def init(seed):
        # A key, not an int: the seed is an argument of the traced program.
        graphdef, params = split_params(make_model(cfg, mesh, seed=jax.random.key(seed)))
        built["graphdef"] = graphdef
        built["logical"] = nnx.to_pure_dict(nnx.get_partition_spec(params))
        return nnx.to_pure_dict(params)

    program, abstract_params = jax.make_jaxpr(init, return_shape=True)(jnp.int32(0))
    return built["graphdef"], abstract_params, built["logical"], jax_core.jaxpr_as_fun(program)


def make_setup(cfg: Config, mesh: jax.sharding.Mesh) -> Setup:
    graphdef, abstract_params, logical, init_program = _trace_model(cfg, mesh)
    param_sh = tree_shardings(logical, abstract_params, cfg.rules, mesh)
    tx = make_optimizer(cfg.train)
    rep = _replicated(mesh)
    opt_abstract = jax.eval_shape(tx.init, abstract_params)
    # Moments are laid out like their parameters; counts and other scalars are replicated.
    opt_sh = optax.tree_map_params(
        tx, lambda _, sharding: sharding, opt_abstract, param_sh, transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
    )
    shardings = {"params": param_sh, "opt_state": opt_sh, "step": rep, "rng": rep}
    abstract = {
        "params": abstract_params,
        "opt_state": opt_abstract,
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
    }
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    treedef = jax.tree.structure(abstract_params)
    init_sharded = jax.jit(lambda seed: jax.tree.unflatten(treedef, init_program(seed)), out_shardings=param_sh)
    batch_spec = logical_to_spec((None, "batch", "sequence"), cfg.rules, mesh)
    return Setup(cfg, mesh, graphdef, tx, shardings, abstract, NamedSharding(mesh, batch_spec), init_sharded,
                 attention_name(cfg, mesh))


def init_state(setup: Setup, seed: int) -> dict:
    params = setup.init_params(jnp.int32(seed))
    opt_state = jax.jit(setup.tx.init, out_shardings=setup.state_shardings["opt_state"])(params)
    rep = _replicated(setup.mesh)
    rng = jax.random.key_data(jax.random.key(seed))
    return {
        "params": params,
        "opt_state": opt_state,
        "step": jax.device_put(jnp.zeros((), jnp.int32), rep),
        "rng": jax.device_put(rng, rep),
    }


def abstract_batch(setup: Setup) -> dict:
    accum = setup.cfg.train.grad_accum
    shape = (accum, setup.cfg.train.global_batch // accum, setup.cfg.train.seq_len)
    dtypes = {"loss_mask": jnp.float32}
    return {
        key: jax.ShapeDtypeStruct(shape, dtypes.get(key, jnp.int32), sharding=setup.batch_sharding)
        for key in BATCH_KEYS
    }


# --------------------------------------------------------------------------- compile


def compile_step(setup: Setup):
    """The train step compiled ahead of time, with its analytic model FLOPs per call (all devices)."""
    step = make_train_step(setup.graphdef, setup.tx, learning_rate(setup.cfg.train))
    rep = _replicated(setup.mesh)
    jitted = jax.jit(
        step,
        in_shardings=(setup.state_shardings, setup.batch_sharding),
        out_shardings=(setup.state_shardings, rep),
        donate_argnums=0,
    )
    t0 = time.perf_counter()
    compiled = jitted.lower(setup.abstract_state, abstract_batch(setup)).compile()
    log.info("compiled the train step in %.1f s", time.perf_counter() - t0)
    _log_memory(compiled)
    flops = step_flops(setup.cfg, setup.abstract_state["params"])
    log.info("model FLOPs per step: %.4g with every row one document (lca.train.flops: 6 x matmul parameters x "
             "tokens + attention; logged throughput counts each batch's documents)", flops.dense)
    return compiled, flops


def _log_memory(compiled) -> None:
    try:
        mem = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        mem = None
    if mem is None:
        return
    log.info(
        "memory per device: arguments %s, outputs %s, temporaries %s, code %s",
        *map(_bytes, (mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.temp_size_in_bytes,
                      mem.generated_code_size_in_bytes)),
    )


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024
