"""data.mixture (tasks mixed into the corpus with grain's own mixing) and data.landmark_every."""

import dataclasses

import grain
import numpy as np
import pytest

from lca.data.pipeline import FEATURES, DataConfig, make_train_iterator, merge_states
from lca.data.tasks import TASK_DESCRIPTION
from lca.data.tokenizer import LANDMARK_ID, PAD_ID

SEQ = 512  # a passkey example needs >= 243 tokens


def iterator(cfg, *, seq_len=SEQ, global_batch=2, **kw):
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return make_train_iterator(cfg, seq_len=seq_len, global_batch=global_batch, seed=0, **kw)


def take(it, n):
    return [next(it) for _ in range(n)]


def is_passkey(batch):
    prefix = np.frombuffer(TASK_DESCRIPTION[:40], np.uint8)
    return [bool((row[row != LANDMARK_ID][:40] == prefix).all()) for row in batch["inputs"]]


def assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        for k in FEATURES:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


MIXED = DataConfig(mixture={"passkey": 0.25}, prefetch=0)


def test_mixture_share_of_passkey_batches():
    kinds = [is_passkey(b) for b in take(iterator(MIXED), 8)]
    assert all(len(set(k)) == 1 for k in kinds)  # whole batches from one part
    assert sum(k[0] for k in kinds) == 2  # 1/4 of 8, grain's deterministic interleave


