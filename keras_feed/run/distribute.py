"""keras-feed's devices: strategies by name, sharded input, chief-only outputs.

    strategy = distribute.make_strategy("mirrored")
    runner.run(config, strategy=strategy)   # or keras-feed-train --strategy=mirrored

`--strategy` names where a run trains, on either backend:

- On TensorFlow, a `tf.distribute` strategy (`default`, `mirrored`,
  `multi_worker`, `tpu`).
- On JAX, a `keras.distribution` (`JaxDevices`): `default` is one device and
  `mirrored` is `keras.distribution.DataParallel` over this machine's devices,
  set for the whole run (`run_scope`). `multi_worker` and `tpu` are
  tf.distribute's and are refused there.

Either way a step over R replicas is the step of the global batch on one
device. Under tf.distribute, everything trainable (teachers trained by the
run, the student, the NTLs, the optimizer) is built and compiled inside
`strategy.scope()` by `Experiment`; `FEEDDistiller.train_step` scales its loss
by 1 / replicas and the optimizer sums the replicas' gradients (up to
BatchNormalization, whose batch statistics are per replica unless the model
uses `synchronized=True`). On JAX, Keras' trainer splits each global batch
along its first axis over the devices and XLA computes the step of the whole
batch, BatchNormalization's statistics included.

Input: under tf.distribute, `train_dataset` gives each worker (input
pipeline) its own shard of every global batch, built by
`Data.train(..., shard=...)`: each worker reads, gathers and augments only its
examples, and no example is used twice in an epoch. Within a worker, the
batch is split across its local replicas. On JAX the input is the one
process's pipeline of global batches, which Keras' JAX trainer splits.

Outputs: every worker runs the same program, saving included, but only the
chief's files land in `--model_dir`; the others write into a private twin
folder (`worker_path`), which also holds their own checkpoints so that a
resumed run takes the same decisions on every worker.

Multi-worker runs read the cluster from `TF_CONFIG`, e.g. for the first of
two workers on one machine:

    TF_CONFIG='{"cluster": {"worker": ["127.0.0.1:12345", "127.0.0.1:12346"]},
                "task": {"type": "worker", "index": 0}}' keras-feed-train --strategy=multi_worker ...

TensorFlow is imported only by the functions that use it.
"""

import contextlib
import os

import keras
import numpy as np

from keras_feed.core import trainer

#: Names accepted by `make_strategy` (and `--strategy`).
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")

#: Those that run on the JAX backend.
JAX_STRATEGIES = ("default", "mirrored")


def make_strategy(name="default", *, tpu=None, tpu_zone=None, gcp_project=None):
    """The strategy called `name`, for the backend Keras runs on.

    On TensorFlow, a `tf.distribute.Strategy`; on JAX, a `JaxDevices`.

    Args:
      name: `default` (the current strategy: one device), `mirrored`
        (synchronous replicas on this machine's GPUs, or its CPU),
        `multi_worker` (synchronous replicas on several machines; the cluster
        and this process's task come from `TF_CONFIG`) or `tpu`.
      tpu: for `tpu`, the TPU's name or `grpc://` address (None: from the
        environment, e.g. `local` on a TPU VM).
      tpu_zone, gcp_project: for `tpu`, where to find it on Google Cloud.

    Raises:
      ValueError: on an unknown name, or one the backend cannot run.
    """
    if name not in STRATEGIES:
        raise ValueError(f"Unknown strategy '{name}'; choose from {', '.join(STRATEGIES)}.")
    if keras.backend.backend() == "jax":
        return JaxDevices.named(name)
    import tensorflow as tf  # noqa: PLC0415 (tf.distribute only on its backend)

    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
        tpu=tpu, zone=tpu_zone, project=gcp_project
    )
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


class JaxDevices:
    """`--strategy` on JAX: the devices of a run, through `keras.distribution`.

    `mirrored` is `keras.distribution.DataParallel` over this machine's devices
    (`keras.distribution.list_devices()`): every variable is replicated on
    each device, and Keras' JAX trainer splits every batch along its first
    axis, one slice per device. `default` is one device and no distribution.
    One process: `jax.distributed`'s multi-process runs are not offered.

    It has what a run takes of a `tf.distribute.Strategy`: `scope()` (the
    distribution set inside, as `keras.distribution.set_distribution` does)
    and `num_replicas_in_sync`; `run_scope` enters it for the whole run.

    Attributes:
      name: the strategy's name (`JAX_STRATEGIES`).
      devices: the devices used, as Keras names them (`"gpu:0"`).
      distribution: the `keras.distribution.Distribution`, or None (`default`).
    """

    cluster_resolver = None  # one process, the chief

    def __init__(self, name, devices, distribution=None):
        self.name = name
        self.devices = list(devices)
        self.distribution = distribution

    @classmethod
    def named(cls, name):
        """The devices of strategy `name` (one of `JAX_STRATEGIES`) on this machine."""
        if name not in JAX_STRATEGIES:
            raise ValueError(
                f"--strategy={name} is a tf.distribute strategy, which the JAX backend does not "
                f"run: on JAX use --strategy=mirrored (this machine's GPUs or TPU cores, else its "
                f"CPU) or default (one device), or run with KERAS_BACKEND=tensorflow for {name}."
            )
        _keep_tensorflow_off_accelerators()
        devices = keras.distribution.list_devices()
        if name == "default":
            return cls(name, devices[:1])
        return cls(name, devices, keras.distribution.DataParallel(devices=devices))

    @property
    def num_replicas_in_sync(self):
        return len(self.devices)

    def scope(self):
        if self.distribution is None:
            return contextlib.nullcontext()
        return self.distribution.scope()


