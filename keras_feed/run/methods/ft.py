"""Factor Transfer (Kim, Park & Kwak, 2018): the method and its paraphraser stage.

The paraphraser and its trainer are `keras_feed.core.factor_transfer`; the student's
terms are the distiller's feature terms with the frozen encoder on the
teacher's map (`teacher_transforms`), logged as `ft_loss_<n>`.
"""

import dataclasses
import functools
import os

from keras_feed.core import factor_transfer
from keras_feed.core import translators as translators_lib
from keras_feed.run import storage
from keras_feed.run.methods.base import Method, register
from keras_feed.run.reporting import say


@register
class FactorTransfer(Method):
    """Factor Transfer, one paraphraser per teacher.

    Each teacher's map is paraphrased by an autoencoder pre-trained to
    reconstruct it (`--paraphraser_epochs` at `--paraphraser_learning_rate`,
    rate `--ft_rate`), then frozen; a translator on the student learns to
    match each factor: L = CE + beta * sum_n || F_Tn/||F_Tn|| - F_Sn/||F_Sn|| ||_1.
    """

    name = "ft"

    def plan(self, config):
        channels = functools.partial(translators_lib.factor_channels, rate=config.ft_rate)
        return dataclasses.replace(
            super().plan(config), translator_channels=channels, writes_feed_translators=False,
            notes=(f"paraphrasers: one per teacher, rate {config.ft_rate}, "
                   f"{config.paraphraser_epochs} epochs at lr {config.paraphraser_learning_rate}",),
        )

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
                "--paraphraser_learning_rate must be > 0, got "
                f"{config.paraphraser_learning_rate}."
            )

    def run(self, experiment):
        teachers, paths = experiment.teachers()
        paraphrasers = [
            train_paraphraser(experiment, teacher, index)
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
            student, distiller, teachers, teacher_paths=paths,
            extra={"ft_rate": experiment.config.ft_rate},
        )


def train_paraphraser(experiment, teacher, index):
    """The stage `paraphraser_<index>`: `teacher`'s paraphraser, trained once, then reused.

    Its weights are kept in `<model_dir>/paraphrasers/paraphraser_<i>.weights.h5`;
    it is returned frozen.
    """
    config = experiment.config
    layer = config.teacher_layers(config.teacher_layer_count)[index]
    path = os.path.join(config.model_dir, "paraphrasers", f"paraphraser_{index}.weights.h5")
    with experiment.strategy.scope():
        paraphraser = factor_transfer.new_paraphraser(
            teacher, teacher_layer=layer, rate=config.ft_rate,
            batchnorm=config.translator_batchnorm, name=f"paraphraser_{index}",
        )
    if os.path.isfile(path):
        say("Reusing paraphraser %d from %s", index, path)
        paraphraser.load_weights(path)
    else:
        say("Training paraphraser %d (rate %.2f, %d epochs, lr %g)", index, config.ft_rate,
            config.paraphraser_epochs, config.paraphraser_learning_rate)
        with experiment.strategy.scope():
            trainer = factor_transfer.ParaphraserTrainer(
                teacher, paraphraser, teacher_layer=layer,
                weight_decay=config.weight_decay,
            )
        experiment.fit_model(trainer, stage=f"paraphraser_{index}",
                             epochs=config.paraphraser_epochs,
                             learning_rate=config.paraphraser_learning_rate)
        storage.save_weights(paraphraser, path)
    paraphraser.trainable = False
    return paraphraser
