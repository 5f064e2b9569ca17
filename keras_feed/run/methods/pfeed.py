"""Parallel FEED: N frozen teachers, one NTL each on the student's feature map."""

from keras_feed.run.methods.base import Method, register


@register
class ParallelFEED(Method):
    """Parallel FEED: N frozen teachers, one NTL each on the student's map.

    With `kd_weight > 0` it adds Hinton KD from the teachers' averaged soft
    targets (FEED + KD).
    """

    name = "pfeed"

    def run(self, experiment):
        teachers, paths = experiment.teachers()
        student = experiment.build_student()
        distiller = experiment.fit(student, teachers, stage="student")
        return experiment.write_outputs(student, distiller, teachers, teacher_paths=paths)
