import pytest

from lca.data.sources import StdlibSource, TextDirSource


def test_stdlib_split_disjoint_and_real_text():
    train, held_out = StdlibSource(split="train"), StdlibSource(split="eval")
    assert len(train) > 100 and len(held_out) > 5
    assert not set(train.paths) & set(held_out.paths)
    assert len(StdlibSource(split="all")) == len(train) + len(held_out)
    assert train.paths == tuple(sorted(train.paths))
    assert "import" in "".join(train[i] for i in range(20))
    assert train.token_ids(0).tolist() == list(train[0].encode("utf-8"))


def test_text_dir(tmp_path):
    for i in range(40):
        (tmp_path / "sub").mkdir(exist_ok=True)
        (tmp_path / "sub" / f"doc{i}.txt").write_text(f"document {i}\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "skip.md").write_text("not matched")
    src = TextDirSource(tmp_path, split="all")
    assert len(src) == 40 and all(p.endswith(".txt") for p in src.paths)
    assert len(TextDirSource(tmp_path, glob="*.md", split="all")) == 1


def test_text_dir_errors(tmp_path):
    with pytest.raises(ValueError, match="path"):
        TextDirSource(tmp_path / "missing")
    with pytest.raises(ValueError, match="glob"):
        TextDirSource(tmp_path)
    with pytest.raises(ValueError, match="split"):
        TextDirSource(tmp_path, split="test")
