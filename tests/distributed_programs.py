"""Programs that `test_distribute.py` runs in fresh processes.

TensorFlow's devices and cluster are fixed when it initialises, so each
distributed check runs here, in a process of its own:

    python distributed_programs.py mirrored OUT.json
        two logical CPU devices: FEED steps on one device, then mirrored over
        both at the same global batch; writes per-step logs and weights, and
        the devices line of a plan.
    python distributed_programs.py multi_worker OUT.json MODEL_DIR TEACHER
        one worker of the cluster in TF_CONFIG: a whole pFEED run from the
        teacher file TEACHER with --strategy=multi_worker; writes its final
        student weights and the images its replica got in the first epoch.
    python distributed_programs.py single_process OUT.json MODEL_DIR TEACHER
        the same run on one device, at the same global batch.
"""

import hashlib
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_feed import (
    FEEDDistiller,  # noqa: E402
    data,  # noqa: E402
    models,  # noqa: E402
)
from keras_feed.run import (
    distribute,  # noqa: E402
    runner,  # noqa: E402
)
from keras_feed.run.config import TrainConfig  # noqa: E402

keras.config.disable_traceback_filtering()
tf.debugging.disable_traceback_filtering()

GLOBAL_BATCH = 16
STEPS = 4


def net(name, *, width, synchronized, seed):
    """Conv-BN-ReLU("features")-pool-dense; the student's BN synchronised over replicas."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(width, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization(synchronized=synchronized)(x)
    x = keras.layers.ReLU(name="features")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x), name=name)


class StepLogs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.steps = []

    def on_train_batch_end(self, batch, logs=None):
        self.steps.append({key: float(value) for key, value in logs.items()})


def feed_steps(strategy, dataset, synchronized=True):
    """Per-step logs and final weights of STEPS FEED steps under `strategy`."""
    with strategy.scope():
        teachers = [net(f"teacher_{i}", width=6 + 2 * i, synchronized=False, seed=10 + i) for i in range(2)]
        student = net("student", width=8, synchronized=synchronized, seed=0)
        keras.utils.set_random_seed(1)  # the NTLs' initialisation
        distiller = FEEDDistiller(student, teachers, beta=20.0, kd_weight=0.3, weight_decay=5e-4)
        distiller.compile(
            optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    logs = StepLogs()
    history = distiller.fit(
        distribute.train_dataset(strategy, dataset, GLOBAL_BATCH),
        epochs=2, steps_per_epoch=STEPS // 2, callbacks=[logs], verbose=0,
    )
    return {
        "steps": logs.steps,
        "epochs": {key: [float(v) for v in values] for key, values in history.history.items()},
        "weights": [w.numpy().tolist() for w in distiller.weights],  # BN statistics too
        "replicas": strategy.num_replicas_in_sync,
        # Largest difference between the replicas' copies of each variable.
        "replica_spread": max(
            float(np.max(np.ptp([v.numpy() for v in strategy.experimental_local_results(w.value)], axis=0)))
            for w in distiller.weights
        ),
    }


def first_replica_batches(strategy, dataset):
    """The images each replica receives in the first step, as NumPy arrays."""
    distributed = iter(distribute.train_dataset(strategy, dataset, GLOBAL_BATCH))
    images, _ = next(distributed)
    return [v.numpy() for v in strategy.experimental_local_results(images)]


def batchnorm_one_step(strategy, dataset):
    """Local BatchNorm after one mirrored step: its statistics, and NumPy's from each shard.

    Each replica normalises its slice with the slice's moments; after the step
    the moving statistics must hold the mean over replicas of what each would
    have on its own: momentum * initial + (1 - momentum) * mean_r(moment_r).
    """
    with strategy.scope():
        teacher = net("teacher_0", width=6, synchronized=False, seed=10)
        student = net("student", width=8, synchronized=False, seed=0)
        keras.utils.set_random_seed(1)
        distiller = FEEDDistiller(student, [teacher], beta=20.0)
        distiller.compile(optimizer=keras.optimizers.SGD(0.05))
    conv, batchnorm = student.layers[1], student.layers[2]
    moments = []
    for images in first_replica_batches(strategy, dataset):
        maps = conv(images).numpy().astype(np.float64)
        moments.append((maps.mean(axis=(0, 1, 2)), maps.var(axis=(0, 1, 2))))
    distiller.fit(distribute.train_dataset(strategy, dataset, GLOBAL_BATCH), epochs=1, steps_per_epoch=1, verbose=0)
    keep = batchnorm.momentum
    expected_mean = (1 - keep) * np.mean([mean for mean, _ in moments], axis=0)
    expected_variance = keep + (1 - keep) * np.mean([variance for _, variance in moments], axis=0)
    replicas = lambda variable: [v.numpy().tolist() for v in strategy.experimental_local_results(variable.value)]  # noqa: E731
    return {
        "expected_mean": expected_mean.tolist(),
        "expected_variance": expected_variance.tolist(),
        "moving_mean": replicas(batchnorm.moving_mean),
        "moving_variance": replicas(batchnorm.moving_variance),
        "shard_means": [mean.tolist() for mean, _ in moments],
    }


def decay_step(strategy, dataset, weight_decay):
    """Trainable weights before and after one plain SGD step (no momentum)."""
    with strategy.scope():
        teacher = net("teacher_0", width=6, synchronized=False, seed=10)
        student = net("student", width=8, synchronized=True, seed=0)
        keras.utils.set_random_seed(1)
        distiller = FEEDDistiller(student, [teacher], beta=20.0, weight_decay=weight_decay)
        distiller.compile(optimizer=keras.optimizers.SGD(0.1), metrics=["accuracy"])
    before = [w.numpy().tolist() for w in distiller.trainable_weights]
    distiller.fit(distribute.train_dataset(strategy, dataset, GLOBAL_BATCH), epochs=1, steps_per_epoch=1, verbose=0)
    return {"before": before, "after": [w.numpy().tolist() for w in distiller.trainable_weights]}


def mirrored(out_path):
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    dataset = data.load("synthetic", train_examples=64, seed=3)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])  # one: collective keys
    results = {
        "one_device": feed_steps(tf.distribute.get_strategy(), dataset),
        "mirrored": feed_steps(strategy, dataset),
        # Per-replica BatchNorm statistics: the replicas must still agree.
        "mirrored_local_batchnorm": feed_steps(strategy, dataset, synchronized=False),
        "batchnorm_one_step": batchnorm_one_step(strategy, dataset),
        "decay": {str(wd): decay_step(strategy, dataset, wd) for wd in (0.0, 0.01)},
        "devices": distribute.describe_devices(strategy, "mirrored", GLOBAL_BATCH),
    }
    with open(out_path, "w") as handle:
        json.dump(results, handle)


@models.register("plain_cnn")
def plain_cnn(input_shape, num_classes):
    """No BatchNormalization: a step split over replicas is the global batch's step."""
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(8, 3, padding="same")(inputs)
    x = keras.layers.ReLU(name="features")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x), name="plain_cnn")


