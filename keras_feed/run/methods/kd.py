"""Hinton knowledge distillation from one teacher or an ensemble (logit level)."""

import dataclasses

from keras_feed.run.methods.base import Method, register


@register
class KnowledgeDistillation(Method):
    """Hinton KD from one or several teachers: the logit-level ensemble baseline.

    L = (1 - kd_weight) * CE + kd_weight * T^2 * KL(mean_n softmax(t_n/T) || softmax(s/T)).
    No NTLs are built.
    """

    name = "kd"

    def plan(self, config):
        return dataclasses.replace(super().plan(config), translator_channels=None,
                                   writes_feed_translators=False)

    def check(self, config):
        super().check(config)
        if not 0.0 < config.kd_weight <= 1.0:
            raise ValueError(
                "--method=kd needs --kd_weight in (0, 1] (the weight of the KD term), got "
                f"{config.kd_weight}."
            )

    def run(self, experiment):
        teachers, paths = experiment.teachers()
        student = experiment.build_student()
        distiller = experiment.fit(student, teachers, stage="student", beta=0.0)
        return experiment.write_outputs(student, distiller, teachers, teacher_paths=paths)
