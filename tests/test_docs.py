"""README.md and docs/*.md name only what exists: flags, methods, commands, files, links.

- every `--name` in backticks or a code block is a flag of the command it is given
  to (`keras-feed-train`, `-eval`, `-export`, `-analyze`, or a benchmark script),
  and a bare one (`--beta`) a flag of one of the four commands;
- every `--method=NAME` is a registered method;
- every `keras-feed-*` is one of the four console scripts of setup.py;
- every relative link (and its `#anchor`) and every repository file named in
  backticks (`flags/...cfg`, `benchmarks/...`) exists;
- every `keras_feed.` / `kf.` path in backticks names a module, or a name that
  module defines;
- the README's test command is the one CI runs, its quickstart tables are the
  recorded ones, and its public API resolves.

The train flags come from `keras_feed.run.config.flag_specs()`; those of the other
commands from their `--help` (or, if that fails, from their sources, and a test
says so).
"""

import ast
import functools
import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "keras_feed")

#: The console scripts and the module each runs (`python -m keras_feed.cli.<module>`).
COMMANDS = {"train": "train", "eval": "evaluate", "export": "export", "analyze": "analyze"}

#: absl's own flags, which every command takes.
ABSL_FLAGS = {"flagfile", "help", "helpfull", "helpshort", "helpxml", "undefok"}

#: Programs other than keras-feed's whose flags the pages show (not checked).
OTHER_PROGRAMS = {
    "pip", "pip3", "apt-get", "apt", "tensorboard", "saved_model_cli", "vmstat", "git",
    "nohup", "nice", "sudo", "pytest",
}

#: `--name=value` stands for any flag.
PLACEHOLDER_FLAGS = {"name"}

FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9_]*)")
METHOD = re.compile(r"(?<![\w-])--method=([A-Za-z0-9_]+)")
CONSOLE_SCRIPT = re.compile(r"(?<![\w-])keras-feed-[a-z]+")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
REPO_FILE = re.compile(r"(?<![\w./-])((?:benchmarks|flags|tests|keras_feed)/[\w./<>*-]*)")
DOTTED = re.compile(r"(?<![\w.])(keras_feed|kf)((?:\.[A-Za-z_]\w*)+)")


def pages():
    """`{path relative to the repository: text}` of README.md and docs/*.md."""
    paths = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    found = {}
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            found[os.path.relpath(path, ROOT)] = handle.read()
    return found


def test_there_are_pages():
    assert "README.md" in pages()
    assert len(pages()) > 1, "docs/*.md are missing"


# -- reading the pages ----------------------------------------------------------------------


def split_page(text):
    """`(blocks, paragraphs)`: fenced code blocks `(language, lines)`, and prose paragraphs."""
    blocks, paragraphs, prose = [], [], []
    fence = None
    for line in text.splitlines():
        stripped = line.strip()
        if fence is None and stripped.startswith("```"):
            fence = (stripped[3:].strip(), [])
            continue
        if fence is not None:
            if stripped.startswith("```"):
                blocks.append(fence)
                fence = None
            else:
                fence[1].append(line)
            continue
        prose.append(line)
    text = "\n".join(prose)
    paragraphs = [part for part in re.split(r"\n\s*\n", text) if part.strip()]
    return blocks, paragraphs


def code_spans(paragraph):
    """The inline code of a paragraph (a span may run over a line break)."""
    return [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", paragraph)]


def shell_lines(lines):
    """The commands of a shell block: continuation lines joined, `&&`, `;` and `|` split."""
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    commands = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0] if not line.lstrip().startswith("#") else ""
        commands.extend(part for part in re.split(r"&&|;|\|", line) if part.strip())
    return commands