@pytest.mark.parametrize("prefetch", [0, 2])
def test_mixture_resumes_through_orbax_checkpoint(tmp_path, prefetch):
    ocp = pytest.importorskip("orbax.checkpoint")
    cfg = dataclasses.replace(MIXED, prefetch=prefetch, landmark_every=16)
    it = iterator(cfg)
    take(it, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = take(it, 5)
    fresh = iterator(cfg)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(mngr.latest_step(), args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert_same(take(fresh, 5), expected)
    assert any(any(is_passkey(b)) for b in expected) and not all(any(is_passkey(b)) for b in expected)


def test_mixture_resumes_on_another_process_count():
    saved = [iterator(MIXED, global_batch=4, process_index=p, process_count=2) for p in range(2)]
    for it in saved:
        take(it, 3)
    merged = merge_states([it.get_state() for it in saved])
    resumed = iterator(MIXED, global_batch=4)
    resumed.set_state(merged)
    expected = [{k: np.concatenate([a[k], b[k]]) for k in FEATURES} for a, b in zip(take(saved[0], 2), take(saved[1], 2))]
    assert_same(take(resumed, 2), expected)


def test_landmark_every_inserts_landmarks_without_loss():
    L = 16
    plain = take(iterator(DataConfig(prefetch=0), seq_len=SEQ - SEQ // L), 1)[0]
    batch = take(iterator(DataConfig(prefetch=0, landmark_every=L)), 1)[0]
    slots = np.arange(SEQ) % L == L - 1
    assert batch["inputs"].shape == (2, SEQ)
    assert (batch["inputs"][:, slots] == LANDMARK_ID).all() and (batch["loss_mask"][:, slots] == 0).all()
    assert (batch["targets"][:, slots] == PAD_ID).all()
    np.testing.assert_array_equal(batch["inputs"][:, ~slots], plain["inputs"])  # the same text, landmarks added
    np.testing.assert_array_equal(batch["targets"][:, ~slots], plain["targets"])


@pytest.mark.parametrize("cfg, match", [
    (DataConfig(mixture={"passkeys": 0.2}), "data.mixture names 'passkeys'"),
    (DataConfig(mixture={"passkey": 1.5}), r"data.mixture.passkey=1.5 must be"),
    (DataConfig(mixture={"passkey": 0.6, "multi_needle": 0.5}), "sum to < 1"),
    (DataConfig(source="passkey", mixture={"assoc_recall": 0.5}), "data.source must be"),
    (DataConfig(landmark_every=24), "data.landmark_every=24 must be >= 2 and divide seq_len=512"),
])
def test_bad_mixture_or_landmark_every(cfg, match):
    with pytest.raises(ValueError, match=match):
        iterator(cfg)


def test_mixture_rows_too_short_for_the_task_fail_before_the_first_batch():
    with pytest.raises(ValueError, match=r"data.mixture.passkey does not fit rows of 240 tokens .* use >= 243"):
        iterator(DataConfig(mixture={"passkey": 0.1}, landmark_every=16), seq_len=256)


def test_task_loss_answer_keeps_only_the_answer_targets():
    """data.task_loss=answer: a passkey row's loss covers its 5 answer digits; corpus rows keep every target."""
    from lca.data.pipeline import DataConfig, make_train_iterator
    from lca.data.tasks import passkey

    cfg = DataConfig(source="passkey", task_loss="answer")
    batch = next(make_train_iterator(cfg, seq_len=300, global_batch=2, seed=0))
    mask = np.asarray(batch["loss_mask"])
    assert mask.shape == (2, 300) and (mask[:, -5:] == 1).all() and (mask[:, :-5] == 0).all()
    assert passkey(301, 0.5).answer_len == 5
    everything = next(make_train_iterator(DataConfig(source="passkey"), seq_len=300, global_batch=2, seed=0))
    np.testing.assert_array_equal(everything["targets"], batch["targets"])
    assert np.asarray(everything["loss_mask"]).sum() > 2 * 250


def test_bad_task_loss_names_the_choices():
    from lca.data.pipeline import DataConfig, validate

    with pytest.raises(ValueError, match=r"data.task_loss='copy' is not known; use one of \['all', 'answer'\]"):
        validate(DataConfig(task_loss="copy"), seq_len=64, global_batch=2)


def test_task_len_jitter_moves_the_answer_and_its_loss_with_it():
    """data.task_len_jitter: examples shortened by 0..jitter tokens, padded at the end; the loss follows the answer."""
    from lca.data.tokenizer import decode

    cfg = DataConfig(source="passkey", task_loss="answer", task_len_jitter=14)
    ends = set()
    for batch in take(iterator(cfg, seq_len=300, global_batch=4), 5):
        for inputs, targets, mask, segments in zip(batch["inputs"], batch["targets"], batch["loss_mask"],
                                                   batch["segment_ids"]):
            real = int((segments > 0).sum())  # one example from the row's start, then padding
            assert 300 - 14 <= real <= 300 and (segments[:real] == 1).all() and (segments[real:] == 0).all()
            end = real - 1 if real < 300 else 300
            assert np.flatnonzero(mask).tolist() == list(range(end - 5, end))  # the 5 key digits, nothing else
            key = decode(targets[end - 5:end])
            assert f"The pass key is {key}." in decode(inputs[:end])
            ends.add(end)
    assert len(ends) >= 8


def test_task_len_jitter_errors_name_the_field():
    from lca.data.pipeline import validate

    with pytest.raises(ValueError, match=r"data.task_len_jitter=-1 must be an int >= 0"):
        validate(DataConfig(task_len_jitter=-1), seq_len=64, global_batch=2)
    with pytest.raises(ValueError, match=r"data.task_len_jitter=200 must be < 150 for rows of 300 tokens"):
        validate(DataConfig(source="passkey", task_len_jitter=200), seq_len=300, global_batch=2)
    with pytest.raises(ValueError, match=r"data.mixture.passkey does not fit rows of 256 tokens .* shortened by up "
                                         r"to data.task_len_jitter=20: .* use >= 243"):
        validate(DataConfig(mixture={"passkey": 0.5}, task_len_jitter=20), seq_len=256, global_batch=2)


def test_task_start_jitter_pads_the_start_and_the_answer_keeps_its_loss():
    """data.task_start_jitter: 0..N leading padding tokens (segment 0, no loss) before a shortened example, so
    one answer position in the row comes with several example lengths; positions count from the example."""
    from lca.data.tokenizer import decode

    cfg = DataConfig(source="passkey", task_loss="answer", task_len_jitter=6, task_start_jitter=12)
    prefix = np.frombuffer(TASK_DESCRIPTION[:40], np.uint8)
    leads, lengths_at_end = set(), {}
    for batch in take(iterator(cfg, seq_len=300, global_batch=4), 6):
        for row in zip(*(batch[k] for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions"))):
            inputs, targets, mask, segments, positions = row
            lead = int(np.argmax(segments > 0))
            real = int((segments > 0).sum())
            assert 0 <= lead <= 12 and (inputs[:lead] == PAD_ID).all() and (positions[:lead] == 0).all()
            assert (inputs[lead:lead + 40] == prefix).all() and (segments[lead:lead + real] == 1).all()
            np.testing.assert_array_equal(positions[lead:lead + real], np.arange(real))
            answer = np.flatnonzero(mask)
            end = int(answer[-1]) + 1
            assert answer.tolist() == list(range(end - 5, end))  # the 5 key digits, nothing else
            key = decode(targets[end - 5:end])
            assert f"The pass key is {key}." in decode(inputs[lead:end])
            assert 300 - 6 <= end + (end < 300) <= 301  # the end is where task_len_jitter alone puts it
            leads.add(lead)
            lengths_at_end.setdefault(end, set()).add(end - lead)
    assert len(leads) >= 6 and max(len(n) for n in lengths_at_end.values()) >= 2


def test_task_start_jitter_errors_name_the_field():
    from lca.data.pipeline import validate

    with pytest.raises(ValueError, match=r"data.task_start_jitter=-2 must be an int >= 0"):
        validate(DataConfig(task_start_jitter=-2), seq_len=64, global_batch=2)
    with pytest.raises(ValueError, match=r"data.mixture.passkey does not fit rows of 256 tokens .* "
                                         r"data.task_len_jitter=4 \+ data.task_start_jitter=12: .* use >= 243"):
        validate(DataConfig(mixture={"passkey": 0.5}, task_len_jitter=4, task_start_jitter=12), seq_len=256,
                 global_batch=2)


@pytest.mark.parametrize("knobs, named", [
    ({"task_loss": "answer"}, r"data.task_loss='answer'"),
    ({"task_len_jitter": 15, "task_start_jitter": 3}, r"data.task_len_jitter=15, data.task_start_jitter=3"),
])
def test_task_knobs_without_a_task_are_refused_not_ignored(knobs, named):
    """The task knobs only shape task rows: on a corpus without data.mixture they would do nothing, silently."""
    from lca.data.pipeline import validate, without_tasks

    cfg = DataConfig(**knobs)
    with pytest.raises(ValueError, match=named + r" shape synthetic task rows, but data.source='stdlib' has none "
                                                 r"and data.mixture is empty; add a task"):
        validate(cfg, seq_len=512, global_batch=2)
    validate(dataclasses.replace(cfg, mixture={"passkey": 0.5}), seq_len=512, global_batch=2)  # with a task: fine
    validate(dataclasses.replace(cfg, source="passkey"), seq_len=512, global_batch=2)
    validate(without_tasks(dataclasses.replace(cfg, mixture={"passkey": 0.5})), seq_len=512, global_batch=2)


def test_task_len_jitter_loss_covers_an_answer_whose_length_follows_the_example():
    """copy's answer is context_len // 8 tokens: with jitter each row's mask has its own example's answer length."""
    from lca.data.tasks import copy

    cfg = DataConfig(source="copy", task_loss="answer", task_len_jitter=40)
    lengths = set()
    for batch in take(iterator(cfg, seq_len=300, global_batch=4), 3):
        for mask, segments in zip(batch["loss_mask"], batch["segment_ids"]):
            real = int((segments > 0).sum())
            end = real - 1 if real < 300 else 300  # an example of end + 1 tokens
            answer_len = copy(end + 1, 0.0).answer_len
            assert np.flatnonzero(mask).tolist() == list(range(end - answer_len, end))
            lengths.add(answer_len)
    assert len(lengths) >= 3
