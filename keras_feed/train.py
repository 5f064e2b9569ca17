"""keras-feed-train: train a student with FEED (or a baseline) from the command line.

    keras-feed-train --flagfile=flags/quickstart.cfg
    keras-feed-train --method=pfeed --dataset=cifar100 --model=resnet56 \\
        --num_teachers=2 --model_dir=runs/r56

Every flag can live in a flagfile (`--flagfile=...`, one `--name=value` a line).
Bad flags, data or teacher files stop the run with one error line before
anything is trained or written.
"""

import dataclasses
import sys

from keras_feed import cli
from absl import flags

FLAGS = flags.FLAGS
cli.define_data_flags()
cli.define_unsafe_load_flag()

# What to train.
flags.DEFINE_string("method", "pfeed", "Training method: ce, pfeed, sfeed, kd, ft (pfeed with --kd_weight > 0: FEED + KD).")
flags.DEFINE_string("model", "resnet56", "Student architecture (a keras_feed.models name).")
flags.DEFINE_string("teacher_model", None, "Teacher architecture; default: the student's.")
flags.DEFINE_list("teachers", [], "Comma-separated .keras files of trained teachers; empty: train --num_teachers of them.")
flags.DEFINE_enum("teacher_preprocessing", "auto", ["auto", "dataset", "none"], "What a teacher file (--teachers, or one reused from --teacher_dir) without its own preprocessing layer after its input expects: auto refuses such a file; dataset: images normalised with the dataset's mean and std (every keras-feed 0.1.0 file; the layer is added); none: raw pixels in [0, 255]. A file with the layer is used as it is.")
flags.DEFINE_integer("num_teachers", 2, "Teachers to train when --teachers is empty.")
flags.DEFINE_string("teacher_dir", None, "Where trained teachers are kept and reused; default: <model_dir>/teachers.")
flags.DEFINE_integer("teacher_seed", 100, "Teacher i is trained with seed teacher_seed + i.")
flags.DEFINE_integer("teacher_epochs", None, "Epochs for each teacher; default: --epochs.")
flags.DEFINE_string("student_layer", "features", "Name of the student's feature-map layer.")
flags.DEFINE_string("teacher_layer", "features", "Name of the teachers' feature-map layer.")
flags.DEFINE_bool("translator_batchnorm", False, "BatchNorm inside the NTLs.")

# Data.
flags.DEFINE_integer("train_examples", None, "Train on a seeded subset of this many examples.")
flags.DEFINE_integer("subset_seed", 0, "Seed choosing the --train_examples subset (the same for teachers and student).")

# Recipe.
flags.DEFINE_integer("epochs", 200, "Training epochs of the student.")
flags.DEFINE_integer("batch_size", 128, "Global batch size.")
flags.DEFINE_integer("eval_batch_size", 256, "Batch size for evaluation.")
flags.DEFINE_float("learning_rate", 0.1, "Initial learning rate (SGD).")
flags.DEFINE_enum("lr_schedule", "step", ["step", "cosine"], "Learning-rate schedule.")
flags.DEFINE_list("lr_decay_epochs", [], "Step schedule: epochs at which the rate is multiplied by --lr_decay_factor; default: 50% and 75% of the epochs.")
flags.DEFINE_float("lr_decay_factor", 0.1, "Step schedule: the decay factor.")
flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
flags.DEFINE_bool("nesterov", False, "Nesterov momentum.")
flags.DEFINE_float("weight_decay", 5e-4, "Coupled L2 weight decay (added to the gradients).")
flags.DEFINE_float("beta", 500.0, "Weight of the FEED terms.")
flags.DEFINE_float("kd_weight", 0.0, "Weight of Hinton KD in [0, 1]; cross-entropy gets 1 - kd_weight.")
flags.DEFINE_float("temperature", 4.0, "KD temperature.")
flags.DEFINE_integer("seed", 0, "Seed of the student's initialisation, data order and augmentation.")
flags.DEFINE_integer("validation_freq", 0, "Evaluate on the test split every N epochs during training (0: only at the end).")
flags.DEFINE_bool("jit_compile", False, "Compile the train step with XLA.")
flags.DEFINE_enum("mixed_precision", "float32", ["float32", "mixed_float16", "mixed_bfloat16"], "Keras dtype policy: 16-bit computation with float32 weights and loss terms (float16 with loss scaling).")

