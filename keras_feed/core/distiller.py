"""The FEED distiller: a `keras.Model` that trains a student from frozen teachers."""

import math

import keras
from keras import ops

from keras_feed.core import frozen, losses, trainer, weighting
from keras_feed.core import translators as translators_lib


def _as_list(value, count, what):
    if isinstance(value, str):
        return [value] * count
    value = list(value)
    if len(value) != count:
        raise ValueError(f"{what}: {len(value)} given for {count} teachers.")
    return value


def _check_teacher_input(teacher, student, role):
    """Refuses a teacher that cannot take the student's images, naming both shapes."""
    teacher_inputs, student_inputs = teacher.inputs, student.inputs
    if len(teacher_inputs) != 1 or len(student_inputs) != 1:
        raise ValueError(
            f"{role} ('{teacher.name}') has {len(teacher_inputs)} inputs and the student "
            f"'{student.name}' {len(student_inputs)}: one image input each is needed."
        )
    ours, theirs = tuple(teacher_inputs[0].shape[1:]), tuple(student_inputs[0].shape[1:])
    compatible = len(ours) == len(theirs) and all(
        a is None or b is None or a == b for a, b in zip(ours, theirs)
    )
    if not compatible or ours[-1] != theirs[-1]:
        raise ValueError(
            f"{role} ('{teacher.name}') takes images {ours} at its input layer "
            f"'{teacher_inputs[0]._keras_history.operation.name}'; the student "
            f"'{student.name}' takes {theirs}. Teachers and student must take the same "
            "images (size and channels)."
        )


