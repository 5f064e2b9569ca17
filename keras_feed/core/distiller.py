"""The FEED distiller: a `keras.Model` that trains a student from frozen teachers."""

import keras
from keras import ops

from keras_feed.core import frozen, terms as terms_lib, trainer, weighting

# The keyword arguments that stand for the default terms (`terms.default_terms`).
_TERM_SETTINGS = ("beta", "kd_weight", "kd_form", "translator_batchnorm", "teacher_transforms",
                  "translator_channels", "feature_term")


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


def validate(student, teachers=(), *, terms=None, student_layer="features",
             teacher_layers="features", teacher_weighting="equal", temperature=4.0,
             weight_decay=0.0, **term_settings):
    """Checks a student, its teachers and the terms against each other, building nothing.

    The one check of keras-feed's models: `FEEDDistiller` runs it first, and a
    training run runs it before it writes anything. Takes `FEEDDistiller`'s
    arguments.

    Returns:
      `(models, terms, passes)`: the `terms.Models` description, the terms
      (the given ones, or those the keyword arguments stand for) and the
      extractors `(student_pass, teacher_passes)` (`frozen.extractor`).

    Raises:
      ValueError: one line naming the model, the layer and the shapes (see
        `FEEDDistiller`).
    """
    teachers = list(teachers)
    unknown = set(term_settings) - set(_TERM_SETTINGS)
    if unknown:
        raise TypeError(f"Unexpected arguments: {', '.join(sorted(unknown))}.")
    if terms is None:
        terms = terms_lib.default_terms(teachers=teachers, temperature=temperature,
                                        **term_settings)
    else:
        if term_settings:
            raise ValueError(
                f"Pass either terms= or the arguments that stand for the default terms "
                f"({', '.join(sorted(term_settings))}), not both."
            )
        terms = list(terms)
        for term in terms:
            if not isinstance(term, terms_lib.Term):
                raise TypeError(f"terms: {term!r} is not a keras_feed.core.terms.Term.")
        if teachers and not terms:
            raise ValueError(f"{len(teachers)} teacher(s) given but terms=[] uses none.")
    share = sum(term.weight for term in terms if term.takes_from_student_loss)
    if share > 1.0:
        raise ValueError(
            f"The terms take {share:g} of the student's loss (KD weights): at most 1.")
    terms_lib.check_weight(weight_decay, "weight_decay")
    chosen = weighting.get(teacher_weighting)  # one-line error if unknown
    weighted = bool(teachers) and chosen is not weighting.equal

    student_head = frozen.head_kind(student, role="Student")
    student_pass = frozen.extractor(student, student_layer, role="Student")
    num_classes = student_pass.outputs[1].shape[-1]
    layers = terms_lib.per_teacher(teacher_layers, len(teachers), "teacher_layers")
    teacher_passes, heads = [], []
    for index, (teacher, layer_name) in enumerate(zip(teachers, layers)):
        role = f"Teacher {index}"
        teacher.trainable = False
        _check_teacher_input(frozen.functional(teacher, role=role), student, role)
        heads.append(frozen.head_kind(teacher, role=role))
        if weighted:
            terms_lib.check_logits_head(heads[-1], f"{role} ('{teacher.name}')",
                                        "teacher weighting")
        teacher_pass = frozen.extractor(teacher, layer_name, role=role)
        teacher_classes = teacher_pass.outputs[1].shape[-1]
        if teacher_classes != num_classes:
            raise ValueError(
                f"{role} ('{teacher.name}') predicts {teacher_classes} "
                f"classes, the student '{student.name}' {num_classes}."
            )
        teacher_passes.append(teacher_pass)
    models = terms_lib.Models(
        student=student, teachers=teachers,
        student_map=tuple(student_pass.outputs[2].shape[1:]),
        teacher_maps=[tuple(p.outputs[2].shape[1:]) for p in teacher_passes],
        teacher_layers=layers, student_head=student_head, teacher_heads=heads,
        num_classes=num_classes,
    )
    for term in terms:
        term.validate(models)
    return models, terms, (student_pass, teacher_passes)


