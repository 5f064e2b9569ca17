"""The FEED distiller: a `keras.Model` that trains a student from frozen teachers."""

import keras
import tensorflow as tf

from keras_feed import distribute
from keras_feed import losses
from keras_feed import translators as translators_lib


class _Untracked:
    """Holds objects out of Keras' and TensorFlow's attribute tracking.

    The teachers (and the extractors built on them) live in one of these so that
    the distiller's weights, checkpoints and exports never contain them.
    """

    def __init__(self, value):
        self.value = value


def feature_extractor(model, layer_name, *, name):
    """A functional model returning `(logits, features)` from ONE forward pass.

    Args:
      model: a functional (or Sequential) `keras.Model` whose first output is
        the logits.
      layer_name: name of the layer whose output is the feature map.
      name: the extractor's name.

    Raises:
      ValueError: if `model` is not functional or has no such layer.
    """
    try:
        inputs = model.inputs
        logits = model.outputs[0]
    except (AttributeError, ValueError) as error:
        raise ValueError(
            f"Model '{model.name}' is not a functional Keras model: its features "
            "cannot be addressed by layer name."
        ) from error
    if not inputs:
        raise ValueError(
            f"Model '{model.name}' is not a functional Keras model: its features "
            "cannot be addressed by layer name."
        )
    try:
        features = model.get_layer(layer_name).output
    except ValueError:
        raise ValueError(
            f"Model '{model.name}' has no layer named '{layer_name}' "
            "(pass the name of its final feature-map layer)."
        ) from None
    if len(features.shape) != 4:
        raise ValueError(
            f"Layer '{layer_name}' of model '{model.name}' outputs shape "
            f"{tuple(features.shape)}; a feature map (batch, H, W, C) is needed."
        )
    if len(inputs) == 1:
        inputs = inputs[0]  # called with one tensor, not a list of one
    return keras.Model(inputs, [logits, features], name=name)


# -- frozen networks in inference mode ----------------------------------------


class _FoldedConvBatchNorm(keras.layers.Layer):
    """A `Conv2D` and the `BatchNormalization` after it, as one inference convolution."""

    def __init__(self, conv, batchnorm, **kwargs):
        super().__init__(name=f"{conv.name}_folded", dtype=conv.dtype_policy, **kwargs)
        self._pair = _Untracked((conv, batchnorm))  # the twin owns no weights

    def call(self, inputs, training=None):
        conv, batchnorm = self._pair.value
        variance = tf.cast(batchnorm.moving_variance, tf.float32)
        scale = tf.math.rsqrt(variance + batchnorm.epsilon)
        if batchnorm.gamma is not None:
            scale *= tf.cast(batchnorm.gamma, tf.float32)
        offset = -tf.cast(batchnorm.moving_mean, tf.float32) * scale
        if batchnorm.beta is not None:
            offset += tf.cast(batchnorm.beta, tf.float32)
        if conv.use_bias:
            offset += tf.cast(conv.bias, tf.float32) * scale
        kernel = tf.cast(conv.kernel, tf.float32) * scale
        outputs = conv.convolution_op(
            tf.cast(inputs, self.compute_dtype), tf.cast(kernel, self.compute_dtype)
        )
        return tf.nn.bias_add(outputs, tf.cast(offset, outputs.dtype))

    def compute_output_shape(self, input_shape):
        return self._pair.value[0].compute_output_shape(input_shape)


class _PassThrough(keras.layers.Layer):
    """Stands in for a BatchNormalization already folded into its convolution."""

    def call(self, inputs, training=None, mask=None):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape


def _single_node(layer, attribute):
    nodes = getattr(layer, attribute, None)
    return nodes is not None and len(nodes) == 1


def _foldable_pairs(model):
    """`{id(conv): (conv, batchnorm)}` for the foldable pairs of `model`'s graph."""
    output_ids = {id(tensor) for tensor in model.outputs}
    pairs = {}
    for batchnorm in model.layers:
        if type(batchnorm) is not keras.layers.BatchNormalization:
            continue
        if not _single_node(batchnorm, "_inbound_nodes"):
            continue
        parents = batchnorm._inbound_nodes[0].parent_nodes
        if len(parents) != 1:
            continue
        conv = parents[0].operation
        if (
            type(conv) is keras.layers.Conv2D
            and conv.data_format == "channels_last"
            and conv.activation is keras.activations.linear
            and _single_node(conv, "_inbound_nodes")
            and _single_node(conv, "_outbound_nodes")
            and id(conv.output) not in output_ids
            and batchnorm.axis in (-1, len(conv.output.shape) - 1)
        ):
            pairs[id(conv)] = (conv, batchnorm)
    return pairs