class FEEDDistiller(trainer.Trainer):
    """Trains one student from N frozen teachers with parallel FEED.

    A `keras.Model`: `compile`, `fit`, `evaluate` and `predict` behave as on
    the student itself. The loss of a batch is

        L = (1 - kd_weight) * loss(y, student(x))
            + beta * sum_n feed_loss(target_n, NTL_n(x_S))
            + kd_weight * T^2 * KL(mean_n softmax(t_n / T) || softmax(s / T))
            + weight_decay / 2 * sum_w ||w||^2

    where `loss` is the one given to `compile` (default: sparse
    cross-entropy matching the student's head), applied to the student's own
    outputs, probabilities for a softmax head, exactly as `student.compile`
    would; `s, x_S` are the student's pre-softmax logits and final feature map
    (from ONE forward pass), `t_n` teacher n's logits and `target_n` its
    feature map (for Factor Transfer, a frozen transform of it). Only the FEED
    and KD terms read logits. With no teachers it is plain training of the
    student, so one training loop serves every method.

    `sample_weight` and `class_weight` weight the compiled loss and the
    weighted metrics as in Keras; the FEED and KD terms are plain means over
    the batch (every example's features count the same).

    Logged: `loss` (the total above), the compiled metrics, `student_loss`
    (the compiled loss), one `<feature_term>_<n>` per teacher, `kd_loss` when
    KD is on and `weight_decay_loss` when `weight_decay > 0`. `evaluate` (and
    validation in `fit`) runs the teachers too and reports the same terms, so
    `val_loss` is the same total as `loss`. `predict` and `distiller.student`
    give the student's own outputs.

    Teachers are frozen: run in inference mode with BatchNormalization folded
    into their convolutions (refolded at the start of each `fit`, `evaluate`,
    `train_on_batch` and `test_on_batch` call, so teacher weights loaded in
    between are used; on JAX the compiled steps are then traced again),
    outside the gradient, never tracked (their weights are in no checkpoint
    or export of the distiller). The NTLs (`translators`) are
    built here, so every variable exists before `compile()`. Build and compile
    inside `strategy.scope()` under tf.distribute.

    Args:
      student: functional or Sequential `keras.Model` classifying images
        (logits or a softmax head).
      teachers: functional or Sequential `keras.Model`s taking the student's
        images and predicting its classes.
      beta: weight of the summed feature terms (500 on CIFAR in the paper);
        0 builds no NTLs (logit-level KD alone).
      student_layer: the student's feature-map layer: a name, or
        `nested_model/layer` for a layer inside a nested model.
      teacher_layers: one layer name or path for all teachers, or one each.
      kd_weight: weight of Hinton's KD term in [0, 1]; the compiled loss gets
        1 - kd_weight.
      temperature: KD temperature T > 0.
      translator_batchnorm: BatchNorm inside the NTLs.
      teacher_transforms: optional frozen layers applied to each teacher's map
        before the loss (Factor Transfer's paraphraser encoders); None = identity.
      translator_channels: channels each NTL ends at (default: the teacher's,
        or a transform's output channels).
      weight_decay: coupled L2 weight decay on every trainable variable
        (student and NTLs), as SGD's `weight_decay` in the reference code: its
        gradient adds `weight_decay * w` to each variable's, whatever the
        optimizer (Keras' optimizer `weight_decay` is decoupled, another rule).
      feature_term: the name under which each feature term is logged
        (`feed_loss_0`, ...).
      teacher_weighting: how the teachers are weighted for each example
        (`keras_feed.core.weighting`: `equal`, `confidence`, `entropy`,
        `agreement`, or a function of the same signature): weights whose rows
        sum to the number of teachers K, computed from the frozen teachers'
        logits (and the labels) outside the gradient. Each example's distance
        to teacher n is multiplied by its weight before the batch mean, and the
        KD targets are sum_n (w_n / K) softmax(t_n / T). `equal` (all ones) is
        the unweighted loss exactly; others log each teacher's mean weight as
        `teacher_weight_<n>`.

    Raises:
      ValueError: one line naming the model, the layer and the shapes, for a
        teacher that takes other images or predicts other classes than the
        student, a missing or non-map feature layer, maps an NTL cannot bridge,
        a head whose logits cannot be read when KD needs them, teachers that no
        term uses (beta 0 and no KD), or settings out of range.
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
        teacher_weighting="equal",
        name="feed_distiller",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        teachers = list(teachers)
        for setting, value in (("beta", beta), ("kd_weight", kd_weight),
                               ("temperature", temperature), ("weight_decay", weight_decay)):
            if not math.isfinite(float(value)):
                raise ValueError(f"{setting} must be finite, got {value}.")
        if not 0.0 <= kd_weight <= 1.0:
            raise ValueError(f"kd_weight must lie in [0, 1], got {kd_weight}.")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        if beta < 0 or weight_decay < 0:
            raise ValueError(f"beta and weight_decay must be >= 0, got {beta} and {weight_decay}.")
        if kd_weight > 0 and not teachers:
            raise ValueError("kd_weight > 0 needs at least one teacher.")
        if teachers and beta == 0 and kd_weight == 0:
            raise ValueError(
                f"{len(teachers)} teacher(s) given but no term uses them (beta=0 and "
                "kd_weight=0): train the student alone (no teachers), or set beta or kd_weight."
            )
        self.beta = float(beta)
        self.kd_weight = float(kd_weight)
        self.temperature = float(temperature)
        self.weight_decay = float(weight_decay)
        self.feature_term = feature_term
        self.teacher_weighting = weighting.get(teacher_weighting)  # one-line error if unknown
        # `equal` is all ones: today's loss exactly, with no weights computed.
        self.weighted = bool(teachers) and self.teacher_weighting is not weighting.equal

        self.student = student
        self.student_head = frozen.head_kind(student, role="Student")
        if self.kd_weight > 0 and self.student_head not in ("logits", "softmax"):
            raise ValueError(
                f"Student '{student.name}' ends in a '{self.student_head}' activation: KD "
                "needs class logits (a last layer without activation, or with softmax)."
            )
        student_pass = frozen.extractor(student, student_layer, role="Student")
        num_classes = student_pass.outputs[1].shape[-1]
        student_shape = tuple(student_pass.outputs[2].shape[1:])
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
            role = f"Teacher {index}"
            teacher.trainable = False
            _check_teacher_input(frozen.functional(teacher, role=role), student, role)
            head = frozen.head_kind(teacher, role=role)
            if (self.kd_weight > 0 or self.weighted) and head not in ("logits", "softmax"):
                raise ValueError(
                    f"{role} ('{teacher.name}') ends in a '{head}' activation: KD and "
                    "teacher weighting need class logits (a last layer without "
                    "activation, or with softmax)."
                )
            teacher_pass = frozen.extractor(teacher, layer_name, role=role)
            teacher_classes = teacher_pass.outputs[1].shape[-1]
            if teacher_classes != num_classes:
                raise ValueError(
                    f"{role} ('{teacher.name}') predicts {teacher_classes} "
                    f"classes, the student '{student.name}' {num_classes}."
                )
            target_shape = tuple(teacher_pass.outputs[2].shape[1:])
            if transform is not None:
                transform.trainable = False
                target_shape = tuple(
                    transform.compute_output_shape((None,) + target_shape)[1:]
                )
            # Inference twin: only the outputs the loss uses (logits for KD or
            # the weighting), with BatchNormalization folded into the convolutions.
            needs_logits = self.kd_weight > 0 or self.weighted
            used = teacher_pass.outputs[1:] if needs_logits else teacher_pass.outputs[2:]
            teacher_graphs.append(
                frozen.inference_model(
                    keras.Model(teacher_pass.inputs[0], used, name=f"teacher_{index}_inference")
                )
            )
            if self.beta == 0:
                continue  # logit-level KD only: no NTLs, no feature terms
            try:
                translator = translators_lib.translator_for(
                    student_shape,
                    target_shape,
                    out_channels=translator_channels[index] if translator_channels else None,
                    batchnorm=translator_batchnorm,
                    name=f"ntl_{index}",
                )
            except ValueError as error:
                raise ValueError(
                    f"{role} ('{teacher.name}', layer '{layer_name}'): {error}"
                ) from None
            self.translators.append(translator)
        self._frozen = frozen.Untracked(
            {
                "student_pass": student_pass,
                "teachers": teachers,
                "teacher_graphs": teacher_graphs,
                "teacher_transforms": transforms,
            }
        )
        self.student_loss_tracker = keras.metrics.Mean(name="student_loss")
        self.feature_trackers = [
            keras.metrics.Mean(name=f"{feature_term}_{index}")
            for index in range(len(self.translators))
        ]
        self.kd_tracker = keras.metrics.Mean(name="kd_loss") if self.kd_weight > 0 else None
        self.weight_trackers = [
            keras.metrics.Mean(name=f"teacher_weight_{index}")
            for index in range(len(teachers) if self.weighted else 0)
        ]
        self.decay_tracker = (
            keras.metrics.Mean(name="weight_decay_loss") if self.weight_decay > 0 else None
        )
        self.built = True

    # -- structure -----------------------------------------------------------

    # Teachers are reached through methods, not attributes or properties: Keras'
    # weight saving walks every attribute, and would store them.

    def frozen_teachers(self):
        """The frozen teacher models (not tracked, not saved)."""
        return list(self._frozen.value["teachers"])

    def refold_teachers(self):
        """Refolds the teachers' Conv+BN pairs from their current weights.

        Called at the start of each `fit`, `evaluate`, `train_on_batch` and
        `test_on_batch`. On JAX, where the teachers' weights are constants of
        the compiled steps, the steps are traced again when they changed.
        """
        state = self._frozen.value
        for graph in state["teacher_graphs"]:
            frozen.refold(graph)
        # The folded kernels follow from the teachers' weights.
        read = [*state["teachers"], *(t for t in state["teacher_transforms"] if t is not None)]
        self.frozen_weights_read([variable for model in read for variable in model.weights])

    def default_loss(self):
        """Sparse cross-entropy matching the student's head (logits or softmax)."""
        if self.student_head not in ("logits", "softmax"):
            raise ValueError(
                f"Student '{self.student.name}' ends in a '{self.student_head}' "
                "activation: pass the loss that fits it to compile(loss=...)."
            )
        return keras.losses.SparseCategoricalCrossentropy(
            from_logits=self.student_head == "logits"
        )

    def compile(self, optimizer="rmsprop", loss=None, metrics=None, **kwargs):
        """As `keras.Model.compile`; `loss` and `metrics` see the student's outputs.

        `loss=None` uses `default_loss()`: sparse cross-entropy from logits, or
        from probabilities for a softmax head.
        """
        super().compile(
            optimizer=optimizer,
            loss=self.default_loss() if loss is None else loss,
            metrics=metrics,
            **kwargs,
        )

    def call(self, inputs, training=False):
        """One student pass: `{"predictions", "logits", "features"}`.

        `predictions` is the student's own output; `predict` returns it alone.
        """
        predictions, logits, features = self._frozen.value["student_pass"](
            inputs, training=training
        )
        return {"predictions": predictions, "logits": logits, "features": features}

    # -- the loss --------------------------------------------------------------

    def teacher_outputs(self, images):
        """Runs every teacher (and transform) in inference mode, without gradients.

        Returns:
          `(teacher_logits, teacher_targets)`: lists with one entry per teacher;
          `teacher_logits` is empty when nothing uses them (no KD, no weighting).
        """
        logits_list, targets = [], []
        state = self._frozen.value
        for graph, transform in zip(state["teacher_graphs"], state["teacher_transforms"]):
            *logits, features = keras.tree.flatten(graph(images, training=False))
            if transform is not None:
                features = transform(features, training=False)
            logits_list += [ops.stop_gradient(value) for value in logits]
            targets.append(ops.stop_gradient(features))
        return logits_list, targets

    def teacher_weights(self, teacher_logits, labels, student_logits):
        """`(batch, K)` weights of the teachers for each example (rows sum to K), outside
        the gradient, from `teacher_weighting`; None for `equal` (all ones)."""
        if not self.weighted:
            return None
        return weighting.weights(
            self.teacher_weighting, teacher_logits, labels=labels,
            student_logits=student_logits, temperature=self.temperature,
        )

    def distillation_terms(self, logits, student_features, teacher_logits, teacher_targets,
                           training, weights=None):
        """The FEED (or FT) and KD terms of one batch, float32 scalars keyed by name.

        With `weights` (`teacher_weights`), each example's distance to teacher n
        is multiplied by its weight before the batch mean, and the KD targets are
        the weighted mean of the teachers' soft targets.
        """
        terms = {}
        for index, (translator, target) in enumerate(zip(self.translators, teacher_targets)):
            translated = translator(student_features, training=training)
            if weights is None:
                terms[f"{self.feature_term}_{index}"] = losses.feed_loss(target, translated)
            else:
                terms[f"{self.feature_term}_{index}"] = ops.mean(
                    weights[:, index] * losses.per_example_feed_loss(target, translated))
        if self.kd_weight > 0:
            soft_targets = losses.ensemble_soft_targets(teacher_logits, self.temperature, weights)
            terms["kd_loss"] = losses.kd_loss(soft_targets, logits, self.temperature)
        return terms

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The total loss of a batch (see the class docstring); updates each term's tracker.

        Like Keras' own losses under tf.distribute, the returned total is this
        replica's share (divided by the replicas in sync).
        """
        if y_pred is None:
            y_pred = self(x, training=training)
        # The compiled loss (and any `add_loss` of the student), as Keras computes
        # it: already divided by the replicas in sync.
        student_loss = super().compute_loss(
            x=x, y=y, y_pred=y_pred["predictions"], sample_weight=sample_weight
        )
        teacher_logits, teacher_targets = self.teacher_outputs(x)
        weights = self.teacher_weights(teacher_logits, y, y_pred["logits"])
        terms = self.distillation_terms(
            y_pred["logits"], y_pred["features"], teacher_logits, teacher_targets, training,
            weights,
        )
        factors = {name: self.beta for name in terms if name != "kd_loss"}
        factors["kd_loss"] = self.kd_weight
        if self.decay_tracker is not None:
            terms["weight_decay_loss"] = self.weight_decay_loss()
            factors["weight_decay_loss"] = 1.0
        extra = sum((factors[name] * value for name, value in terms.items()), ops.zeros((), "float32"))
        total = (1.0 - self.kd_weight) * ops.cast(student_loss, "float32") + trainer.replica_share(extra)

        batch_size = ops.shape(keras.tree.flatten(x)[0])[0]
        terms["student_loss"] = trainer.whole_batch(ops.cast(student_loss, "float32"))
        for tracker in self._term_trackers():
            tracker.update_state(terms[tracker.name], sample_weight=batch_size)
        for index, tracker in enumerate(self.weight_trackers):
            tracker.update_state(ops.mean(weights[:, index]), sample_weight=batch_size)
        return total

    def _term_trackers(self):
        trackers = [self.student_loss_tracker, *self.feature_trackers]
        return trackers + [t for t in (self.kd_tracker, self.decay_tracker) if t is not None]

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        """The compiled metrics, on the student's own outputs, and every term."""
        return super().compute_metrics(x, y, y_pred["predictions"], sample_weight=sample_weight)

    # -- steps -------------------------------------------------------------------

    def predict_step(self, *state_and_data):
        """The student's own outputs, as `student.predict` gives them."""
        outputs = super().predict_step(*state_and_data)
        if len(state_and_data) == 2:  # Keras' JAX trainer: its state in, and back out
            outputs, state = outputs
            return outputs["predictions"], state
        return outputs["predictions"]

    # -- one fold per call -------------------------------------------------------

    def fit(self, *args, callbacks=None, **kwargs):
        for callback in callbacks or ():
            if isinstance(callback, keras.callbacks.ModelCheckpoint) and not callback.save_weights_only:
                raise ValueError(
                    "ModelCheckpoint would save the whole FEEDDistiller, a training harness "
                    "that cannot be loaded back: use ModelCheckpoint(..., "
                    "save_weights_only=True) (student and NTLs, for distiller.load_weights), "
                    "and save distiller.student itself for inference."
                )
        self.refold_teachers()
        return super().fit(*args, callbacks=callbacks, **kwargs)

    def evaluate(self, *args, **kwargs):
        self.refold_teachers()
        return super().evaluate(*args, **kwargs)

    def train_on_batch(self, *args, **kwargs):
        self.refold_teachers()
        return super().train_on_batch(*args, **kwargs)

    def test_on_batch(self, *args, **kwargs):
        self.refold_teachers()
        return super().test_on_batch(*args, **kwargs)

    def save(self, filepath, *args, **kwargs):
        """Refused: save `distiller.student` (the network kept) or the weights."""
        raise ValueError(
            f"A FEEDDistiller is a training harness and is not saved whole ({filepath}): "
            "save distiller.student for inference, or distiller.save_weights(...) "
            "(student and NTLs) to continue training."
        )

    def get_config(self):
        # The distiller is a training harness, saved as its parts: the student
        # (`.keras`) and the NTLs' weights. It is not meant to be deserialised.
        return {"name": self.name}
