"""The training progress bar: tqdm on a terminal, every step, log lines printed above it, silent off a terminal."""

import io
import logging
import re
import time

import pytest

from lca.train.metrics import ProgressBar


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def console(monkeypatch):
    """Call it in the test body (pytest's capture resets sys.stderr after fixtures run): stderr
    becomes a terminal, with a console log handler on it as the launchers set up."""

    def make():
        terminal = Terminal()
        monkeypatch.setattr("sys.stderr", terminal)
        root = logging.getLogger()
        monkeypatch.setattr(root, "handlers", [logging.StreamHandler(terminal)])
        monkeypatch.setattr(root, "level", root.level)  # restored after the test
        # setLevel, not an attribute write: loggers cache isEnabledFor, and "lca.train" may have cached
        # False for INFO in an earlier test of this worker (root at WARNING), which dropped the log line.
        root.setLevel(logging.INFO)
        return terminal

    return make


def screen_lines(text: str) -> list[str]:
    """What a terminal shows line by line: a carriage return redraws the line from its start."""
    return [line.split("\r")[-1].rstrip() for line in text.split("\n")]


def test_bar_moves_every_step_and_log_lines_stay_whole(console):
    console = console()
    bar = ProgressBar(4, initial=1)  # resumed at step 1
    for step in (2, 3, 4):
        time.sleep(0.11)  # tqdm redraws at most every 0.1 s; a training step takes longer
        bar.update(step, loss=1.2345 if step == 3 else None)
        if step == 2:
            logging.getLogger("lca.train").info("step 2/4 | loss 1.2345")
    bar.close()
    text = console.getvalue()
    for step in (1, 2, 3, 4):
        assert re.search(rf"\b{step}/4\b", text), f"the bar never showed step {step}: {text!r}"
    assert "loss=1.2345" in text
    # The log record is a line of its own: nothing of the bar before or after it.
    assert "step 2/4 | loss 1.2345" in screen_lines(text)
    # After close() logging goes to the console handler again, not through tqdm.
    assert logging.getLogger().handlers[0].stream is console


def test_no_bar_off_a_terminal_or_when_disabled(console):
    console = console()
    pipe = io.StringIO()
    quiet = ProgressBar(3, file=pipe)
    quiet.update(1)
    quiet.close()
    off = ProgressBar(3, enabled=False)
    off.update(1, loss=2.0)
    off.close()
    assert pipe.getvalue() == "" and console.getvalue() == ""
