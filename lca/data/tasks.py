"""Synthetic long-context tasks, byte-tokenized, of an exact length, with the answer as the last tokens.

Every task is `task(context_len, depth, seed) -> TaskExample(tokens int32 [context_len], answer_start, answer_len)`
where `tokens[answer_start:answer_start + answer_len]` is the answer and `answer_start + answer_len == context_len`.
Teacher-forced scoring: a causal model is right iff `argmax(logits[answer_start - 1 + i]) == tokens[answer_start + i]`
for every i < answer_len (the same as greedy generation of the answer). `depth` in [0, 1] places the needle (or the
queried pair) from the start (0) to the end (1) of the distractor text. `seed` is an int or a `np.random.Generator`.

- `passkey`: the protocol of the landmark attention paper (Mohtashami & Jaggi, 2023): a task description, filler
  sentences repeated to length, "The pass key is 71432. Remember it. 71432 is the pass key." at `depth`, and the
  question "What is the pass key? The pass key is " followed by the 5-digit answer.
- `multi_needle`: `num_needles` pass keys for differently named doors at random depths; the one asked for is at
  `depth`.
- `assoc_recall`: a list of random "abcd:1234" key:value pairs; the queried pair is at `depth`; the answer is the value.
- `copy`: filler, then a random string of letters, digits and spaces of random length, a newline, and the string
  again (the answer: the last `context_len // 8` tokens). Every answer token is a copy of a token one
  string-length back, a distance that varies from row to row: the content-based induction passkey retrieval
  needs, dozens of copies per row instead of five. A training task (`depth` is unused).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from lca.data.tokenizer import encode

TASK_DESCRIPTION = (b"There is an important info hidden inside a lot of irrelevant text. "
                    b"Find it and memorize it. I will quiz you about the important info there. ")
FILLER = b"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
DOOR_NAMES = ("red", "blue", "green", "yellow", "purple", "orange", "silver", "golden", "black", "white",
              "brown", "pink", "grey", "violet", "amber", "teal")


class TaskExample(NamedTuple):
    tokens: np.ndarray  # int32 [context_len]
    answer_start: int
    answer_len: int


def _rng(seed) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def _check(task: str, context_len: int, depth: float, minimum: int) -> None:
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"{task}: depth={depth!r} must be in [0, 1] (0 = start of the text, 1 = end).")
    if context_len < minimum:
        raise ValueError(f"{task}: context_len={context_len} is too short for the prompt; use >= {minimum} tokens.")


def _pass_key(rng: np.random.Generator) -> bytes:
    return b"%d" % rng.integers(10_000, 100_000)


def _haystack(task: str, context_len: int, prefix: bytes, needles, question: bytes, answer: bytes) -> TaskExample:
    """prefix + filler with `needles` [(depth, text)] inserted at their depths + question + answer, exactly context_len bytes."""
    fixed = len(prefix) + sum(len(t) for _, t in needles) + len(question) + len(answer)
    _check(task, context_len, max((d for d, _ in needles), default=0.0), fixed)
    n_filler = context_len - fixed
    filler = (FILLER * (n_filler // len(FILLER) + 1))[:n_filler]
    pieces, cut = [prefix], 0
    for depth, text in sorted(needles, key=lambda dt: dt[0]):
        at = round(depth * n_filler)
        if 0 < at < n_filler:  # insert between words (at most one word earlier than the exact depth)
            at = max(filler.rfind(b" ", 0, at) + 1, cut)
        pieces += [filler[cut:at], text]
        cut = at
    pieces += [filler[cut:], question, answer]
    tokens = encode("".join(p.decode("ascii") for p in pieces))
    assert tokens.shape == (context_len,), (tokens.shape, context_len)
    return TaskExample(tokens, context_len - len(answer), len(answer))


def passkey(context_len: int, depth: float, seed=0) -> TaskExample:
    """Landmark-attention passkey retrieval: find the 5-digit key hidden at `depth` in repeated filler text."""
    _check("passkey", context_len, depth, 0)
    key = _pass_key(_rng(seed))
    needle = b"The pass key is %s. Remember it. %s is the pass key. " % (key, key)
    return _haystack("passkey", context_len, TASK_DESCRIPTION, [(depth, needle)],
                     b"\nWhat is the pass key? The pass key is ", key)


def _door_needle(name: bytes, key: bytes) -> bytes:
    return b"The pass key of the %s door is %s. Remember it. " % (name, key)


def _door_question(name: bytes) -> bytes:
    return b"\nWhat is the pass key of the %s door? The pass key of the %s door is " % (name, name)


def multi_needle(context_len: int, depth: float, seed=0, *, num_needles: int = 4) -> TaskExample:
    """`num_needles` keys for named doors; the question asks for the door whose key sits at `depth`."""
    if not 1 <= num_needles <= len(DOOR_NAMES):
        raise ValueError(f"multi_needle: num_needles={num_needles} must be in [1, {len(DOOR_NAMES)}].")
    # The doors drawn decide the prompt's length: check the longest draw, so that a length either fits every
    # seed or none (a length checked on one seed must not fail on another, mid-training).
    longest = sorted(DOOR_NAMES, key=len)[-num_needles:]
    key = b"0" * 5
    minimum = (len(TASK_DESCRIPTION) + sum(len(_door_needle(n.encode(), key)) for n in longest)
               + len(_door_question(longest[-1].encode())) + len(key))
    _check("multi_needle", context_len, depth, minimum)
    rng = _rng(seed)
    names = [DOOR_NAMES[i].encode() for i in rng.choice(len(DOOR_NAMES), num_needles, replace=False)]
    keys = [b"%d" % k for k in rng.choice(np.arange(10_000, 100_000), num_needles, replace=False)]
    depths = [depth] + [float(d) for d in rng.uniform(0.0, 1.0, num_needles - 1)]
    needles = [(d, _door_needle(n, k)) for d, n, k in zip(depths, names, keys)]
    return _haystack("multi_needle", context_len, TASK_DESCRIPTION, needles, _door_question(names[0]), keys[0])


_RECALL_PREFIX = b"Below is a list of key:value pairs. Remember them.\n"
_PAIR_LEN = len(b"abcd:1234 ")


def assoc_recall(context_len: int, depth: float, seed=0) -> TaskExample:
    """Associative recall over random 4-letter keys with 4-digit values; the queried pair is at `depth` in the list."""
    question_len = len(b"\nWhat is the value of abcd? abcd:")
    _check("assoc_recall", context_len, depth, len(_RECALL_PREFIX) + _PAIR_LEN + question_len + 4)
    rng = _rng(seed)
    num_pairs = (context_len - len(_RECALL_PREFIX) - question_len - 4) // _PAIR_LEN
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    codes = rng.choice(26**4, num_pairs, replace=False)  # distinct keys, so the answer is unique
    keys = [letters[[(c // 26**i) % 26 for i in range(4)]].tobytes() for c in codes]
    values = [b"%04d" % v for v in rng.integers(0, 10_000, num_pairs)]
    asked = round(depth * (num_pairs - 1))
    pad = b" " * (context_len - len(_RECALL_PREFIX) - num_pairs * _PAIR_LEN - question_len - 4)
    text = (_RECALL_PREFIX + b"".join(k + b":" + v + b" " for k, v in zip(keys, values)) + pad
            + b"\nWhat is the value of %s? %s:" % (keys[asked], keys[asked]) + values[asked])
    tokens = encode(text.decode("ascii"))
    assert tokens.shape == (context_len,), (tokens.shape, context_len)
    return TaskExample(tokens, context_len - 4, 4)


_COPY_ALPHABET = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz0123456789 ", dtype=np.uint8)


def copy(context_len: int, depth: float, seed=0) -> TaskExample:
    """Filler, a newline, a random string of random length, a newline, the string again.

    The answer is the last ``context_len // 8`` tokens of the second copy (a fixed length, so a batch's answer
    mask is one slice). The string's length is uniform in [answer_len, (context_len - 2) // 2], so the distance
    from an answer token back to its original varies from row to row: only content-based copying (an induction
    head) solves it, not a head that attends a fixed distance back, which a fixed-length copy teaches instead.
    ``depth`` is unused.
    """
    _check("copy", context_len, depth, 32)  # answers of 4 or more: a copy needs some length to be a task
    rng = _rng(seed)
    answer_len = context_len // 8
    n = int(rng.integers(answer_len, (context_len - 2) // 2 + 1))
    string = _COPY_ALPHABET[rng.integers(0, len(_COPY_ALPHABET), n)].tobytes()
    n_filler = context_len - 2 - 2 * n
    filler = (FILLER * (n_filler // len(FILLER) + 1))[:n_filler]
    tokens = encode((filler + b"\n" + string + b"\n" + string).decode("ascii"))
    assert tokens.shape == (context_len,), (tokens.shape, context_len)
    return TaskExample(tokens, context_len - answer_len, answer_len)


TASKS = {"passkey": passkey, "multi_needle": multi_needle, "assoc_recall": assoc_recall, "copy": copy}


def check_length(name: str, context_len: int) -> None:
    """The ValueError of task ``name`` if ``context_len`` tokens cannot hold its prompt; nothing if they can.

    A task's minimum length is the same for every seed and depth (``multi_needle`` checks its longest draw),
    so one probe settles it for a whole run.
    """
    get_task(name)(context_len, 0.5, 0)


def get_task(name: str):
    """The task function called `name` (one of TASKS)."""
    if name not in TASKS:
        raise ValueError(f"task={name!r} is not a known task; use one of {sorted(TASKS)}.")
    return TASKS[name]