# Devices (keras_feed.distribute).
flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker", "tpu"], "tf.distribute strategy: one device, this machine's replicas, several machines (cluster from TF_CONFIG), or a TPU.")
flags.DEFINE_string("tpu", None, "--strategy=tpu: the TPU's name or grpc:// address; default: from the environment.")
flags.DEFINE_string("tpu_zone", None, "--strategy=tpu: the TPU's Google Cloud zone.")
flags.DEFINE_string("gcp_project", None, "--strategy=tpu: the TPU's Google Cloud project.")

# Sequential FEED and Factor Transfer.
flags.DEFINE_integer("generations", 2, "sfeed: born-again generations distilled after generation 0.")
flags.DEFINE_float("ft_rate", 0.5, "ft: paraphrase rate k in (0, 1]; the factor has k * C channels.")
flags.DEFINE_integer("paraphraser_epochs", 10, "ft: epochs of each paraphraser's reconstruction pre-training.")
flags.DEFINE_float("paraphraser_learning_rate", 0.01, "ft: the paraphraser's peak learning rate (same schedule as the student's); its reconstruction loss on raw teacher maps diverges at the student's usual 0.1.")
flags.DEFINE_bool("baseline", False, "Also train a plain cross-entropy student of the same architecture and seed, and report its test accuracy and the gain (metrics.json: baseline, gain).")
flags.DEFINE_bool("dry_run", False, "Validate the flags, build the models and the data spec, print the plan, train nothing.")

# Outputs.
flags.DEFINE_string("model_dir", "runs/feed", "Where the student, export, metrics and logs are written.")
flags.DEFINE_integer("verbose", None, "Keras fit verbosity (0, 1: bar, 2: a line an epoch); default: bar on a terminal.")

# Resuming.
flags.DEFINE_integer("checkpoint_steps", 0, "Also checkpoint every N training steps (0: at the end of each epoch only); rerunning with the same flags resumes from the last checkpoint.")
flags.DEFINE_bool("deterministic", False, "Seeded, deterministic ops: a run killed and resumed ends with the same weights, bit for bit, as an uninterrupted one (slower on some hardware).")


def config_from_flags():
    """The `TrainConfig` that the parsed flags describe."""
    from keras_feed.experiment import TrainConfig

    values = {}
    for field in dataclasses.fields(TrainConfig):
        if field.name not in FLAGS:
            continue
        value = FLAGS[field.name].value
        if field.name == "teachers":
            value = tuple(value)
        elif field.name == "lr_decay_epochs":
            try:
                value = tuple(int(epoch) for epoch in value)
            except ValueError:
                raise ValueError(f"--lr_decay_epochs must be whole numbers, got {','.join(value)}.") from None
        values[field.name] = value
    return TrainConfig(**values)


def main():
    from keras_feed import experiment

    metrics = experiment.run(config_from_flags())
    if "plan" in metrics:
        return
    from keras_feed import summary

    print("\n".join(summary.table(metrics)))
    print(f"Outputs in {FLAGS.model_dir} (summary.png: the table above as a chart)")


def interrupted():
    """Where a run stopped by Ctrl-C or SIGTERM stood (no checkpoint is written then).

    `checkpointing.interruption_message`: the stage and step, and the last
    periodic checkpoint that a rerun of the same command resumes from.
    """
    checkpointing = sys.modules.get("keras_feed.checkpointing")
    if checkpointing is None:  # stopped while starting up
        return "interrupted before training began; run the same command again to resume"
    return checkpointing.interruption_message()


def run():
    cli.run("keras-feed-train", main, interrupted)


if __name__ == "__main__":
    run()
