"""Plain cross-entropy training of the student: the baseline."""

from keras_feed.run.methods.base import Method, register


@register
class CrossEntropy(Method):
    """Plain training of the student with cross-entropy: the baseline."""

    name = "ce"
    uses_teachers = False

    def run(self, experiment):
        student = experiment.build_student()
        experiment.fit(student, [], stage="student", kd_weight=0.0)
        return experiment.write_outputs(student, None, [])
