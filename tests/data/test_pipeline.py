import dataclasses

import grain
import numpy as np
import pytest

from lca.data.pipeline import (FEATURES, DataConfig, documents, eval_batches, make_train_iterator, merge_states,
                               row_features)
from lca.data.tokenizer import EOS_ID, PAD_ID, encode

SEQ = 64


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        for k in FEATURES:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def iterator(cfg=DataConfig(), *, seq_len=SEQ, global_batch=4, seed=0, **kw):
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return make_train_iterator(cfg, seq_len=seq_len, global_batch=global_batch, seed=seed, **kw)


@pytest.fixture
def corpus(tmp_path):
    """40 small documents of different lengths; returns (config, the documents in sorted path order)."""
    texts = {f"d{i:02d}.txt": f"doc {i}: " + "xyz" * (i % 7) + "\n" for i in range(40)}
    for name, text in texts.items():
        (tmp_path / name).write_text(text)
    return DataConfig(source="text_dir", path=str(tmp_path)), [texts[k] for k in sorted(texts)]


def test_row_features_by_hand():
    row = row_features([np.array([1, 2, EOS_ID]), np.array([3, 4])], seq_len=6)
    assert row["inputs"].tolist() == [1, 2, EOS_ID, 3, 4, PAD_ID]
    assert row["targets"].tolist() == [2, EOS_ID, 3, 4, PAD_ID, PAD_ID]
    assert row["segment_ids"].tolist() == [1, 1, 1, 2, 2, 0]
    assert row["positions"].tolist() == [0, 1, 2, 0, 1, 0]
    assert row["loss_mask"].tolist() == [1, 1, 0, 1, 0, 0]
    assert {k: v.dtype for k, v in row.items()} == {
        "inputs": np.int32, "targets": np.int32, "segment_ids": np.int32, "positions": np.int32, "loss_mask": np.float32}


def test_concat_packing_is_the_document_stream(corpus):
    cfg, texts = corpus
    it = iterator(dataclasses.replace(cfg, shuffle=False), seq_len=16, global_batch=1, split="all")
    stream = np.concatenate([encode(t, add_eos=True) for t in texts] * 3)
    for k, batch in enumerate(take(it, 40)):
        np.testing.assert_array_equal(batch["inputs"][0], stream[16 * k:16 * k + 16])
        np.testing.assert_array_equal(batch["targets"][0], stream[16 * k + 1:16 * k + 17])
        # The only masked targets are the first tokens of the next document.
        np.testing.assert_array_equal(batch["loss_mask"][0], batch["inputs"][0] != EOS_ID)
        seg, pos = batch["segment_ids"][0], batch["positions"][0]
        new_doc = np.concatenate([[True], batch["inputs"][0][:-1] == EOS_ID])
        np.testing.assert_array_equal(seg, np.cumsum(new_doc))
        np.testing.assert_array_equal(pos[new_doc], 0)
        np.testing.assert_array_equal(pos[1:][~new_doc[1:]], pos[:-1][~new_doc[1:]] + 1)


def test_stdlib_batch_invariants():
    it = iterator(seq_len=256, global_batch=4)
    for batch in take(it, 3):
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
            "inputs": ((4, 256), np.int32), "targets": ((4, 256), np.int32), "segment_ids": ((4, 256), np.int32),
            "positions": ((4, 256), np.int32), "loss_mask": ((4, 256), np.float32)}
        np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
        np.testing.assert_array_equal(batch["loss_mask"], batch["inputs"] != EOS_ID)
        assert (batch["segment_ids"] >= 1).all() and (np.diff(batch["segment_ids"], axis=1) >= 0).all()
        assert (batch["positions"] < 256).all() and (batch["positions"][:, 0] == 0).all()


def test_pad_packing(corpus):
    cfg, texts = corpus
    cfg = dataclasses.replace(cfg, packing="pad", shuffle=False)
    docs = {encode(t, add_eos=True).tobytes() for t in texts}
    for batch in take(iterator(cfg, seq_len=32, global_batch=2, split="all"), 10):
        for r in range(2):
            seg, tokens = batch["segment_ids"][r], np.append(batch["inputs"][r], batch["targets"][r][-1])
            pad = seg == 0
            assert (batch["inputs"][r][pad] == PAD_ID).all() and (batch["loss_mask"][r][pad] == 0).all()
            for s in range(1, seg.max() + 1):  # every segment is one whole document (all fit: < 33 tokens)
                piece = tokens[:-1][seg == s]
                if s < seg.max() or pad.any():
                    assert piece.tobytes() in docs
                assert batch["loss_mask"][r][seg == s][-1] == 0 or not pad.any()
            assert np.diff(seg[~pad]).min(initial=0) >= 0


def test_task_source_one_example_per_row():
    cfg = DataConfig(source="passkey")
    batch = next(iterator(cfg, seq_len=300, global_batch=2))
    assert (batch["segment_ids"] == 1).all() and (batch["loss_mask"] == 1).all()
    np.testing.assert_array_equal(batch["positions"], np.broadcast_to(np.arange(300), (2, 300)))
    full = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
    assert all(bytes(row[:30].astype(np.uint8)).startswith(b"There is an important") for row in full)
    assert not (batch["inputs"][0] == batch["inputs"][1]).all()
    held_out = eval_batches(cfg, seq_len=300, batch=2, num_batches=1, seed=0)[0]
    assert not (held_out["inputs"] == batch["inputs"]).all(axis=1).any()


def test_deterministic_for_a_seed():
    assert_same(take(iterator(seed=5), 3), take(iterator(seed=5), 3))
    other = next(iterator(seed=6))
    assert not (other["inputs"] == next(iterator(seed=5))["inputs"]).all()


