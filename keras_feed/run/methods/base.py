"""What every training method is: `Method`, its `Plan`, and the registry."""

import dataclasses
from typing import Callable, Optional, Tuple

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


def same_channels(teacher_channels):
    """FEED's NTLs end at their teacher's channel count."""
    return teacher_channels


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a method will train for a configuration, known before it runs.

    Attributes:
      teacher_count: how many teachers the student learns from (0: none).
      teacher_architecture: the architecture of the teachers the run trains
        itself (None without teachers).
      translator_channels: the channels each NTL ends at, as a function of its
        teacher map's channels; None when the method builds no NTLs.
      writes_feed_translators: whether the run saves FEED NTLs
        (`translators.weights.h5`) that `keras_feed.run.analysis` can study.
      notes: lines the method adds to a dry run's plan.
    """

    teacher_count: int = 0
    teacher_architecture: Optional[str] = None
    translator_channels: Optional[Callable[[int], int]] = None
    writes_feed_translators: bool = False
    notes: Tuple[str, ...] = ()


class Method:
    """Base class. Subclasses set `name` and `uses_teachers`, implement `run`, and
    override `plan` and `check` where they differ."""

    name = None
    uses_teachers = True

    def plan(self, config):
        """The `Plan` of this method for `config`. The default: FEED's (NTLs to teachers' maps)."""
        if not self.uses_teachers:
            return Plan()
        return Plan(
            teacher_count=len(config.teachers) or config.num_teachers,
            teacher_architecture=config.teacher_architecture,
            translator_channels=same_channels if config.beta else None,
            writes_feed_translators=bool(config.beta),
        )

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

    def run(self, experiment):
        """Runs the method's stages, writes the outputs and returns the metrics."""
        raise NotImplementedError
