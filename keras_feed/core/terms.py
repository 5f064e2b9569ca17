"""Distillation terms: what the student learns from its teachers, one object each.

A `FEEDDistiller` adds to the student's own (compiled) loss a weighted sum of
terms. Each term is a small object, as Keras' `keras.distillation` losses are:

- `validate(models)` refuses, in one line, models it cannot work with
  (`Models`: the student, the teachers, their feature maps and heads);
- `build(models)` creates the layers it trains (the NTLs of `FeatureTerm`),
  called once by the distiller after `validate`;
- `compute(batch)` returns its values for one batch (`Batch`: the student's
  logits and map, the teachers' logits and maps, their per-example weights),
  float32 scalars keyed by the names it logs (`names()`); the distiller adds
  `weight * sum(values)` to the loss and logs each value;
- `get_config()` describes it; `from_config` builds it back.

`FeatureTerm` (FEED's, and Factor Transfer's with frozen transforms) and
`KDTerm` (Hinton's, or CA-MKD's per-teacher form) are keras-feed's. A new term
is a subclass in the user's own code (see README, "Your own term").
"""

import dataclasses
import math
from typing import Any, List, Optional

import keras
from keras import ops

from keras_feed.core import losses
from keras_feed.core import translators as translators_lib

#: KD forms: `ensemble` (Hinton's, the teachers' soft targets averaged) and
#: `per_teacher` (CA-MKD's: the teachers' KL divergences averaged).
KD_FORMS = ("ensemble", "per_teacher")


@dataclasses.dataclass
class Models:
    """What a term is validated and built against.

    Attributes:
      student: the student model.
      teachers: the teacher models (frozen).
      student_map: shape `(H, W, C)` of the student's feature map.
      teacher_maps: one shape `(H, W, C)` per teacher, at `teacher_layers`.
      teacher_layers: the feature-map layer of each teacher (name or path).
      student_head: `logits`, `softmax` or another activation's name.
      teacher_heads: the same, per teacher.
      num_classes: the classes the student (and every teacher) predicts.
    """

    student: Any
    teachers: List[Any]
    student_map: tuple
    teacher_maps: List[tuple]
    teacher_layers: List[str]
    student_head: str
    teacher_heads: List[str]
    num_classes: int

    def teacher_role(self, index):
        """`Teacher 0 ('resnet32', layer 'features')`, for messages."""
        return (f"Teacher {index} ('{self.teachers[index].name}', layer "
                f"'{self.teacher_layers[index]}')")


@dataclasses.dataclass
class Batch:
    """One batch, as the terms see it; every teacher value is outside the gradient.

    Attributes:
      student_logits: `(batch, classes)` pre-softmax logits of the student.
      student_features: the student's feature map `(batch, H, W, C)`.
      teacher_logits: one `(batch, classes)` per teacher; empty when no term
        and no weighting needs them (`Term.needs_teacher_logits`).
      teacher_features: one feature map per teacher.
      teacher_weights: `(batch, K)` per-example teacher weights whose rows sum
        to K, or None for `equal` weighting (all ones).
      labels: the batch's labels, as given to `fit`.
      training: whether this is a training step.
    """

    student_logits: Any
    student_features: Any
    teacher_logits: List[Any]
    teacher_features: List[Any]
    teacher_weights: Optional[Any]
    labels: Any
    training: bool

    def weighted_mean(self, per_example, index):
        """The batch mean of `per_example` (a `(batch,)` float32 vector) with each
        example weighted by teacher `index`'s weight (a plain mean without weights)."""
        if self.teacher_weights is None:
            return ops.mean(per_example)
        return ops.mean(self.teacher_weights[:, index] * per_example)


def check_weight(weight, what, *, at_most=None):
    """`weight` as a float, or a one-line `ValueError` unless it is finite, >= 0
    (and <= `at_most`)."""
    weight = float(weight)
    if not math.isfinite(weight) or weight < 0 or (at_most is not None and weight > at_most):
        limit = f"lie in [0, {at_most:g}]" if at_most is not None else "be finite and >= 0"
        raise ValueError(f"{what} must {limit}, got {weight}.")
    return weight


def check_logits_head(head, role, why):
    """Refuses a model whose head is not logits or softmax (its logits cannot be read)."""
    if head not in ("logits", "softmax"):
        raise ValueError(
            f"{role} ends in a '{head}' activation: {why} needs class logits (a last "
            "layer without activation, or with softmax)."
        )


def check_kd_form(form):
    """Refuses a KD form not in `KD_FORMS`, in one line."""
    if form not in KD_FORMS:
        raise ValueError(f"Unknown KD form '{form}'; choose from {', '.join(KD_FORMS)}.")