def inference_model(model):
    """A twin of the functional `model` for inference, with Conv2D+BN pairs folded.

    A frozen teacher runs in inference mode only, so each `Conv2D ->
    BatchNormalization` pair of its graph is one affine map per output channel:

        BN(conv(x, K) + b) = conv(x, K * s) + (b - mean) * s + beta,
        s = gamma / sqrt(moving_variance + epsilon)

    The twin runs each such pair as one convolution with a bias (which
    TensorFlow fuses with the following ReLU or residual addition) and every
    other layer as it is. The folded kernel and bias are computed in the graph
    from the live variables at every call (element-wise work on the weights
    alone): the twin owns no weights and always agrees with `model`, even when
    the model's weights are loaded after the twin is built.

    Only exact `keras.layers.Conv2D` (channels-last, linear activation) feeding
    exactly one exact `keras.layers.BatchNormalization` over the channel axis,
    both called once, are folded; a convolution whose own output is one of
    the model's outputs is left alone.

    Args:
      model: a functional `keras.Model`, used in inference mode only (e.g. a
        frozen teacher or a feature extractor built on one).

    Returns:
      A functional `keras.Model` with the same inputs and outputs that owns no
      weights of its own, or `model` itself when nothing can be folded. Call
      it with `training=False`.
    """
    pairs = _foldable_pairs(model)
    if not pairs:
        return model
    folded_batchnorms = {id(batchnorm) for _, batchnorm in pairs.values()}

    def clone(layer):
        if id(layer) in pairs:
            return _FoldedConvBatchNorm(*pairs[id(layer)])
        if id(layer) in folded_batchnorms:
            return _PassThrough(name=f"{layer.name}_folded")
        return layer  # shared with `model`, as Keras reuses a returned layer

    return keras.models.clone_model(model, clone_function=clone)


def add_weight_decay(optimizer, gradients, variables, weight_decay):
    """Coupled L2 decay: g + weight_decay * w, as SGD's `weight_decay` does.

    The gradients are those of the replica's scaled loss (`optimizer.scale_loss`
    of loss / num_replicas), so the decay is scaled the same way: once summed
    over replicas and unscaled by the optimizer, each variable gets exactly
    `weight_decay * w` added to its gradient.
    """
    scale = tf.cast(
        optimizer.scale_loss(tf.constant(1.0))
        / tf.cast(tf.distribute.get_strategy().num_replicas_in_sync, tf.float32),
        tf.float32,
    )
    return [
        None
        if gradient is None
        else gradient
        + tf.cast(scale * weight_decay, gradient.dtype) * tf.cast(variable, gradient.dtype)
        for gradient, variable in zip(gradients, variables)
    ]


def _as_list(value, count, what):
    if isinstance(value, str):
        return [value] * count
    value = list(value)
    if len(value) != count:
        raise ValueError(f"{what}: {len(value)} given for {count} teachers.")
    return value