def program_of(command):
    """Who takes the flags of `command`: `("command", "train")`, `("script", path)`,
    `("other", name)`, or `("any", None)` for flags given alone (`--beta=500`, `... --x`).
    """
    words = command.split()
    while words and (re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0])
                     or words[0] in ("nohup", "sudo", "time")):
        words = words[1:]
    if words and words[0] == "nice":
        words = words[1:]
        if words[:1] == ["-n"]:
            words = words[2:]
    if not words or words[0].startswith("-") or words[0].startswith("..."):
        return ("any", None)
    first = words[0]
    match = re.fullmatch(r"keras-feed-([a-z]+)", first)
    if match:
        return ("command", match.group(1))
    if re.fullmatch(r"python[0-9.]*", first):
        if words[1:2] == ["-m"] and len(words) > 2:
            module = re.fullmatch(r"keras_feed\.cli\.([a-z]+)", words[2])
            if module:
                names = {module_name: name for name, module_name in COMMANDS.items()}
                return ("command", names.get(module.group(1), module.group(1)))
            return ("other", words[2])
        for word in words[1:]:
            if word.endswith(".py"):
                return ("script", word)
        return ("other", first)
    if first.endswith(".sh"):  # a wrapper: the program it runs
        rest = program_of(" ".join(words[1:]))
        return rest if rest[0] != "any" else ("other", first)
    if first.endswith(".py"):
        return ("script", first)
    if first in OTHER_PROGRAMS:
        return ("other", first)
    return ("any", None)


def flag_uses():
    """Every flag named in the pages: `(page, program, flag, where)`."""
    uses = []
    for page, text in pages().items():
        blocks, paragraphs = split_page(text)
        for language, lines in blocks:
            if language not in ("", "bash", "sh", "shell", "console"):
                continue
            for command in shell_lines(lines):
                program = program_of(command)
                for flag in FLAG.findall(command):
                    uses.append((page, program, flag, command.strip()))
        for paragraph in paragraphs:
            scripts = sorted(set(re.findall(r"benchmarks/\w+\.py", paragraph)))
            for span in code_spans(paragraph):
                program = program_of(span)
                if program == ("any", None) and scripts:
                    program = ("any", tuple(scripts))
                for flag in FLAG.findall(span):
                    uses.append((page, program, flag, span))
    return uses


# -- what exists ----------------------------------------------------------------------------


def console_scripts():
    """`{script: module}` from setup.py's entry points."""
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as handle:
        text = handle.read()
    return dict(re.findall(r"[\"'](keras-feed-[a-z]+)=([\w.]+):\w+[\"']", text))


def help_flags(text):
    """The flag names a `--help` lists (`  --name: ...`, `  --[no]name: ...`)."""
    return set(re.findall(r"^\s+--(?:\[no\])?([a-z][a-z0-9_]*):", text, re.MULTILINE))


def defined_flags(path):
    """The flags a module defines with absl (`flags.DEFINE_*("name", ...)`) or argparse."""
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), path)
    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        name = getattr(node.func, "attr", getattr(node.func, "id", ""))
        first = node.args[0]
        if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
            continue
        if name.startswith("DEFINE"):
            found.add(first.value)
        elif name == "add_argument":
            for argument in node.args:
                if isinstance(argument, ast.Constant) and str(argument.value).startswith("--"):
                    found.add(argument.value[2:])
    return found


