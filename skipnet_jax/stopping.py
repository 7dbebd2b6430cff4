"""Why and how training stops early: a rejected (non-finite or diverging) step, or a
request to stop (SIGTERM, a preemption notice, Ctrl-C) honoured at a step boundary after a
checkpoint.  The messages name what happened and how to resume."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any

import jax
import numpy as np
from absl import logging


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss or gradient."""


class Preempted(Exception):
    """Training stopped early on request (SIGTERM, preemption notice or Ctrl-C) after saving a
    checkpoint. `interrupted`: the request was Ctrl-C (SIGINT), which the command line reports
    with exit status 130 so a shell script does not carry on as if training had finished."""

    def __init__(self, step: int, *, interrupted: bool = False):
        super().__init__(f"{'interrupted' if interrupted else 'preempted'} at step {step}; checkpoint saved")
        self.step = step
        self.interrupted = interrupted


class PreemptionWatcher:
    """Turns SIGTERM, and Ctrl-C (SIGINT) in a single-process run, into a request to checkpoint
    and stop at the next step boundary.

    A second Ctrl-C stops at once (KeyboardInterrupt; pending saves still finish, see
    `finish_saves_on`). In a multi-process run every process must stop at the same step, so the
    decision comes from orbax/JAX's preemption sync (`reached_preemption`), which agrees on a step
    across hosts; there SIGINT keeps Python's default (a process stopped alone cannot agree on a
    step with the others).
    """

    def __init__(self):
        self._signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def interrupted(self) -> bool:
        return self._signum == signal.SIGINT

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            signals = [signal.SIGTERM] + ([signal.SIGINT] if jax.process_count() == 1 else [])
            self._previous = {signum: signal.signal(signum, self._handle) for signum in signals}
        return self

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        return False

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.interrupted:
            raise KeyboardInterrupt
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        again = " (Ctrl-C again: stop without saving)" if signum == signal.SIGINT else ""
        logging.warning("%s received: saving a checkpoint at the end of this step, then stopping%s.", name, again)
        self._signum = self._signum or signum

    def requested(self, manager, step: int) -> bool:
        if jax.process_count() > 1:
            return bool(manager.reached_preemption(step))
        return self._signum is not None


@contextlib.contextmanager
def finish_saves_on(error_type, manager):
    """On `error_type`, lets pending checkpoint saves complete before it propagates."""
    try:
        yield
    except error_type:
        manager.wait_until_finished()
        raise


def diverged_message(metrics: dict, step: int, max_abs_weight: float) -> str:
    """Why step `step` was rejected: a NaN/Inf, or weights pushed past ``config.max_abs_weight``."""
    loss, grad_norm, weight = (float(metrics[k]) for k in ("loss", "grad_norm", "max_abs_weight"))
    if np.isfinite(loss) and np.isfinite(grad_norm) and np.isfinite(weight):
        what = (
            f"diverging weights at step {step} (the update would make a weight {weight:.3g} in magnitude, "
            f"beyond config.max_abs_weight={max_abs_weight:g}; loss={loss}, grad_norm={grad_norm})"
        )
    else:
        what = f"non-finite loss or gradient at step {step} (loss={loss}, grad_norm={grad_norm})"
    return f"{what}; the weights were not updated"


def how_to_resume(manager) -> str:
    """Names the checkpoint a rerun resumes from (every saved one predates the rejected step)."""
    step = manager.latest_step()
    if step is None:
        return "no checkpoint was saved yet: fix the config (e.g. a lower --config.learning_rate) and rerun"
    path = os.path.join(str(manager.directory), str(step))
    return (
        f"last good checkpoint: {path} (step {step}); rerun the same command with a fix "
        "(e.g. a lower --config.learning_rate) and --allow_changed_config to resume from it"
    )
