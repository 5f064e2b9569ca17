"""Progress lines for the person watching a run: `say`.

The bottom of the run layer: every stage, method and command reports through
`say`, and the command-line tools choose where the lines go (`configure`).
"""

import sys

_SETTINGS = {"stream": None, "prefix": "[keras-feed] ", "quiet": False}


def configure(*, stream=None, prefix=None, quiet=None):
    """Where `say` writes (default: standard error), its prefix, and whether it is silent."""
    if stream is not None:
        _SETTINGS["stream"] = stream
    if prefix is not None:
        _SETTINGS["prefix"] = prefix
    if quiet is not None:
        _SETTINGS["quiet"] = bool(quiet)


def say(message, *args):
    """One progress line, `message % args`, flushed at once."""
    if _SETTINGS["quiet"]:
        return
    stream = _SETTINGS["stream"] or sys.stderr
    print(_SETTINGS["prefix"] + (message % args if args else message), file=stream, flush=True)