@functools.cache
def command_flags():
    """`({command: flags}, {command: why its --help could not be read})`."""
    from keras_feed.run import config

    flags = {"train": {spec.name for spec in config.flag_specs()}}
    problems = {}
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    running = {
        command: subprocess.Popen(
            [sys.executable, "-m", f"keras_feed.cli.{module}", "--help"], cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for command, module in COMMANDS.items() if command != "train"
    }
    for command, process in running.items():
        try:
            out, err = process.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        listed = help_flags(out)
        if listed:
            flags[command] = listed
            continue
        problems[command] = (f"`python -m keras_feed.cli.{COMMANDS[command]} --help` listed no "
                             f"flags (exit {process.returncode}): {(err or out)[-1500:]}")
        source = os.path.join(PACKAGE, "cli", f"{COMMANDS[command]}.py")
        flags[command] = defined_flags(source) if os.path.isfile(source) else set()
        common = os.path.join(PACKAGE, "cli", "common.py")
        if os.path.isfile(common):
            flags[command] |= defined_flags(common)
    return flags, problems


def allowed_flags(program):
    """The flags `program` (from `program_of`) takes, absl's own included."""
    flags, _ = command_flags()
    kind, name = program
    if kind == "command":
        return flags.get(name, set()) | ABSL_FLAGS
    if kind == "script":
        path = os.path.join(ROOT, name)
        return script_flags(path) if os.path.isfile(path) else set()
    allowed = set().union(*flags.values()) | ABSL_FLAGS | PLACEHOLDER_FLAGS
    for script in name or ():
        allowed |= script_flags(os.path.join(ROOT, script))
    return allowed


def script_flags(path):
    """The flags a script defines, itself or in a module of its own folder it imports
    (the studies of benchmarks/ take theirs from `study_common.py`)."""
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), path)
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            imported.add(node.module)
    found = defined_flags(path)
    for module in imported:
        sibling = os.path.join(os.path.dirname(path), f"{module}.py")
        if os.path.isfile(sibling):
            found |= defined_flags(sibling)
    return found


# -- the checks -----------------------------------------------------------------------------


def test_each_command_lists_its_flags():
    """`--help` of keras-feed-eval, -export and -analyze runs and lists their flags."""
    flags, problems = command_flags()
    assert not problems, "\n".join(problems.values())
    for command in COMMANDS:
        assert flags[command], f"keras-feed-{command} has no flags"
    assert {"method", "beta", "model_dir"} <= flags["train"]
    assert "model_path" in flags["eval"] and "student" in flags["export"]
    assert "runs" in flags["analyze"]


def test_every_flag_named_exists():
    unknown = []
    for page, program, flag, where in flag_uses():
        if program[0] == "other":
            continue
        if flag not in allowed_flags(program):
            who = {"command": f"keras-feed-{program[1]}", "script": program[1]}.get(
                program[0], "any of the four commands")
            unknown.append(f"{page}: --{flag} is not a flag of {who}: `{where}`")
    _, problems = command_flags()
    note = ("\n(could not read: " + "; ".join(problems) + ")") if problems and unknown else ""
    assert not unknown, "\n".join(unknown) + note


def test_the_checks_see_the_flags_of_each_command():
    """The pages name flags of every command (the check above is not vacuous)."""
    seen = {program[1] for _, program, _, _ in flag_uses() if program[0] == "command"}
    assert set(COMMANDS) <= seen, f"no flags found for {sorted(set(COMMANDS) - seen)}"


def test_every_method_named_is_registered():
    from keras_feed.run import methods

    registered = set(methods.names())
    for page, text in pages().items():
        for name in METHOD.findall(text):
            if name.isupper():  # `--method=NAME`: a placeholder
                continue
            assert name in registered, f"{page}: --method={name} is not one of {sorted(registered)}"
    described = set(re.findall(r"^\| `(\w+)` \|", pages()[os.path.join("docs", "methods.md")], re.MULTILINE))
    assert registered <= described, f"docs/methods.md's table lacks {sorted(registered - described)}"


def test_every_console_script_named_exists():
    scripts = console_scripts()
    assert sorted(scripts) == sorted(f"keras-feed-{name}" for name in COMMANDS), scripts
    for script, module in scripts.items():
        assert module == f"keras_feed.cli.{COMMANDS[script[len('keras-feed-'):]]}", (script, module)
        assert os.path.isfile(os.path.join(ROOT, *module.split(".")) + ".py"), module
    for page, text in pages().items():
        for name in CONSOLE_SCRIPT.findall(text):
            assert name in scripts, f"{page}: {name} is not a console script ({sorted(scripts)})"


