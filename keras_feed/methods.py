"""The registry of training methods: one small class per method.

A method says whether it needs teachers, checks its own settings and shapes
before anything runs, and runs itself on an `Experiment` (which holds the data,
builds models, fits and writes the outputs). `keras-feed-train --method=NAME`
looks the method up here; adding one is writing a class and registering it.
"""

import os

from keras_feed import experiment as experiment_lib
from keras_feed import storage
from keras_feed import translators as translators_lib

_METHODS = {}


def register(method_class):
    """Class decorator: makes `method_class` available under its `name`."""
    _METHODS[method_class.name] = method_class
    return method_class


def names():
    """The registered method names, sorted."""
    return sorted(_METHODS)


def get(name):
    """An instance of the method called `name`; `ValueError` if unknown."""
    if name not in _METHODS:
        raise ValueError(f"Unknown method '{name}'; choose from {', '.join(names())}.")
    return _METHODS[name]()


class Method:
    """Base class. Subclasses set `name`, `uses_teachers` and implement `run`."""

    name = None
    uses_teachers = True

    def teacher_architecture(self, config):
        """The architecture of the teachers the run trains itself."""
        return config.teacher_architecture

    def teacher_count(self, config):
        """How many teachers the student learns from."""
        return len(config.teachers) or config.num_teachers

    def translator_channels(self, config, teacher_channels):
        """Channels each NTL ends at, for a teacher map of `teacher_channels`; None: no NTLs."""
        return teacher_channels if config.beta else None

    def plan_notes(self, config):
        """Lines this method adds to a dry run's plan."""
        return []

    def check(self, config):
        """Raises `ValueError` on settings this method cannot use.

        Subclasses extend it (calling `super().check(config)`).
        """
        if config.baseline and not self.uses_teachers:
            raise ValueError(
                f"--baseline with --method={self.name}: this student is the cross-entropy "
                "baseline itself."
            )
        if self.uses_teachers and config.beta == 0 and config.kd_weight == 0:
            raise ValueError(
                f"--method={self.name} with --beta=0 and --kd_weight=0: no term uses the "
                "teachers; train the student alone with --method=ce."
            )

    def check_shapes(self, student_shape, teacher_shape):
        """Raises `ValueError` when an NTL cannot map student onto teacher map."""
        translators_lib.spatial_adapter(student_shape, teacher_shape)

    def run(self, experiment):
        """Trains, writes the outputs and returns the metrics."""
        raise NotImplementedError


@register
class CrossEntropy(Method):
    """Plain training of the student with cross-entropy: the baseline."""

    name = "ce"
    uses_teachers = False

    def run(self, experiment):
        student = experiment.build_student()
        experiment.fit(student, [], stage="student", kd_weight=0.0)
        return experiment.write_outputs(student, None, [])


@register
class ParallelFEED(Method):
    """Parallel FEED: N frozen teachers, one NTL each on the student's map.

    With `kd_weight > 0` it adds Hinton KD from the teachers' averaged soft
    targets (FEED + KD).
    """

    name = "pfeed"

    def run(self, experiment):
        teachers = experiment.teachers()
        student = experiment.build_student()
        distiller = experiment.fit(student, teachers, stage="student")
        return experiment.write_outputs(student, distiller, teachers)


@register
class KnowledgeDistillation(Method):
    """Hinton KD from one or several teachers: the logit-level ensemble baseline.

    L = (1 - kd_weight) * CE + kd_weight * T^2 * KL(mean_n softmax(t_n/T) || softmax(s/T)).
    No NTLs are built.
    """

    name = "kd"

    def check(self, config):
        super().check(config)
        if not 0.0 < config.kd_weight <= 1.0:
            raise ValueError(
                f"--method=kd needs --kd_weight in (0, 1] (the weight of the KD term), got {config.kd_weight}."
            )

    def check_shapes(self, student_shape, teacher_shape):
        """KD compares logits only: any feature maps will do."""

    def translator_channels(self, config, teacher_channels):
        return None

    def run(self, experiment):
        teachers = experiment.teachers()
        student = experiment.build_student()
        distiller = experiment.fit(student, teachers, stage="student", beta=0.0)
        return experiment.write_outputs(student, distiller, teachers)


