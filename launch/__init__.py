"""Command-line entry points: ``lca-train`` and ``lca-eval``."""
