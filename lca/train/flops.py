"""Analytic FLOPs of one training step: the numerator of tokens/s's honest cousin, MFU.

XLA's ``cost_analysis`` cannot be the source: it does not count Pallas or cuBLAS
custom calls, nor the bodies of scans, so on a GPU it reported ~0% MFU. The count
here is the usual model-FLOPs convention (PaLM, appendix B), independent of how the
step is computed (remat recomputation and a flash backward's extra matmul are not
"model" FLOPs):

* matmuls: ``6 x matmul parameters x tokens`` (forward 2, backward 4 per
  multiply-add), where the matmul parameters are every parameter with two or more
  axes (dense kernels, Titans' projections, depthwise convolution taps and memory
  MLP weights), except an untied embedding table (a lookup, not a matmul; tied, it is
  also the output projection and counts) and persistent memory tokens (extra inputs,
  not weights a token is multiplied by). Norm scales, biases and gains have one axis.
  A Titans memory's MLP weights count as one dense layer's, a lower bound: its
  test-time update also takes their gradient at every chunk;
* attention, per layer whose mixer section says what it attends (``attends(model)``,
  :class:`lca.models.attends.Attends`): ``QK^T`` and ``PV`` take ``2 x 2 x heads x head_dim``
  FLOPs per attended (query, key) pair forward, three times that for training.
  Causal attention over ``T`` tokens attends ``T^2 / 2`` pairs; a sliding window
  of ``W`` attends ``T W - W^2 / 2`` with ``W = min(W, T)`` (which is ``T^2/2`` at
  ``W = T``); a prefix of ``P`` keys every query sees (Titans' persistent tokens)
  adds ``T P``; Titans MAC's segments of ``S`` tokens attend ``S^2 / 2`` pairs
  twice each (the memory's retrieval and the segment itself). In packed rows a
  token attends its own document only (and lca's kernels compute nothing across
  documents), so a batch with ``segment_ids`` counts each document piece (a run
  of one nonzero id) as a sequence of its own length (:meth:`StepFlops.of`);
  padding (id 0) counts nothing. MAC cuts rows, not documents, so it counts whole
  rows. Without segment ids, every row is one sequence of ``T`` tokens
  (:meth:`StepFlops.dense`).

Global, local and landmark layers (the grouped softmax takes causal attention's
products) and Titans MAG/MAL/MAC count their attention this way; ``titans_lmm``
has none. Not counted: a landmark layer's ``train_retrieval`` rows, attended a
second time as decoding does.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from lca.attention.mask import segment_begins
from lca.config import Config, ModelConfig
from lca.models.attends import Attends
from lca.models.mixers import layer_mixers


def matmul_params(params, *, tied: bool) -> int:
    """Weights that take part in matrix products: every leaf of two or more axes but an untied embedding
    table and persistent memory tokens (see the module docstring)."""
    not_weights = {"persistent"} | (set() if tied else {"embedding"})
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = getattr(path[-1], "key", getattr(path[-1], "name", None))
        if len(leaf.shape) >= 2 and name not in not_weights:
            total += int(leaf.size)
    return total


def attended_pairs(seq_len, window: int | None):
    """Causal (query, key) pairs of one sequence of ``seq_len`` tokens (or of each, an array), optionally windowed."""
    w = seq_len if window is None else np.minimum(window, seq_len)
    return seq_len * w - w * w / 2


def document_lengths(segment_ids) -> np.ndarray:
    """The lengths of the document pieces of packed rows ``segment_ids [rows, T]`` (host ints).

    A document piece is a run of one nonzero id; padding (id 0) is none.
    """
    ids = np.asarray(segment_ids)
    run_id = np.cumsum(segment_begins(ids).ravel()) - 1  # rows never share a run: a row starts a run
    lengths = np.bincount(run_id, weights=(ids.ravel() != 0))  # padding runs count 0 tokens
    return lengths[lengths > 0]


def layer_pairs(attends: Attends, lengths, rows: int, row_length: int) -> float:
    """Attended (query, key) pairs of one layer over document pieces of ``lengths`` (host ints) that fill
    ``rows`` rows of ``row_length`` tokens (a MAC layer counts the rows: its dense segment attention computes
    every pair of a segment, across the packed documents it masks apart)."""
    if attends.segment is not None:
        whole, rest = divmod(row_length, attends.segment)
        per_row = whole * attends.segment ** 2 + rest ** 2 + attends.prefix * row_length
        return float(rows * per_row)
    lengths = np.asarray(lengths)
    return float(np.sum(attended_pairs(lengths, attends.window)) + attends.prefix * np.sum(lengths))


def attention_flops(model: ModelConfig, lengths, rows: int, row_length: int) -> float:
    """Training FLOPs (forward + backward) of the attention products of every layer (see :func:`layer_pairs`)."""
    total = 0.0
    for kind in layer_mixers(model):
        section = model.mixers[kind]
        if hasattr(section, "attends"):
            attends = section.attends(model)
            total += 3 * 2 * 2 * attends.width * layer_pairs(attends, lengths, rows, row_length)
    return total


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """Model FLOPs of one optimizer step (all devices together): fixed matmuls, attention per batch."""

    matmuls: float
    model: ModelConfig
    seq_len: int
    global_batch: int

    @property
    def dense(self) -> float:
        """Every row one sequence of ``seq_len`` tokens."""
        lengths = np.full(self.global_batch, self.seq_len)
        return self.matmuls + attention_flops(self.model, lengths, self.global_batch, self.seq_len)

    def of(self, segment_ids=None) -> float:
        """This step's count from its rows' ``segment_ids [rows, seq_len]``; :attr:`dense` without them.

        ``rows`` may be one process's share of the global batch: its count is scaled to
        ``global_batch`` rows (exact with one process, an estimate with several).
        """
        if segment_ids is None:
            return self.dense
        lengths = document_lengths(segment_ids)  # once per batch, whatever the number of layers
        rows = np.shape(segment_ids)[0]
        scale = self.global_batch / rows
        return self.matmuls + attention_flops(self.model, lengths, rows, self.seq_len) * scale


def step_flops(cfg: Config, params) -> StepFlops:
    """The :class:`StepFlops` of ``cfg``; ``params`` may be abstract."""
    sequences, seq_len = cfg.train.global_batch, cfg.train.seq_len
    matmuls = 6 * matmul_params(params, tied=cfg.model.tie_embeddings) * sequences * seq_len
    return StepFlops(float(matmuls), cfg.model, seq_len, sequences)


def train_step_flops(cfg: Config, params) -> float:
    """Model FLOPs of one optimizer step of ``cfg`` with every row one sequence (:attr:`StepFlops.dense`)."""
    return step_flops(cfg, params).dense
