"""Programs that `test_distribute.py` runs in fresh processes.

TensorFlow's devices and cluster are fixed when it initialises, so each
distributed check runs here, in a process of its own:

    python distributed_programs.py mirrored OUT.json
        two logical CPU devices: FEED steps on one device, then mirrored over
        both at the same global batch; writes per-step logs and weights.
    python distributed_programs.py multi_worker OUT.json MODEL_DIR TEACHER
        one worker of the cluster in TF_CONFIG: a whole pFEED run from the
        teacher file TEACHER with --strategy=multi_worker; writes its final
        student weights.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_feed import FEEDDistiller, data, distribute, experiment  # noqa: E402
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
        distiller.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
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
    }
    with open(out_path, "w") as handle:
        json.dump(results, handle)


def multi_worker(out_path, model_dir, teacher):
    strategy = distribute.make_strategy("multi_worker")
    config = experiment.TrainConfig(
        method="pfeed", dataset="synthetic", model="resnet8", train_examples=64,
        batch_size=GLOBAL_BATCH, epochs=1, teachers=(teacher,),
        learning_rate=0.05, eval_batch_size=64, validation_freq=1, verbose=0, model_dir=model_dir,
        strategy="multi_worker",
    )
    metrics = experiment.run(config, strategy=strategy)
    written = distribute.worker_path(strategy, model_dir)
    student = keras.models.load_model(os.path.join(written, "student.keras"))
    with open(out_path, "w") as handle:
        json.dump(
            {
                "chief": distribute.is_chief(strategy),
                "replicas": strategy.num_replicas_in_sync,
                "wrote_into": written,
                "student_accuracy": metrics["student"]["test_accuracy"],
                "weights": [w.tolist() for w in student.get_weights()],
            },
            handle,
        )


if __name__ == "__main__":
    program, *arguments = sys.argv[1:]
    {"mirrored": mirrored, "multi_worker": multi_worker}[program](*arguments)
