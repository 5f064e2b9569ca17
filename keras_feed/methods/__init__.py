"""The registry of training methods: one module and one class per method.

A method says what it needs (its `Plan`: teachers, NTLs, notes), checks its
own settings and shapes before anything runs, and runs its stages on an
`Experiment` (which holds the data, builds models, fits and writes the
outputs). `keras-feed-train --method=NAME` looks the method up here. Adding a
method is one new module with a `Method` subclass decorated with `@register`,
and one import line below.
"""

from keras_feed.methods.base import Method
from keras_feed.methods.base import Plan
from keras_feed.methods.base import get
from keras_feed.methods.base import names
from keras_feed.methods.base import register

# Each module registers its method when imported.
from keras_feed.methods import ce  # noqa: E402,F401
from keras_feed.methods import pfeed  # noqa: E402,F401
from keras_feed.methods import kd  # noqa: E402,F401
from keras_feed.methods import ft  # noqa: E402,F401
from keras_feed.methods import sfeed  # noqa: E402,F401

CrossEntropy = ce.CrossEntropy
ParallelFEED = pfeed.ParallelFEED
KnowledgeDistillation = kd.KnowledgeDistillation
FactorTransfer = ft.FactorTransfer
SequentialFEED = sfeed.SequentialFEED

__all__ = [
    "Method", "Plan", "get", "names", "register", "CrossEntropy", "ParallelFEED",
    "KnowledgeDistillation", "FactorTransfer", "SequentialFEED",
]
