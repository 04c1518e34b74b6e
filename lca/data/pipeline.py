"""Grain training pipeline: byte-tokenized documents packed into rows of `seq_len`, sharded per process, checkpointable.

    it = make_train_iterator(DataConfig(), seq_len=2048, global_batch=8, seed=0)
    batch = next(it)   # dict of numpy arrays, this process's global_batch // process_count rows

Each batch (B = global_batch // process_count):
    inputs       int32   [B, seq_len]  token ids (tokenizer: bytes 0..255, PAD_ID, EOS_ID)
    targets      int32   [B, seq_len]  the next token: targets[:, i] is the token after inputs[:, i]
    segment_ids  int32   [B, seq_len]  1, 2, ... per packed document piece in the row, 0 = padding
    positions    int32   [B, seq_len]  position of the token within its document piece in this row
    loss_mask    float32 [B, seq_len]  1 where the target continues the same document; 0 on padding and where the
                                       target is the first token of the next document

Packing (`DataConfig.packing`):
- "concat" (default): documents (each followed by EOS_ID) are concatenated into an endless stream and cut into rows
  of seq_len + 1 tokens that overlap by one token, so every token is the target exactly once. A document cut by a
  row boundary continues in the next row of the same stream, with positions restarting at 0 there (the row cannot
  attend to the previous row, and positions stay < seq_len). No padding.
- "pad": whole documents are placed into a row while they fit; the rest of the row is padding (PAD_ID, segment 0).
  Documents longer than seq_len + 1 tokens are truncated. Useful for the synthetic tasks and for evaluation.

Sharding and determinism: the global batch has `global_batch` rows; row r of every batch comes from its own packing
stream, which reads the documents r, r + G, r + 2G, ... (G = global_batch) of the shuffled, endlessly repeated
document sequence (a new shuffle every epoch, `grain.MapDataset.shuffle(seed).repeat()`). Process p produces rows
[p * B, (p + 1) * B), reading only its own documents, so the per-process batches are disjoint and their union (in
process order) is exactly the batch a single process would produce: the data do not depend on the process count.

Checkpointing: the iterator is a `grain.DatasetIterator` with `get_state() -> dict` (JSON-serialisable: per row the
index of the current document and the offset in it) and `set_state(state)`; resuming continues bit-exactly. Save it
with Orbax through grain's handler:

    import grain, orbax.checkpoint as ocp
    mngr = ocp.CheckpointManager(directory)
    mngr.save(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it), ...))
    mngr.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it), ...))  # sets it in place

(`grain.checkpoint.CheckpointHandler` writes one `process_<i>-of-<n>.json` per process; restoring checks that the
row layout matches.) `num_workers > 0` moves the pipeline into grain worker processes (`mp_prefetch`): then each
worker packs its own slice of the documents and batches are interleaved over workers, so the data order depends on
num_workers (still deterministic and checkpointable). `prefetch > 0` packs ahead in a thread (same data).
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from lca.data.landmark import InsertLandmarks, JumpPositions
from lca.data.sources import SPLITS, StdlibSource, TextDirSource
from lca.data.tasks import TASKS, check_length
from lca.data.tokenizer import EOS_ID, PAD_ID

FILE_SOURCES = ("stdlib", "text_dir")
SOURCES = FILE_SOURCES + tuple(TASKS)
PACKINGS = ("concat", "pad")
FEATURES = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


@dataclasses.dataclass
class DataConfig:
    """What to train on and how to pack it.

    source: "stdlib" (the interpreter's Python standard library), "text_dir" (files under `path` matching `glob`),
        or a synthetic task "passkey" | "multi_needle" | "assoc_recall" (one example of exactly seq_len + 1 tokens
        per row, needle depth uniform in [0, 1]; `packing` does not apply).
    eval_fraction: share of files held out for split="eval" (chosen by a hash of the relative path).
    packing: "concat" or "pad" (see the module docstring).
    shuffle: shuffle the documents (a new order every epoch); False keeps the sorted file order.
    num_workers: grain worker processes (0 = in this process).
    prefetch: batches packed ahead in a background thread (0 = none).
    mixture: synthetic tasks mixed into the corpus, task name -> share of the batches, e.g. {passkey: 0.25}: a
        quarter of the batches are passkey rows (one example of seq_len + 1 tokens per row), the rest come from
        `source`. Grain's own mixing (`grain.IterDataset.mix`, a deterministic weighted interleave of whole batches,
        the same on every process); the iterator state holds each part's state and stays checkpointable.
    landmark_every: None, or landmark attention's block size L: a landmark token follows every L - 1 tokens of each
        row (`lca.data.landmark.InsertLandmarks`, no loss at landmark positions); rows are packed with
        seq_len - seq_len / L tokens so that they hold seq_len tokens with their landmarks (seq_len % L == 0).
        Set it to `model.mixers.landmark.block_size` when `model.pattern` uses the landmark mixer (checked at load).
    landmark_pos_jump: 0 (off) or J >= 2, with landmark_every: in training rows (split "train") the positions after
        each landmark move up by a further uniform random 0..J-1 (`lca.data.landmark.JumpPositions`, the reference's
        --pos_jump_on_mem), so that rotary distances between blocks vary; retrieval at inference places the
        blocks it retrieves closer together than they were. Held-out batches keep plain positions.
    task_loss: which targets of a synthetic task's row carry loss: "all" (every token, like text) or "answer"
        (only the answer at the row's end: the copy the task tests, not the filler it is made of). Applies to a
        task `source` and to the tasks of `mixture`; corpus rows keep every token.
    task_len_jitter: task examples are shortened by a uniform random 0..task_len_jitter tokens (the row's end is
        padding), so the answer does not sit at the same row position in every example. With landmarks, use
        landmark_every - 1: the answer then meets every offset within its landmark block; a model trained at one
        offset (the default 0 and fixed-length rows) retrieves only at that offset of the block grid.
    task_start_jitter: task examples start after a uniform random 0..task_start_jitter padding tokens (segment 0,
        no loss) and are shortened by as many, so they still end where task_len_jitter puts them. With
        task_len_jitter alone an example's length fixes its answer's offset in the block grid, and a small model
        can learn an answer per (length, offset) pair that fails at other lengths; with both, every offset comes
        with task_start_jitter + 1 lengths. Use landmark_every - 1 as well.
    """

    source: str = "stdlib"
    path: str | None = None
    glob: str = "**/*.txt"
    eval_fraction: float = 0.05
    packing: str = "concat"
    shuffle: bool = True
    num_workers: int = 0
    prefetch: int = 2
    mixture: dict[str, float] = dataclasses.field(default_factory=dict)
    landmark_every: int | None = None
    landmark_pos_jump: int = 0
    task_loss: str = "all"
    task_len_jitter: int = 0
    task_start_jitter: int = 0


TASK_LOSSES = ("all", "answer")


class AnswerOnlyLoss(grain.transforms.Map):
    """Zero the loss mask of a task batch except each row's answer: its last real targets.

    A task row holds one example ("pad" packing, after ``data.task_start_jitter``'s leading padding if any),
    so it has ``count = loss_mask.sum()`` real targets (an example of ``count + 1`` tokens) and the answer
    ends at the last of them, before any trailing padding. ``answer_lens[count]`` is the answer's length for
    that example length: a task's answer may grow with its length (``copy``), and the jitters vary the
    length per row.
    """

    def __init__(self, task: str, lengths: range):
        self.answer_lens = np.zeros(max(lengths), np.int64)
        for n in lengths:
            self.answer_lens[n - 1] = TASKS[task](n, 0.5, 0).answer_len

    def map(self, batch: dict) -> dict:
        loss_mask = batch["loss_mask"]
        count = loss_mask.sum(axis=-1, keepdims=True).astype(np.int64)
        index = np.arange(loss_mask.shape[-1])
        end = np.max(np.where(loss_mask > 0, index + 1, 0), axis=-1, keepdims=True)
        answer = (index >= end - self.answer_lens[count]) & (index < end)
        return {**batch, "loss_mask": np.where(answer, loss_mask, 0).astype(loss_mask.dtype)}


def validate(cfg: DataConfig, *, seq_len: int, global_batch: int, process_count: int = 1, split: str = "train") -> None:
    """Raise ValueError naming the first bad field and what would work."""
    if cfg.source not in SOURCES:
        raise ValueError(f"data.source={cfg.source!r} is not a known source; use one of {list(SOURCES)}.")
    if cfg.source == "text_dir" and not cfg.path:
        raise ValueError("data.path is required for data.source='text_dir'; set data.path=/folder/of/text/files.")
    if cfg.packing not in PACKINGS:
        raise ValueError(f"data.packing={cfg.packing!r} is not known; use one of {list(PACKINGS)}.")
    if not 0.0 < cfg.eval_fraction < 1.0:
        raise ValueError(f"data.eval_fraction={cfg.eval_fraction!r} must be in (0, 1), e.g. 0.05.")
    if cfg.task_loss not in TASK_LOSSES:
        raise ValueError(f"data.task_loss={cfg.task_loss!r} is not known; use one of {list(TASK_LOSSES)}.")
    for name in ("task_len_jitter", "task_start_jitter"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"data.{name}={value!r} must be an int >= 0 (tokens), e.g. landmark_every - 1.")
    if cfg.num_workers < 0 or cfg.prefetch < 0:
        raise ValueError(f"data.num_workers={cfg.num_workers} and data.prefetch={cfg.prefetch} must be >= 0.")
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not known; use one of {list(SPLITS)}.")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len={seq_len!r} must be an int >= 2 (tokens per row).")
    if not isinstance(global_batch, int) or global_batch < 1:
        raise ValueError(f"global_batch={global_batch!r} must be an int >= 1.")
    L = cfg.landmark_every
    if L is not None and (L < 2 or seq_len % L):
        raise ValueError(f"data.landmark_every={L} must be >= 2 and divide seq_len={seq_len} (each row holds whole "
                         f"landmark blocks); use e.g. seq_len={max(2, L) * max(1, seq_len // max(2, L))}.")
    jump = cfg.landmark_pos_jump
    if isinstance(jump, bool) or not isinstance(jump, int) or jump < 0 or jump == 1:
        raise ValueError(f"data.landmark_pos_jump={jump!r} must be 0 (off) or an int >= 2 (jumps 0..J-1 after each "
                         f"landmark), e.g. landmark_every.")
    if jump and L is None:
        raise ValueError(f"data.landmark_pos_jump={jump} moves positions at landmarks, but data.landmark_every is None "
                         f"(no landmarks); set data.landmark_every or data.landmark_pos_jump=0.")
    row_len = seq_len - seq_len // L if L else seq_len
    _check_task_knobs_have_a_task(cfg)
    if cfg.source in TASKS and (cfg.task_len_jitter or cfg.task_start_jitter):
        _check_task_fits("data.source", cfg.source, cfg, row_len=row_len)
    _validate_mixture(cfg, row_len=row_len)
    if process_count < 1 or global_batch % process_count:
        raise ValueError(f"global_batch={global_batch} is not divisible by process_count={process_count}; "
                         f"use a multiple of {process_count}, e.g. {process_count * max(1, global_batch // process_count)}.")


TASK_KNOBS = {"task_loss": "all", "task_len_jitter": 0, "task_start_jitter": 0}  # each knob's no-op value


def without_tasks(cfg: DataConfig) -> DataConfig:
    """``cfg`` reading its corpus only: no mixture, and the task knobs back at their no-op values."""
    return dataclasses.replace(cfg, mixture={}, **TASK_KNOBS)


def _check_task_knobs_have_a_task(cfg: DataConfig) -> None:
    """The task knobs shape synthetic task rows only: set without any, they would be ignored silently."""
    if cfg.source in TASKS or cfg.mixture:
        return
    set_knobs = [f"data.{name}={getattr(cfg, name)!r}" for name, off in TASK_KNOBS.items() if getattr(cfg, name) != off]
    if set_knobs:
        raise ValueError(f"{', '.join(set_knobs)} shape synthetic task rows, but data.source={cfg.source!r} has none "
                         f"and data.mixture is empty; add a task (e.g. data.mixture={{passkey: 0.25}}) or leave "
                         f"{'them' if len(set_knobs) > 1 else 'it'} at the default.")


def _validate_mixture(cfg: DataConfig, *, row_len: int) -> None:
    for task, share in cfg.mixture.items():
        if task not in TASKS:
            raise ValueError(f"data.mixture names {task!r}, not a synthetic task; use one of {sorted(TASKS)}.")
        if not 0.0 < share < 1.0:
            raise ValueError(f"data.mixture.{task}={share!r} must be a share of the batches in (0, 1), e.g. 0.25.")
        _check_task_fits(f"data.mixture.{task}", task, cfg, row_len=row_len)
    if cfg.mixture and sum(cfg.mixture.values()) >= 1.0:
        raise ValueError(f"data.mixture shares {dict(cfg.mixture)} must sum to < 1: the rest is data.source.")
    if cfg.mixture and cfg.source not in FILE_SOURCES:
        raise ValueError(f"data.mixture mixes tasks into a corpus; data.source must be one of {list(FILE_SOURCES)}, "
                         f"got {cfg.source!r}.")


def _check_task_fits(name: str, task: str, cfg: DataConfig, *, row_len: int) -> None:
    """One example per row, of row_len + 1 - both jitters .. row_len + 1 tokens: refuse rows too short now."""
    jitter, start = cfg.task_len_jitter, cfg.task_start_jitter
    if jitter and 2 * (row_len + 1 - jitter) <= row_len + 1:
        raise ValueError(f"data.task_len_jitter={jitter} must be < {(row_len + 1) // 2} for rows of {row_len} "
                         f"tokens: two shortened examples would share a row.")
    try:
        check_length(task, row_len + 1 - jitter - start)
    except ValueError as err:
        knobs = " + ".join(f"data.{name}={value}" for name, value in
                           (("task_len_jitter", jitter), ("task_start_jitter", start)) if value)
        shortened = f" shortened by up to {knobs}" if knobs else ""
        raise ValueError(f"{name} does not fit rows of {row_len} tokens (seq_len without landmarks){shortened}: "
                         f"{err}") from None


# ---------------------------------------------------------------------------------------------------- documents


@dataclasses.dataclass(frozen=True)
class _FileDocument:
    """index -> byte tokens of the file + EOS (a picklable callable, so grain worker processes can run it)."""

    source: object

    def __call__(self, index: int) -> np.ndarray:
        return np.append(self.source.token_ids(int(index)), np.int32(EOS_ID))


@dataclasses.dataclass(frozen=True)
class _TaskDocument:
    """index -> one task example of `length` tokens (minus uniform 0..jitter), needle depth uniform in [0, 1],
    seeded by (seed, index); with `start_jitter`, after uniform 0..start_jitter PAD_ID tokens that count in
    `length` (`row_features` makes them padding)."""

    task: str
    length: int
    seed: int
    jitter: int = 0
    start_jitter: int = 0

    def __call__(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, int(index)])
        # no draw without a jitter: the examples of jitter 0 stay those of before the options existed
        length = self.length - int(rng.integers(0, self.jitter + 1)) if self.jitter else self.length
        lead = int(rng.integers(0, self.start_jitter + 1)) if self.start_jitter else 0
        example = TASKS[self.task](length - lead, float(rng.uniform()), rng).tokens
        return np.concatenate([np.full(lead, PAD_ID, np.int32), example]) if lead else example


def _file_source(cfg: DataConfig, split: str):
    if cfg.source == "stdlib":
        return StdlibSource(split=split, eval_fraction=cfg.eval_fraction)
    return TextDirSource(cfg.path, cfg.glob, split=split, eval_fraction=cfg.eval_fraction)


def check_sources(cfg: DataConfig, *, splits: tuple[str, ...] = ("train",)) -> None:
    """Raise ValueError now if a file source is missing or has no documents in one of ``splits``.

    Lets a launcher refuse an empty folder (or an empty held-out split) before it trains.
    """
    if cfg.source == "text_dir" and not cfg.path:
        raise ValueError("data.path is required for data.source='text_dir'; set data.path=/folder/of/text/files.")
    if cfg.source in FILE_SOURCES:
        for split in splits:
            _file_source(cfg, split)


def documents(cfg: DataConfig, *, split: str, seed: int, length: int) -> grain.MapDataset:
    """Endless deterministic sequence of token arrays int32 [n]: shuffled files (reshuffled per epoch) or task examples.

    `length` is the task example length (seq_len + 1); file documents have their own lengths.
    """
    if cfg.source in TASKS:
        # A different stream of examples per split so eval examples are not the training ones.
        split_seed = SPLITS.index(split)
        return grain.MapDataset.range(2**62).map(
            _TaskDocument(cfg.source, length, seed * len(SPLITS) + split_seed, cfg.task_len_jitter,
                          cfg.task_start_jitter))
    source = _file_source(cfg, split)
    docs = grain.MapDataset.range(len(source)).map(_FileDocument(source))
    if cfg.shuffle:
        docs = docs.shuffle(seed=seed)
    return docs.repeat()


# ---------------------------------------------------------------------------------------------------- packing


def row_features(pieces, seq_len: int) -> dict:
    """Features of one row from its document pieces (int32 arrays, total length <= seq_len + 1), padded with PAD_ID.

    A piece may begin with PAD_ID tokens (``data.task_start_jitter``): they are padding like the row's end
    (segment 0, position 0, no loss), and the piece's positions count from its first real token.

    Returns inputs/targets/segment_ids/positions int32 [seq_len] and loss_mask float32 [seq_len].
    """
    lengths = np.array([len(p) for p in pieces], dtype=np.int64)
    used = int(lengths.sum())
    if used > seq_len + 1:
        raise ValueError(f"row_features: pieces hold {used} tokens, more than seq_len + 1 = {seq_len + 1}.")
    tokens = np.full(seq_len + 1, PAD_ID, dtype=np.int32)
    segments = np.zeros(seq_len + 1, dtype=np.int32)
    positions = np.zeros(seq_len + 1, dtype=np.int32)
    if used:
        tokens[:used] = np.concatenate(pieces)
        segments[:used] = np.repeat(np.arange(1, len(pieces) + 1, dtype=np.int32), lengths)
        # only a task piece can start with padding: other pieces skip the scan (this runs for every row)
        leads = np.array([np.cumprod(p == PAD_ID).sum() if len(p) and p[0] == PAD_ID else 0 for p in pieces],
                         dtype=np.int64)
        starts = np.cumsum(lengths) - lengths + leads
        positions[:used] = np.arange(used) - np.repeat(starts, lengths)
        if leads.any():
            lead = positions < 0
            segments[lead], positions[lead] = 0, 0
    same_doc = (segments[:-1] == segments[1:]) & (segments[:-1] != 0)
    return {
        "inputs": tokens[:-1],
        "targets": tokens[1:],
        "segment_ids": segments[:-1],
        "positions": positions[:-1],
        "loss_mask": same_doc.astype(np.float32),
    }


class _Stream:
    """One row's packing stream over documents first, first + step, first + 2 step, ... of `docs`.

    State: `doc` (how many of its documents are fully consumed) and `offset` (tokens consumed of the next one).
    """

    def __init__(self, docs: grain.MapDataset, first: int, step: int):
        self._docs, self._first, self._step = docs, first, step
        self.doc, self.offset = 0, 0
        self._cached = (-1, None)

    def _tokens(self, n: int) -> np.ndarray:
        if self._cached[0] != n:  # a long document spans many rows: read it once
            self._cached = (n, self._docs[self._first + n * self._step])
        return self._cached[1]

    def concat_row(self, seq_len: int) -> list:
        """Pieces of the next seq_len + 1 tokens; the state advances by seq_len (rows overlap by one token)."""
        pieces, need = [], seq_len
        while need:
            doc = self._tokens(self.doc)
            piece = doc[self.offset:self.offset + need]
            pieces.append(piece)
            need -= len(piece)
            self.offset += len(piece)
            if self.offset == len(doc):
                self.doc, self.offset = self.doc + 1, 0
        last = self._tokens(self.doc)[self.offset:self.offset + 1]  # peek: the target of the last input
        if self.offset == 0:  # it starts the next document
            pieces.append(last)
        else:
            pieces[-1] = np.concatenate([pieces[-1], last])
        return pieces

    def pad_row(self, seq_len: int) -> list:
        """Whole documents (truncated to seq_len + 1) while they fit; at least one."""
        pieces, used = [], 0
        while True:
            doc = self._tokens(self.doc)[:seq_len + 1]
            if pieces and used + len(doc) > seq_len + 1:
                return pieces
            pieces.append(doc)
            used += len(doc)
            self.doc += 1


class PackedBatchDataset(grain.IterDataset):
    """Batches of packed rows `rows` (global row ids) of a global batch of `num_streams` rows; see module docstring."""

    def __init__(self, docs: grain.MapDataset, *, seq_len: int, rows: range, num_streams: int, packing: str):
        super().__init__(docs)
        self.docs, self.seq_len, self.rows, self.num_streams, self.packing = docs, seq_len, rows, num_streams, packing
        self.worker, self.num_workers = 0, 1

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """Called by grain's `mp_prefetch` on each worker's copy: worker w of W packs documents w, w + W, ... of
        every row's stream, so the workers together use each document once (instead of grain slicing the file list)."""
        del sequential_slice  # the document sequence is endless: only the interleaved split makes sense
        self.worker, self.num_workers = sl.start or 0, sl.step or 1

    def __iter__(self) -> "PackedBatchIterator":
        return PackedBatchIterator(self)

    def __str__(self) -> str:
        return (f"PackedBatchDataset(seq_len={self.seq_len}, rows={self.rows.start}..{self.rows.stop - 1} "
                f"of {self.num_streams}, packing={self.packing!r})")


class PackedBatchIterator(grain.DatasetIterator):
    def __init__(self, ds: PackedBatchDataset):
        super().__init__()
        self._ds = ds
        step = ds.num_streams * ds.num_workers
        self._streams = [_Stream(ds.docs, r + ds.num_streams * ds.worker, step) for r in ds.rows]

    def __next__(self) -> dict:
        ds = self._ds
        if ds.packing == "concat":
            rows = [row_features(s.concat_row(ds.seq_len), ds.seq_len) for s in self._streams]
        else:
            rows = [row_features(s.pad_row(ds.seq_len), ds.seq_len) for s in self._streams]
        return {k: np.stack([row[k] for row in rows]) for k in FEATURES}

    def get_state(self) -> dict:
        return {
            "rows": [self._ds.rows.start, self._ds.rows.stop, self._ds.num_streams],
            "doc": [int(s.doc) for s in self._streams],
            "offset": [int(s.offset) for s in self._streams],
        }

    def set_state(self, state: dict) -> None:
        """Continue from `state`: this iterator's own, or any covering its rows (see `merge_states`)."""
        start, stop, streams = (int(x) for x in state["rows"])
        mine = self._ds.rows
        if streams != self._ds.num_streams or not start <= mine.start <= mine.stop <= stop:
            raise ValueError(
                f"data iterator state is for rows [start, stop, global_batch]={[start, stop, streams]}, "
                f"this iterator has {[mine.start, mine.stop, self._ds.num_streams]}; restore with the same "
                "global_batch, from the states of all processes merged (merge_states) if the process count changed."
            )
        first = mine.start - start
        for s, doc, offset in zip(self._streams, state["doc"][first:], state["offset"][first:]):
            s.doc, s.offset = int(doc), int(offset)


def merge_states(states: list[dict]) -> dict:
    """One iterator state for the rows of all `states` (each a `PackedBatchIterator.get_state()`, or of a mixture).

    The data do not depend on the process count, so a run saved by P processes can
    resume on any other count: merge the P saved states, and every new process's
    iterator takes its own rows from the result (`set_state`). Raises ValueError if
    the states are not consecutive rows of one global batch.
    """
    if not states:
        raise ValueError("merge_states needs at least one state.")
    if "parents" in states[0]:  # a data.mixture: grain's mixed iterator, the same index on every process
        if len({(s["index"], s["stop"]) for s in states}) != 1:
            raise ValueError(f"mixed data iterator states are at different batches: {[s['index'] for s in states]}.")
        parts = states[0]["parents"]
        return {**states[0], "parents": {key: merge_states([s["parents"][key] for s in states]) for key in parts}}
    ordered = sorted(states, key=lambda state: state["rows"][0])
    start, _, streams = ordered[0]["rows"]
    merged = {"rows": [start, start, streams], "doc": [], "offset": []}
    for state in ordered:
        begin, stop, count = state["rows"]
        if count != streams or begin != merged["rows"][1] or len(state["doc"]) != stop - begin:
            rows = [s["rows"] for s in ordered]
            raise ValueError(f"data iterator states do not tile one global batch: rows {rows}.")
        merged["rows"][1] = stop
        merged["doc"] += list(state["doc"])
        merged["offset"] += list(state["offset"])
    return merged


# ---------------------------------------------------------------------------------------------------- entry points


def _process_index_and_count(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only when the caller did not say: keeps the data pipeline usable without initialising JAX

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
    return process_index, process_count


def _absl_flags_parsed() -> None:
    """grain 0.2.18's worker processes read an absl flag, which fails in programs that never parse absl flags."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_dataset(cfg: DataConfig, *, seq_len: int, global_batch: int, seed: int, split: str = "train",
                 process_index: int | None = None, process_count: int | None = None) -> grain.IterDataset:
    """The grain IterDataset behind `make_train_iterator` (for composing further grain transformations)."""
    process_index, process_count = _process_index_and_count(process_index, process_count)
    validate(cfg, seq_len=seq_len, global_batch=global_batch, process_count=process_count, split=split)
    per_process = global_batch // process_count
    L = cfg.landmark_every
    row_len = seq_len - seq_len // L if L else seq_len  # tokens per row before the landmarks go in
    rows = range(process_index * per_process, (process_index + 1) * per_process)

    def packed(source: str) -> PackedBatchDataset:
        part = dataclasses.replace(cfg, source=source)
        docs = documents(part, split=split, seed=seed, length=row_len + 1)
        # A task example is exactly row_len + 1 tokens: "pad" packing puts one per row (concat would shift them).
        packing = "pad" if source in TASKS else cfg.packing
        ds = PackedBatchDataset(docs, seq_len=row_len, rows=rows, num_streams=global_batch, packing=packing)
        if source in TASKS and cfg.task_loss == "answer":
            shortest = row_len + 1 - cfg.task_len_jitter - cfg.task_start_jitter
            ds = ds.map(AnswerOnlyLoss(source, range(shortest, row_len + 2)))
        return ds

    ds = packed(cfg.source)
    if cfg.mixture:
        parts = {"corpus": ds, **{task: packed(task) for task in cfg.mixture}}
        shares = {"corpus": 1.0 - sum(cfg.mixture.values()), **cfg.mixture}
        ds = grain.IterDataset.mix(parts, shares)
    if L:
        ds = ds.map(InsertLandmarks(L))
        if cfg.landmark_pos_jump and split == "train":
            ds = ds.random_map(JumpPositions(L, cfg.landmark_pos_jump, rows, global_batch), seed=seed)
    if cfg.num_workers > 0:
        _absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    elif cfg.prefetch > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=cfg.prefetch)
    return ds


def make_train_iterator(cfg: DataConfig, *, seq_len: int, global_batch: int, seed: int, split: str = "train",
                        process_index: int | None = None, process_count: int | None = None) -> grain.DatasetIterator:
    """Endless checkpointable iterator of this process's share of each global batch (see the module docstring).

    process_index/process_count default to jax.process_index()/jax.process_count().
    """
    return iter(make_dataset(cfg, seq_len=seq_len, global_batch=global_batch, seed=seed, split=split,
                             process_index=process_index, process_count=process_count))


def eval_batches(cfg: DataConfig, *, seq_len: int, batch: int, num_batches: int, seed: int = 0,
                 split: str = "eval", process_index: int | None = None,
                 process_count: int | None = None) -> list[dict]:
    """`num_batches` batches of held-out text (split="eval"): this process's rows of each `batch`-row batch.

    Rows are split over processes as in training (process p gets rows [p * B, (p + 1) * B), B = batch //
    process_count), so the processes' rows together are exactly one process's batch. process_index and
    process_count default to jax.process_index() and jax.process_count(); pass 0 and 1 for the whole batch.
    """
    if num_batches < 1:
        raise ValueError(f"num_batches={num_batches!r} must be >= 1.")
    cfg = dataclasses.replace(cfg, num_workers=0, prefetch=0)
    it = make_train_iterator(cfg, seq_len=seq_len, global_batch=batch, seed=seed, split=split,
                             process_index=process_index, process_count=process_count)
    return [next(it) for _ in range(num_batches)]


__all__ = ["DataConfig", "make_train_iterator", "make_dataset", "eval_batches", "merge_states", "validate",
           "check_sources",
           "row_features", "documents", "PackedBatchDataset", "SOURCES", "PACKINGS", "FEATURES"]
