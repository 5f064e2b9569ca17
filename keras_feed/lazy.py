"""Packages whose modules load on first use, so that importing one loads no other.

A package's `__init__` calls `lazy.exports(__name__, submodules, names)` and
binds what it returns: `kf.run.checkpointing` then imports that module when
first read, and `kf.TrainConfig` its defining module, nothing more. This keeps
TensorFlow out of what does not need it (the settings, `--help`, the IDX and
NumPy data path) and lets the commands set up logging before it loads.
"""

import importlib


def exports(package, submodules=(), names=None):
    """`(__getattr__, __dir__, __all__)` for `package`.

    Args:
      package: the package's `__name__`.
      submodules: its modules and subpackages, by relative name.
      names: `{public name: (module, attribute)}`: attributes of its modules
        offered at the package's top.
    """
    names = dict(names or {})
    public = sorted(names) + sorted(submodules)

    def __getattr__(name):  # noqa: N807 (the module-level hook's own name)
        if name in submodules:
            return importlib.import_module(f"{package}.{name}")
        if name in names:
            module, attribute = names[name]
            return getattr(importlib.import_module(module), attribute)
        raise AttributeError(f"module '{package}' has no attribute '{name}'")

    def __dir__():  # noqa: N807
        return public

    return __getattr__, __dir__, public
