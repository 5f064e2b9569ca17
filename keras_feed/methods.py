"""The registry of training methods: one small class per method.

A method says whether it needs teachers, checks its own settings and shapes
before anything runs, and runs itself on an `Experiment` (which holds the data,
builds models, fits and writes the outputs). `keras-feed-train --method=NAME`
looks the method up here; adding one is writing a class and registering it.
"""

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

    def check(self, config):
        """Raises `ValueError` on settings this method cannot use."""

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
        experiment.fit(student, [], stage="student")
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