def _keep_tensorflow_off_accelerators():
    """Hides the GPUs from TensorFlow, which only feeds JAX (tf.data, on the CPU).

    TensorFlow would otherwise reserve most of every GPU's memory when its
    runtime starts. Nothing is done once the runtime has started, or without
    TensorFlow.
    """
    try:
        import tensorflow as tf  # noqa: PLC0415 (the input pipeline's, on JAX)
    except ImportError:
        return
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TensorFlow's runtime is already up: its devices are fixed
        pass


def _splits_batches(strategy):
    """Whether `strategy` is a `JaxDevices` that splits each batch over devices."""
    return isinstance(strategy, JaxDevices) and strategy.num_replicas_in_sync > 1


def compiles_steps(strategy):
    """Whether every step under `strategy` is compiled with XLA, whatever `--jit_compile` says.

    On JAX's devices: uncompiled, Keras' JAX trainer runs a step op by op,
    each op a computation of its own over the devices, slowly, and XLA's CPU
    collectives can stall between such computations until a rendezvous
    timeout aborts the process; compiled, a step is one computation.
    """
    return _splits_batches(strategy)


def run_scope(strategy):
    """The context a whole run under `strategy` is inside.

    On JAX, `strategy.scope()`: every variable the run creates (models,
    optimizer, metrics) is laid out on the devices, and every `fit`,
    `evaluate` and `predict` splits its batches over them. Under tf.distribute,
    nothing: `Experiment` enters `strategy.scope()` where it builds.
    """
    if isinstance(strategy, JaxDevices):
        return strategy.scope()
    return contextlib.nullcontext()


def device_names(strategy):
    """This process's devices under `strategy`, named as Keras names them (`"gpu:0"`)."""
    if isinstance(strategy, JaxDevices):
        return list(strategy.devices)
    try:
        devices = strategy.extended.worker_devices
    except RuntimeError:  # the default strategy: where TensorFlow places ops
        import tensorflow as tf  # noqa: PLC0415

        logical = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        devices = [logical[0].name]
    # "/job:localhost/replica:0/task:0/device:GPU:0" -> "gpu:0"
    return [device.rsplit("device:", 1)[-1].lower() for device in devices]


def describe_devices(strategy, name, batch_size):
    """What a plan says of the devices: one line, e.g.

    `devices: mirrored over 2 CPU devices (cpu:0, cpu:1), global batch 64 = 32 per device`
    """
    if isinstance(strategy, JaxDevices):
        name = strategy.name
    devices = device_names(strategy)
    kinds = sorted({device.split(":")[0].upper() for device in devices})
    kind = "/".join(kinds)
    listed = ", ".join(devices)
    replicas = strategy.num_replicas_in_sync
    if replicas == 1:
        return f"devices: {name}, one {kind} device ({listed}), batch {batch_size}"
    if replicas == len(devices):
        where = f"{replicas} {kind} devices ({listed})"
    else:  # several workers
        where = f"{replicas} replicas, {len(devices)} {kind} device(s) in this process ({listed})"
    return f"devices: {name} over {where}, global batch {batch_size} = {batch_size // replicas} per device"


def _task(strategy):
    """`(task_type, task_id)` of this process in a cluster, or None outside one."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return None
    return resolver.task_type, resolver.task_id


def is_chief(strategy):
    """Whether this process writes the run's outputs: `chief`, else `worker` 0."""
    task = _task(strategy)
    if task is None or task[0] == "chief":
        return True
    jobs = strategy.cluster_resolver.cluster_spec().jobs
    return task == ("worker", 0) and "chief" not in jobs