class Term:
    """Base class of the distillation terms.

    Subclasses implement `compute` and `names`, and override `validate`,
    `build`, `layers` and `get_config` where they need to. A term's
    `compute` sees one `Batch` and returns float32 scalars; everything it
    computes from the student is differentiated, the teachers' values are
    constants.

    Attributes:
      weight: the factor of the term's values in the loss.
      takes_from_student_loss: True for a term that takes its weight from the
        compiled loss (Hinton's KD: `(1 - weight) * loss + weight * KD`).
      needs_teacher_logits: whether `compute` reads `batch.teacher_logits`.
      needs_teachers: whether the term is meaningless without teachers.
    """

    takes_from_student_loss = False
    needs_teacher_logits = False
    needs_teachers = True

    def __init__(self, weight=1.0):
        self.weight = check_weight(weight, f"{type(self).__name__} weight")

    def validate(self, models):
        """Raises `ValueError` (one line) if the term cannot work with `models`."""
        if self.needs_teachers and not models.teachers:
            raise ValueError(f"{type(self).__name__} needs at least one teacher.")

    def build(self, models):
        """Creates the term's layers for `models` (already validated)."""

    def layers(self):
        """The layers the term trains (tracked, trained and saved with the student)."""
        return []

    def frozen_models(self):
        """Models whose weights the term reads as constants (refolded with the teachers)."""
        return []

    def names(self):
        """The names of the values `compute` returns, in order (after `build`)."""
        raise NotImplementedError

    def compute(self, batch):
        """`{name: float32 scalar}` for one `Batch`, before `weight`."""
        raise NotImplementedError

    def get_config(self):
        return {"weight": self.weight}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def describe(self):
        """`{"class": ..., "config": ...}`, as the distiller's `get_config` lists it."""
        return {"class": type(self).__name__, "config": self.get_config()}


def per_teacher(value, count, what):
    """`value` as a list of `count` values: one value (None, a string, a number or a
    function) for every teacher, or a sequence of one per teacher (`ValueError`, one
    line, when its length is not `count`)."""
    if value is None or callable(value) or isinstance(value, (str, int)):
        return [value] * count
    value = list(value)
    if len(value) != count:
        raise ValueError(f"{what}: {len(value)} given for {count} teachers.")
    return value


class FeatureTerm(Term):
    """FEED's feature term: one NTL per teacher, normalised L1 to its map.

    For teacher n and each example, the NTL's output on the student's map and
    the teacher's map (or a frozen transform of it) are flattened and
    L2-normalised; the value is the mean absolute difference
    (`losses.per_example_feed_loss`), weighted by the example's teacher
    weight, averaged over the batch. Logged as `<name>_<n>`.

    Args:
      weight: beta (500 in the paper on CIFAR).
      translator_channels: the channels each NTL ends at: None (the target's
        channels), one int or a function of the target's channels for all,
        or one per teacher.
      translator_batchnorm: BatchNorm inside the NTLs.
      teacher_transforms: None, or one frozen model per teacher applied to its
        map before the distance (Factor Transfer's paraphraser encoders; None
        in the list: identity).
      name: the logged name's prefix (`feed_loss`; `ft_loss` for Factor Transfer).
    """

    def __init__(self, weight=500.0, *, translator_channels=None, translator_batchnorm=False,
                 teacher_transforms=None, name="feed_loss"):
        super().__init__(weight)
        self.translator_channels = translator_channels
        self.translator_batchnorm = bool(translator_batchnorm)
        self.teacher_transforms = teacher_transforms
        self.name = name
        self.translators = []
        self._transforms = []

    def _targets(self, models):
        """Per teacher: (transform or None, target shape, NTL channels)."""
        count = len(models.teachers)
        transforms = per_teacher(self.teacher_transforms, count, "teacher_transforms")
        channels = per_teacher(self.translator_channels, count, "translator_channels")
        targets = []
        for transform, shape, wanted in zip(transforms, models.teacher_maps, channels):
            if transform is not None:
                transform.trainable = False
                shape = tuple(transform.compute_output_shape((None,) + tuple(shape))[1:])
            out = wanted(shape[-1]) if callable(wanted) else wanted
            targets.append((transform, shape, out))
        return targets

    def validate(self, models):
        super().validate(models)
        for index, (_, shape, _) in enumerate(self._targets(models)):
            try:
                translators_lib.spatial_adapter(models.student_map, shape)
            except ValueError as error:
                raise ValueError(f"{models.teacher_role(index)}: {error}") from None

    def build(self, models):
        self._transforms = []
        self.translators = []
        for index, (transform, shape, out) in enumerate(self._targets(models)):
            self._transforms.append(transform)
            self.translators.append(translators_lib.translator_for(
                models.student_map, shape, out_channels=out,
                batchnorm=self.translator_batchnorm, name=f"ntl_{index}",
            ))

    def layers(self):
        return list(self.translators)

    def frozen_models(self):
        return [transform for transform in self._transforms if transform is not None]

    def names(self):
        return [f"{self.name}_{index}" for index in range(len(self.translators))]

    def compute(self, batch):
        values = {}
        for index, (translator, transform, target) in enumerate(
                zip(self.translators, self._transforms, batch.teacher_features)):
            if transform is not None:
                target = ops.stop_gradient(transform(target, training=False))
            translated = translator(batch.student_features, training=batch.training)
            values[f"{self.name}_{index}"] = batch.weighted_mean(
                losses.per_example_feed_loss(target, translated), index)
        return values

    def get_config(self):
        channels = self.translator_channels
        return {
            "weight": self.weight,
            "translator_channels": None if callable(channels) else channels,
            "translator_batchnorm": self.translator_batchnorm,
            "teacher_transforms": (None if self.teacher_transforms is None
                                   else [getattr(t, "name", None) for t in self.teacher_transforms]),
            "name": self.name,
        }


