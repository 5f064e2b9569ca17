"""What Keras' trainers lack for FEED, per backend, in one place.

The distiller's loss is written with `keras.ops` and runs in Keras' own
`train_step` and `test_step` on any backend. Under tf.distribute, three
things are left that Keras does not do, each a small function here:

- `replica_share` / `whole_batch`: a loss term computed by hand is this
  replica's share of the global batch's mean (Keras' compiled losses are
  divided by the replicas in sync the same way, and their logs multiplied
  back);
- `after_train_step`: BatchNormalization's moving statistics averaged over
  the replicas after each step (Keras updates each replica from its own slice
  of the batch, so the chief would save statistics of its shard alone);
- `step_logs` and `Trainer._maybe_symbolic_build`: what Keras 3.15 needs
  across workers (scalar logs reduced along axis 0; compiled metrics built
  from one replica's slice of a first batch, which Keras otherwise reduces
  across workers, and cannot).

On other backends each function is the identity.

On JAX, Keras compiles each step with XLA and passes only the trainer's own
variables in: any other variable the step reads (a frozen teacher's weights,
its folded kernels) is a constant of the compiled step.
`Trainer.frozen_weights_read` drops the compiled steps when those values
change, so that the next `fit` or `evaluate` traces them again.
"""

import hashlib

import keras
import numpy as np


def _tensorflow():
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf  # noqa: PLC0415 (TensorFlow only on its backend)

    return tf


def replicas_in_sync():
    """How many replicas share each global batch (1 outside tf.distribute)."""
    tf = _tensorflow()
    return 1 if tf is None else tf.distribute.get_strategy().num_replicas_in_sync


def replica_share(value):
    """`value / replicas`: the share whose sum over replicas is `value`'s mean."""
    replicas = replicas_in_sync()
    return value if replicas == 1 else value * (1.0 / replicas)


def whole_batch(value):
    """The inverse of `replica_share`, for logging a Keras-scaled loss."""
    replicas = replicas_in_sync()
    return value if replicas == 1 else value * float(replicas)


def multi_worker(strategy):
    """Whether the tf.distribute `strategy` spans a cluster of workers (`TF_CONFIG`)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    return resolver is not None and bool(resolver.cluster_spec().as_dict())


def step_logs(logs):
    """A step's logs, shaped for Keras' reduction across workers.

    Across workers Keras (3.15) averages every logged value of a step with
    `strategy.reduce("MEAN", value, axis=0)`, which fails on scalars; a value
    of shape (1,) reduces to the same mean, a scalar. Elsewhere `logs` is
    returned as it is.
    """
    tf = _tensorflow()
    if tf is None or not multi_worker(tf.distribute.get_strategy()):
        return logs
    return {name: tf.reshape(value, [1]) for name, value in logs.items()}


def after_train_step(model, logs):
    """Averages BatchNorm statistics over replicas (tf.distribute); shapes the logs."""
    tf = _tensorflow()
    if tf is not None and tf.distribute.get_strategy().num_replicas_in_sync > 1:
        # Replicas must issue their collectives in one order: this one after
        # the optimizer's (a read of an updated weight orders it).
        with tf.control_dependencies([model.trainable_variables[0].value]):
            average_replica_state(model)
    return step_logs(logs)


def average_replica_state(model):
    """Sets the replicas' float non-trainable variables (BN statistics) to their mean."""
    tf = _tensorflow()
    state = [v for v in model.non_trainable_variables if "float" in str(v.dtype)]
    if state:
        means = tf.distribute.get_replica_context().all_reduce(
            "MEAN", [tf.identity(variable) for variable in state]  # on this replica's device
        )
        for variable, mean in zip(state, means):
            variable.assign(mean)


def first_local_batch(model, iterator):
    """The first batch of a Keras epoch iterator, one replica's slice if distributed.

    What Keras' `_symbolic_build` needs to build compiled metrics and losses
    from shapes alone; no cross-replica (or cross-worker) reduction is made.
    """
    for _, _, batches in iterator:
        batch = batches[0] if isinstance(batches, (list, tuple)) else next(batches)
        break
    tf = _tensorflow()
    local = model.distribute_strategy.experimental_local_results
    first = lambda value: local(value)[0] if isinstance(value, tf.distribute.DistributedValues) else value  # noqa: E731
    return keras.tree.map_structure(first, batch)


def weights_digest(variables):
    """A digest of the values (dtypes, shapes and bytes) of `variables`, in order."""
    digest = hashlib.blake2b(digest_size=16)
    for variable in variables:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(variable))
        digest.update(f"{value.dtype}{value.shape}".encode())
        digest.update(value.reshape(-1).view(np.uint8))  # any dtype, bfloat16 included
    return digest.hexdigest()


class Trainer(keras.Model):
    """Base of keras-feed's trainers: Keras' own steps, plus what is above.

    A subclass writes its loss in `compute_loss` (with `keras.ops`) and sets
    `weight_decay`; the steps, the symbolic build and the logs are Keras'. A
    subclass whose steps read variables it does not track (frozen teachers)
    passes them to `frozen_weights_read` before each `fit` or `evaluate`.
    """

    weight_decay = 0.0
    _frozen_weights_digest = None

    def frozen_weights_read(self, variables):
        """Declares the untracked `variables` the steps read, at their current values.

        On JAX they are constants of the compiled train and test steps: when
        their values differ from those of the last call, `train_function` and
        `test_function` are dropped and Keras traces them again at their next
        use. On other backends (TensorFlow's compiled steps read variables as
        they run) nothing is done, and nothing is read.
        """
        if keras.backend.backend() != "jax":
            return
        digest = weights_digest(variables)
        if digest != self._frozen_weights_digest:
            import jax  # noqa: PLC0415 (JAX only on its backend)

            if self._frozen_weights_digest is not None:
                # JAX caches a trace by the function traced (here Keras' bound
                # `self.train_step`), not by the constants it read: its caches
                # must go too, or a step jitted anew could reuse the old trace.
                jax.clear_caches()
            self._frozen_weights_digest = digest
            self.train_function = self.test_function = None

    def weight_decay_loss(self):
        """Coupled L2 decay as a loss: `weight_decay / 2 * sum ||w||^2` (float32).

        Its gradient adds exactly `weight_decay * w` to each trainable
        variable's, whatever the optimizer, loss scaling or replica count.
        """
        ops = keras.ops
        return 0.5 * self.weight_decay * ops.sum(
            ops.stack([ops.sum(ops.square(ops.cast(v, "float32"))) for v in self.trainable_variables])
        )

    # `*state_and_data`: Keras' JAX trainer passes its state before the data.

    def train_step(self, *state_and_data):
        return after_train_step(self, super().train_step(*state_and_data))

    def test_step(self, *state_and_data):
        return step_logs(super().test_step(*state_and_data))

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # The one override of a private Keras method; tests/test_keras_contract.py
        # fails the day Keras changes what it relies on. On TensorFlow, Keras
        # (3.15) builds compiled metrics here only under a strategy, from a
        # first batch reduced across replicas, which fails across workers.
        # Built here always (from one replica's slice), they exist before
        # `fit`'s callbacks run: a resumed epoch's running metrics can be restored.
        # Only Keras' TensorFlow trainer has and calls this hook; its JAX
        # trainer calls `_symbolic_build` itself, with no strategy involved.
        if _tensorflow() is None:
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        if data_batch is None and iterator is not None:
            data_batch = first_local_batch(self, iterator)
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=data_batch)
