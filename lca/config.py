"""Run configuration: typed schema, YAML files with inheritance, ``key=value`` overrides.

A config file is YAML whose keys follow :class:`Config`. It may name a parent
with ``base: other.yaml`` (a path relative to the file, or a name in
``configs/``); the child's keys override the parent's. Command-line overrides
are dotted ``key=value`` strings (``train.steps=100 mesh.context=4``) applied last.

OmegaConf does the merging and the type checks against the schema; this module
turns its errors into one :class:`ConfigError` line that names the key and, for an
unknown key, suggests the closest valid one. The result is a tree of frozen
dataclasses, so nothing downstream can mutate it. ``model.mixers`` and
``model.strategies`` hold one typed section per entry of the model's two catalogues
(:data:`lca.models.mixers.MIXERS`, :data:`lca.models.strategies.STRATEGIES`), so a
new entry brings its section without a change here; the entries that the config
uses are checked when it loads.

This module must not initialise JAX: the launcher reads ``runtime.cpu_devices``
from the config before JAX picks its devices.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException



def _shipped_config_dir() -> Path:
    """The configs that ship with lca: the repository's top-level ``configs/``.

    An installed wheel holds them as the package data ``lca.configs`` (setup.py maps
    ``configs/`` there); a source checkout, editable install or ``PYTHONPATH`` run
    reads the checkout's ``configs/`` next to the ``lca`` package.
    """
    package = Path(str(importlib.resources.files("lca")))
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


CONFIG_DIR = _shipped_config_dir()
RESOLVED_NAME = "config.yaml"


class ConfigError(ValueError):
    """A config problem the user can fix; launchers print it as one line."""


# --------------------------------------------------------------------------- schema


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """How the attention mixers compute attention: two independent choices."""

    # Local implementation: how attention runs on one device (lca.attention.impl.get_impl):
    # reference | xla | blockwise | pallas | cudnn.
    impl: str = "blockwise"
    # Sequence strategy (lca.models.strategies.STRATEGIES): none | ring | ulysses | usp, or
    # "auto": ring when its mesh axis (model.strategies.ring.axis) is > 1, else none.
    # The chosen strategy's options are its section model.strategies.<name>.
    sequence: str = "auto"
    # Tile sizes of the local implementation; None: its best default for the head_dim, dtype and
    # device (blockwise: 512; pallas: kernels_pallas.blocks.plan, which also gives the backward its own).
    block_q: Optional[int] = None
    block_kv: Optional[int] = None
    # The backward's tiles; None: the implementation's backward default (blockwise: the forward's
    # sizes; pallas: the plan's backward tiles, which on an H100 differ from the forward's).
    block_q_bwd: Optional[int] = None
    block_kv_bwd: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: Optional[int] = None  # None: the byte tokenizer's vocabulary
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: Optional[int] = None  # None: d_model // num_heads
    mlp_dim: int = 1024
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"  # none | full | dots | dots_no_batch
    # The token mixer of each layer, cycled over the layers: kinds of lca.models.mixers.MIXERS.
    # [local, local, local, global] makes every 4th layer global, the rest sliding-window.
    pattern: list[str] = dataclasses.field(default_factory=lambda: ["global"])
    attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
    # One typed section per catalogue entry, from the catalogues at load time (see _schema):
    # model.mixers.<kind> is lca.models.mixers.MIXERS[kind].config, and
    # model.strategies.<name> is lca.models.strategies.STRATEGIES[name].config.
    mixers: Any = None
    strategies: Any = None

    @property
    def resolved_head_dim(self) -> int:
        """The attention layers' head width: ``head_dim``, or ``d_model // num_heads`` when that is None."""
        return self.head_dim or self.d_model // self.num_heads


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    context: int = 1
    tensor: int = 1


