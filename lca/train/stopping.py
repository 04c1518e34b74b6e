"""Why a run stops early: a preemption signal (SIGTERM, Ctrl-C) or a diverged loss.

Both are :class:`RunStopped`, which the launchers print as one line and turn into
the exit code it carries (128 + the signal number after a signal, 1 after a
divergence), so schedulers and shells see a failure without a traceback.
"""

from __future__ import annotations

import logging
import math
import signal
import threading

import jax
import numpy as np

log = logging.getLogger("lca.train")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunStopped(Exception):
    """The run ended before ``train.steps``; ``str(err)`` is the one line to print."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class Diverged(RunStopped):
    def __init__(self, message: str):
        super().__init__(message, exit_code=1)


def check_finite(step: int, metrics: dict, last_saved: str) -> None:
    """Raise :class:`Diverged` if the loss or the gradient norm of ``step`` is not finite."""
    bad = {k: float(metrics[k]) for k in ("loss", "grad_norm") if k in metrics and not math.isfinite(metrics[k])}
    if bad:
        shown = ", ".join(f"{k} {v}" for k, v in bad.items())
        raise Diverged(f"training diverged at step {step} ({shown}); nothing from it was saved, {last_saved}; "
                       "lower train.lr or train.clip_norm, or raise train.warmup_steps.")


class StopSignals:
    """While active, SIGTERM and SIGINT ask the run to stop after the current step instead of killing it.

    A second SIGINT interrupts at once (KeyboardInterrupt). In a multi-process run
    every process must stop after the same step: :meth:`agreed` is a collective
    that all of them call at the same steps.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python only lets the main thread set handlers
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum
            log.warning("got %s: stopping after the current step and saving a checkpoint", signal.Signals(signum).name)

    def agreed(self) -> int | None:
        """The signal any process got (collective in a multi-process run), or None to go on."""
        if jax.process_count() == 1:
            return self.signum
        from jax.experimental import multihost_utils

        got = multihost_utils.process_allgather(np.asarray(self.signum or 0, np.int32))
        return int(np.max(got)) or None

    @staticmethod
    def describe(signum: int) -> str:
        return signal.Signals(signum).name
