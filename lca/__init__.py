"""lca: distributed long-context attention for JAX/Flax."""

__version__ = "0.1.0"
