"""What the command-line tools share: quiet start-up, common flags, one-line errors.

Every command (`keras-feed-train`, `-eval`, `-export`, `-analyze`) goes
through `run`: it refuses a Keras backend keras-feed does not run on before
Keras loads, answers `--help` with the command's own flags, and turns bad
flags and failures into one line and exit status 1.
"""

import os
import signal
import sys

from absl import flags as absl_flags

from keras_feed.run import interrupts

# Before TensorFlow loads: keep its C++ start-up chatter out of the console.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The flags the functions below define belong to the command that calls them:
# its `--help` lists them.
absl_flags.disclaim_key_flags()

#: The arguments that ask a command for its help (absl's `--help` and
#: `--helpshort`, their one-dash forms, `-?`, and `-h`).
HELP_ARGUMENTS = ("--help", "-help", "--helpshort", "-helpshort", "-?", "-h")


def fail(program, error):
    """Prints `<program>: error: <message on one line>` on stderr and exits with 1."""
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"{program}: error: {message}", file=sys.stderr)
    sys.exit(1)


#: Exit statuses of a command stopped by Ctrl-C (SIGINT) or SIGTERM: 128 + the signal.
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM


Terminated = interrupts.Terminated  # SIGTERM's exception (see keras_feed.run.interrupts)


def main_with_errors(program, body, interrupted=None):
    """Runs `body()`; a `ValueError` or `OSError` becomes one line and exit 1.

    Ctrl-C and SIGTERM stop it with one line, `<program>: <interrupted()>`
    (default "interrupted"), and exit 130 or 143. Inside a training loop they
    take effect at the next batch boundary (`keras_feed.run.interrupts`).
    """
    try:
        with interrupts.installed():
            return body()
    except (ValueError, OSError) as error:
        fail(program, error)
    except (KeyboardInterrupt, Terminated) as interruption:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it at once
        message = interrupted() if interrupted else "interrupted"
        print(f"{program}: {message}", file=sys.stderr, flush=True)
        sys.exit(EXIT_TERMINATED if isinstance(interruption, Terminated) else EXIT_INTERRUPTED)


def flags_parser(program, module=None):
    """An `absl.app.run` flags parser whose errors are one line and exit 1.

    (absl's own prints a "FATAL" line and a hint line.) Bad flag names, values,
    unreadable flagfiles and stray positional arguments are reported this way.
    With `module` (the command's module name), `--help` (`HELP_ARGUMENTS`)
    prints `command_help(module)` and exits with 0.
    """

    def parse(argv):
        from absl import flags

        if module is not None and help_requested(argv):
            print(command_help(module))
            sys.exit(0)
        try:
            remaining = flags.FLAGS(argv)
        except flags.Error as error:
            fail(program, error)
        if len(remaining) > 1:
            fail(program, f"Unexpected arguments: {' '.join(remaining[1:])}")
        return remaining

    return parse


def help_requested(argv):
    """Whether the command line `argv` (program name first) asks for help."""
    arguments = argv[1:]
    if "--" in arguments:  # what follows is not flags
        arguments = arguments[:arguments.index("--")]
    return any(argument in HELP_ARGUMENTS for argument in arguments)


def command_help(module):
    """A command's help: its module's docstring, then its own flags with their help.

    The flags are those `module` defined, itself or through this module's
    `define_*` functions (absl's own flags are left to `--helpfull`).
    """
    from absl import flags

    doc = (sys.modules[module].__doc__ or "").strip()
    listing = flags.FLAGS.module_help(module).strip("\n")
    lines = [doc, ""] if doc else []
    if listing:
        lines += ["flags:"] + listing.split("\n")[1:] + [""]  # without absl's module header
    lines.append("Any flag can also be written in a --flagfile (one --name=value a line); "
                 "--helpfull also lists absl's own flags.")
    return "\n".join(lines)


def define_config_flags(names=None, flag_values=None):
    """Defines a flag for each `TrainConfig` field (or those in `names`), once.

    The flags are derived from the fields (`keras_feed.run.config.flag_specs`): their
    names, defaults, help (with its range) and choices are the fields'. They go
    into `flag_values` (default: absl's global `FLAGS`); a name defined there
    already is left as it is. On a Keras backend keras-feed does not run on,
    none is defined: reading the choices imports Keras, which may fail there,
    and `run` refuses the command before its flags are parsed.
    """
    from absl import flags

    from keras_feed.run import config

    try:
        config.check_backend()
    except ValueError:
        return
    flag_values = flags.FLAGS if flag_values is None else flag_values

    define = {
        "string": flags.DEFINE_string, "integer": flags.DEFINE_integer,
        "float": flags.DEFINE_float, "bool": flags.DEFINE_bool, "list": flags.DEFINE_list,
    }
    for spec in config.flag_specs(names):
        if spec.name in flag_values:
            continue
        if spec.kind == "enum":
            flags.DEFINE_enum(spec.name, spec.default, list(spec.choices), spec.help,
                              flag_values=flag_values)
        else:
            define[spec.kind](spec.name, spec.default, spec.help, flag_values=flag_values)


def define_data_flags():
    """Defines --dataset, --data_dir and --image_size, named alike by every command."""
    define_config_flags(("dataset", "data_dir", "image_size"))


def define_unsafe_load_flag():
    """Defines --unsafe_load: allow model files that carry code."""
    define_config_flags(("unsafe_load",))


def refuse_unsupported_backend(program):
    """Exits with one line and 1 unless Keras runs on a backend of `config.BACKENDS`.

    Read as Keras reads it (`config.keras_backend`), before Keras loads.
    """
    from keras_feed.run import config

    try:
        config.check_backend()
    except ValueError as error:
        fail(program, error)


def run(program, body, interrupted=None):
    """Runs a command: parses its flags (one-line errors), then `body()` with one-line errors.

    Before anything else, a Keras backend other than `config.BACKENDS`
    (`KERAS_BACKEND`, or keras.json) stops it with one line and exit 1.
    `--help` lists the flags of `body`'s module (`command_help`) and exits
    with 0. `interrupted()`, if given, says where the command stood when
    Ctrl-C or SIGTERM stopped it (see `main_with_errors`).
    """
    from absl import app, logging

    refuse_unsupported_backend(program)

    def main(argv):
        # TensorFlow's Python modules log through absl at INFO (SavedModel
        # export details...); keep the console to what keras-feed says.
        if not flags_given("verbosity", "v"):
            logging.set_verbosity(logging.WARNING)
        return main_with_errors(program, body, interrupted)

    app.run(main, flags_parser=flags_parser(program, body.__module__))


def flags_given(*names):
    """Whether any of the flags `names` was set on the command line."""
    from absl import flags

    return any(name in flags.FLAGS and flags.FLAGS[name].present for name in names)