def _default_rules() -> dict[str, list[str]]:
    return {
        # activations
        "batch": ["data", "fsdp"],
        "sequence": ["context"],
        "act_embed": [],
        "act_heads": ["tensor"],
        "act_kv_heads": ["tensor"],
        "act_mlp": ["tensor"],
        "act_vocab": ["tensor"],
        # parameters
        "embed": ["fsdp"],
        "vocab": ["tensor"],
        "heads": ["tensor"],
        "kv_heads": ["tensor"],
        "head_dim": [],
        "mlp": ["tensor"],
        "norm": [],
    }


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    seq_len: int = 1024
    global_batch: int = 8  # sequences per optimizer step, all processes together
    grad_accum: int = 1  # micro-batches per step; global_batch % grad_accum == 0
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    seed: int = 0
    log_every: int = 10
    progress_bar: bool = True  # only drawn on a terminal
    # Trace steps profile_at .. profile_at + profile_steps - 1 (from 1; >= 2 leaves compilation
    # out) into RUN_DIR/profile/, with a per-op time table ops.md (lca.train.profile). 0: off.
    profile_at: int = 0
    profile_steps: int = 2
    # Fine-tune: a run that starts fresh takes its parameters from this checkpoint (a
    # run_dir's newest, or RUN/checkpoints/STEP) instead of initialising them; the
    # optimizer, step, schedule and data start anew. Ignored once the run has its own
    # checkpoints. None: initialise from train.seed.
    init_from: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    enabled: bool = True
    every: int = 100
    keep: int = 3
    async_save: bool = True
    # Resume even though a key that shapes the saved state (model, data, global_batch,
    # seed) differs from the run's config.yaml; the restore still refuses other shapes.
    allow_config_change: bool = False
    # When every checkpoint of the run is unreadable: false stops, true starts again at step 0.
    restart_if_unusable: bool = False


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    at_end: bool = True
    seq_len: Optional[int] = None  # None: train.seq_len
    batch: int = 8
    num_batches: int = 4
    retrieval_task: str = "passkey"
    context_lengths: list[int] = dataclasses.field(default_factory=lambda: [256, 512])
    depths: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.5, 1.0])
    samples_per_cell: int = 4
    seed: int = 1234


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    cpu_devices: int = 0  # > 0: run on this many fake CPU devices (set before JAX starts)
    # How this process joins its job (LAUNCH_FIELDS: each process of a job has its own, so a run's saved
    # config.yaml holds their defaults, and a reloaded run takes them from its own launch).
    distributed: str = "auto"  # auto | on | off: call jax.distributed.initialize()
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None


LAUNCH_FIELDS = ("distributed", "coordinator_address", "num_processes", "process_id")


def _launch_defaults() -> dict:
    """``{field: default}`` of the runtime's :data:`LAUNCH_FIELDS`: what a saved or reloaded run holds."""
    defaults = RuntimeConfig()
    return {name: getattr(defaults, name) for name in LAUNCH_FIELDS}


@dataclasses.dataclass(frozen=True)
class Config:
    name: str = "run"
    run_dir: str = "runs/${name}"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    rules: dict[str, list[str]] = dataclasses.field(default_factory=_default_rules)
    # lca.data.pipeline.DataConfig; typed at load time (see _schema).
    data: Any = None
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)


_CHOICES = {
    "model.dtype": ("bfloat16", "float32", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "dots", "dots_no_batch"),
    "runtime.distributed": ("auto", "on", "off"),
}


# --------------------------------------------------------------------------- loading


def _schema() -> DictConfig:
    schema = OmegaConf.structured(Config)
    # No JAX backend initialisation in any of these.
    from lca.data.pipeline import DataConfig
    from lca.models.mixers import MIXERS
    from lca.models.strategies import STRATEGIES

    with _unfrozen(schema), _unfrozen(schema.model):
        schema.data = OmegaConf.structured(DataConfig)
        schema.model.mixers = _sections({kind: entry.config for kind, entry in MIXERS.items()})
        schema.model.strategies = _sections({name: entry.config for name, entry in STRATEGIES.items()})
    return schema


def _sections(configs: dict[str, type]) -> DictConfig:
    """One typed node per catalogue entry; an unknown entry name is an unknown key."""
    node = OmegaConf.create({name: OmegaConf.structured(config) for name, config in configs.items()})
    OmegaConf.set_struct(node, True)
    return node


class _unfrozen:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def __enter__(self):
        OmegaConf.set_readonly(self.cfg, False)

    def __exit__(self, *exc):
        OmegaConf.set_readonly(self.cfg, None)


