"""Ctrl-C and SIGTERM, taken at a safe point of a training loop.

A Python signal handler runs between two bytecodes of the main thread, and
raising from it there can land inside a TensorFlow call that is converting or
running tensors, which is not written to unwind from an exception at any
point. So while a loop runs under `deferred()`, the first Ctrl-C or SIGTERM
is only recorded, and the loop raises it at its next batch boundary
(`check()`, called by `checkpointing.StageCheckpoint` after each step, which
first saves a checkpoint there, so a rerun loses no step). A
second signal before that raises at once: a user who presses Ctrl-C twice
wants out. Outside `deferred()` a signal raises where it lands, as Python's
own Ctrl-C does.

SIGTERM raises `Terminated`, a `BaseException` like `KeyboardInterrupt`, so
that no `except Exception` on the way swallows it.
"""

import contextlib
import signal
import threading


class Terminated(BaseException):
    """Raised in the main thread by SIGTERM, as `KeyboardInterrupt` is by Ctrl-C."""


_EXCEPTIONS = {signal.SIGINT: KeyboardInterrupt, signal.SIGTERM: Terminated}

#: How many `deferred()` blocks are open, and the signal waiting for `check()`.
_STATE = {"depth": 0, "pending": None}


def _handle(signum, frame):
    del frame
    if _STATE["depth"] > 0 and _STATE["pending"] is None:
        _STATE["pending"] = signum  # raised by check() at the next batch boundary
        return
    _STATE["pending"] = None
    raise _EXCEPTIONS[signum]()


@contextlib.contextmanager
def installed():
    """Ctrl-C and SIGTERM raise `KeyboardInterrupt` / `Terminated` (deferred in loops)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _handle) for signum in _EXCEPTIONS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if signal.getsignal(signum) is _handle:
                signal.signal(signum, handler)


@contextlib.contextmanager
def deferred():
    """Signals received inside are raised by `check()`, or on leaving the block."""
    _STATE["depth"] += 1
    try:
        yield
    finally:
        _STATE["depth"] -= 1
    check()


def pending():
    """Whether a Ctrl-C or SIGTERM waits for `check()`."""
    return _STATE["pending"] is not None


def check():
    """Raises the Ctrl-C or SIGTERM that arrived while deferred, if any."""
    signum = _STATE["pending"]
    if signum is not None:
        _STATE["pending"] = None
        raise _EXCEPTIONS[signum]()
