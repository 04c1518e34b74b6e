"""Landmark tokens in packed rows: insert one after every L - 1 tokens, and strip them again.

    ds = make_dataset(cfg, seq_len=63 * 8, ...).map(InsertLandmarks(block_size=64))   # rows of 64 * 8

A row of ``n`` tokens becomes ``n + n // (L - 1)``: after every ``L - 1`` tokens of the row comes one landmark
slot, so the landmarks sit at row indices ``j`` with ``j % L == L - 1``. That is where
:mod:`lca.attention.landmark` looks for them (the attention's default positions are the row indices), and it
keeps the landmark block aligned with the attention block. Landmarks are counted along the packed row, not
per document: a document that starts inside a block shares that block's landmark with the one before it;
attention's segment mask keeps the two apart.

A landmark slot gets:
    inputs       LANDMARK_ID (PAD_ID inside padding)
    targets      PAD_ID, loss_mask 0: landmark positions carry no loss. Ordinary tokens keep their target,
                 the next real token, so the token before a landmark still learns to predict the next text.
    segment_ids  the segment of the token before it (the block it closes)
    positions    one more than the token before it; positions of the later tokens of that document piece move
                 up by one per landmark (rotary positions count landmarks, as in the reference).

Both transforms accept rows ``[n]`` or batches ``[..., n]`` of the pipeline's features (any subset of
inputs/targets/segment_ids/positions/loss_mask; other keys are refused) and are exact inverses on them.

Position jumps (training only, ``data.landmark_pos_jump = J``; the reference's ``--pos_jump_on_mem`` in
lm_benchmark): after each landmark the positions of the rest of its document piece move up by a random
``0 .. J - 1`` more, so the rotary distance between two blocks is no longer their distance in the row.
Retrieval at inference re-positions the retrieved blocks (:mod:`lca.attention.landmark`), closer together
than they were in the text; the jumps are meant to keep a model from relying on block distances (on the
passkey model they made retrieval worse: ``benchmarks/results/landmark_passkey_pos_jump.json``).
``JumpPositions`` draws the jumps of all ``global_batch`` rows from one generator per batch and keeps this
process's rows, so the data stay independent of the process count.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from lca.attention.mask import segment_begins
from lca.data.tokenizer import LANDMARK_ID, PAD_ID

FILL = {"inputs": LANDMARK_ID, "targets": PAD_ID, "loss_mask": 0}


def _check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 2:
        raise ValueError(f"block_size must be an int >= 2 (L - 1 tokens, then a landmark), got {block_size!r}.")
    return int(block_size)


def with_landmarks_length(n: int, block_size: int) -> int:
    """Row length after :func:`insert_landmarks`: ``n + n // (L - 1)``."""
    return n + n // (_check_block_size(block_size) - 1)


