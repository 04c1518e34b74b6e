import numpy as np
import pytest

from lca.data.tasks import TASK_DESCRIPTION, TASKS, assoc_recall, check_length, copy, multi_needle, passkey
from lca.data.tokenizer import decode, encode


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("length", [512, 4096])
def test_passkey_structure(length, depth):
    tokens, start, n = passkey(length, depth, seed=7)
    assert tokens.dtype == np.int32 and tokens.shape == (length,)
    assert start + n == length and n == 5
    text = decode(tokens)
    key = decode(tokens[start:])
    assert key.isdigit() and len(key) == 5
    assert text.startswith("There is an important info hidden inside a lot of irrelevant text.")
    assert text.endswith(f"What is the pass key? The pass key is {key}")
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    assert text.count(needle) == 1
    # The needle starts at `depth` of the filler (snapped back to a word start: at most a few bytes early).
    prefix_len = len(TASK_DESCRIPTION)
    filler_len = length - len(encode(needle)) - 1 - prefix_len - len("\nWhat is the pass key? The pass key is ") - 5
    expected = prefix_len + depth * filler_len
    assert expected - 12 <= text.index(needle) <= expected + 1


def test_passkey_deterministic_and_varies():
    a, b = passkey(1024, 0.5, seed=3), passkey(1024, 0.5, seed=3)
    assert (a.tokens == b.tokens).all()
    keys = {decode(passkey(1024, 0.5, seed=s).tokens[-5:]) for s in range(10)}
    assert len(keys) > 5


def test_multi_needle_answer_is_asked_door():
    tokens, start, n = multi_needle(2048, 0.25, seed=1, num_needles=5)
    text = decode(tokens)
    assert tokens.shape == (2048,) and start + n == 2048
    door = text.rsplit("What is the pass key of the ", 1)[1].split(" door?")[0]
    assert f"The pass key of the {door} door is {decode(tokens[start:])}." in text
    assert text.count("The pass key of the ") == 5 + 1


def test_assoc_recall_answer_matches_pair():
    tokens, start, n = assoc_recall(1000, 0.6, seed=2)
    text = decode(tokens)
    assert tokens.shape == (1000,) and n == 4 and start == 996
    key = text.rsplit("What is the value of ", 1)[1][:4]
    pairs = text.split("\n")[1].split()
    lookup = dict(p.split(":") for p in pairs)
    assert len(lookup) == len(pairs)  # keys distinct
    assert lookup[key] == decode(tokens[start:])
    assert abs(pairs.index(f"{key}:{lookup[key]}") - 0.6 * (len(pairs) - 1)) <= 0.5


def test_copy_answer_is_a_copy_at_a_distance_that_varies():
    distances = set()
    for seed in range(20):
        tokens, start, n = copy(385, 0.0, seed=seed)
        assert tokens.shape == (385,) and n == 385 // 8 and start == 385 - n
        _, string, again = decode(tokens).rsplit("\n", 2)
        assert string == again and decode(tokens[start:]) == again[-n:]
        distances.add(len(string) + 1)  # an answer token's original sits one string-length (+ newline) back
    assert len(distances) >= 15  # no fixed offset for a positional head to learn


@pytest.mark.parametrize("task", sorted(TASKS))
def test_bad_arguments(task):
    with pytest.raises(ValueError, match="context_len"):
        TASKS[task](16, 0.5, 0)
    with pytest.raises(ValueError, match="depth"):
        TASKS[task](4096, 1.5, 0)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_a_length_fits_every_seed_or_none(task):
    """The pipeline and the eval config check a task's length on one seed: no other seed may then fail
    (multi_needle's doors have names of 3 to 6 letters; its minimum is that of the longest draw)."""
    shortest = next(n for n in range(2, 4096) if _fits(task, n, 0))
    for n in (shortest - 1, shortest, shortest + 1):
        assert len({_fits(task, n, seed) for seed in range(200)}) == 1, (task, n)
    check_length(task, shortest)  # the probe both checks use says the same
    with pytest.raises(ValueError, match=f"{task}: context_len={shortest - 1} is too short"):
        check_length(task, shortest - 1)


def _fits(task, n, seed):
    try:
        TASKS[task](n, 0.5, seed)
        return True
    except ValueError:
        return False
