"""How a `TrainConfig` setting is declared: `setting`, its range `Bounds`, its check.

A setting is a dataclass field whose metadata carries what the command line
needs to offer it as a flag (its help, choices, range, whether a rerun may
change it). Plain Python: importing it imports neither Keras nor TensorFlow.
"""

import dataclasses
import numbers
import re


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The values a numeric setting may take, written as its help shows them.

    `text` is one of: `> a`, `>= a`, `< b`, `<= b`, an interval `[a, b]`,
    `(a, b]`, `[a, b)`, `(a, b)`, or a set of values `{a, b, c}`. For a tuple
    setting the range applies to each item.
    """

    text: str

    def __post_init__(self):
        self._parsed()  # a malformed range fails where the field is defined

    def _parsed(self):
        text = self.text.strip()
        number = r"\s*(-?[0-9.]+(?:e-?[0-9]+)?)\s*"
        if text.startswith("{") and text.endswith("}"):
            return "set", tuple(float(v) for v in text[1:-1].split(","))
        match = re.fullmatch(r"(>=|>|<=|<)" + number, text)
        if match:
            return match.group(1), float(match.group(2))
        match = re.fullmatch(r"([\[(])" + number + "," + number + r"([\])])", text)
        if match:
            return "interval", (match.group(1), float(match.group(2)), float(match.group(3)),
                                match.group(4))
        raise ValueError(f"Malformed range '{self.text}'.")

    def __contains__(self, value):
        kind, spec = self._parsed()
        if kind == "set":
            return value in spec
        if kind == "interval":
            opening, low, high, closing = spec
            above = value >= low if opening == "[" else value > low
            below = value <= high if closing == "]" else value < high
            return above and below
        return {">": value > spec, ">=": value >= spec, "<": value < spec,
                "<=": value <= spec}[kind]

    @property
    def requirement(self):
        """`must be > 0`, `must lie in (0, 1]`, `must be one of 0, 1, 2`."""
        kind, _ = self._parsed()
        if kind == "set":
            return f"must be one of {self.text.strip()[1:-1]}"
        if kind == "interval":
            return f"must lie in {self.text}"
        return f"must be {self.text}"

    def __str__(self):
        return self.text


def setting(default, help, *, choices=None, resumable=False, item=None,  # pylint: disable=redefined-builtin
            bounds=None, per_teacher=False):
    """A `TrainConfig` field with what its flag needs.

    Args:
      default: the default value (also the flag's).
      help: the flag's help text.
      choices: the allowed values: a tuple, or a function returning them (a
        registry's `names`), read when the flags are defined.
      resumable: whether a rerun may change it and still resume the run
        (`keras_feed.run.run_folder.comparable_settings`): where and how it
        runs, not what it trains.
      item: for tuple settings, the type of their comma-separated items.
      bounds: for numbers, the range of their values (`Bounds` text, e.g.
        `"(0, 1]"`; each item's, for tuple settings); `check_config` refuses
        a value outside it, and the flag's help shows it. None (the default
        of an optional number) is always allowed.
      per_teacher: one value for every teacher, or a tuple of one per teacher
        (`item` each); its flag is a string of comma-separated values.
    """
    metadata = {"help": help, "choices": choices, "resumable": resumable, "item": item,
                "bounds": Bounds(bounds) if bounds is not None else None,
                "per_teacher": per_teacher}
    return dataclasses.field(default=default, metadata=metadata)


def check_bounds(field, value):
    """Raises `ValueError` (one line) if `value` lies outside `field`'s range.

    None passes for an optional setting (one whose default is None); a tuple
    setting's range applies to each of its items.
    """
    bounds = field.metadata["bounds"]
    if bounds is None or (value is None and field.default is None):
        return
    items = value if isinstance(value, tuple) else (value,)
    shown = ",".join(str(item) for item in items) if isinstance(value, tuple) else value
    for item in items:
        if isinstance(item, bool) or not isinstance(item, numbers.Real):
            raise ValueError(f"--{field.name} must be a number, got {shown!r}.")  # noqa: TRY004
        if item not in bounds:
            if isinstance(value, tuple):
                raise ValueError(
                    f"--{field.name} must be comma-separated values {bounds}, got {shown}.")
            raise ValueError(f"--{field.name} {bounds.requirement}, got {shown}.")
