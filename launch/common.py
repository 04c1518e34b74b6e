"""What both launchers share: logging setup and turning config errors into one line."""

from __future__ import annotations

import logging
import sys
from typing import Callable

from lca.config import ConfigError


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_cli(prog: str, body: Callable[[], object]) -> int:
    """Run ``body``; a ConfigError becomes ``prog: error: ...`` on stderr and exit code 2."""
    try:
        body()
    except ConfigError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return 0
