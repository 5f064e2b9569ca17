"""The package's shape: imports go one way down its layers, with no circle; modules stay small.

Read from the sources with `ast` (nothing is imported), so that a cycle hidden
by an import placed inside a function is caught as well as one at the top.
"""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "keras_feed")

#: keras_feed's units, bottom first: a module of `core`, `run` or `cli` (`run.methods`
#: is one unit), the `data` and `models` packages, or a top module. Each may import from
#: its own layer (without a circle) and the layers below it, never from a layer above;
#: the folders are layers too: `core`, `data` and `models` import nothing of `run`,
#: `run` nothing of `cli`. A new module goes into one of them.
LAYERS = [
    {"lazy"},
    # The backend-neutral core, the data and the model zoo: they know nothing of runs.
    {"data", "models", "core.losses", "core.weighting"},
    {"core.frozen", "core.translators", "core.trainer", "core.terms"},
    {"core.distiller", "core.factor_transfer"},
    # A run: files and devices, then checkpoints and methods, then settings, stages, runner.
    {"run.interrupts", "run.reporting", "run.files", "run.distribute", "run.settings"},
    {"run.storage", "run.summary"},
    {"run.checkpointing", "run.run_folder", "run.serving"},
    {"run.methods"},
    {"run.config"},
    {"run.experiment"},
    {"run.runner", "run.analysis"},
    # The command-line tools.
    {"cli.common"},
    {"cli.train", "cli.evaluate", "cli.export", "cli.analyze"},
]
MAX_LINES = 600


def modules():
    """`{dotted name: path}` of every module of keras_feed (packages as `<name>.__init__`)."""
    found = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                relative = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3]
                found[relative.replace(os.sep, ".")] = path
    return found


def resolve(name, known):
    """The module `name` refers to (`pkg` -> `pkg.__init__`), or None outside keras_feed."""
    if name in known:
        return name
    if name + ".__init__" in known:
        return name + ".__init__"
    return None


def imports_of(path, module, known):
    """The keras_feed modules that `module` imports anywhere in its file."""
    package = module.rsplit(".", 1)[0] if not module.endswith(".__init__") else module[:-9]
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = resolve(alias.name, known)
                if target:
                    found.add(target)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:  # `from pkg import module` names a module
                target = resolve(f"{base}.{alias.name}", known) or resolve(base, known)
                if target:
                    found.add(target)
    found.discard(module)
    return found


def unit(module):
    """The unit of `module` in LAYERS: `core.distiller`, `run.methods`, `data`, `lazy`...

    A package's own `__init__` is `__init__` (the lazy front doors name every submodule).
    """
    parts = module.split(".")[1:]
    if parts[-1] == "__init__" and parts[0] not in ("data", "models") or parts == ["__init__"]:
        return "__init__"
    if parts[0] in ("core", "run", "cli"):
        return ".".join(parts[:2])
    return parts[0]


@pytest.fixture(scope="module")
def graph():
    known = modules()
    return {module: imports_of(path, module, known) for module, path in known.items()}


def test_every_module_has_a_layer(graph):
    placed = set().union(*LAYERS)
    units = {unit(module) for module in graph} - {"__init__"}
    assert units <= placed, f"put {sorted(units - placed)} into a layer of LAYERS"


def test_imports_never_climb_a_layer(graph):
    level = {name: index for index, layer in enumerate(LAYERS) for name in layer}
    upward = []
    for module, targets in graph.items():
        if unit(module) == "__init__":  # the lazy front doors name every submodule
            continue
        for target in targets:
            source_unit, target_unit = unit(module), unit(target)
            if target_unit == "__init__" or source_unit == target_unit:
                continue
            if level[target_unit] > level[source_unit]:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports from a higher layer: " + ", ".join(sorted(upward))


def test_folders_import_nothing_from_a_folder_above(graph):
    """`core`, `data` and `models` never import `run` or `cli`; `run` never imports `cli`."""
    rank = {"core": 0, "data": 0, "models": 0, "run": 1, "cli": 2}
    upward = []
    for module, targets in graph.items():
        source = module.split(".")[1]
        for target in targets:
            folder = target.split(".")[1]
            if source in rank and folder in rank and rank[folder] > rank[source]:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports from a folder above: " + ", ".join(sorted(upward))


def test_no_import_cycle(graph):
    state = {}
    path = []

    def visit(module):
        state[module] = "open"
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state and unit(module) != "__init__":
            visit(module)


def test_no_module_over_the_line_limit():
    too_long = {}
    for module, path in modules().items():
        with open(path, encoding="utf-8") as handle:
            count = sum(1 for _ in handle)
        if count > MAX_LINES:
            too_long[module] = count
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"


def test_the_checker_sees_a_cycle_hidden_in_a_function(tmp_path, monkeypatch):
    """A lazy import that closes a circle counts: the check would fail on it."""
    package = tmp_path / "keras_feed"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("def f():\n    from keras_feed import high\n")
    (package / "high.py").write_text("from keras_feed import low\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", str(package))
    known = modules()
    fake = {module: imports_of(path, module, known) for module, path in known.items()}
    assert fake["keras_feed.low"] == {"keras_feed.high"}
    with pytest.raises(AssertionError, match="import cycle"):
        test_no_import_cycle(fake)
