import dataclasses

import numpy as np
import pytest

from lca.data.landmark import (InsertLandmarks, JumpPositions, StripLandmarks, insert_landmarks, jump_positions,
                               strip_landmarks, with_landmarks_length)
from lca.data.pipeline import FEATURES, DataConfig, make_dataset, row_features
from lca.data.tokenizer import EOS_ID, LANDMARK_ID, NUM_IDS, PAD_ID, VOCAB_SIZE, check_token_id, decode, encode


def test_landmark_id_is_a_reserved_special_outside_the_byte_vocabulary():
    assert (PAD_ID, EOS_ID, VOCAB_SIZE) == (256, 257, 258)  # existing ids unchanged
    assert LANDMARK_ID == 258 and NUM_IDS == 259
    assert decode(np.array([104, LANDMARK_ID, 105])) == "hi"
    check_token_id(LANDMARK_ID, 384)
    with pytest.raises(ValueError, match="collides with the byte vocabulary"):
        check_token_id(EOS_ID, 384)
    with pytest.raises(ValueError, match="vocab_size >= 259"):
        check_token_id(LANDMARK_ID, 258)


def test_insert_by_hand():
    row = row_features([encode("abcd", add_eos=True), encode("xy")], seq_len=6)  # "abcd" EOS "x" | target "y"
    out = insert_landmarks(row, block_size=3)
    a, b, c, d, x, y = (ord(ch) for ch in "abcdxy")
    L_, P = LANDMARK_ID, PAD_ID
    np.testing.assert_array_equal(out["inputs"], [a, b, L_, c, d, L_, EOS_ID, x, L_])
    np.testing.assert_array_equal(out["targets"], [b, c, P, d, EOS_ID, P, x, y, P])
    np.testing.assert_array_equal(out["segment_ids"], [1, 1, 1, 1, 1, 1, 1, 2, 2])
    np.testing.assert_array_equal(out["positions"], [0, 1, 2, 3, 4, 5, 6, 0, 1])
    np.testing.assert_array_equal(out["loss_mask"], [1, 1, 0, 1, 1, 0, 0, 1, 0])
    assert with_landmarks_length(6, 3) == 9


