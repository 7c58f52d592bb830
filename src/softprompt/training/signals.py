"""Ctrl-C and SIGTERM during training: stop at the next step boundary, after saving the latest state.

While `stop_at_step_boundary_on_signals` is active, SIGINT (Ctrl-C) or SIGTERM (what `kill`, systemd
and job schedulers send) only sets a flag; the training loop asks `stop_requested` before each
optimizer step, saves the latest state there and raises `TrainingInterrupted`, so ``--resume``
continues exactly. A second signal acts at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

from softprompt.training import distributed

_STOP = threading.Event()
# What each signal does when nobody handles it: KeyboardInterrupt (Python's SIGINT handler), or the end.
_DEFAULTS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training after the latest state was saved; the message says where."""


def stop_requested() -> bool:
    """Whether a signal asked the running loop to save and stop (see the module docstring)."""
    return _STOP.is_set()


def _ours(sig: signal.Signals) -> bool:
    """Whether the loop may take over ``sig``: it has its default action, or it is SIGINT and ignored.

    A shell without job control (a script, ``sh -c``, a CI step) starts a background command
    (``softprompt train ... &``, with or without ``nohup``) with SIGINT ignored, and Python keeps an
    inherited ignore. That is no choice of the user's, who still expects ``kill -INT`` to save and stop.
    An ignored SIGTERM or a handler set in Python is someone else's choice and stays.
    """
    handler = signal.getsignal(sig)
    return handler is _DEFAULTS[sig] or (sig == signal.SIGINT and handler is signal.SIG_IGN)


@contextlib.contextmanager
def stop_at_step_boundary_on_signals() -> Iterator[None]:
    """Within this block SIGINT and SIGTERM set the stop flag (in the main thread of a single process).

    The first signal puts the default action back, so a second one acts at once; on leaving, each
    signal gets back the handler it had. Signals someone else already handles are left alone.
    """
    if threading.current_thread() is not threading.main_thread() or distributed.launched_world_size() > 1:
        yield  # not ours to change: another thread, or several processes
        return
    previous = {sig: signal.getsignal(sig) for sig in _DEFAULTS if _ours(sig)}

    def on_signal(signum, frame):
        _STOP.set()
        signal.signal(signum, _DEFAULTS[signum])

    _STOP.clear()
    for sig in previous:
        signal.signal(sig, on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _STOP.clear()


__all__ = ["TrainingInterrupted", "stop_at_step_boundary_on_signals", "stop_requested"]
