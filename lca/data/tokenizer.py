"""Byte-level tokenizer: every UTF-8 byte is a token, plus two specials. No vocabulary files, no downloads.

Token ids:
    0..255      the byte values of the UTF-8 encoding
    PAD_ID=256  padding (never produced by `encode`; segment id 0 marks it in packed batches)
    EOS_ID=257  end of document; the pipeline appends it to every document it packs
VOCAB_SIZE = 258: the ids text and packing produce. Models usually round the embedding table up (e.g. to a multiple
of 128).

Reserved special tokens, from VOCAB_SIZE up (inserted by model-specific transforms, never by `encode`; `decode`
skips them):
    LANDMARK_ID=258  landmark attention's block marker (lca.data.landmark)
NUM_IDS = 259: an embedding table needs at least this many rows to hold every id; `check_token_id` says so.
"""

from __future__ import annotations

import numpy as np

NUM_BYTES = 256
PAD_ID = 256
EOS_ID = 257
VOCAB_SIZE = 258
LANDMARK_ID = 258
SPECIAL_IDS = {"landmark": LANDMARK_ID}
NUM_IDS = VOCAB_SIZE + len(SPECIAL_IDS)


def check_token_id(token_id: int, vocab_size: int, *, name: str = "landmark_id") -> None:
    """Raise ValueError unless `token_id` is a reserved special id below `vocab_size` (no byte, PAD or EOS)."""
    if not VOCAB_SIZE <= token_id < NUM_IDS:
        raise ValueError(f"{name}={token_id} collides with the byte vocabulary (ids 0..{VOCAB_SIZE - 1}); use a "
                         f"reserved special id: {SPECIAL_IDS}.")
    if token_id >= vocab_size:
        raise ValueError(f"{name}={token_id} does not fit an embedding table of vocab_size={vocab_size}; use "
                         f"vocab_size >= {token_id + 1} (e.g. {NUM_IDS} rounded up to a multiple of 128).")


def encode(text: str, *, add_eos: bool = False) -> np.ndarray:
    """UTF-8 bytes of `text` as int32 ids [len(utf8 bytes) (+1 with add_eos)]."""
    ids = np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int32)
    if add_eos:
        ids = np.append(ids, np.int32(EOS_ID))
    return ids


def decode(ids) -> str:
    """Text of the byte ids in `ids` (any int array-like); special ids are skipped, bad UTF-8 becomes U+FFFD."""
    ids = np.asarray(ids).reshape(-1)
    data = ids[(ids >= 0) & (ids < NUM_BYTES)].astype(np.uint8).tobytes()
    return data.decode("utf-8", errors="replace")
