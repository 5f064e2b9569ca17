"""What the command-line tools share: quiet start-up and one-line errors."""

import os
import sys

# Before TensorFlow loads: keep its C++ start-up chatter out of the console.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main_with_errors(program, body):
    """Runs `body()`; a `ValueError` or `OSError` becomes one line and exit 1."""
    try:
        return body()
    except (ValueError, OSError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{program}: error: {message}", file=sys.stderr)
        sys.exit(1)