def worker_path(strategy, path):
    """Where this process writes the folder `path`.

    The chief writes `path` itself; any other worker writes `<path>.<type><id>`
    (e.g. `runs/feed.worker1`), a private twin it keeps like the chief keeps
    `path`, so that a rerun reuses and resumes the same things on every worker.
    """
    if path is None or is_chief(strategy):
        return path
    task_type, task_id = _task(strategy)
    return f"{os.path.normpath(path)}.{task_type}{task_id}"


def check_batch_size(strategy, batch_size):
    """Raises `ValueError` unless the global batch splits evenly over the replicas."""
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        what = "devices" if isinstance(strategy, JaxDevices) else "replicas in sync"
        raise ValueError(
            f"--batch_size={batch_size} is the global batch: it must be a multiple "
            f"of the {replicas} {what}."
        )


def check_evaluation_split(strategy, split, examples):
    """Raises `ValueError` unless `fit` can validate on `split` under `strategy`.

    On JAX over several devices every batch `evaluate` gets is split over
    them, the last, partial one included: the split's size must be a multiple
    of the devices (its other batches are, `evaluation_batch_size`).
    Predictions need no such thing: `predict` pads.
    """
    if _splits_batches(strategy) and examples % strategy.num_replicas_in_sync:
        devices = strategy.num_replicas_in_sync
        raise ValueError(
            f"--validation_freq evaluates on the {split} split during training, and its "
            f"{examples} examples do not split evenly over the {devices} devices of "
            f"--strategy={strategy.name} on JAX: use --validation_freq=0 (every model is "
            f"still scored on it after training) or a split of a multiple of {devices} examples."
        )


def train_dataset(strategy, data, batch_size, **train_args):
    """`data.train(batch_size, **train_args)` as `fit` takes it under `strategy`.

    One replica, or JAX's devices: the pipeline itself (Keras' JAX trainer
    splits each global batch over the devices). Otherwise a distributed
    dataset whose input pipeline `i` of `n` (one per worker) yields shard
    `(n, i)` of every global batch, split into one slice per local replica:
    the replicas of a step together see exactly the examples of the unsharded
    batch.
    """
    if strategy.num_replicas_in_sync == 1:
        return data.train(batch_size, **train_args)
    check_batch_size(strategy, batch_size)
    if isinstance(strategy, JaxDevices):  # Keras' JAX trainer splits each global batch
        return data.train(batch_size, **train_args)

    def worker_dataset(context):
        shard = (context.num_input_pipelines, context.input_pipeline_id)
        dataset = data.train(batch_size, shard=shard, **train_args)
        per_replica = context.get_per_replica_batch_size(batch_size)
        if per_replica * context.num_input_pipelines != batch_size:
            dataset = dataset.rebatch(per_replica)  # one slice per local replica
        return dataset

    return strategy.distribute_datasets_from_function(worker_dataset)


def evaluation_batch_size(strategy, batch_size):
    """The batch size `evaluate` takes under `strategy`: `batch_size`, except on
    JAX's devices, rounded down to a multiple of them (at least one each), so
    that every batch of a split but the last splits evenly over them
    (`check_evaluation_split` checks the last one)."""
    if not _splits_batches(strategy):
        return batch_size
    devices = strategy.num_replicas_in_sync
    return max(devices, batch_size // devices * devices)


def evaluation_dataset(strategy, dataset):
    """`dataset` for `evaluate`/validation under `strategy`.

    Across workers, each one evaluates the whole split (no sharding): every
    worker runs the same number of steps, and the logged means are unchanged
    by the replicas' summed totals and counts.
    """
    if not trainer.multi_worker(strategy):
        return dataset
    import tensorflow as tf  # noqa: PLC0415

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return dataset.with_options(options)


def predict(strategy, model, dataset):
    """`model`'s outputs on every batch of `dataset` (images alone), concatenated.

    Across workers each one computes all of them itself, outside the strategy's
    collectives, so every worker gets the same full array. On JAX's devices,
    a batch that does not split evenly over them is padded with zeros, and
    the padding's outputs dropped.
    """
    if _splits_batches(strategy):
        return _padded_predict(model, dataset, strategy.num_replicas_in_sync)
    if not trainer.multi_worker(strategy):
        return model.predict(dataset, verbose=0)
    import tensorflow as tf  # noqa: PLC0415

    forward = tf.function(lambda images: model(images, training=False))
    return tf.concat([forward(images) for images in dataset], axis=0).numpy()


def _padded_predict(model, dataset, devices):
    """`model.predict` over `dataset`, each batch padded to a multiple of `devices`."""
    outputs = []
    for images in dataset.as_numpy_iterator():
        count = len(images)
        padding = np.zeros((-count % devices, *images.shape[1:]), images.dtype)
        padded = np.concatenate([images, padding])
        outputs.append(model.predict(padded, batch_size=len(padded), verbose=0)[:count])
    return np.concatenate(outputs)