class KDTerm(Term):
    """Knowledge distillation from the teachers' logits, at temperature T.

    `form="ensemble"` (Hinton's, FEED's baseline): T^2 KL(sum_k (w_k / K)
    softmax(t_k / T) || softmax(s / T)), the weights entering the averaged
    soft targets. `form="per_teacher"` (CA-MKD's): T^2 (1 / K) sum_k
    mean_i(w_ik KL(softmax(t_ik / T) || softmax(s_i / T))), each teacher's
    divergence weighted per example. (CA-MKD's code divides once more by K,
    its weights summing to 1 where these sum to K: the same loss, K times
    smaller, which its KD weight absorbs.) With one teacher both forms are
    Hinton's KD. The compiled loss gets `1 - weight`. Logged as `name`.

    Args:
      weight: the KD weight in [0, 1].
      temperature: T > 0.
      form: `ensemble` or `per_teacher` (`KD_FORMS`).
      name: the logged name.
    """

    takes_from_student_loss = True
    needs_teacher_logits = True

    def __init__(self, weight=0.9, *, temperature=4.0, form="ensemble", name="kd_loss"):
        super().__init__(check_weight(weight, "kd_weight", at_most=1.0))
        check_kd_form(form)
        temperature = float(temperature)
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be finite and > 0, got {temperature}.")
        self.temperature = temperature
        self.form = form
        self.name = name

    def validate(self, models):
        super().validate(models)
        check_logits_head(models.student_head, f"Student '{models.student.name}'", "KD")
        for index, head in enumerate(models.teacher_heads):
            check_logits_head(head, f"Teacher {index} ('{models.teachers[index].name}')", "KD")

    def names(self):
        return [self.name]

    def compute(self, batch):
        temperature = self.temperature
        if self.form == "ensemble":
            soft_targets = losses.ensemble_soft_targets(
                batch.teacher_logits, temperature, batch.teacher_weights)
            return {self.name: losses.kd_loss(soft_targets, batch.student_logits, temperature)}
        total = 0.0
        for index, logits in enumerate(batch.teacher_logits):
            soft_targets = keras.ops.softmax(ops.cast(logits, "float32") / temperature, axis=-1)
            per_example = losses.per_example_kd_loss(soft_targets, batch.student_logits, temperature)
            total = total + batch.weighted_mean(per_example, index)
        return {self.name: total / float(len(batch.teacher_logits))}

    def get_config(self):
        return {"weight": self.weight, "temperature": self.temperature, "form": self.form,
                "name": self.name}


def default_terms(*, teachers, beta=500.0, kd_weight=0.0, temperature=4.0, kd_form="ensemble",
                  translator_batchnorm=False, teacher_transforms=None, translator_channels=None,
                  feature_term="feed_loss"):
    """The terms `FEEDDistiller`'s keyword arguments stand for.

    A `FeatureTerm` when beta > 0 and a `KDTerm` when kd_weight > 0, with
    teachers; no terms without teachers (plain training).
    """
    beta = check_weight(beta, "beta")
    kd_weight = check_weight(kd_weight, "kd_weight", at_most=1.0)
    check_kd_form(kd_form)
    if kd_form != "ensemble" and kd_weight == 0:
        raise ValueError(f"kd_form={kd_form!r} shapes the KD term, and kd_weight=0 builds none.")
    terms = []
    if kd_weight > 0 and not teachers:
        raise ValueError("kd_weight > 0 needs at least one teacher.")
    if not teachers:
        return terms
    if beta > 0:
        terms.append(FeatureTerm(beta, translator_channels=translator_channels,
                                 translator_batchnorm=translator_batchnorm,
                                 teacher_transforms=teacher_transforms, name=feature_term))
    if kd_weight > 0:
        terms.append(KDTerm(kd_weight, temperature=temperature, form=kd_form))
    if not terms:
        raise ValueError(
            f"{len(teachers)} teacher(s) given but no term uses them (beta=0 and "
            "kd_weight=0): train the student alone (no teachers), or set beta or kd_weight."
        )
    return terms
