import numpy as np

from lca.data.tokenizer import EOS_ID, PAD_ID, VOCAB_SIZE, decode, encode


def test_round_trip_unicode():
    text = "def f(x):\n    return 'héllo wörld ✓ 日本'\n"
    ids = encode(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text.encode("utf-8")),)
    assert ids.max() < 256
    assert decode(ids) == text


def test_specials_ignored_and_eos():
    ids = encode("ab", add_eos=True)
    assert ids.tolist() == [97, 98, EOS_ID]
    assert decode([PAD_ID, 97, EOS_ID, 98, PAD_ID]) == "ab"
    assert VOCAB_SIZE == 258 and {PAD_ID, EOS_ID} == {256, 257}


def test_bad_utf8_replaced():
    assert decode([0xFF, 97]) == "\ufffda"