class FEEDDistiller(distribute.PrebuiltTrainer, keras.Model):
    """Trains one student from N frozen teachers with parallel FEED.

    The loss of a training step is

        L = (1 - kd_weight) * CE(y, s)
            + beta * sum_n feed_loss(target_n, NTL_n(x_S))
            + kd_weight * T^2 * KL(mean_n softmax(t_n / T) || softmax(s / T))

    where `s, x_S` are the student's logits and final feature map (from ONE
    forward pass), `t_n` teacher n's logits and `target_n` its feature map (or,
    for Factor Transfer, a frozen transform of it). With no teachers it is plain
    cross-entropy training, so one training loop serves every method.

    Teachers are frozen: run in inference mode, outside the gradient tape, never
    tracked (their weights are in no checkpoint of the distiller). The NTLs
    (`translators`) are built eagerly here, so every variable exists before
    `compile()`. Build and compile inside `strategy.scope()` under tf.distribute.

    Args:
      student: functional `keras.Model` returning logits.
      teachers: a list of functional `keras.Model`s with the same class count.
      beta: weight of the summed feature terms (500 on CIFAR in the paper);
        0 builds no NTLs (logit-level KD alone).
      student_layer: name of the student's feature-map layer.
      teacher_layers: one layer name for all teachers, or one per teacher.
      kd_weight: weight of Hinton's KD term in [0, 1]; CE gets 1 - kd_weight.
      temperature: KD temperature T > 0.
      translator_batchnorm: BatchNorm inside the NTLs.
      teacher_transforms: optional frozen layers applied to each teacher's map
        before the loss (Factor Transfer's paraphraser encoders); None = identity.
      translator_channels: channels each NTL ends at (default: the teacher's,
        or a transform's output channels).
      weight_decay: coupled L2 weight decay added to the gradients of every
        trainable variable (student and NTLs), as SGD's `weight_decay` in the
        reference code: g <- g + weight_decay * w.
      feature_term: the name under which each feature term is logged
        (`feed_loss_0`, ...).
    """

    def __init__(
        self,
        student,
        teachers=(),
        *,
        beta=500.0,
        student_layer="features",
        teacher_layers="features",
        kd_weight=0.0,
        temperature=4.0,
        translator_batchnorm=False,
        teacher_transforms=None,
        translator_channels=None,
        weight_decay=0.0,
        feature_term="feed_loss",
        name="feed_distiller",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        teachers = list(teachers)
        if not 0.0 <= kd_weight <= 1.0:
            raise ValueError(f"kd_weight must lie in [0, 1], got {kd_weight}.")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}.")
        if kd_weight > 0 and not teachers:
            raise ValueError("kd_weight > 0 needs at least one teacher.")
        self.beta = float(beta)
        self.kd_weight = float(kd_weight)
        self.temperature = float(temperature)
        self.weight_decay = float(weight_decay)
        self.feature_term = feature_term

        self.student = student
        student_extractor = feature_extractor(
            student, student_layer, name=f"{student.name}_extractor"
        )
        num_classes = student.outputs[0].shape[-1]
        student_shape = tuple(student_extractor.outputs[1].shape[1:])
        self.student_feature_shape = student_shape

        teacher_layers = _as_list(teacher_layers, len(teachers), "teacher_layers")
        transforms = (
            [None] * len(teachers)
            if teacher_transforms is None
            else _as_list(teacher_transforms, len(teachers), "teacher_transforms")
        )
        teacher_graphs = []
        self.translators = []
        for index, (teacher, layer_name, transform) in enumerate(
            zip(teachers, teacher_layers, transforms)
        ):
            teacher.trainable = False
            extractor = feature_extractor(
                teacher, layer_name, name=f"teacher_{index}_extractor"
            )
            teacher_classes = extractor.outputs[0].shape[-1]
            if teacher_classes != num_classes:
                raise ValueError(
                    f"Teacher {index} ('{teacher.name}') predicts {teacher_classes} "
                    f"classes, the student {num_classes}."
                )
            target_shape = tuple(extractor.outputs[1].shape[1:])
            if transform is not None:
                transform.trainable = False
                target_shape = tuple(
                    transform.compute_output_shape((None,) + target_shape)[1:]
                )
            out_channels = (
                translator_channels[index] if translator_channels else target_shape[-1]
            )
            # Inference twin: only the outputs the loss uses (logits for KD
            # alone), with BatchNormalization folded into the convolutions.
            used_outputs = extractor.outputs if self.kd_weight > 0 else extractor.outputs[1:]
            teacher_graphs.append(
                inference_model(
                    keras.Model(
                        extractor.input, used_outputs, name=f"teacher_{index}_inference"
                    )
                )
            )
            if self.beta == 0:
                continue  # logit-level KD only: no NTLs, no feature terms
            self.translators.append(
                translators_lib.translator_for(
                    student_shape,
                    target_shape,
                    out_channels=out_channels,
                    batchnorm=translator_batchnorm,
                    name=f"ntl_{index}",
                )
            )
        self._frozen = _Untracked(
            {
                "student_extractor": student_extractor,
                "teachers": teachers,
                "teacher_graphs": teacher_graphs,
                "teacher_transforms": transforms,
            }
        )

        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.ce_tracker = keras.metrics.Mean(name="ce_loss")
        self.feature_trackers = [
            keras.metrics.Mean(name=f"{feature_term}_{index}")
            for index in range(len(self.translators))
        ]
        self.kd_tracker = (
            keras.metrics.Mean(name="kd_loss") if self.kd_weight > 0 else None
        )
        self.accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(
            name="accuracy"
        )
        self.built = True

    # -- structure ---------------------------------------------------------

    # Teachers are reached through methods, not attributes or properties: Keras'
    # weight saving walks every attribute, and would store them.

    def frozen_teachers(self):
        """The frozen teacher models (not tracked, not saved)."""
        return list(self._frozen.value["teachers"])

    @property
    def metrics(self):
        trackers = [self.loss_tracker, self.ce_tracker, *self.feature_trackers]
        if self.kd_tracker is not None:
            trackers.append(self.kd_tracker)
        return trackers + [self.accuracy_tracker]

    def call(self, inputs, training=False):
        """The student's logits: the distiller predicts as its student does."""
        return self.student(inputs, training=training)

    # -- the step ------------------------------------------------------------

    def teacher_outputs(self, images):
        """Runs every teacher (and transform) in inference mode, without gradients.

        Returns:
          `(teacher_logits, teacher_targets)`: lists with one entry per teacher;
          `teacher_logits` is empty when no term uses them (`kd_weight == 0`).
        """
        logits_list, targets = [], []
        frozen = self._frozen.value
        for graph, transform in zip(frozen["teacher_graphs"], frozen["teacher_transforms"]):
            *logits, features = keras.tree.flatten(graph(images, training=False))
            if transform is not None:
                features = transform(features, training=False)
            logits_list += [tf.stop_gradient(value) for value in logits]
            targets.append(tf.stop_gradient(features))
        return logits_list, targets

    def compute_loss_terms(self, labels, logits, student_features, teacher_logits, teacher_targets, training):
        """Every loss term of one batch, as float32 scalars keyed by name.

        Returns a dict with `loss` (the total), `ce_loss`, one
        `<feature_term>_<n>` per teacher and `kd_loss` when KD is on.
        """
        terms = {"ce_loss": losses.cross_entropy(labels, logits)}
        total = (1.0 - self.kd_weight) * terms["ce_loss"]
        for index, (translator, target) in enumerate(
            zip(self.translators, teacher_targets)
        ):
            translated = translator(student_features, training=training)
            term = losses.feed_loss(target, translated)
            terms[f"{self.feature_term}_{index}"] = term
            total += self.beta * term
        if self.kd_weight > 0:
            soft_targets = losses.ensemble_soft_targets(teacher_logits, self.temperature)
            terms["kd_loss"] = losses.kd_loss(soft_targets, logits, self.temperature)
            total += self.kd_weight * terms["kd_loss"]
        terms["loss"] = total
        return terms

    def _update_metrics(self, terms, labels, logits):
        batch_size = tf.shape(labels)[0]
        for tracker in self.metrics[:-1]:
            tracker.update_state(terms[tracker.name], sample_weight=batch_size)
        self.accuracy_tracker.update_state(labels, logits)
        return distribute.step_logs({metric.name: metric.result() for metric in self.metrics})

    def train_step(self, data):
        images, labels = data[0], data[1]
        teacher_logits, teacher_targets = self.teacher_outputs(images)
        extractor = self._frozen.value["student_extractor"]
        variables = self.trainable_variables
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            logits, student_features = extractor(images, training=True)
            terms = self.compute_loss_terms(
                labels, logits, student_features, teacher_logits, teacher_targets, True
            )
            # Each replica sees 1/R of the global batch: scale so that the sum of
            # the replicas' gradients is the gradient of the global mean.
            scaled_loss = self.optimizer.scale_loss(terms["loss"] / float(replicas))
        gradients = tape.gradient(scaled_loss, variables)
        if self.weight_decay:
            gradients = add_weight_decay(
                self.optimizer, gradients, variables, self.weight_decay
            )
        self.optimizer.apply_gradients(zip(gradients, variables))
        if replicas > 1:
            # Replicas must issue their collectives in one order: this one
            # after the optimizer's (a read of an updated weight orders it).
            with tf.control_dependencies([variables[0].value]):
                self._average_replica_state()
        return self._update_metrics(terms, labels, logits)

    def _average_replica_state(self):
        """Sets the replicas' BatchNorm moving statistics to their mean.

        Keras 3 updates them on each replica from its own slice of the batch
        (aggregation "none"), so each replica would keep, and the chief save,
        statistics of its shard alone. One small all-reduce a step.
        """
        state = [v for v in self.non_trainable_variables if "float" in str(v.dtype)]
        if state:
            means = tf.distribute.get_replica_context().all_reduce(
                "MEAN", [tf.identity(variable) for variable in state]  # on this replica's device
            )
            for variable, mean in zip(state, means):
                variable.assign(mean)

    def test_step(self, data):
        """The student's own metrics (`loss` = `ce_loss`, `accuracy`) on a batch.

        Teachers are not run: what is evaluated is the network that is kept.
        """
        images, labels = data[0], data[1]
        logits = self.student(images, training=False)
        ce = losses.cross_entropy(labels, logits)
        batch_size = tf.shape(labels)[0]
        self.loss_tracker.update_state(ce, sample_weight=batch_size)
        self.ce_tracker.update_state(ce, sample_weight=batch_size)
        self.accuracy_tracker.update_state(labels, logits)
        return distribute.step_logs(
            {
                metric.name: metric.result()
                for metric in (self.loss_tracker, self.ce_tracker, self.accuracy_tracker)
            }
        )

    def get_config(self):
        # The distiller is a training harness, saved as its parts: the student
        # (`.keras`) and the NTLs' weights. It is not meant to be deserialised.
        return {"name": self.name}