def heading_anchors(text):
    """GitHub's anchors of a page's headings."""
    _, paragraphs = split_page(text)
    anchors = set()
    for paragraph in paragraphs:
        for line in paragraph.splitlines():
            match = re.match(r"#{1,6}\s+(.*)", line)
            if match:
                title = re.sub(r"[`*]", "", match.group(1).strip().lower())
                anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_every_relative_link_points_to_an_existing_file():
    texts = pages()
    broken = []
    for page, text in texts.items():
        _, paragraphs = split_page(text)
        for target in LINK.findall("\n\n".join(paragraphs)):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            full = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path \
                else os.path.join(ROOT, page)
            if not os.path.exists(full):
                broken.append(f"{page}: {target} (no {os.path.relpath(full, ROOT)})")
                continue
            if anchor and full.endswith(".md"):
                with open(full, encoding="utf-8") as handle:
                    if anchor not in heading_anchors(handle.read()):
                        broken.append(f"{page}: {target} (no heading #{anchor})")
    assert not broken, "\n".join(broken)


def test_every_repository_file_named_exists():
    missing = []
    for page, text in pages().items():
        blocks, paragraphs = split_page(text)
        spans = [span for paragraph in paragraphs for span in code_spans(paragraph)]
        spans += [line for _, lines in blocks for line in lines]
        for span in spans:
            for path in REPO_FILE.findall(span):
                path = path.rstrip(".,:;")
                if re.search(r"[<>*]|\.\.\.", path):  # a pattern, not a file
                    continue
                if not os.path.exists(os.path.join(ROOT, path)):
                    missing.append(f"{page}: {path}")
    assert not missing, "no such file: " + ", ".join(missing)


@functools.cache
def module_names(path):
    """The names a module's source defines at its top, and the strings it names (lazy exports)."""
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), path)
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    if os.path.basename(path) == "__init__.py":
        names.update(node.value for node in ast.walk(tree)
                     if isinstance(node, ast.Constant) and isinstance(node.value, str))
    return names


def resolve(parts):
    """None if `keras_feed.<parts>` names a module or a name its module defines, else why not."""
    folder, module = PACKAGE, os.path.join(PACKAGE, "__init__.py")
    for part in parts:
        if folder and os.path.isfile(os.path.join(folder, part, "__init__.py")):
            folder = os.path.join(folder, part)
            module = os.path.join(folder, "__init__.py")
        elif folder and os.path.isfile(os.path.join(folder, part + ".py")):
            folder, module = None, os.path.join(folder, part + ".py")
        elif part in module_names(module):
            return None  # a name the module defines: its attributes are not followed
        else:
            return f"{os.path.relpath(module, ROOT)} defines no {part}"
    return None


def test_every_module_path_named_exists():
    wrong = []
    for page, text in pages().items():
        blocks, paragraphs = split_page(text)
        spans = [span for paragraph in paragraphs for span in code_spans(paragraph)]
        spans += [line for language, lines in blocks if language == "python" for line in lines]
        for span in spans:
            for root, dotted in DOTTED.findall(span):
                parts = dotted.split(".")[1:]
                problem = resolve(parts)
                if problem:
                    wrong.append(f"{page}: {root}{dotted}: {problem}")
    assert not wrong, "\n".join(sorted(set(wrong)))


# -- the README -----------------------------------------------------------------------------


def readme():
    return pages()["README.md"]


def test_the_readme_gives_the_test_command_ci_runs():
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as handle:
        ci = handle.read()
    assert "\npython -m pytest -q tests\n" in ci
    blocks, _ = split_page(readme())
    lines = [line.strip() for _, block in blocks for line in block]
    assert "python -m pytest -q tests" in lines
    assert 'python -m pytest -q -m "not slow" tests' in lines


