"""Sequential FEED: a born-again chain of same-architecture students."""

import dataclasses
import os

from keras_feed.run import storage
from keras_feed.run.methods.base import Method, register
from keras_feed.run.reporting import say


@register
class SequentialFEED(Method):
    """Sequential FEED: a born-again chain of same-architecture students.

    Generation 0 is trained with cross-entropy (or is `--teachers`' first file);
    generation g = 1..`--generations`, a fresh network of `--model`, learns from
    generation g-1 through one NTL with the FEED loss. Every generation is saved
    as `generations/gen_<g>.keras`; the last one is the student.
    """

    name = "sfeed"
    uses_teacher_folder = False  # generation 0 is its teacher, never --teacher_dir's

    def plan(self, config):
        # Born-again: every generation has the student's architecture.
        return dataclasses.replace(
            super().plan(config), teacher_count=1, teacher_architecture=config.model,
            notes=(f"generations: 0 (CE) then 1..{config.generations}, each from the one "
                   "before",),
        )

    def check(self, config):
        super().check(config)
        if config.generations < 1:
            raise ValueError(f"--generations must be >= 1, got {config.generations}.")
        if isinstance(config.teacher_layer, tuple):
            raise ValueError("--method=sfeed distils from one network at a time; give one "
                             "--teacher_layer.")
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
                say("Reusing generation %d from %s", generation, path)
            else:
                student = experiment.build_student(seed=config.seed + generation)
                distiller = experiment.fit(student, [teacher], stage=f"gen_{generation}")
                storage.save_model(student, path)
            paths.append(path)
            previous = path
        metrics = experiment.evaluate(student, [teacher])
        # The last two generations are the run's teacher and student, just evaluated.
        generation_accuracies = [
            experiment.accuracy_of(experiment.load_frozen(p)) for p in paths[:-2]
        ] + [metrics["teachers"][0]["test_accuracy"], metrics["student"]["test_accuracy"]]
        return experiment.write_outputs(
            student,
            distiller,
            [teacher],
            teacher_paths=[paths[-2]],
            extra={
                "generations": [
                    {"generation": g, "path": os.path.abspath(p), "test_accuracy": a}
                    for g, (p, a) in enumerate(zip(paths, generation_accuracies))
                ]
            },
            metrics=metrics,
        )
