"""Evaluation: bits per byte on held-out text and needle-retrieval grids."""

from lca.eval.perplexity import bits_per_byte, token_nll
from lca.eval.retrieval import RetrievalResults, ReportPaths, retrieval_grid, write_retrieval_report

__all__ = ["bits_per_byte", "token_nll", "retrieval_grid", "write_retrieval_report", "RetrievalResults", "ReportPaths"]