def shipped_configs() -> list[str]:
    """The names of the configs that ship with lca (``lca-train NAME``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def find_config(name: str | Path) -> Path:
    """A config path: as given if it exists, else a shipped config ``configs/<name>[.yaml]``."""
    path = Path(name)
    candidates = [path, CONFIG_DIR / path, CONFIG_DIR / f"{path}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"config file {str(name)!r} not found (looked in the current directory and {CONFIG_DIR}); "
        f"available: {shipped_configs()}."
    )


def _read_yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    """``[(file, keys)]`` from the root ancestor down to ``path``, following ``base:``."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config inheritance cycle: {' -> '.join(str(p) for p in (*seen, path))}.")
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err}).".replace("\n", " ")) from None
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys, got {type(content).__name__}.")
    base = content.pop("base", None)
    chain = []
    if base is not None:
        parent = path.parent / base
        chain = _read_yaml_chain(parent if parent.is_file() else find_config(base), (*seen, path))
    return [*chain, (path, content)]


def _all_keys(node: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key in node.keys():
        full = f"{prefix}{key}"
        keys.append(full)
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_none():
            keys.extend(_all_keys(child, f"{full}."))
    return keys


def _explain(err: OmegaConfBaseException, schema: DictConfig, origin: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        close = difflib.get_close_matches(key, _all_keys(schema), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        return ConfigError(f"unknown config key {key!r} in {origin}{hint}")
    reason = str(getattr(err, "msg", err)).splitlines()[0]
    return ConfigError(f"bad value for config key {key!r} in {origin}: {reason}.")


def choice_error(key: str, value: str, choices) -> ConfigError:
    """``key`` holds ``value``, which is none of ``choices``: one line, with the closest choice."""
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return ConfigError(f"config key {key!r} has unknown value {value!r}; {hint}choices: {list(choices)}.")


def _merge(schema: DictConfig, layer, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(schema, layer)
    except OmegaConfBaseException as err:
        raise _explain(err, schema, origin) from None


def _on_off_from_yaml_bools(cfg: DictConfig) -> DictConfig:
    """``runtime.distributed=on`` as the user wrote it.

    YAML 1.1 (and so OmegaConf, in files and in overrides) reads ``on``/``off``/
    ``yes``/``no`` as booleans, which the string field then holds as ``"True"``/``"False"``.
    """
    value = cfg.runtime.distributed
    if value in ("True", "False"):
        cfg = OmegaConf.merge(cfg, {"runtime": {"distributed": "on" if value == "True" else "off"}})
    return cfg


def _check_values(cfg: Config) -> None:
    flat = {
        "model.dtype": cfg.model.dtype,
        "model.param_dtype": cfg.model.param_dtype,
        "model.remat": cfg.model.remat,
        "runtime.distributed": cfg.runtime.distributed,
    }
    for key, value in flat.items():
        if value not in _CHOICES[key]:
            raise ConfigError(f"config key {key!r} must be one of {list(_CHOICES[key])}, got {value!r}.")
    from lca.models import mixers, strategies

    mixers.check(cfg.model, cfg)
    if cfg.data.landmark_every is not None:  # any model reading landmark rows needs the id, not only a landmark layer
        from lca.models.landmark import check_vocab_holds_landmark

        check_vocab_holds_landmark(cfg.model, "that data.landmark_every inserts")
    strategies.check(cfg.model, tuple(field.name for field in dataclasses.fields(MeshConfig)))
    m = cfg.model
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(
            f"model.num_heads ({m.num_heads}) must be a multiple of model.num_kv_heads ({m.num_kv_heads})."
        )
    if m.head_dim is None and m.d_model % m.num_heads:
        raise ConfigError(
            f"model.d_model ({m.d_model}) must be divisible by model.num_heads ({m.num_heads}), "
            "or set model.head_dim."
        )
    _check_train_values(cfg)
    t = cfg.train
    if t.global_batch % t.grad_accum:
        raise ConfigError(
            f"train.global_batch ({t.global_batch}) must be divisible by train.grad_accum ({t.grad_accum})."
        )


def _check_train_values(cfg: Config) -> None:
    """Values no run can use: each a ConfigError naming the key and what would work."""
    t, e = cfg.train, cfg.eval
    at_least_one = {
        "train.steps": t.steps, "train.seq_len": t.seq_len, "train.global_batch": t.global_batch,
        "train.grad_accum": t.grad_accum, "train.log_every": t.log_every, "checkpoint.every": cfg.checkpoint.every,
        "checkpoint.keep": cfg.checkpoint.keep, "eval.batch": e.batch, "eval.num_batches": e.num_batches,
        "eval.samples_per_cell": e.samples_per_cell, "train.profile_steps": t.profile_steps,
    }
    for key, value in at_least_one.items():
        if value < 1:
            raise ConfigError(f"config key {key!r} must be >= 1, got {value}.")
    ranges = {  # key: (value, low, high, inclusive low, inclusive high, example)
        "train.lr": (t.lr, 0.0, float("inf"), False, False, "3e-4"),
        "train.min_lr_ratio": (t.min_lr_ratio, 0.0, 1.0, True, True, "0.1"),
        "train.weight_decay": (t.weight_decay, 0.0, float("inf"), True, False, "0.1"),
        "train.b1": (t.b1, 0.0, 1.0, True, False, "0.9"),
        "train.b2": (t.b2, 0.0, 1.0, True, False, "0.95"),
        "train.eps": (t.eps, 0.0, float("inf"), False, False, "1e-8"),
        "train.clip_norm": (t.clip_norm, 0.0, float("inf"), False, True, "1.0"),
    }
    for key, (value, low, high, with_low, with_high, example) in ranges.items():
        above = value >= low if with_low else value > low
        below = value <= high if with_high else value < high
        if not (above and below):
            interval = f"{'[' if with_low else '('}{low:g}, {high:g}{']' if with_high else ')'}"
            raise ConfigError(f"config key {key!r} must be in {interval}, got {value!r}; e.g. {key}={example}.")
    if t.warmup_steps < 0:
        raise ConfigError(f"config key 'train.warmup_steps' must be >= 0, got {t.warmup_steps}.")
    if t.profile_at < 0:
        raise ConfigError(f"config key 'train.profile_at' must be >= 0 (0: no profile), got {t.profile_at}; "
                          "e.g. train.profile_at=3 traces steps 3 and 4.")
    if cfg.runtime.cpu_devices < 0:
        raise ConfigError(f"config key 'runtime.cpu_devices' must be >= 0, got {cfg.runtime.cpu_devices}.")
    if e.seq_len is not None and e.seq_len < 2:
        raise ConfigError(f"config key 'eval.seq_len' must be >= 2 or null (train.seq_len), got {e.seq_len}.")
    if any(n < 2 for n in e.context_lengths):
        raise ConfigError(f"config key 'eval.context_lengths' must hold lengths >= 2, got {list(e.context_lengths)}.")
    if any(not 0.0 <= d <= 1.0 for d in e.depths):
        raise ConfigError(f"config key 'eval.depths' must hold depths in [0, 1], got {list(e.depths)}.")
    _check_retrieval_grid(e)


def _check_retrieval_grid(e: EvalConfig) -> None:
    """The final evaluation's task and lengths, checked now rather than after training."""
    from lca.data.tasks import TASKS, check_length

    if e.retrieval_task not in TASKS:
        raise choice_error("eval.retrieval_task", e.retrieval_task, sorted(TASKS))
    for length in e.context_lengths:
        try:
            check_length(e.retrieval_task, length)
        except ValueError as err:
            raise ConfigError(f"config key 'eval.context_lengths' holds {length}, too short for "
                              f"eval.retrieval_task={e.retrieval_task!r} ({str(err).rstrip('.')}).") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The validated, read-only config from a YAML file (and its bases) plus overrides.

    >>> cfg = load_config("demo", ["train.steps=10"])
    """
    schema = _schema()
    cfg = schema
    if path is not None:
        for file, content in _read_yaml_chain(find_config(path)):
            cfg = _merge(cfg, content, str(file))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.steps=100).")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override {item!r}")
    cfg = _on_off_from_yaml_bools(cfg)
    try:
        result = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise _explain(err, schema, "the config") from None
    _check_values(result)
    return result


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, run_dir: str | Path) -> Path:
    """Write the resolved config to ``run_dir/config.yaml`` (what ``lca-eval`` reloads).

    The runtime's :data:`LAUNCH_FIELDS` are written at their defaults: process 0's id and this job's
    coordinator would be wrong for any later launch of the run.
    """
    path = Path(run_dir) / RESOLVED_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, **_launch_defaults()))))
    return path


def load_run_config(run_dir: str | Path, overrides=()) -> Config:
    """The config a run was trained with, plus overrides.

    The runtime's :data:`LAUNCH_FIELDS` start from their defaults whatever the file holds (run dirs saved
    before they were left out of it), so only ``overrides`` and the job's environment set them.
    """
    path = Path(run_dir) / RESOLVED_NAME
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no {RESOLVED_NAME}; is it a run directory made by lca-train?")
    launch = [f"runtime.{name}={'null' if value is None else value}" for name, value in _launch_defaults().items()]
    return load_config(path, [*launch, *overrides])