@register
class FactorTransfer(Method):
    """Factor Transfer (Kim, Park & Kwak, 2018), one paraphraser per teacher.

    Each teacher's map is paraphrased by an autoencoder pre-trained to
    reconstruct it (`--paraphraser_epochs` at `--paraphraser_learning_rate`, rate
    `--ft_rate`), then frozen; a
    translator on the student learns to match each factor:
    L = CE + beta * sum_n || F_Tn/||F_Tn|| - F_Sn/||F_Sn|| ||_1.
    """

    name = "ft"

    def translator_channels(self, config, teacher_channels):
        return translators_lib.factor_channels(teacher_channels, config.ft_rate)

    def check(self, config):
        super().check(config)
        if not 0.0 < config.ft_rate <= 1.0:
            raise ValueError(f"--ft_rate must lie in (0, 1], got {config.ft_rate}.")
        if config.paraphraser_epochs < 1:
            raise ValueError(
                f"--paraphraser_epochs must be >= 1, got {config.paraphraser_epochs}."
            )
        if not config.paraphraser_learning_rate > 0:
            raise ValueError(
                f"--paraphraser_learning_rate must be > 0, got {config.paraphraser_learning_rate}."
            )

    def run(self, experiment):
        teachers = experiment.teachers()
        paraphrasers = [
            experiment.train_paraphraser(teacher, index)
            for index, teacher in enumerate(teachers)
        ]
        student = experiment.build_student()
        distiller = experiment.fit(
            student,
            teachers,
            stage="student",
            teacher_transforms=[p.encoder for p in paraphrasers],
            translator_channels=[p.factor_channels for p in paraphrasers],
            feature_term="ft_loss",
        )
        return experiment.write_outputs(
            student, distiller, teachers, {"ft_rate": experiment.config.ft_rate}
        )


@register
class SequentialFEED(Method):
    """Sequential FEED: a born-again chain of same-architecture students.

    Generation 0 is trained with cross-entropy (or is `--teachers`' first file);
    generation g = 1..`--generations`, a fresh network of `--model`, learns from
    generation g-1 through one NTL with the FEED loss. Every generation is saved
    as `generations/gen_<g>.keras`; the last one is the student.
    """

    name = "sfeed"

    def teacher_architecture(self, config):
        return config.model  # born-again: every generation has the student's shape

    def teacher_count(self, config):
        return 1

    def plan_notes(self, config):
        return [f"generations: 0 (CE) then 1..{config.generations}, each from the one before"]

    def check(self, config):
        super().check(config)
        if config.generations < 1:
            raise ValueError(f"--generations must be >= 1, got {config.generations}.")
        if len(config.teachers) > 1:
            raise ValueError(
                f"--method=sfeed starts from one network; --teachers names {len(config.teachers)}."
            )

    def run(self, experiment):
        config = experiment.config
        folder = os.path.join(config.model_dir, "generations")
        previous = os.path.join(folder, "gen_0.keras")
        if config.teachers:
            previous = config.teachers[0]
        else:
            experiment.train_with_ce(
                previous, config.model, seed=config.seed, stage="gen_0",
                epochs=config.epochs, what="generation 0",
            )
        paths = [previous]
        for generation in range(1, config.generations + 1):
            path = os.path.join(folder, f"gen_{generation}.keras")
            teacher = experiment.load_frozen(previous)
            if os.path.isfile(path) and generation < config.generations:
                experiment_lib.say("Reusing generation %d from %s", generation, path)
            else:
                student = experiment.build_student(seed=config.seed + generation)
                distiller = experiment.fit(student, [teacher], stage=f"gen_{generation}")
                storage.save_model(student, path)
            paths.append(path)
            previous = path
        experiment.teacher_paths = [paths[-2]]
        metrics = experiment.evaluate(student, [teacher])
        # The last two generations are the run's teacher and student, just evaluated.
        generation_accuracies = [
            experiment.accuracy_of(experiment.load_frozen(p)) for p in paths[:-2]
        ] + [metrics["teachers"][0]["test_accuracy"], metrics["student"]["test_accuracy"]]
        return experiment.write_outputs(
            student,
            distiller,
            [teacher],
            {
                "generations": [
                    {"generation": g, "path": os.path.abspath(p), "test_accuracy": a}
                    for g, (p, a) in enumerate(zip(paths, generation_accuracies))
                ]
            },
            metrics=metrics,
        )
