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
deletes old checkpoints (``keep``) after a newer one is committed.

Restoring reads the checkpoint's metadata first: a checkpoint whose arrays have
other shapes or dtypes than the run's state (the config changed) is a
:class:`CheckpointMismatch`, never corruption. Only a checkpoint that fails to
read (a truncated or deleted file) is corrupt: it is moved aside, under a name
no other set-aside uses (``<step>.corrupt-<time>``; nothing is ever deleted),
with a warning naming the cause, and the previous one is used. ``keep`` counts
only good checkpoints, since Orbax only sees directories named by a step.
A read-only Checkpointer (``lca-eval``) skips corrupt checkpoints without moving
anything and creates no directory.

Multi-process runs: every process restores the same step or none (a checkpoint
that fails on one process is set aside on all of them, after all of them have
tried it), and a run may resume on another process count: the saved iterator
states are merged and each process takes its own rows (``lca.data.merge_states``).

Fine-tuning (``train.init_from``) reads only the ``params`` of another run's
checkpoint (:func:`init_from_checkpoint`, :func:`restore_params`), so that run's
optimizer, schedule and data position need not match this one's.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import grain.checkpoint
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from lca.config import ConfigError

log = logging.getLogger(__name__)


class CheckpointMismatch(ConfigError):
    """A readable checkpoint that holds a differently shaped state than the run's config makes."""


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
    """Save every ``every`` steps, keep the last ``keep``, restore the newest good one.

    ``read_only``: never create, move or write anything (for evaluation).
    """

    def __init__(self, directory: str | Path, *, every: int, keep: int, async_save: bool = True,
                 read_only: bool = False):
        self.directory = Path(directory).absolute()
        self.every, self.keep, self.async_save, self.read_only = every, keep, async_save, read_only
        self.set_aside: list[tuple[int, str]] = []  # (step, the reason) of each unusable checkpoint met
        _plain_array_saves_on_cpu()
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep,
            enable_async_checkpointing=self.async_save,
            create=not self.read_only,
            cleanup_tmp_directories=not self.read_only,  # leftovers of a run killed mid-save
        )
        return ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def should_save(self, step: int, final: bool = False) -> bool:
        return step > 0 and (final or step % self.every == 0) and step not in self._manager.all_steps()

    def save(self, step: int, state, data_iterator=None) -> None:
        """Start saving ``state`` (and the iterator's current state) as checkpoint ``step``."""
        if self.read_only:
            raise RuntimeError(f"checkpoints in {self.directory} are opened read-only")
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot.of(data_iterator))
        self._manager.save(step, args=ocp.args.Composite(**items))

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore_latest(self, abstract_state, data_iterator=None, *, partial: bool = False):
        """``(step, state)`` of the newest checkpoint that restores, or ``(None, None)``.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with the target
        shardings. The data iterator, if given, is set to the saved position.
        ``partial``: ``abstract_state`` names some of the saved top-level keys (e.g. only
        ``params``, for evaluation) and only those are read: no memory for the rest.
        Raises :class:`CheckpointMismatch` if the newest readable checkpoint holds
        a state of other shapes. Unusable checkpoints are listed in ``set_aside``.
        """
        for step in reversed(self.steps()):
            error, mismatch = None, []
            try:
                mismatch = state_mismatch(self.directory / str(step) / "state", abstract_state, partial=partial)
                if not mismatch:
                    state, data_state = self._restore(step, abstract_state, data_iterator is not None,
                                                      partial=partial)
            except Exception as err:  # noqa: BLE001 - any read failure means this checkpoint is unusable
                error = err
            if not _on_every_process(error is None):
                self._set_aside(step, error or RuntimeError("it failed to restore on another process"))
                continue
            if mismatch:
                raise CheckpointMismatch(
                    f"checkpoint {step} in {self.directory} holds a state of other shapes than this config makes "
                    f"({'; '.join(mismatch[:3])}{'; ...' if len(mismatch) > 3 else ''}); "
                    "train with the config the run was started with, or give a new run_dir."
                )
            if data_iterator is not None and data_state is not None:
                data_iterator.set_state(data_state)
            return step, state
        return None, None

    def _restore(self, step: int, abstract_state, with_data: bool, *, partial: bool = False):
        items = {"state": _partial_restore(abstract_state) if partial else ocp.args.StandardRestore(abstract_state)}
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

    def _set_aside(self, step: int, err: Exception) -> None:
        """Move an unreadable checkpoint aside under a new name (kept for inspection) and forget it."""
        reason = describe_error(err)
        self.set_aside.append((step, reason))
        if self.read_only:
            log.warning("checkpoint %d in %s is unreadable (%s); skipping it", step, self.directory, reason)
            return
        # Every process has finished reading it (the vote above is a collective);
        # process 0 moves it, and no process lists the directory before the move is done.
        target = _unused_name(self.directory, f"{step}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        log.warning("checkpoint %d in %s is unreadable (%s); moving it to %s and trying the previous one",
                    step, self.directory, reason, target.name if jax.process_index() == 0 else "<step>.corrupt-<time>")
        _barrier(f"before setting aside checkpoint {step}")
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(target)
        _barrier(f"set aside checkpoint {step}")
        self._manager.close()
        self._manager = self._open()

    def wait(self) -> None:
        """Block until every started save is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def checkpoint_steps(directory: str | Path) -> list[int]:
    """The committed checkpoints' steps in ``directory``, read without opening (or creating) anything."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def set_aside_names(directory: str | Path) -> list[str]:
    """The names of the checkpoints set aside as unreadable in ``directory``, newest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    names = [p.name for p in directory.iterdir() if p.name.split(".", 1)[0].isdigit() and ".corrupt" in p.name]
    return sorted(names, key=lambda name: (-int(name.split(".", 1)[0]), name))


def state_mismatch(state_dir: Path, abstract_state, *, partial: bool = False) -> list[str]:
    """``["params.x: saved (32,) float32, wanted (64,) float32", ...]`` from the checkpoint's metadata.

    ``partial``: compare only the saved subtrees under ``abstract_state``'s top-level keys (a
    partial restore). Reading the metadata raises if it is unreadable (that is corruption).
    """
    handler = ocp.StandardCheckpointHandler()
    try:
        saved = _leaf_types(handler.metadata(epath.Path(state_dir)))
    finally:
        handler.close()
    if partial:
        saved = {key: value for key, value in saved.items() if key.split(".", 1)[0] in abstract_state}
    wanted = _leaf_types(abstract_state)
    out = []
    for key in sorted(set(saved) | set(wanted)):
        have, want = saved.get(key), wanted.get(key)
        if have != want:
            describe = lambda t: "absent" if t is None else f"{tuple(t[0])} {t[1]}"  # noqa: E731
            out.append(f"{key}: saved {describe(have)}, wanted {describe(want)}")
    return out


def init_from_checkpoint(path: str | Path) -> Path:
    """The ``state`` folder of the checkpoint that ``train.init_from=path`` names.

    ``path`` is a run_dir (its newest checkpoint), its ``checkpoints`` folder, or one
    step's folder (``RUN/checkpoints/1200``). ConfigError when it names none.
    """
    path = Path(path).expanduser().absolute()
    if path.name.isdigit() and (path / "state").is_dir():
        return path / "state"
    for folder in (path / "checkpoints", path):
        steps = checkpoint_steps(folder)
        if steps:
            return folder / str(steps[-1]) / "state"
    found = "no checkpoints/<step>/ in it" if path.exists() else "no such folder"
    raise ConfigError(f"train.init_from={str(path)!r} holds no checkpoint ({found}); give a run_dir that has "
                      "checkpoints, or one step's folder RUN/checkpoints/STEP.")


def restore_params(state_dir: Path, abstract_params):
    """The ``params`` of the checkpoint at ``state_dir``, restored with ``abstract_params``' shardings.

    ConfigError, before anything is restored, when the checkpoint cannot be read or
    its parameters have other shapes than this config's (the model must be the same).
    """
    target = {"params": abstract_params}
    step_dir = state_dir.parent

    def unreadable(err):
        return ConfigError(f"train.init_from: checkpoint {step_dir} cannot be read ({describe_error(err)}); "
                           f"name an earlier step of {step_dir.parent} (RUN/checkpoints/STEP).")

    try:
        mismatch = state_mismatch(state_dir, target, partial=True)
    except Exception as err:  # noqa: BLE001 - any read failure: this checkpoint cannot start the run
        raise unreadable(err) from None
    if mismatch:
        raise ConfigError(
            f"train.init_from: the parameters of checkpoint {step_dir} differ from this config's "
            f"({'; '.join(mismatch[:3])}{'; ...' if len(mismatch) > 3 else ''}); fine-tuning needs the same model: "
            "change only keys that keep the parameters' shapes (training, data, compute options)."
        )
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        restored = checkpointer.restore(state_dir, args=_partial_restore(target))
    except Exception as err:  # noqa: BLE001 - e.g. a truncated array file
        raise unreadable(err) from None
    finally:
        checkpointer.close()
    return restored["params"]


def _partial_restore(abstract_state) -> ocp.args.PyTreeRestore:
    """Restore arguments that read only ``abstract_state``'s subtrees of a saved state (with its shardings)."""
    return ocp.args.PyTreeRestore(item=abstract_state, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))


def _leaf_types(tree) -> dict[str, tuple]:
    def name(path):
        return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)

    return {name(path): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def describe_error(err: BaseException) -> str:
    """``"Type: first line of the message"``: the cause, without the object reprs some libraries embed."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    if "<bound method" in first:  # Orbax embeds TensorStore's spec repr: give the wrapped cause instead
        first = first.split(" See full TensorStore details")[0].split("<bound method")[0].rstrip(" :.")
        cause = err.__cause__ or err.__context__
        if cause is not None and cause is not err:
            first = f"{first}: {describe_error(cause)}"
    return f"{type(err).__name__}: {first[:300]}" if first else type(err).__name__


def _unused_name(directory: Path, name: str) -> Path:
    target, n = directory / name, 1
    while target.exists():
        n += 1
        target = directory / f"{name}-{n}"
    return target


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
