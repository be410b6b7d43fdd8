"""Stopping cleanly on SIGTERM or SIGINT (spot instances, cluster schedulers, Ctrl+C).

The first signal only sets a flag. After every optimizer step the processes agree on it (a signal
may reach one process only, so with several processes the flags are summed by an all-reduce of one
number), and if any process was signalled, all of them write a checkpoint at that same step the
normal atomic way and the run ends with `Interrupted` (exit status 143 = 128 + SIGTERM, whichever
signal it was). A second signal, e.g. because the grace period ran out while saving, ends the
process at once; the checkpoint being written is only a hidden `.checkpoint-N.partial` folder then,
and earlier checkpoints are never touched.
"""

from __future__ import annotations

import logging
import os
import signal

import torch

logger = logging.getLogger("sdft")

EXIT_INTERRUPTED = 128 + signal.SIGTERM    # 143, what schedulers report for a job ended by SIGTERM
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    """The run stopped on a signal after writing a checkpoint."""

    exit_code = EXIT_INTERRUPTED


class StopRequest:
    """Install with `install()`, check with `agreed()` once per optimizer step, `restore()` at the end."""

    def __init__(self):
        self.signal_number: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "StopRequest":
        for number in SIGNALS:
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number: int, frame) -> None:
        if self.signal_number is not None:
            # Second signal: stop now. Only the hidden .partial folder of a save in progress is left.
            _say(f"Second signal ({signal.Signals(number).name}): exiting at once; checkpoints written before "
                 "are intact.")
            os._exit(128 + number)
        self.signal_number = number
        _say(f"Received {signal.Signals(number).name}: finishing this optimizer step, then saving a checkpoint "
             "(send it again to exit at once).")

    def agreed(self, accelerator) -> bool:
        """Whether any process was signalled; every process must call this at the same step."""
        requested = self.signal_number is not None
        if accelerator.num_processes == 1:
            return requested
        flag = torch.tensor([1.0 if requested else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def _say(message: str) -> None:
    # os.write, not print: a handler may interrupt a print in progress, and buffered streams refuse re-entry.
    os.write(2, (message + "\n").encode())


def stop_if_requested(stop: StopRequest | None, accelerator, checkpointer, position, saved: bool) -> None:
    """After an optimizer step: if a stop was requested anywhere, checkpoint (unless this step was
    just saved) and raise Interrupted on every process."""
    if stop is None or not stop.agreed(accelerator):
        return
    path = checkpointer.output_dir / f"checkpoint-{position.global_step}"
    if not saved:
        path = checkpointer.save(position)
    accelerator.end_training()
    raise Interrupted(f"Interrupted by a signal at step {position.global_step}; saved {path}. Continue with the "
                      "same command and --resume_from_checkpoint latest.")