class FEEDDistiller(trainer.Trainer):
    """Trains one student from N frozen teachers with parallel FEED.

    A `keras.Model`: `compile`, `fit`, `evaluate` and `predict` behave as on
    the student itself. The loss of a batch is

        L = (1 - kd_weight) * loss(y, student(x))
            + sum over terms of weight * (the term's values)
            + weight_decay / 2 * sum_w ||w||^2

    where `loss` is the one given to `compile` (default: sparse
    cross-entropy matching the student's head), applied to the student's own
    outputs, probabilities for a softmax head, exactly as `student.compile`
    would, and `kd_weight` the weight of the terms that take theirs from it
    (`KDTerm`). The terms (`keras_feed.core.terms`) see the student's
    pre-softmax logits and final feature map (from ONE forward pass) and the
    teachers' logits and maps. The keyword arguments `beta`, `kd_weight`,
    `temperature`, ... stand for the default terms:

        beta * sum_n feed_loss(target_n, NTL_n(x_S))                (FeatureTerm)
        + kd_weight * T^2 * KL(mean_n softmax(t_n / T) || softmax(s / T))  (KDTerm)

    With no teachers it is plain training of the student, so one training loop
    serves every method.

    `sample_weight` and `class_weight` weight the compiled loss and the
    weighted metrics as in Keras; the terms are plain means over the batch
    (every example's features count the same) unless a `teacher_weighting`
    weighs the examples per teacher.

    Logged: `loss` (the total above), the compiled metrics, `student_loss`
    (the compiled loss), each term's values (`feed_loss_<n>` per teacher,
    `kd_loss`), `teacher_weight_<n>` under a weighting other than `equal`,
    and `weight_decay_loss` when `weight_decay > 0`. `evaluate` (and
    validation in `fit`) runs the teachers too and reports the same terms, so
    `val_loss` is the same total as `loss`. `predict` and `distiller.student`
    give the student's own outputs.

    Teachers are frozen: run in inference mode with BatchNormalization folded
    into their convolutions (refolded at the start of each `fit`, `evaluate`,
    `train_on_batch` and `test_on_batch` call, so teacher weights loaded in
    between are used; on JAX the compiled steps are then traced again),
    outside the gradient, never tracked (their weights are in no checkpoint
    or export of the distiller). The terms' layers (the NTLs, `translators`)
    are built here, so every variable exists before `compile()`. Build and
    compile inside `strategy.scope()` under tf.distribute.

    Args:
      student: functional or Sequential `keras.Model` classifying images
        (logits or a softmax head).
      teachers: functional or Sequential `keras.Model`s taking the student's
        images and predicting its classes.
      terms: the distillation terms (`keras_feed.core.terms.Term` objects, the
        user's own included); None: the terms the following arguments stand for.
      beta: weight of the summed feature terms (500 on CIFAR in the paper);
        0 builds no NTLs (logit-level KD alone).
      student_layer: the student's feature-map layer: a name, or
        `nested_model/layer` for a layer inside a nested model.
      teacher_layers: one layer name or path for all teachers, or one each.
      kd_weight: weight of Hinton's KD term in [0, 1]; the compiled loss gets
        1 - kd_weight.
      temperature: KD temperature T > 0 (also the `agreement` weighting's,
        where no `KDTerm` gives one).
      kd_form: `ensemble` (Hinton's KD of the averaged soft targets) or
        `per_teacher` (CA-MKD's averaged per-teacher divergences); see `KDTerm`.
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
        terms=None,
        student_layer="features",
        teacher_layers="features",
        temperature=4.0,
        weight_decay=0.0,
        teacher_weighting="equal",
        name="feed_distiller",
        **kwargs,
    ):
        term_settings = {key: kwargs.pop(key) for key in _TERM_SETTINGS if key in kwargs}
        super().__init__(name=name, **kwargs)
        models, terms, (student_pass, teacher_passes) = validate(
            student, teachers, terms=terms, student_layer=student_layer,
            teacher_layers=teacher_layers, teacher_weighting=teacher_weighting,
            temperature=temperature, weight_decay=weight_decay, **term_settings,
        )
        self.weight_decay = float(weight_decay)
        self.teacher_weighting = weighting.get(teacher_weighting)
        teachers = models.teachers
        # `equal` is all ones: today's loss exactly, with no weights computed.
        self.weighted = bool(teachers) and self.teacher_weighting is not weighting.equal
        kd_terms = [term for term in terms if isinstance(term, terms_lib.KDTerm)]
        self.temperature = kd_terms[0].temperature if kd_terms else float(temperature)
        self.student = student
        self.student_head = models.student_head
        self.student_feature_shape = models.student_map

        for term in terms:
            if getattr(term, "_keras_feed_distiller", False):
                raise ValueError(
                    f"This {type(term).__name__} already belongs to a FEEDDistiller (its layers "
                    "train there): give each distiller its own terms.")
            term.build(models)
            term._keras_feed_distiller = True  # noqa: SLF001
        self._terms = frozen.Untracked(terms)
        # The terms' layers, tracked here (trained, checkpointed, saved with the
        # weights): the NTLs of the feature terms as `translators`, the others'
        # as `term_layers`.
        self.translators = [layer for term in terms if isinstance(term, terms_lib.FeatureTerm)
                            for layer in term.layers()]
        others = [layer for term in terms if not isinstance(term, terms_lib.FeatureTerm)
                  for layer in term.layers()]
        if others:
            self.term_layers = others
        # Inference twins: only the outputs the terms use (logits for KD or the
        # weighting), with BatchNormalization folded into the convolutions.
        needs_logits = self.weighted or any(term.needs_teacher_logits for term in terms)
        teacher_graphs = []
        for index, teacher_pass in enumerate(teacher_passes):
            used = teacher_pass.outputs[1:] if needs_logits else teacher_pass.outputs[2:]
            teacher_graphs.append(frozen.inference_model(
                keras.Model(teacher_pass.inputs[0], used, name=f"teacher_{index}_inference")))
        self._frozen = frozen.Untracked(
            {
                "student_pass": student_pass,
                "teachers": teachers,
                "teacher_graphs": teacher_graphs,
            }
        )
        self.student_loss_tracker = keras.metrics.Mean(name="student_loss")
        self.term_trackers = [
            keras.metrics.Mean(name=value_name) for term in terms for value_name in term.names()
        ]
        self.weight_trackers = [
            keras.metrics.Mean(name=f"teacher_weight_{index}")
            for index in range(len(teachers) if self.weighted else 0)
        ]
        self.decay_tracker = (
            keras.metrics.Mean(name="weight_decay_loss") if self.weight_decay > 0 else None
        )
        self.built = True

    # -- structure -----------------------------------------------------------

    # Teachers and terms are reached through methods, not attributes or
    # properties: Keras' weight saving walks every attribute, and would store them.

    @property
    def terms(self):
        """The distillation terms (`keras_feed.core.terms.Term`), in order."""
        return list(self._terms.value)

    @property
    def beta(self):
        """The summed weight of the feature terms (0 without any)."""
        return sum(t.weight for t in self.terms if isinstance(t, terms_lib.FeatureTerm))

    @property
    def kd_weight(self):
        """The share of the loss the KD terms take from the compiled loss (0 without KD)."""
        return sum(t.weight for t in self.terms if t.takes_from_student_loss)

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
        # The folded kernels follow from the teachers' weights (and the terms'
        # frozen transforms').
        read = [*state["teachers"], *(m for term in self.terms for m in term.frozen_models())]
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
        """Runs every teacher in inference mode, without gradients.

        Returns:
          `(teacher_logits, teacher_maps)`: lists with one entry per teacher
          (`teacher_logits` is empty when nothing uses them: no KD, no
          weighting), outside the gradient. A term's transforms (Factor
          Transfer's encoders) are applied by the term.
        """
        logits_list, maps = [], []
        for graph in self._frozen.value["teacher_graphs"]:
            *logits, features = keras.tree.flatten(graph(images, training=False))
            logits_list += [ops.stop_gradient(value) for value in logits]
            maps.append(ops.stop_gradient(features))
        return logits_list, maps

    def teacher_weights(self, teacher_logits, labels, student_logits):
        """`(batch, K)` weights of the teachers for each example (rows sum to K), outside
        the gradient, from `teacher_weighting`; None for `equal` (all ones)."""
        if not self.weighted:
            return None
        return weighting.weights(
            self.teacher_weighting, teacher_logits, labels=labels,
            student_logits=student_logits, temperature=self.temperature,
        )

    def distillation_terms(self, logits, student_features, teacher_logits, teacher_maps,
                           training, weights=None, labels=None):
        """Every term's values for one batch, float32 scalars keyed by their logged names.

        With `weights` (`teacher_weights`), the terms weigh each example per
        teacher (see `terms.Batch`).
        """
        batch = terms_lib.Batch(
            student_logits=logits, student_features=student_features,
            teacher_logits=teacher_logits, teacher_features=teacher_maps,
            teacher_weights=weights, labels=labels, training=training,
        )
        values = {}
        for term in self.terms:
            values.update(term.compute(batch))
        return values

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
        teacher_logits, teacher_maps = self.teacher_outputs(x)
        weights = self.teacher_weights(teacher_logits, y, y_pred["logits"])
        values = self.distillation_terms(
            y_pred["logits"], y_pred["features"], teacher_logits, teacher_maps, training,
            weights, labels=y,
        )
        extra = ops.zeros((), "float32")
        for term in self.terms:
            for value_name in term.names():
                extra = extra + term.weight * values[value_name]
        if self.decay_tracker is not None:
            values["weight_decay_loss"] = self.weight_decay_loss()
            extra = extra + values["weight_decay_loss"]
        total = (1.0 - self.kd_weight) * ops.cast(student_loss, "float32") + trainer.replica_share(extra)

        batch_size = ops.shape(keras.tree.flatten(x)[0])[0]
        values["student_loss"] = trainer.whole_batch(ops.cast(student_loss, "float32"))
        for tracker in self._term_trackers():
            tracker.update_state(values[tracker.name], sample_weight=batch_size)
        for index, tracker in enumerate(self.weight_trackers):
            tracker.update_state(ops.mean(weights[:, index]), sample_weight=batch_size)
        return total

    def _term_trackers(self):
        trackers = [self.student_loss_tracker, *self.term_trackers]
        return trackers + ([self.decay_tracker] if self.decay_tracker is not None else [])

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
        """What the distiller trains with: its terms, weighting and settings.

        The distiller is a training harness, saved as its parts (the student's
        `.keras` file, the terms' layers' weights), not deserialised from this.
        """
        return {
            "name": self.name,
            "terms": [term.describe() for term in self.terms],
            "teachers": [teacher.name for teacher in self.frozen_teachers()],
            "teacher_weighting": getattr(self.teacher_weighting, "__name__",
                                         str(self.teacher_weighting)),
            "weight_decay": self.weight_decay,
        }
