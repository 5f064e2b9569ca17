"""keras-feed-train: train a student with FEED (or a baseline) from the command line.

    keras-feed-train --flagfile=flags/quickstart.cfg
    keras-feed-train --method=pfeed --dataset=cifar100 --model=resnet56 \\
        --num_teachers=2 --model_dir=runs/r56

Every flag can live in a flagfile (`--flagfile=...`, one `--name=value` a line).
Bad flags, data or teacher files stop the run with one error line before
anything is trained or written.
"""

import sys

from absl import flags

from keras_feed.cli import common

FLAGS = flags.FLAGS


def define_flags():
    """Defines one flag per `TrainConfig` field, with its help, range and choices."""
    common.define_config_flags()


def config_from_flags():
    """The `TrainConfig` that the parsed flags describe."""
    from keras_feed.run import config

    return config.from_values({spec.name: FLAGS[spec.name].value for spec in config.flag_specs()})


def main():
    from keras_feed.run import runner

    metrics = runner.run(config_from_flags())
    if "plan" in metrics:
        return
    from keras_feed.run import summary

    print("\n".join(summary.table(metrics)))
    print(f"Outputs in {FLAGS.model_dir} (summary.png: the table above as a chart)")


def interrupted():
    """Where a run stopped by Ctrl-C or SIGTERM stood.

    `checkpointing.interruption_message`: the stage and step, and the
    checkpoint that a rerun of the same command resumes from.
    """
    checkpointing = sys.modules.get("keras_feed.run.checkpointing")
    if checkpointing is None:  # stopped while starting up
        return "interrupted before training began; run the same command again to resume"
    return checkpointing.interruption_message()


def run():
    define_flags()
    common.run("keras-feed-train", main, interrupted)


if __name__ == "__main__":
    run()
