"""Checks on a run directory before a run writes to it: can it be written, and may this config resume it.

Both run before anything is created, so a failed start leaves nothing behind.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import yaml

from lca.config import LAUNCH_FIELDS, RESOLVED_NAME, Config, ConfigError, to_yaml

log = logging.getLogger("lca.train")

# Keys under `model.` that change how the model computes, not what its state holds.
COMPUTE_ONLY_MODEL_KEYS = frozenset({
    "model.dtype", "model.remat", "model.attention.impl", "model.attention.sequence",
    "model.attention.block_q", "model.attention.block_kv",
    "model.attention.block_q_bwd", "model.attention.block_kv_bwd",
})
# Sections under `model.` whose every key is compute-only: how the sequence is split
# over the mesh (layouts, axis names) never changes a parameter.
COMPUTE_ONLY_MODEL_SECTIONS = ("model.strategies.",)
# Keys outside `model.` that the saved state depends on: the data iterator's position
# counts documents of one source, shuffle and row layout.
STATE_KEYS = frozenset({
    "train.global_batch", "train.seed", "data.source", "data.path", "data.glob", "data.eval_fraction",
    "data.packing", "data.shuffle", "data.num_workers",
})
FORCE_KEY = "checkpoint.allow_config_change"


def check_writable(run_dir: str | Path) -> None:
    """ConfigError unless ``run_dir`` exists as a writable folder or can be created; creates nothing."""
    run_dir = Path(run_dir).absolute()
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"run_dir={str(run_dir)!r} cannot be created: {existing} is a file; give another run_dir.")
    try:
        Path(tempfile.mkdtemp(prefix=".lca-write-test-", dir=existing)).rmdir()
    except OSError as err:
        where = "" if existing == run_dir else f" (its nearest existing parent {existing} is not writable)"
        raise ConfigError(
            f"run_dir={str(run_dir)!r} is not writable{where}: {err.strerror or err}; give a run_dir you can write."
        ) from None


def _flat(node, prefix: str = "") -> dict:
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    out = {}
    for key, value in node.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def shapes_state(key: str) -> bool:
    """Whether changing ``key`` on resume changes what the saved state means."""
    compute_only = key in COMPUTE_ONLY_MODEL_KEYS or key.startswith(COMPUTE_ONLY_MODEL_SECTIONS)
    return key in STATE_KEYS or (key.startswith("model.") and not compute_only)


def config_changes(saved_yaml: str, cfg: Config) -> dict[str, tuple]:
    """``{key: (saved value, new value)}`` for every key that differs."""
    saved = _flat(yaml.safe_load(saved_yaml) or {})
    new = _flat(yaml.safe_load(to_yaml(cfg)))
    # A key only one side has (the schema changed in between) cannot be compared; the
    # checkpoint's own metadata still refuses a state of other shapes.
    return {key: (saved[key], new[key]) for key in sorted(set(saved) & set(new)) if saved[key] != new[key]}


def check_resume(cfg: Config, run_dir: str | Path) -> None:
    """Compare ``cfg`` with the config the run in ``run_dir`` saved, before its checkpoints are touched.

    A change of a key that shapes the saved state is a ConfigError unless
    ``checkpoint.allow_config_change=true``; other changes are logged.
    """
    path = Path(run_dir) / RESOLVED_NAME
    if not path.is_file():
        return
    try:
        changes = config_changes(path.read_text(), cfg)
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read the run's saved config {path} ({type(err).__name__}); "
                          "restore it or give a new run_dir.") from None
    # where the run lives and how this launch joins its job, not what the run holds
    for key in (FORCE_KEY, "run_dir", "name", *(f"runtime.{name}" for name in LAUNCH_FIELDS)):
        changes.pop(key, None)

    def show(key):
        before, after = changes[key]
        return f"{key} {before} -> {after}"

    blocking = [key for key in changes if shapes_state(key)]
    if blocking and not cfg.checkpoint.allow_config_change:
        listed = ", ".join(show(key) for key in blocking[:4]) + (", ..." if len(blocking) > 4 else "")
        raise ConfigError(
            f"run_dir={str(run_dir)!r} holds checkpoints of a run with another config ({listed}); "
            "resume it without those changes, give a new run_dir to start a new run, "
            f"or set {FORCE_KEY}=true to try anyway."
        )
    if changes:
        log.info("resuming with a changed config: %s", ", ".join(show(key) for key in changes))
