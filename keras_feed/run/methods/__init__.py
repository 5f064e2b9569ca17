"""The registry of training methods: one module and one class per method.

A method says what it needs (its `Plan`: teachers, NTLs, notes), checks its
own settings and shapes before anything runs, and runs its stages on an
`Experiment` (which holds the data, builds models, fits and writes the
outputs). `keras-feed-train --method=NAME` looks the method up here. Adding a
method is one new module with a `Method` subclass decorated with `@register`,
and one import line below.
"""

from keras_feed.run.methods.base import Method, Plan, get, names, register

# Each module registers its method when imported, in this order (--method's choices).
from keras_feed.run.methods import ce  # noqa: E402,F401,I001
from keras_feed.run.methods import pfeed  # noqa: E402,F401,I001
from keras_feed.run.methods import kd  # noqa: E402,F401,I001
from keras_feed.run.methods import ft  # noqa: E402,F401,I001
from keras_feed.run.methods import sfeed  # noqa: E402,F401,I001

__all__ = ["Method", "Plan", "get", "names", "register"]
