"""Document sources: deterministic, random-access collections of text files.

A source is a sequence of documents: `len(src)`, `src[i] -> str` (the text) and `src.token_ids(i) -> int32 [n]`
(the byte tokens, read straight from the file without a decode/encode round trip). It is usable directly as a
grain `RandomAccessDataSource` (`grain.MapDataset.source(src)`).

Train/eval hold-out: each file goes to "eval" iff a hash of its path relative to the root falls in the first
`eval_fraction` of the hash range, else to "train". The split depends only on the relative path, so it is the same
on every machine and Python version, and the eval text is disjoint from the training text. `split="all"` keeps
every file.
"""

from __future__ import annotations

import functools
import hashlib
import pathlib
import sysconfig

import numpy as np

SPLITS = ("train", "eval", "all")
_HASH_BUCKETS = 10_000
# Folders under the stdlib path that hold third-party code on some installs (e.g. /usr/local/lib/python3.x/site-packages).
_NOT_STDLIB = {"site-packages", "dist-packages", "__pycache__"}


def in_split(relative_path: str, split: str, eval_fraction: float) -> bool:
    """Whether the file at `relative_path` (posix, relative to the source root) belongs to `split`."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    is_eval = int.from_bytes(digest[:8], "little") % _HASH_BUCKETS < round(eval_fraction * _HASH_BUCKETS)
    return split == "all" or is_eval == (split == "eval")


def _check_split(name: str, split: str, eval_fraction: float) -> None:
    if split not in SPLITS:
        raise ValueError(f"{name}: split={split!r} is not one of {SPLITS}.")
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"{name}: eval_fraction={eval_fraction!r} must be in (0, 1), e.g. 0.05.")


@functools.lru_cache(maxsize=16)
def _list_files(root: pathlib.Path, glob: str, exclude_dirs: frozenset) -> tuple[str, ...]:
    """Relative posix paths of the non-empty files under `root` matching `glob` (cached: walking the stdlib takes ~1 s)."""
    files = []
    for p in root.glob(glob):
        rel = p.relative_to(root)
        if exclude_dirs.intersection(rel.parts[:-1]) or not p.is_file() or p.stat().st_size == 0:
            continue
        files.append(rel.as_posix())
    return tuple(files)


class FileSource:
    """Non-empty files under `root` matching `glob`, sorted by relative path, restricted to `split`."""

    def __init__(self, root, glob: str, *, split: str = "train", eval_fraction: float = 0.05,
                 exclude_dirs=frozenset(), name: str = "FileSource"):
        _check_split(name, split, eval_fraction)
        root = pathlib.Path(root)
        if not root.is_dir():
            raise ValueError(f"{name}: path={str(root)!r} is not a directory; give a folder holding your text files.")
        files = _list_files(root, glob, frozenset(exclude_dirs))
        if not files:
            raise ValueError(f"{name}: no non-empty files match glob={glob!r} under path={str(root)!r}; "
                             "check the path or pass a glob such as '**/*.md'.")
        selected = sorted(f for f in files if in_split(f, split, eval_fraction))
        if not selected:
            # A file's split is fixed by a hash of its path, so only more files (or another fraction) help.
            fraction = "raise" if split == "eval" else "lower"
            raise ValueError(
                f"{name}: the {split!r} split of the {len(files)} file(s) under {str(root)!r} is empty: each file goes "
                f"to 'eval' with probability eval_fraction={eval_fraction} by a hash of its path; add files "
                f"(about {max(2, round(1 / min(eval_fraction, 1 - eval_fraction)))} or more) or {fraction} "
                "eval_fraction (data.eval_fraction).")
        self.root = root
        self.split = split
        self.paths = tuple(selected)

    def __len__(self) -> int:
        return len(self.paths)

    def _read(self, index: int) -> bytes:
        return (self.root / self.paths[index]).read_bytes()

    def __getitem__(self, index: int) -> str:
        return self._read(index).decode("utf-8", errors="replace")

    def token_ids(self, index: int) -> np.ndarray:
        """Byte tokens int32 [file size] of document `index` (no EOS)."""
        return np.frombuffer(self._read(index), dtype=np.uint8).astype(np.int32)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, files={len(self)})"


class StdlibSource(FileSource):
    """The .py files of the running interpreter's standard library: real text present on every machine."""

    def __init__(self, *, split: str = "train", eval_fraction: float = 0.05):
        super().__init__(sysconfig.get_paths()["stdlib"], "**/*.py", split=split, eval_fraction=eval_fraction,
                         exclude_dirs=_NOT_STDLIB, name="StdlibSource")


class TextDirSource(FileSource):
    """The user's own corpus: files under `path` matching `glob` (default every .txt file, recursively)."""

    def __init__(self, path, glob: str = "**/*.txt", *, split: str = "train", eval_fraction: float = 0.05):
        if path is None:
            raise ValueError("TextDirSource: path is None; give the folder of your text files (data.path=/my/corpus).")
        super().__init__(path, glob, split=split, eval_fraction=eval_fraction, name="TextDirSource")