def pfeed_config(model_dir, teacher, strategy_name):
    """The pFEED run both programs below train: BN-free student, resnet8 teacher.

    The teacher file has no preprocessing layer and takes normalised images, as a
    keras-feed 0.1.0 file: the run adds the dataset's normalisation to it.
    """
    return TrainConfig(
        method="pfeed", dataset="synthetic", model="plain_cnn", train_examples=64,
        batch_size=GLOBAL_BATCH, epochs=1, teachers=(teacher,), teacher_preprocessing="dataset",
        beta=20.0, kd_weight=0.3,
        learning_rate=0.05, eval_batch_size=64, validation_freq=1, verbose=0, model_dir=model_dir,
        strategy=strategy_name,
    )


def epoch_images(strategy, config):
    """Fingerprints of the images each local replica gets in the run's first epoch."""
    dataset = data.load(config.dataset, train_examples=config.train_examples, seed=config.seed,
                        subset_seed=config.subset_seed)
    batches = iter(distribute.train_dataset(strategy, dataset, config.batch_size, seed=config.seed))
    steps = dataset.steps_per_epoch(config.batch_size)
    seen = []
    for _ in range(steps):
        images, _ = next(batches)
        for replica in strategy.experimental_local_results(images):
            seen += [hashlib.sha1(image.tobytes()).hexdigest() for image in replica.numpy()]
    return seen


def written_student(strategy, model_dir, metrics):
    written = distribute.worker_path(strategy, model_dir)
    student = keras.models.load_model(os.path.join(written, "student.keras"))
    return {
        "chief": distribute.is_chief(strategy),
        "replicas": strategy.num_replicas_in_sync,
        "wrote_into": written,
        "student_accuracy": metrics["student"]["test_accuracy"],
        "weights": [w.tolist() for w in student.get_weights()],
    }


def multi_worker(out_path, model_dir, teacher):
    strategy = distribute.make_strategy("multi_worker")
    config = pfeed_config(model_dir, teacher, "multi_worker")
    metrics = runner.run(config, strategy=strategy)
    result = written_student(strategy, model_dir, metrics)
    result["epoch_images"] = epoch_images(strategy, config)
    with open(out_path, "w") as handle:
        json.dump(result, handle)


def single_process(out_path, model_dir, teacher):
    """The same run on one device at the same global batch: the reference."""
    strategy = distribute.make_strategy("default")
    config = pfeed_config(model_dir, teacher, "default")
    result = written_student(strategy, model_dir, runner.run(config, strategy=strategy))
    result["epoch_images"] = epoch_images(strategy, config)
    with open(out_path, "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    program, *arguments = sys.argv[1:]
    {"mirrored": mirrored, "multi_worker": multi_worker, "single_process": single_process}[program](*arguments)
