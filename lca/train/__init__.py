"""Training: optimizer, sharded train step, loop, checkpoints, metrics, evaluation."""

from lca.train.loop import train


def main(cfg) -> dict:
    """Train the run ``cfg`` (an ``lca.config.Config``) describes; what ``lca-train`` calls."""
    return train(cfg)


__all__ = ["main", "train"]
