"""The attention combinations the model tests run: (local implementation, sequence strategy).

Every local implementation without a split, and every sequence strategy over blockwise;
pallas only where its module imports.
"""

from lca.attention.impl import get_impl


def _pallas_imports() -> bool:
    try:
        get_impl("pallas")
    except (ImportError, ValueError):
        return False
    return True


_CASES = {
    "reference": ("reference", "none"),
    "xla": ("xla", "none"),
    "blockwise": ("blockwise", "none"),
    "ring": ("blockwise", "ring"),
    "ulysses": ("blockwise", "ulysses"),
    "usp": ("blockwise", "usp"),
    "pallas": ("pallas", "none"),
}
CASES = {name: case for name, case in _CASES.items() if name != "pallas" or _pallas_imports()}


def overrides(name: str) -> list[str]:
    """The config overrides that select case ``name``."""
    impl, sequence = CASES[name]
    return [f"model.attention.impl={impl}", f"model.attention.sequence={sequence}"]
