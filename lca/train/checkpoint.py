"""Checkpoints of a training run: Orbax CheckpointManager plus the data iterator.

Each checkpoint ``<run_dir>/checkpoints/<step>/`` holds two items:

* ``state``: the train-state pytree (params, optimizer state, step, RNG), written
  asynchronously by Orbax; restored onto whatever mesh the restoring run has
  (the target shardings come from the caller), so 8 devices -> 4 works.
* ``data``: this process's data-iterator state (one JSON file per process),
  snapshotted when the save is requested, so the background write cannot see an
  iterator that has moved on.

Orbax writes each checkpoint into a temporary directory and renames it when
complete, so a run killed mid-save leaves no half checkpoint behind, and it only
deletes old checkpoints (``keep``) after a newer one is committed. A committed
checkpoint that fails to restore (a truncated or deleted file) is moved aside to
``<step>.corrupt`` with a warning and the previous one is used.

Multi-process runs: every process restores the same step or none (a checkpoint
that fails on one process is set aside on all of them, after all of them have
tried it), and a run may resume on another process count: the saved iterator
states are merged and each process takes its own rows (``lca.data.merge_states``).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import grain.checkpoint
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class _IteratorSnapshot:
    """The state of a data iterator at one moment, in the form Grain's handler stores."""

    def __init__(self, state: Any = None):
        self.state = state

    @classmethod
    def of(cls, iterator) -> "_IteratorSnapshot":
        return cls(iterator.get_state())

    def get_state(self) -> bytes:
        if isinstance(self.state, bytes):
            return json.dumps({"bytes": self.state.decode()}).encode()
        return json.dumps({"json": self.state}).encode()

    def set_state(self, raw: bytes) -> None:
        content = json.loads(raw.decode())
        self.state = content["bytes"].encode() if "bytes" in content else content["json"]

    def start_prefetch(self) -> None:  # called by Grain's handler after set_state
        pass


_CPU_HANDLER_SET = False


def _plain_array_saves_on_cpu() -> None:
    """Save each array shard from one replica when running on CPU.

    Orbax's replica-parallel saving slices replicated arrays so that replicas
    write parts; every slice is a small XLA compilation, which on a CPU with fake
    devices costs seconds per checkpoint and buys nothing.
    """
    global _CPU_HANDLER_SET
    if jax.default_backend() == "cpu" and not _CPU_HANDLER_SET:
        _CPU_HANDLER_SET = True
        absl_log = logging.getLogger("absl")
        level = absl_log.level
        absl_log.setLevel(logging.ERROR)  # Orbax warns about the (intended) override
        try:
            ocp.type_handlers.register_type_handler(
                jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
            )
        finally:
            absl_log.setLevel(level)


class Checkpointer:
    """Save every ``every`` steps, keep the last ``keep``, restore the newest good one."""

    def __init__(self, directory: str | Path, *, every: int, keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.every, self.keep, self.async_save = every, keep, async_save
        _plain_array_saves_on_cpu()
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep,
            enable_async_checkpointing=self.async_save,
            create=True,
            cleanup_tmp_directories=True,  # leftovers of a run killed mid-save
        )
        return ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def should_save(self, step: int, final: bool = False) -> bool:
        return step > 0 and (final or step % self.every == 0) and step not in self._manager.all_steps()

    def save(self, step: int, state, data_iterator=None) -> None:
        """Start saving ``state`` (and the iterator's current state) as checkpoint ``step``."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot.of(data_iterator))
        self._manager.save(step, args=ocp.args.Composite(**items))

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore_latest(self, abstract_state, data_iterator=None):
        """``(step, state)`` of the newest checkpoint that restores, or ``(None, None)``.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with the target
        shardings. The data iterator, if given, is set to the saved position.
        """
        for step in reversed(self.steps()):
            error = None
            try:
                state, data_state = self._restore(step, abstract_state, data_iterator is not None)
            except Exception as err:  # noqa: BLE001 - any failure means this checkpoint is unusable
                error = err
            if not _on_every_process(error is None):
                self._quarantine(step, error or RuntimeError("it failed to restore on another process"))
                continue
            if data_iterator is not None and data_state is not None:
                data_iterator.set_state(data_state)
            return step, state
        return None, None

    def _restore(self, step: int, abstract_state, with_data: bool):
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        data_dir = self.directory / str(step) / "data"
        mine = data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if with_data and mine.is_file():
            items["data"] = grain.checkpoint.CheckpointRestore(_IteratorSnapshot())
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if "data" in items:
            return restored["state"], restored["data"].state
        if with_data and data_dir.is_dir():
            return restored["state"], _merged_data_state(data_dir, step)
        if with_data:
            log.warning("checkpoint %d has no data-iterator state; the data restarts from the beginning", step)
        return restored["state"], None

    def _quarantine(self, step: int, err: Exception) -> None:
        """Move an unreadable checkpoint aside (kept for inspection) and forget it."""
        reason = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        target = self.directory / f"{step}.corrupt"
        log.warning(
            "checkpoint %d in %s is unreadable (%s: %s); moved to %s and using the previous one",
            step, self.directory, type(err).__name__, reason, target.name,
        )
        if jax.process_index() == 0:
            if target.exists():
                shutil.rmtree(target)
            (self.directory / str(step)).rename(target)
        # No process may look at the directory again (or reopen its manager, which
        # lists the steps) before the move is done.
        _barrier(f"set aside checkpoint {step}")
        self._manager.close()
        self._manager = self._open()

    def wait(self) -> None:
        """Block until every started save is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _merged_data_state(data_dir: Path, step: int):
    """This process's iterator state from the states a different process count saved, or None.

    ``set_state`` takes the merged state of all saved processes and keeps its own rows.
    """
    from lca.data.pipeline import merge_states

    files = sorted(data_dir.glob("process_*-of-*.json"))
    try:
        states = [json.loads(f.read_text())["json"] for f in files]
        counts = {f.stem.rsplit("-of-", 1)[1] for f in files}
        if len(counts) != 1 or len(files) != int(counts.pop()):
            raise ValueError(f"the saved states are {[f.name for f in files]}")
        merged = merge_states(states)
    except (KeyError, TypeError, ValueError) as err:
        log.warning("checkpoint %d: the data-iterator states of %d processes cannot be used by %d (%s); "
                    "the data restarts from the beginning", step, len(files), jax.process_count(), err)
        return None
    log.info("checkpoint %d: data-iterator state of %d processes merged for %d", step, len(files),
             jax.process_count())
    return merged


def _on_every_process(ok: bool) -> bool:
    """Whether ``ok`` holds on every process, so that all of them take the same branch."""
    if jax.process_count() == 1:
        return ok
    flags = multihost_utils.process_allgather(np.asarray(ok, np.int32))
    return bool(np.all(flags))


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"lca checkpoint: {name}")
