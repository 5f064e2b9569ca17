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

`signal_point` lets a test land a signal at an exact point of a run (a step of
a stage, an output file written) through the `KERAS_FEED_SIGNAL_AT`
environment variable, where a signal sent from outside would land wherever the
process happens to be.
"""

import contextlib
import os
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


#: The test hook read by `signal_point`: "<point>=<SIGNAL>", e.g. "student/16=SIGTERM".
SIGNAL_AT = "KERAS_FEED_SIGNAL_AT"

_FIRED = []  # the hook fires once per process


def signal_point(*point):
    """Raises the signal that `KERAS_FEED_SIGNAL_AT` names for `point`, once.

    The variable is "<point>=<SIGNAL>", the point's parts joined by "/". A run
    calls this as each stage begins a step (`"<stage>", step`, steps counted
    from 1 over the whole stage: "student/16=SIGTERM" lands a SIGTERM in step
    16 of the student stage) and as it writes each output file (`"outputs",
    file name`: "outputs/student.keras=SIGKILL" kills the run once the student
    is saved). Unset, or naming another point, it does nothing.
    """
    spec = os.environ.get(SIGNAL_AT)
    if not spec or _FIRED:
        return
    where, _, name = spec.rpartition("=")
    if where != "/".join(str(part) for part in point):
        return
    signum = getattr(signal, name, None)
    if not isinstance(signum, signal.Signals):
        raise ValueError(f"{SIGNAL_AT}={spec}: {name} is not a signal name (e.g. SIGTERM).")
    _FIRED.append(spec)
    signal.raise_signal(signum)