def test_epochs_reshuffle(corpus):
    cfg, texts = corpus
    docs = documents(cfg, split="all", seed=0, length=SEQ + 1)
    first = [docs[i].tobytes() for i in range(len(texts))]
    second = [docs[i].tobytes() for i in range(len(texts), 2 * len(texts))]
    assert sorted(first) == sorted(second) and first != second


@pytest.mark.parametrize("prefetch", [0, 2])
def test_process_shards_union_is_global_batch(prefetch):
    cfg = DataConfig(prefetch=prefetch)
    whole = take(iterator(cfg, global_batch=4), 3)
    shards = [take(iterator(cfg, global_batch=4, process_index=p, process_count=2), 3) for p in range(2)]
    for step, batch in enumerate(whole):
        for k in FEATURES:
            parts = [shards[p][step][k] for p in range(2)]
            assert parts[0].shape == (2, SEQ)
            np.testing.assert_array_equal(np.concatenate(parts), batch[k])
        rows = {r.tobytes() for r in batch["inputs"]}
        assert len(rows) == 4  # the shards' rows are different rows


@pytest.mark.parametrize("cfg", [DataConfig(), DataConfig(packing="pad", prefetch=0), DataConfig(source="assoc_recall")],
                         ids=["stdlib-concat", "stdlib-pad", "assoc_recall"])
def test_resume_from_state(cfg):
    seq_len = 128 if cfg.source == "stdlib" else 200
    it = iterator(cfg, seq_len=seq_len)
    take(it, 5)
    state = it.get_state()
    expected = take(it, 4)
    resumed = iterator(cfg, seq_len=seq_len)
    resumed.set_state(state)
    assert_same(take(resumed, 4), expected)


def test_resume_through_orbax_checkpoint(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    it = iterator(seq_len=128)
    take(it, 7)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = take(it, 3)
    fresh = iterator(seq_len=128)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(mngr.latest_step(), args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert_same(take(fresh, 3), expected)


@pytest.mark.parametrize("saved_by, resumed_by", [(1, 2), (2, 4), (4, 1)])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_on_another_process_count(corpus, saved_by, resumed_by, prefetch):
    """The merged states of P processes let Q processes continue with exactly the batches P would have made."""
    cfg = dataclasses.replace(corpus[0], prefetch=prefetch)  # short documents of many lengths
    saved = [iterator(cfg, process_index=p, process_count=saved_by) for p in range(saved_by)]
    for it in saved:
        take(it, 3)
    merged = merge_states([it.get_state() for it in reversed(saved)])  # any order
    assert merged["rows"] == [0, 4, 4]
    assert len(set(zip(merged["doc"], merged["offset"]))) == 4  # every row is somewhere else
    resumed = [iterator(cfg, process_index=p, process_count=resumed_by) for p in range(resumed_by)]
    for it in resumed:
        it.set_state(merged)

    def global_batches(iterators):  # the next 2 global batches: the processes' rows in process order
        return [{k: np.concatenate([b[k] for b in step]) for k in FEATURES}
                for step in zip(*[take(it, 2) for it in iterators])]

    assert_same(global_batches(resumed), global_batches(saved))


def test_merge_states_rejects_gaps():
    states = [iterator(process_index=p, process_count=4).get_state() for p in (0, 2, 3)]  # process 1 missing
    with pytest.raises(ValueError, match="do not tile"):
        merge_states(states)


def test_state_for_other_layout_rejected():
    state = iterator(global_batch=4).get_state()
    with pytest.raises(ValueError, match="global_batch"):
        iterator(global_batch=8).set_state(state)


def test_eval_batches_are_held_out():
    held_out = eval_batches(DataConfig(), seq_len=SEQ, batch=2, num_batches=2, seed=0)
    assert len(held_out) == 2 and held_out[0]["inputs"].shape == (2, SEQ)
    train_rows = {r.tobytes() for b in take(iterator(global_batch=2), 2) for r in b["inputs"]}
    assert not train_rows & {r.tobytes() for b in held_out for r in b["inputs"]}


@pytest.mark.parametrize("kwargs, field", [
    (dict(cfg=DataConfig(source="wikipedia")), "data.source"),
    (dict(cfg=DataConfig(source="text_dir")), "data.path"),
    (dict(cfg=DataConfig(packing="best_fit")), "data.packing"),
    (dict(seq_len=1), "seq_len"),
    (dict(global_batch=3, process_count=2), "process_count"),
    (dict(split="validation"), "split"),
])
def test_bad_config(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")) as info:
        iterator(**kwargs)
    assert any(hint in str(info.value) for hint in ("use", "must", "set "))  # says what would work


def test_worker_processes_deterministic_and_resumable(corpus):
    cfg = dataclasses.replace(corpus[0], num_workers=2)
    it = iterator(cfg, seq_len=16, global_batch=2)
    first = take(it, 4)
    state = it.get_state()
    expected = take(it, 4)
    it.close()
    # Batches alternate over the workers; worker w's row r reads documents r + 2w, r + 2w + 4, ... (global_batch 2).
    docs = documents(cfg, split="train", seed=0, length=17)
    for batch, row, doc in [(first[0], 0, docs[0]), (first[0], 1, docs[1]), (first[1], 0, docs[2]), (first[1], 1, docs[3])]:
        n = min(16, len(doc))
        assert batch["inputs"][row][:n].tolist() == doc[:n].tolist()
    resumed = iterator(cfg, seq_len=16, global_batch=2)  # pool start: ~10 s on 2 cores
    resumed.set_state(state)
    assert_same(take(resumed, 4), expected)
    resumed.close()
