"""`ftune` whose training waits, after a checkpoint, for a signal: the deterministic trigger of the
tests that stop or kill a run part-way (a run that ends before its signal proves nothing).

    FTUNE_TEST_PAUSE_AFTER_SAVE=3 FTUNE_TEST_PAUSED_FILE=/tmp/paused python tests/pausing_train.py train RECIPE ...

runs `ftune train RECIPE ...` (also as a torchrun script). After the first checkpoint at or past
step FTUNE_TEST_PAUSE_AFTER_SAVE, the training waits until the process receives SIGTERM or
SIGINT, which reaches ftune's own handler as usual, and then goes on. Once waiting, it appends
"rank R step N" to FTUNE_TEST_PAUSED_FILE: a test waits for that file, then signals or kills.
FTUNE_TEST_PAUSE_RANK=R makes only that rank wait (the others go on to the next gradient
all-reduce and wait there); without it every rank waits. Rank 0 waits once the checkpoint folder
is in place (it renames it after every rank wrote its part); another rank may wait before that
rename: to kill a run with its checkpoint whole, pause rank 0. After FTUNE_TEST_PAUSE_TIMEOUT
seconds (300) without a signal the run fails, so that a broken test leaves no process behind.

Nothing in ftune knows of this: the wait is a TrainerCallback added here by wrapping
`transformers.Trainer.train`, and the signal goes through whatever handler ftune installed.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from transformers import Trainer, TrainerCallback

AFTER_SAVE = "FTUNE_TEST_PAUSE_AFTER_SAVE"
PAUSED_FILE = "FTUNE_TEST_PAUSED_FILE"
PAUSE_RANK = "FTUNE_TEST_PAUSE_RANK"
TIMEOUT = "FTUNE_TEST_PAUSE_TIMEOUT"
SCRIPT = os.path.abspath(__file__)


class PauseAfterSave(TrainerCallback):
    def __init__(self, step: int, paused_file: str, timeout: float):
        self.step, self.paused_file, self.timeout = step, paused_file, timeout
        self.done = False

    def on_save(self, args, state, control, **kwargs):
        # on_save follows _save_checkpoint, in which rank 0 renames the finished checkpoint into place
        if self.done or state.global_step < self.step:
            return control
        self.done = True
        received: list[int] = []
        previous = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}

        def wake(number, frame):
            received.append(number)
            handler = previous[number]
            if callable(handler):
                handler(number, frame)
            elif handler == signal.SIG_DFL:
                signal.signal(number, signal.SIG_DFL)
                os.kill(os.getpid(), number)

        for number in previous:
            signal.signal(number, wake)
        try:
            rank = os.environ.get("RANK", "0")
            with open(self.paused_file, "a") as marker:  # only now: a signal before this would be lost
                marker.write(f"rank {rank} step {state.global_step}\n")
            deadline = time.monotonic() + self.timeout
            while not received:
                if time.monotonic() > deadline:
                    raise SystemExit(f"pausing_train: no signal {self.timeout:.0f} s after step {state.global_step}")
                time.sleep(0.02)
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
        return control


def install() -> None:
    step = int(os.environ[AFTER_SAVE])
    paused_file = os.environ[PAUSED_FILE]
    only_rank = os.environ.get(PAUSE_RANK)
    timeout = float(os.environ.get(TIMEOUT, "300"))
    if only_rank is not None and os.environ.get("RANK", "0") != only_rank:
        return
    train = Trainer.train

    def train_with_pause(self, *args, **kwargs):
        self.add_callback(PauseAfterSave(step, paused_file, timeout))
        return train(self, *args, **kwargs)

    Trainer.train = train_with_pause


def environment(step: int, paused_file, *, rank: int | None = None) -> dict[str, str]:
    """os.environ plus what makes this script pause after the checkpoint of `step`."""
    env = {**os.environ, AFTER_SAVE: str(step), PAUSED_FILE: str(paused_file)}
    if rank is not None:
        env[PAUSE_RANK] = str(rank)
    return env


def wait_until_paused(paused_file, process, timeout: float = 240) -> str:
    """The marker's text once a rank waits; fails if the process ends first or time runs out."""
    import pytest

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(paused_file):
            return open(paused_file).read()
        if process.poll() is not None:
            pytest.fail(f"the run ended (exit {process.returncode}) before it paused")
        time.sleep(0.05)
    pytest.fail(f"the run did not pause within {timeout:.0f} s")


if __name__ == "__main__":
    install()
    from ftune.cli import main

    sys.argv[0] = "ftune"
    main()
