"""Name -> builder registry of the keras-feed model zoo.

Two kinds of names are understood by :func:`build`:

* fixed names added with :func:`register` (``resnet56``, ``resnet18``,
  ``small_cnn`` ...);
* parametric families whose parameters are parsed from the name
  (``wrn_<depth>_<width>``, ``resnext29_<cardinality>x<width>d``), added
  with :func:`register_family`. :func:`names` lists the common members of
  each family, :func:`families` the patterns.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import keras

from keras_feed.models import common, preprocessing

Builder = Callable[[Tuple[Optional[int], ...], int], keras.Model]

_BUILDERS: Dict[str, Builder] = {}


@dataclasses.dataclass(frozen=True)
class Family:
    """A parametric family of architectures.

    Attributes:
      pattern: human readable pattern, e.g. ``"wrn_<depth>_<width>"``.
      regex: full-match regular expression for member names.
      factory: ``factory(match) -> Builder``; raises ``ValueError`` for a
        name that matches ``regex`` but has invalid parameters.
      common: member names listed by :func:`names`.
    """

    pattern: str
    regex: "re.Pattern[str]"
    factory: Callable[["re.Match[str]"], Builder]
    common: Tuple[str, ...] = ()


_FAMILIES: List[Family] = []


def register(name: str, *, overwrite: bool = False) -> Callable[[Builder], Builder]:
    """Decorator registering ``fn(input_shape, num_classes) -> keras.Model``.

    Example::

        @register("my_net")
        def my_net(input_shape, num_classes):
            ...

    The builder must return a functional ``keras.Model`` with a layer named
    ``"features"``; see :mod:`keras_feed.models`. Registering an existing
    name raises ``ValueError`` unless ``overwrite=True``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")

    def decorator(fn: Builder) -> Builder:
        if not callable(fn):
            raise TypeError(f"builder for {name!r} is not callable: {fn!r}")
        if name in _BUILDERS and not overwrite:
            raise ValueError(
                f"model {name!r} is already registered (use overwrite=True)"
            )
        _BUILDERS[name] = fn
        return fn

    return decorator


def register_family(
    pattern: str,
    regex: str,
    factory: Callable[["re.Match[str]"], Builder],
    common_names: Sequence[str] = (),
) -> None:
    """Register a parametric family of names (see :class:`Family`)."""
    _FAMILIES.append(
        Family(pattern, re.compile(regex), factory, tuple(common_names))
    )


def names() -> List[str]:
    """Sorted list of the registered fixed names plus the common members of
    each parametric family (any valid family member is accepted by
    :func:`build`, see :func:`families`)."""
    out = set(_BUILDERS)
    for family in _FAMILIES:
        out.update(family.common)
    return sorted(out)


def families() -> List[str]:
    """Patterns of the parametric families, e.g. ``"wrn_<depth>_<width>"``."""
    return [family.pattern for family in _FAMILIES]


def _unknown(name) -> ValueError:
    return ValueError(
        f"Unknown model {name!r}. Known models: {', '.join(names())}; "
        f"parametric families: {', '.join(families())}."
    )


def get_builder(name: str) -> Builder:
    """Builder for ``name``; ``ValueError`` for unknown or invalid names."""
    if not isinstance(name, str):
        raise _unknown(name)
    if name in _BUILDERS:
        return _BUILDERS[name]
    for family in _FAMILIES:
        match = family.regex.fullmatch(name)
        if match is not None:
            return family.factory(match)
    raise _unknown(name)


def _as_int(value):
    """``int`` for Python/NumPy integers, the value unchanged otherwise."""
    if isinstance(value, bool):
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value


def _normalize_shape(input_shape) -> Tuple[Optional[int], ...]:
    error = ValueError(
        "input_shape must be (height, width, channels) with positive ints or "
        f"None, got {input_shape!r}"
    )
    try:
        shape = tuple(None if d is None else _as_int(d) for d in input_shape)
    except TypeError:
        raise error from None
    if len(shape) != 3 or shape[-1] is None or any(
        d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 1)
        for d in shape
    ):
        raise error
    return shape


def build(
    name: str,
    *,
    input_shape: Sequence[Optional[int]],
    num_classes: int,
    seed: Optional[int] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> keras.Model:
    """Build the architecture ``name`` as a functional ``keras.Model``.

    Args:
      name: a registered name or a member of a parametric family
        (see :func:`names` and :func:`families`).
      input_shape: ``(height, width, channels)``, channels last; height and
        width may be ``None``.
      num_classes: size of the logits.
      seed: optional int. Two builds with the same seed have identical
        initial weights: every initialiser/dropout layer of the built-in
        architectures receives its own integer seed drawn from
        ``random.Random(seed)``, and Python's global ``random`` generator
        (from which Keras draws default seeds) is re-seeded during the build
        and restored afterwards, which also makes user-registered builders
        deterministic. TensorFlow's global seed is not touched.
        ``None`` gives fresh random weights.
      mean, std: per-channel input statistics in [0, 1] pixel units (e.g.
        ``DatasetInfo.mean`` and ``.std``; one value per channel). Given, the
        model takes raw pixels in [0, 255] (uint8 or float) and normalises
        them itself, ``(x / 255 - mean) / std``, in its first layer after the
        input, named ``"preprocessing"`` (see
        :mod:`keras_feed.models.preprocessing`). ``None`` (both): no such
        layer, the model takes its inputs as they come. The layer has no
        weights and draws no seed: the other weights are the same either way.

    Returns:
      A ``keras.Model`` named after the architecture, mapping images to
      float32 logits ``(batch, num_classes)``, with a layer named
      ``"features"`` that outputs the final feature map before global
      pooling.

    Raises:
      ValueError: unknown name (the message lists the known names), invalid
        family parameters, or invalid ``input_shape`` / ``num_classes`` /
        ``mean`` / ``std``.
    """
    builder = get_builder(name)
    shape = _normalize_shape(input_shape)
    num_classes = common.check_positive_int(_as_int(num_classes), "num_classes")
    if (mean is None) != (std is None):
        raise ValueError("mean and std go together: give both or neither.")
    if mean is not None:
        layer = preprocessing.normalization(mean, std)  # checks them before building
        if len(layer.scale) not in (1, shape[-1]):
            raise ValueError(
                f"mean and std have {len(layer.scale)} values; the input has {shape[-1]} channels."
            )
    with common.seed_scope(None if seed is None else _as_int(seed)):
        model = builder(shape, num_classes)
    if not isinstance(model, keras.Model):
        raise TypeError(f"builder for {name!r} returned {type(model).__name__}")
    if mean is not None:
        # `add` shares the built model's layers, whose `.output` then still points
        # into the graph without the layer; a clone gives the model layers of its own,
        # so `keras.Model(model.inputs, model.get_layer("features").output)` works.
        shared = preprocessing.add(model, mean, std)
        model = keras.models.clone_model(shared)
        model.set_weights(shared.get_weights())
    return model