def _check_features(features: dict) -> int:
    unknown = set(features) - {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
    if unknown:
        raise ValueError(f"landmark transforms know inputs/targets/segment_ids/positions/loss_mask, got {sorted(unknown)}.")
    lengths = {k: np.shape(x)[-1] if np.ndim(x) else None for k, x in features.items()}
    if len(set(lengths.values())) != 1 or None in lengths.values():
        raise ValueError(f"features must share one last (token) axis, got lengths {lengths}.")
    if "positions" in features and "segment_ids" not in features:
        raise ValueError("positions need segment_ids to know where each document piece starts.")
    return next(iter(lengths.values()))


def _run_positions(segments, positions_at_start):
    """Positions counting up within each run of equal segment ids from the given start; 0 on padding (segment 0).

    ``positions_at_start [..., n]`` is read at each run's first index.
    """
    index, run_start = _run_starts(segments)
    first = np.take_along_axis(positions_at_start, run_start, axis=-1)
    return np.where(segments == 0, 0, first + index - run_start).astype(np.int32)


def _run_starts(segments):
    """``(index, run_start)`` ``[..., n]``: each token's row index, and the index where its run of equal ids begins."""
    index = np.broadcast_to(np.arange(segments.shape[-1]), segments.shape)
    starts = segment_begins(np.asarray(segments))
    return index, np.maximum.accumulate(np.where(starts, index, 0), axis=-1)


def insert_landmarks(features: dict, block_size: int) -> dict:
    """Insert a landmark slot after every ``block_size - 1`` tokens of each row (see the module docstring)."""
    L = _check_block_size(block_size)
    n = _check_features(features)
    m = with_landmarks_length(n, L)
    new_index = np.arange(n) + np.arange(n) // (L - 1)
    is_landmark = np.arange(m) % L == L - 1
    before = np.arange(m) - 1  # the slot before each landmark holds an ordinary token
    out = {}
    for key, x in features.items():
        x = np.asarray(x)
        y = np.zeros(x.shape[:-1] + (m,), x.dtype)
        y[..., new_index] = x
        if key == "segment_ids":
            y[..., is_landmark] = y[..., before[is_landmark]]
        elif key in FILL:
            y[..., is_landmark] = FILL[key]
        out[key] = y
    if "inputs" in out and "segment_ids" in out:
        out["inputs"] = np.where(is_landmark & (out["segment_ids"] == 0), PAD_ID, out["inputs"]).astype(
            out["inputs"].dtype)
    if "positions" in out:
        out["positions"] = _run_positions(out["segment_ids"], out["positions"])
    return out


def strip_landmarks(features: dict, block_size: int) -> dict:
    """Drop the landmark slots (row indices ``j % L == L - 1``): the inverse of :func:`insert_landmarks`."""
    L = _check_block_size(block_size)
    m = _check_features(features)
    keep = np.arange(m) % L != L - 1
    out = {key: np.asarray(x)[..., keep] for key, x in features.items()}
    if "positions" in out:
        out["positions"] = _run_positions(out["segment_ids"], out["positions"])
    return out


def jump_positions(features: dict, block_size: int, jumps) -> dict:
    """Add ``jumps [..., n // L]`` (ints >= 0, one per landmark slot) to the positions after each landmark.

    The positions of a document piece then grow by the jumps of the landmarks inside it (from its first
    token on), so every piece still starts at its own first position; landmarks and padding are unchanged
    otherwise. Needs ``positions`` and ``segment_ids`` of rows of whole landmark blocks.
    """
    L = _check_block_size(block_size)
    n = _check_features(features)
    if "positions" not in features:
        raise ValueError("jump_positions needs the positions (and segment_ids) features.")
    positions, segments = np.asarray(features["positions"]), np.asarray(features["segment_ids"])
    jumps = np.asarray(jumps)
    if n % L or jumps.shape != positions.shape[:-1] + (n // L,) or (jumps < 0).any():
        raise ValueError(f"jumps must be ints >= 0 of shape {positions.shape[:-1] + (n // L,)} (one per landmark "
                         f"of rows of {n} = whole blocks of {L}), got shape {jumps.shape}.")
    # Token i moves up by the jumps of the landmarks before it (the reference's cumsum(is_mem * jump)[:-1]).
    per_slot = np.zeros(positions.shape, np.int64)
    per_slot[..., L - 1::L] = jumps
    before = np.cumsum(per_slot, axis=-1) - per_slot
    # ... counted from its document piece's first token, so each piece keeps its start position.
    _, run_start = _run_starts(segments)
    moved = before - np.take_along_axis(before, run_start, axis=-1)
    out = dict(features)
    out["positions"] = np.where(segments == 0, positions, positions + moved).astype(positions.dtype)
    return out


@dataclasses.dataclass(frozen=True)
class _LandmarkMap(grain.transforms.Map):
    block_size: int

    def __post_init__(self):
        _check_block_size(self.block_size)


class InsertLandmarks(_LandmarkMap):
    """Grain map: :func:`insert_landmarks` on each element (a row or a batch of features)."""

    def map(self, element: dict) -> dict:
        return insert_landmarks(element, self.block_size)


class StripLandmarks(_LandmarkMap):
    """Grain map: :func:`strip_landmarks` on each element."""

    def map(self, element: dict) -> dict:
        return strip_landmarks(element, self.block_size)


@dataclasses.dataclass(frozen=True)
class JumpPositions(grain.transforms.RandomMap):
    """Grain random map on batches of ``global_batch`` rows' slice ``rows``: :func:`jump_positions` with jumps
    uniform in ``0 .. max_jump - 1``, drawn for all ``global_batch`` rows and sliced to ``rows``."""

    block_size: int
    max_jump: int
    rows: range
    global_batch: int

    def __post_init__(self):
        _check_block_size(self.block_size)
        if isinstance(self.max_jump, bool) or not isinstance(self.max_jump, (int, np.integer)) or self.max_jump < 1:
            raise ValueError(f"max_jump must be an int >= 1 (jumps 0 .. max_jump - 1), got {self.max_jump!r}.")

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        n = np.shape(element["positions"])[-1]
        jumps = rng.integers(0, self.max_jump, size=(self.global_batch, n // self.block_size))
        return jump_positions(element, self.block_size, jumps[self.rows.start:self.rows.stop])


__all__ = ["InsertLandmarks", "JumpPositions", "StripLandmarks", "insert_landmarks", "jump_positions", "strip_landmarks",
           "with_landmarks_length"]