def test_the_readme_quickstart_tables_are_the_recorded_ones():
    """The seeds table and its summary are those of benchmarks/results/quickstart_seeds.md."""
    with open(os.path.join(ROOT, "benchmarks", "results", "quickstart_seeds.md"), encoding="utf-8") as f:
        recorded = f.read()
    text = readme()
    table = [line for line in text.splitlines() if re.match(r"\| \d+ \| \d", line)]
    summary = [line for line in text.splitlines()
               if re.match(r"- (CE student|FEED student|gain|verdict): ", line)]
    assert len(table) == 3 and len(summary) == 4, (table, summary)
    for line in table + summary:
        assert line in recorded, f"README's line is not in quickstart_seeds.md: {line}"
    # The closing table of the seed-0 run gives the same numbers as the table's seed 0 row.
    seed_0 = re.findall(r"[+]?\d+\.\d+", table[0])
    closing = re.search(r"Test accuracy, then validation accuracy:\n(.*?)```", text, re.DOTALL)
    assert closing, "the quickstart's closing table is missing"
    assert re.findall(r"[+]?\d+\.\d+", closing.group(1)) == seed_0


def test_the_readme_lists_the_public_api_and_the_commands():
    text = readme()
    for name in ("FEEDDistiller", "Translator", "losses", "models", "data", "TrainConfig",
                 "train", "fit_resumable", "StageCheckpoint", "load_predictor", "core", "run",
                 "cli"):
        assert f"`kf.{name}" in text, f"README's API list lacks kf.{name}"
    for script, module in COMMANDS.items():
        assert f"`keras-feed-{script}`" in text
        assert f"`python -m keras_feed.cli.{module}`" in text


def test_the_readme_public_api_resolves():
    """Every `kf.NAME` of the README's API list is an attribute of keras_feed."""
    import keras_feed as kf

    section = readme().split("## Public API", 1)[1].split("\n## ", 1)[0]
    names = sorted(set(re.findall(r"`kf\.(\w+)", section)))
    assert names
    missing = []
    for name in names:
        try:
            getattr(kf, name)
        except (AttributeError, ImportError) as error:
            missing.append(f"kf.{name}: {error}")
    assert not missing, "\n".join(missing)


def test_the_python_examples_parse():
    for page, text in pages().items():
        blocks, _ = split_page(text)
        for language, lines in blocks:
            if language == "python":
                ast.parse("\n".join(lines), f"{page} (python block)")


def test_the_readme_stays_a_front_page():
    # A front page: set-up, a Python example with a user-written term, the tests, the API,
    # the evidence in brief; the reference is in docs/.
    assert len(readme().splitlines()) <= 230


# -- the checker itself ---------------------------------------------------------------------


@pytest.mark.parametrize("command, program", [
    ("keras-feed-train --flagfile=flags/quickstart.cfg", ("command", "train")),
    ("python -m keras_feed.cli.evaluate --help", ("command", "eval")),
    ("KERAS_BACKEND=jax keras-feed-eval --model_path=x", ("command", "eval")),
    ("nohup nice -n 19 python benchmarks/fashion_mnist_study.py > study.log 2>&1 ",
     ("script", "benchmarks/fashion_mnist_study.py")),
    ("benchmarks/paused.sh python benchmarks/throughput.py", ("script", "benchmarks/throughput.py")),
    ("tensorboard --logdir runs/quickstart/logs", ("other", "tensorboard")),
    ("python -m pytest -q tests", ("other", "pytest")),
    ("--beta", ("any", None)),
    ("... --method=pfeed --kd_weight=0.5", ("any", None)),
])
def test_program_of(command, program):
    assert program_of(command) == program


def test_help_flags_reads_absl_help():
    text = "flags:\n  --batch_size: Batch size.\n    (default: '256')\n  --[no]overwrite: Replace.\n"
    assert help_flags(text) == {"batch_size", "overwrite"}


def test_a_script_takes_the_flags_of_the_modules_it_imports():
    flags = script_flags(os.path.join(ROOT, "benchmarks", "heterogeneous_study.py"))
    assert {"report_only", "smoke", "results_dir", "runs_dir"} <= flags


def test_a_wrong_flag_is_caught(monkeypatch):
    text = "Run `keras-feed-eval --model_path=m --no_such_flag=1` and `--beta`.\n"
    monkeypatch.setitem(globals(), "pages", lambda: {"README.md": text})
    with pytest.raises(AssertionError, match="no_such_flag is not a flag of keras-feed-eval"):
        test_every_flag_named_exists()
