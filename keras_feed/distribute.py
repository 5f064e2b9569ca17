"""keras-feed on tf.distribute: strategies by name, sharded input, chief-only outputs.

    strategy = distribute.make_strategy("mirrored")
    experiment.run(config, strategy=strategy)   # or keras-feed-train --strategy=mirrored

Everything trainable (teachers trained by the run, the student, the NTLs, the
optimizer) is built and compiled inside `strategy.scope()` by `Experiment`;
`FEEDDistiller.train_step` scales its loss by 1 / replicas and the optimizer
sums the replicas' gradients, so a step over R replicas is the step of the
global batch on one device (up to BatchNormalization, whose batch statistics
are per replica unless the model uses `synchronized=True`).

Input: `train_dataset` gives each worker (input pipeline) its own shard of
every global batch, built by `Data.train(..., shard=...)`: each worker reads,
gathers and augments only its examples, and no example is used twice in an
epoch. Within a worker, the batch is split across its local replicas.

Outputs: every worker runs the same program, saving included, but only the
chief's files land in `--model_dir`; the others write into a private twin
folder (`worker_path`), which also holds their own checkpoints so that a
resumed run takes the same decisions on every worker.

Multi-worker runs read the cluster from `TF_CONFIG`, e.g. for the first of
two workers on one machine:

    TF_CONFIG='{"cluster": {"worker": ["127.0.0.1:12345", "127.0.0.1:12346"]},
                "task": {"type": "worker", "index": 0}}' keras-feed-train --strategy=multi_worker ...
"""

import os

import tensorflow as tf

#: Names accepted by `make_strategy` (and `--strategy`).
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")


def make_strategy(name="default", *, tpu=None, tpu_zone=None, gcp_project=None):
    """The `tf.distribute.Strategy` called `name`.

    Args:
      name: `default` (the current strategy: one device), `mirrored`
        (synchronous replicas on this machine's GPUs, or its CPU),
        `multi_worker` (synchronous replicas on several machines; the cluster
        and this process's task come from `TF_CONFIG`) or `tpu`.
      tpu: for `tpu`, the TPU's name or `grpc://` address (None: from the
        environment, e.g. `local` on a TPU VM).
      tpu_zone, gcp_project: for `tpu`, where to find it on Google Cloud.

    Raises:
      ValueError: on an unknown name.
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
            tpu=tpu, zone=tpu_zone, project=gcp_project
        )
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(f"Unknown strategy '{name}'; choose from {', '.join(STRATEGIES)}.")


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
        raise ValueError(
            f"--batch_size={batch_size} is the global batch: it must be a multiple "
            f"of the {replicas} replicas in sync."
        )


def train_dataset(strategy, data, batch_size, **train_args):
    """`data.train(batch_size, **train_args)` as `fit` takes it under `strategy`.

    One replica: the pipeline itself. Otherwise a distributed dataset whose
    input pipeline `i` of `n` (one per worker) yields shard `(n, i)` of every
    global batch, split into one slice per local replica: the replicas of a
    step together see exactly the examples of the unsharded batch.
    """
    if strategy.num_replicas_in_sync == 1:
        return data.train(batch_size, **train_args)
    check_batch_size(strategy, batch_size)

    def worker_dataset(context):
        shard = (context.num_input_pipelines, context.input_pipeline_id)
        dataset = data.train(batch_size, shard=shard, **train_args)
        per_replica = context.get_per_replica_batch_size(batch_size)
        if per_replica * context.num_input_pipelines != batch_size:
            dataset = dataset.rebatch(per_replica)  # one slice per local replica
        return dataset

    return strategy.distribute_datasets_from_function(worker_dataset)


def _multi_worker(strategy):
    return _task(strategy) is not None


def evaluation_dataset(strategy, dataset):
    """`dataset` for `evaluate`/validation under `strategy`.

    Across workers, each one evaluates the whole split (no sharding): every
    worker runs the same number of steps, and the logged means are unchanged
    by the replicas' summed totals and counts.
    """
    if not _multi_worker(strategy):
        return dataset
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return dataset.with_options(options)


def predict(strategy, model, dataset):
    """`model`'s outputs on every batch of `dataset` (images alone), concatenated.

    Across workers each one computes all of them itself, outside the strategy's
    collectives, so every worker gets the same full array.
    """
    if not _multi_worker(strategy):
        return model.predict(dataset, verbose=0)
    forward = tf.function(lambda images: model(images, training=False))
    return tf.concat([forward(images) for images in dataset], axis=0).numpy()
