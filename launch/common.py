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
    """Run ``body``; what the user can act on becomes one line on stderr and an exit code.

    A ConfigError (the run could not start; nothing was written) is ``prog: error: ...``
    and exit code 2. A run that stopped early (a signal, a diverged loss) is
    ``prog: ...`` with the exit code it carries (128 + signal number, or 1).
    """
    try:
        body()
    except ConfigError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        from lca.train.stopping import RunStopped  # imported late: it imports JAX, which must start after the config

        if not isinstance(err, RunStopped):
            raise
        print(f"{prog}: {err}", file=sys.stderr)
        return err.exit_code
    return 0
