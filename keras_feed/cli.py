"""What the command-line tools share: quiet start-up and one-line errors."""

import os
import sys

# Before TensorFlow loads: keep its C++ start-up chatter out of the console.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def fail(program, error):
    """Prints `<program>: error: <message on one line>` on stderr and exits with 1."""
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"{program}: error: {message}", file=sys.stderr)
    sys.exit(1)


def main_with_errors(program, body):
    """Runs `body()`; a `ValueError` or `OSError` becomes one line and exit 1."""
    try:
        return body()
    except (ValueError, OSError) as error:
        fail(program, error)


def flags_parser(program):
    """An `absl.app.run` flags parser whose errors are one line and exit 1.

    (absl's own prints a "FATAL" line and a hint line.) Bad flag names, values,
    unreadable flagfiles and stray positional arguments are reported this way.
    """

    def parse(argv):
        from absl import flags

        try:
            remaining = flags.FLAGS(argv)
        except flags.Error as error:
            fail(program, error)
        if len(remaining) > 1:
            fail(program, f"Unexpected arguments: {' '.join(remaining[1:])}")
        return remaining

    return parse
