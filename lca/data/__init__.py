"""Data: byte tokenizer, document sources, synthetic long-context tasks and the Grain packing pipeline."""

from lca.data.landmark import (InsertLandmarks, JumpPositions, StripLandmarks, insert_landmarks, jump_positions,
                               strip_landmarks, with_landmarks_length)
from lca.data.pipeline import (DataConfig, eval_batches, make_dataset, make_train_iterator, merge_states, row_features,
                               validate)
from lca.data.sources import FileSource, StdlibSource, TextDirSource
from lca.data.tasks import TASKS, TaskExample, assoc_recall, get_task, multi_needle, passkey
from lca.data.tokenizer import EOS_ID, LANDMARK_ID, NUM_IDS, PAD_ID, VOCAB_SIZE, check_token_id, decode, encode

__all__ = [
    "DataConfig", "make_train_iterator", "make_dataset", "eval_batches", "merge_states", "row_features", "validate",
    "FileSource", "StdlibSource", "TextDirSource",
    "TASKS", "TaskExample", "get_task", "passkey", "multi_needle", "assoc_recall",
    "VOCAB_SIZE", "PAD_ID", "EOS_ID", "LANDMARK_ID", "NUM_IDS", "check_token_id", "encode", "decode",
    "InsertLandmarks", "StripLandmarks", "JumpPositions", "insert_landmarks", "strip_landmarks", "jump_positions",
    "with_landmarks_length",
]