def test_landmarks_in_padding_stay_padding():
    row = row_features([encode("abc")], seq_len=8)
    out = insert_landmarks(row, block_size=4)
    np.testing.assert_array_equal(out["inputs"][[3, 7]], [LANDMARK_ID, PAD_ID])
    np.testing.assert_array_equal(out["segment_ids"], [1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(out["positions"], [0, 1, 2, 3, 0, 0, 0, 0, 0, 0])


@pytest.mark.parametrize("packing", ["concat", "pad"])
@pytest.mark.parametrize("block_size", [2, 5, 8])
def test_grain_pipeline_roundtrip_and_checkpoint(tmp_path, packing, block_size):
    for i in range(12):
        (tmp_path / f"d{i:02d}.txt").write_text(f"document {i} " + "abc" * i)
    cfg = DataConfig(source="text_dir", path=str(tmp_path), packing=packing, prefetch=0)
    seq = 4 * (block_size - 1) + 1  # one incomplete block at the end of each row
    plain = make_dataset(cfg, seq_len=seq, global_batch=2, seed=0, process_index=0, process_count=1)
    with_lm = plain.map(InsertLandmarks(block_size))
    it, it_plain = iter(with_lm), iter(plain)
    for _ in range(3):
        batch, original = next(it), next(it_plain)
        n = with_landmarks_length(seq, block_size)
        is_landmark = np.arange(n) % block_size == block_size - 1
        assert batch["inputs"].shape == (2, n)
        assert set(np.unique(batch["inputs"][:, is_landmark])) <= {LANDMARK_ID, PAD_ID}
        assert not np.any(batch["inputs"][:, ~is_landmark] == LANDMARK_ID)
        assert np.all(batch["loss_mask"][:, is_landmark] == 0)
        landmark_at = np.flatnonzero(is_landmark)
        np.testing.assert_array_equal(batch["segment_ids"][:, landmark_at], batch["segment_ids"][:, landmark_at - 1])
        back = StripLandmarks(block_size).map(batch)
        for key in FEATURES:
            np.testing.assert_array_equal(back[key], original[key], err_msg=key)
    # The iterator state is the plain pipeline's: save, read on, restore, read the same again.
    state = it.get_state()
    ahead = next(it)
    it.set_state(state)
    again = next(it)
    for key in FEATURES:
        np.testing.assert_array_equal(ahead[key], again[key], err_msg=key)


def test_positions_count_landmarks_within_each_document_piece():
    row = row_features([encode("abcdefg"), encode("hijklmnopq")], seq_len=16)
    out = insert_landmarks(row, block_size=4)
    for seg in (1, 2):
        piece = out["segment_ids"] == seg
        np.testing.assert_array_equal(out["positions"][piece], np.arange(piece.sum()))


def test_bad_inputs():
    row = row_features([encode("abc")], seq_len=6)
    with pytest.raises(ValueError, match="block_size"):
        insert_landmarks(row, block_size=1)
    with pytest.raises(ValueError, match="block_size"):
        InsertLandmarks(0)
    with pytest.raises(ValueError, match="extra"):
        insert_landmarks({**row, "extra": row["inputs"]}, block_size=3)
    with pytest.raises(ValueError, match="one last"):
        strip_landmarks({**row, "targets": row["targets"][:3]}, block_size=3)
    with pytest.raises(ValueError, match="segment_ids"):
        insert_landmarks({"positions": row["positions"]}, block_size=3)


def test_inserted_rows_match_what_landmark_attention_reads():
    # The attention finds landmarks by row index (j % L == L - 1) and keeps documents apart by segment id:
    # on inserted rows, its landmark columns are exactly the LANDMARK_ID inputs, and every real token's row
    # of weights sums to 1.
    import jax
    import jax.numpy as jnp

    from lca.attention.landmark import landmark_weights

    L = 4
    rows = [row_features([encode("abcdefgh"), encode("ijklm"), encode("nopqrstuv")], seq_len=21),
            row_features([encode("xyz" * 4)], seq_len=21)]
    batch = insert_landmarks({k: np.stack([r[k] for r in rows]) for k in FEATURES}, L)
    n = batch["inputs"].shape[1]
    q = jax.random.normal(jax.random.PRNGKey(0), (2, n, 2, 8))
    weights = np.asarray(landmark_weights(q, q, block_size=L, segment_ids=jnp.asarray(batch["segment_ids"])))
    is_landmark = batch["inputs"] == LANDMARK_ID
    assert np.all(is_landmark == ((np.arange(n) % L == L - 1) & (batch["segment_ids"] > 0)))
    real = (batch["segment_ids"] > 0) & ~is_landmark
    np.testing.assert_allclose(weights.sum(-1).transpose(0, 2, 1)[real], 1.0, atol=1e-5)
    assert np.all(weights.transpose(0, 2, 1, 3)[:, :, :, np.arange(n) % L == L - 1] == 0)


def test_position_jumps_by_hand():
    # Rows of blocks of 3 (two tokens, then a landmark): "abcd" EOS | "xyz" (to its last target) | padding.
    row = insert_landmarks(row_features([encode("abcd", add_eos=True), encode("xyz")], seq_len=10), block_size=3)
    np.testing.assert_array_equal(row["segment_ids"], [1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(row["positions"], [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 0, 0, 0])
    out = jump_positions(row, 3, np.array([10, 20, 30, 40, 50]))
    # After landmark 0 (row index 2) +10, after landmark 1 (index 5) +20 more; piece 2 starts at index 7 and
    # counts only the landmark inside it (index 8: +30; the one at 11 closes it); padding keeps 0.
    np.testing.assert_array_equal(out["positions"], [0, 1, 2, 13, 14, 15, 36, 0, 1, 32, 33, 34, 0, 0, 0])
    for key in ("inputs", "targets", "segment_ids", "loss_mask"):
        np.testing.assert_array_equal(out[key], row[key])
    np.testing.assert_array_equal(jump_positions(row, 3, np.zeros(5, int))["positions"], row["positions"])
    with pytest.raises(ValueError, match=r"jumps must be ints >= 0 of shape \(5,\)"):
        jump_positions(row, 3, np.zeros(4, int))
    with pytest.raises(ValueError, match="max_jump"):
        JumpPositions(3, 0, range(0, 1), 1)


def test_position_jumps_in_the_pipeline_train_only_per_row_and_checkpointable(tmp_path):
    for i in range(12):
        (tmp_path / f"d{i:02d}.txt").write_text(f"document {i} " + "abc" * 20)
    cfg = DataConfig(source="text_dir", path=str(tmp_path), prefetch=0, landmark_every=4, landmark_pos_jump=5)
    plain = dataclasses.replace(cfg, landmark_pos_jump=0)
    kw = dict(seq_len=32, global_batch=4, seed=3)
    whole = make_dataset(cfg, **kw, process_index=0, process_count=1)
    it, ref = iter(whole), iter(make_dataset(plain, **kw, process_index=0, process_count=1))
    batch, base = next(it), next(ref)
    for key in ("inputs", "targets", "segment_ids", "loss_mask"):
        np.testing.assert_array_equal(batch[key], base[key], err_msg=key)
    moved = batch["positions"] - base["positions"]
    assert moved.min() >= 0 and moved.max() > 0
    steps = np.diff(batch["positions"], axis=-1)[np.diff(batch["segment_ids"], axis=-1) == 0]
    assert steps.min() >= 1 and steps.max() <= 5  # strictly increasing within a piece, jumps 0..4
    # A process's rows are the single process's rows: jumps do not depend on the process count.
    half = next(iter(make_dataset(cfg, **kw, process_index=1, process_count=2)))
    np.testing.assert_array_equal(half["positions"], batch["positions"][2:])
    # Resuming from a saved state repeats the same jumps; held-out rows never jump.
    state = it.get_state()
    ahead = next(it)
    it.set_state(state)
    np.testing.assert_array_equal(next(it)["positions"], ahead["positions"])
    held_out = dataclasses.replace(cfg, eval_fraction=0.5)
    plain_out = dataclasses.replace(held_out, landmark_pos_jump=0)
    eval_kw = dict(kw, split="eval", process_index=0, process_count=1)
    np.testing.assert_array_equal(next(iter(make_dataset(held_out, **eval_kw)))["positions"],
                                  next(iter(make_dataset(plain_out, **eval_kw)))["positions"])
    for bad, match in (({"landmark_pos_jump": 1}, "must be 0"), ({"landmark_pos_jump": 4, "landmark_every": None},
                                                                   "landmark_every is None")):
        with pytest.raises(ValueError, match=match):
            make_dataset(dataclasses.replace(cfg, **bad), **kw, process_index=0, process_count=1)
