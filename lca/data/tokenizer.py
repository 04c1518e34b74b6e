"""Byte-level tokenizer: every UTF-8 byte is a token, plus two specials. No vocabulary files, no downloads.

Token ids:
    0..255      the byte values of the UTF-8 encoding
    PAD_ID=256  padding (never produced by `encode`; segment id 0 marks it in packed batches)
    EOS_ID=257  end of document; the pipeline appends it to every document it packs
VOCAB_SIZE = 258. Models usually round the embedding table up (e.g. to a multiple of 128); ids >= 258 never occur.
"""

from __future__ import annotations

import numpy as np

NUM_BYTES = 256
PAD_ID = 256
EOS_ID = 257
VOCAB_SIZE = 258


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
