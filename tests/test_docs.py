"""The docs agree with the code: every relative link resolves, and every flag a page names exists
in the parser of the command it belongs to, with the default its flags table gives.

Parsers are built in-process: the argparse ones by their own builder functions, the absl ones
(``train``, ``train.compile``) by running their ``DEFINE_*`` statements into a fresh ``FlagValues``
(importing both modules into one process would define ``--config`` twice). ``--config.FIELD`` is
checked against the config file the command line names, else against every config; a benchmark
script's flags against the ``add_argument`` calls in it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib.util
import re
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from absl import flags
from ml_collections import ConfigDict, config_flags

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]

# Which commands' flags a page's prose may name (command lines are checked against their own
# command wherever they stand). A page not listed here may name the flags of any command.
PAGE_COMMANDS = {
    "docs/synth.md": ("synth",),
    "docs/curate.md": ("curate score", "curate embed", "curate balance", "convert import"),
    "docs/data.md": ("data check", "data prepare", "data plan"),
    "docs/training.md": ("train", "convert import"),
    "docs/tpu.md": ("train.compile", "train"),
    "docs/convert.md": ("convert import", "convert export"),
    "docs/inference.md": ("generate", "serve"),
    "docs/eval.md": ("eval", "eval pairwise"),
    "docs/models.md": ("convert import", "convert export", "train"),
    "docs/benchmarks.md": ("train", "train.compile", "serve", "generate", "curate score", "data plan",
                           "benchmarks/generate.py"),
}
# The command of a "## Flags" table with no "### `command`" heading above it.
FLAGS_TABLE_COMMAND = {"docs/synth.md": "synth", "docs/training.md": "train", "docs/tpu.md": "train.compile"}
# Flags of other programs that pages name in prose, and whose they are.
FOREIGN_FLAGS = {"--signal": "sbatch", "--requeue": "sbatch", "--nodes": "sbatch", "--worker": "gcloud",
                 "--no-deps": "pip", "--dist": "pytest", "--retries": "launch/tpu_pod.sh"}

# python -m allava_jax.MODULE [SUBCOMMAND], or python benchmarks/NAME.py
COMMAND_RE = re.compile(r"python (?:-m allava_jax\.([\w.]+)|(benchmarks/\w+\.py))((?:[ \t]+\S+)?)")
FLAG_RE = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*(?:\.[\w-]+)*")
LINK_RE = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE_RE = re.compile(r"^```.*?^```", re.M | re.S)
INLINE_CODE_RE = re.compile(r"`[^`\n]+`")


# --- parsers --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Flag:
    """One flag of a parser, as a flags table states it."""

    key: str  # the flag's canonical name (aliases share it)
    required: bool
    switch: bool  # an argparse store_true flag: "off" by default
    default: Any


def _argparse_flags(parser: argparse.ArgumentParser) -> dict[str, Flag]:
    out = {}
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or not action.option_strings:
            continue
        flag = Flag(action.option_strings[-1], action.required, isinstance(action, argparse._StoreTrueAction),
                    action.default)
        out.update({option: flag for option in action.option_strings})
    return out


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def _data_parser() -> argparse.ArgumentParser:
    """``python -m allava_jax.data`` builds its parser inside ``main``: catch it at ``parse_args``."""
    from allava_jax.data import __main__ as data_main

    class Caught(Exception):
        pass

    def catch(self, *args, **kwargs):
        raise Caught(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", catch):
        try:
            data_main.main([])
        except Caught as caught:
            return caught.args[0]
    raise AssertionError("allava_jax.data main() never parsed its arguments")


def _absl_flags(module_path: Path) -> dict[str, Flag]:
    """The module's ``flags.DEFINE_*`` / ``config_flags.DEFINE_*`` statements, run into a fresh
    ``FlagValues`` (the rest of the module is not imported)."""
    values = flags.FlagValues()

    class Into:
        def __init__(self, module):
            self._module = module

        def __getattr__(self, name):
            attr = getattr(self._module, name)
            return functools.partial(attr, flag_values=values) if name.startswith("DEFINE") else attr

    def is_define(node: ast.stmt) -> bool:
        call = getattr(node, "value", None)
        return (isinstance(node, (ast.Assign, ast.Expr)) and isinstance(call, ast.Call)
                and isinstance(call.func, ast.Attribute) and call.func.attr.startswith("DEFINE"))

    tree = ast.parse(module_path.read_text())
    body = ast.Module(body=[n for n in tree.body if is_define(n)], type_ignores=[])
    exec(compile(body, str(module_path), "exec"), {"flags": Into(flags), "config_flags": Into(config_flags)})
    out = {f"--{name}": Flag(f"--{name}", bool(fl.validators), False, fl.default) for name, fl in values._flags().items()}
    assert out, f"{module_path}: no DEFINE_* statements found"
    return out


@functools.cache
def _absl_builtins() -> set[str]:
    """What absl's ``app.run`` and its flag parser accept besides the module's own flags."""
    from absl import app

    return {f"--{c().name}" for c in (app.HelpFlag, app.HelpshortFlag, app.HelpfullFlag, app.HelpXMLFlag)} | {
        "--flagfile", "--undefok"}


def _script_flags(path: Path) -> dict[str, Flag]:
    """A benchmark script's ``add_argument("--x", ...)`` flags (its parser is built inside ``main``,
    beside imports of torch and transformers: read, not run)."""
    out = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            names = [a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")]
            out.update({name: Flag(names[-1], False, False, None) for name in names})
    return out


@functools.cache
def commands() -> dict[str, dict[str, Flag]]:
    """Every command (and subcommand) a page may name -> its flags."""
    from allava_jax.convert.__main__ import parser as convert_parser
    from allava_jax.curate.__main__ import parser as curate_parser
    from allava_jax.eval.__main__ import pairwise_parser
    from allava_jax.eval.__main__ import parser as eval_parser
    from allava_jax.infer.cli import generate_parser, serve_parser
    from allava_jax.synth.__main__ import build_parser as synth_parser

    out = {
        "synth": _argparse_flags(synth_parser()),
        "generate": _argparse_flags(generate_parser()),
        "serve": _argparse_flags(serve_parser()),
        "eval": _argparse_flags(eval_parser()),
        "eval pairwise": _argparse_flags(pairwise_parser()),
        "train": _absl_flags(ROOT / "allava_jax/train/__main__.py"),
        "train.compile": _absl_flags(ROOT / "allava_jax/train/compile.py"),
    }
    for name, parser in (("convert", convert_parser()), ("curate", curate_parser()), ("data", _data_parser())):
        subs = _subcommands(parser)
        assert subs, f"{name}: no subcommands"
        out.update({f"{name} {sub}": _argparse_flags(p) for sub, p in subs.items()})
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        out[str(script.relative_to(ROOT))] = _script_flags(script)
    return out


def is_benchmark(command: str) -> bool:
    return command.startswith("benchmarks/")


ABSL_COMMANDS = ("train", "train.compile")


# --- configs --------------------------------------------------------------------------------------


@functools.cache
def load_config(spec: str) -> ConfigDict:
    """``configs/x.py[:ARG]`` -> its ``get_config(ARG)``, as ``--config`` loads it."""
    file, _, arg = spec.partition(":")
    path = ROOT / file
    module_spec = importlib.util.spec_from_file_location(f"docs_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


@functools.cache
def every_config() -> tuple[ConfigDict, ...]:
    from allava_jax.train.config import base_config

    return (base_config(), *(load_config(str(p.relative_to(ROOT))) for p in sorted((ROOT / "configs").glob("*.py"))))


def has_field(cfg: ConfigDict, dotted: str) -> bool:
    """Whether ``--config.<dotted>`` names a field; an upper-case part (``FIELD``) is a placeholder."""
    node: Any = cfg
    for part in dotted.split("."):
        if part.isupper():
            return True
        if not isinstance(node, (ConfigDict, dict)) or part not in node:
            return False
        node = node[part]
    return True


def config_problem(flag: str, config_spec: str | None) -> str | None:
    field = flag[len("--config."):]
    if config_spec and (ROOT / config_spec.partition(":")[0]).is_file():
        if not has_field(load_config(config_spec), field):
            return f"{flag}: no field {field!r} in {config_spec.partition(':')[0]}"
        return None
    if not any(has_field(cfg, field) for cfg in every_config()):
        return f"{flag}: no field {field!r} in base_config() or any configs/*.py"
    return None


# --- pages ----------------------------------------------------------------------------------------


def code_pieces(text: str) -> list[str]:
    """Fenced blocks as logical lines (backslash continuations joined), then inline code spans."""
    pieces = []
    for block in FENCE_RE.findall(text):
        pieces += block.replace("\\\n", " ").splitlines()[1:-1]
    prose = FENCE_RE.sub("", text)
    pieces += [span.strip("`") for span in INLINE_CODE_RE.findall(prose)]
    return pieces


def command_segments(piece: str) -> list[tuple[str, str]]:
    """(command, the text of its arguments) for each ``python -m allava_jax.X`` in a piece."""
    matches = list(COMMAND_RE.finditer(piece))
    out = []
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(piece)
        args = re.split(r" && | ; |; | \| | #", piece[m.start(3):end])[0]
        module, sub = m.group(1) or m.group(2), m.group(3).strip()
        out.append((f"{module} {sub}" if f"{module} {sub}" in commands() else module, args))
    return out


def segment_problems(command: str, args: str) -> list[str]:
    known = commands().get(command)
    found = FLAG_RE.findall(args)
    if known is None:
        return [f"{command}: no such command (flags {found})"] if found else []
    config = re.search(r"--config[ =](\S+)", args)
    problems = []
    for flag in found:
        if flag.startswith("--config.") and command in ABSL_COMMANDS:
            problem = config_problem(flag, config.group(1) if config else None)
            problems += [f"{command}: {problem}"] if problem else []
        elif flag not in known and flag != "--help" and not (command in ABSL_COMMANDS and flag in _absl_builtins()):
            problems.append(f"{command}: no flag {flag}")
    return problems


def page_commands(page: str) -> tuple[str, ...]:
    return PAGE_COMMANDS.get(page, tuple(commands()))


def flag_problems(text: str, page: str) -> list[str]:
    """Flags on command lines against their command; other flags against the page's commands."""
    problems = []
    for piece in code_pieces(text):
        for command, args in command_segments(piece):
            problems += segment_problems(command, args)
    prose = FENCE_RE.sub("", text)
    for span in INLINE_CODE_RE.findall(prose):
        if COMMAND_RE.search(span):
            prose = prose.replace(span, "")
    allowed = set().union(*(commands()[c] for c in page_commands(page)))
    absl = any(c in ABSL_COMMANDS for c in page_commands(page))
    for flag in FLAG_RE.findall(prose):
        if flag.startswith("--config.") and absl:
            problem = config_problem(flag, None)
            problems += [f"prose: {problem}"] if problem else []
        elif flag not in allowed and flag not in FOREIGN_FLAGS and not (absl and flag in _absl_builtins()):
            problems.append(f"prose: {flag} is no flag of {', '.join(page_commands(page))}")
    return problems


def flags_tables(text: str, page: str) -> dict[str, dict[str, str]]:
    """The "## Flags" section's tables: command -> {flag: its default cell}."""
    section = re.search(r"^## Flags\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if not section:
        return {}
    tables: dict[str, dict[str, str]] = {}
    command = FLAGS_TABLE_COMMAND.get(page)
    for line in section.group(1).splitlines():
        heading = re.match(r"^### `([^`]+)`", line)
        if heading:
            command = heading.group(1)
        elif line.startswith("| `-"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            for flag in FLAG_RE.findall(cells[0]):
                tables.setdefault(str(command), {})[flag] = cells[1]
    return tables


def expected_default(flag: Flag) -> str:
    if flag.required:
        return "required"
    if flag.switch:
        return "off"
    return "" if flag.default is None else f"`{flag.default}`"


def table_problems(text: str, page: str) -> list[str]:
    """Each flags table lists every flag of its command, with the parser's default."""
    problems = []
    for command, rows in flags_tables(text, page).items():
        known = commands().get(command)
        if known is None:
            problems.append(f"flags table of {command!r}: no such command")
            continue
        for flag, cell in rows.items():
            if flag not in known:
                problems.append(f"{command}: the table lists {flag}, which the parser lacks")
            elif cell != expected_default(known[flag]):
                problems.append(f"{command} {flag}: the table says {cell!r}, --help {expected_default(known[flag])!r}")
        documented = {known[f].key for f in rows if f in known}
        problems += [f"{command}: {key} is missing from the flags table"
                     for key in sorted({f.key for f in known.values()} - documented)]
    return problems


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE_RE.sub("", path.read_text())
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def link_problems(text: str, page: Path) -> list[str]:
    """Every relative link resolves to a file, and its #anchor to a heading there."""
    problems = []
    prose = INLINE_CODE_RE.sub("", FENCE_RE.sub("", text))
    for target in LINK_RE.findall(prose):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            problems.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            problems.append(f"{target}: no heading #{anchor} in {path.name}")
    return problems


# --- the checks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES)
def test_links_resolve(page):
    assert link_problems((ROOT / page).read_text(), ROOT / page) == []


@pytest.mark.parametrize("page", PAGES)
def test_flags_exist(page):
    assert flag_problems((ROOT / page).read_text(), page) == []


@pytest.mark.parametrize("page", PAGES)
def test_flags_tables_match_help(page):
    assert table_problems((ROOT / page).read_text(), page) == []


def test_every_command_has_a_flags_table():
    tabled = set().union(*(flags_tables((ROOT / p).read_text(), p) for p in PAGES))
    assert sorted(c for c in commands() if not is_benchmark(c) and c not in tabled) == []


def test_mapped_pages_exist():
    assert sorted(p for p in PAGE_COMMANDS if not (ROOT / p).is_file()) == []
    assert all(c in commands() for cs in PAGE_COMMANDS.values() for c in cs)


TASK_PAGES = ("docs/synth.md", "docs/curate.md", "docs/data.md", "docs/training.md", "docs/tpu.md",
              "docs/convert.md", "docs/inference.md", "docs/eval.md")


@pytest.mark.parametrize("page", TASK_PAGES)
def test_task_pages_start_with_the_command_and_end_with_flags_and_failures(page):
    text = (ROOT / page).read_text()
    first_block = FENCE_RE.search(text)
    assert first_block and COMMAND_RE.search(first_block.group(0)), "no command in the first code block"
    assert text.index(first_block.group(0)) < text.index("\n## "), "the first code block comes after a section"
    assert re.findall(r"^## (.+)$", text, re.M)[-2:] == ["Flags", "Failure modes"]


def test_readme_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 220
    first_block = FENCE_RE.search(text).group(0).splitlines()[1:-1]
    ci = (ROOT / ".ci/run").read_text().strip().splitlines()[-1]
    assert first_block[1] == ci and first_block[0].startswith("pip install -r requirements.txt && ")


# --- the checkers report what is broken -----------------------------------------------------------


def test_broken_links_are_reported():
    page = ROOT / "docs" / "synth.md"
    text = "[a](missing.md) [b](curate.md#no-such-heading) [c](curate.md#flags) [d](#failure-modes) [e](https://x.org)"
    assert link_problems(text, page) == ["missing.md: no such file", "curate.md#no-such-heading: no heading "
                                         "#no-such-heading in curate.md"]
    assert link_problems("[a](#nowhere)", page) == ["#nowhere: no heading #nowhere in synth.md"]


def test_unknown_flags_are_reported():
    text = "\n".join([
        "```bash",
        "python -m allava_jax.synth laion --images x --no-such-flag 1 \\",
        "    --out y   # a comment --not-checked",
        "python -m allava_jax.curate score --data a --top-k 3 && pip install --no-deps z",
        "python -m allava_jax.train --config configs/allava_stage1.py --workdir w --config.no_such_field=1 --config.mesh.tensor=2",
        "python -m allava_jax.train.compile --config configs/allava_stage1.py --topology v5e-8 --workdir w",
        "python benchmarks/generate.py --repeats 5 --no-such-knob --help",
        "```",
        "Prose: `--ssim`, `--bogus`, and `python -m allava_jax.eval pairwise --questions q --tasks t`.",
    ])
    assert flag_problems(text, "docs/curate.md") == [
        "synth: no flag --no-such-flag",
        "curate score: no flag --top-k",
        "train: --config.no_such_field: no field 'no_such_field' in configs/allava_stage1.py",
        "train.compile: no flag --workdir",
        "benchmarks/generate.py: no flag --no-such-knob",
        "eval pairwise: no flag --tasks",
        "prose: --bogus is no flag of curate score, curate embed, curate balance, convert import",
    ]


def test_config_fields_are_checked_against_the_config_named():
    # scan_layers is set by configs/demo.py only: fine there and in prose, not with the stage-1 config
    line = "python -m allava_jax.train --config configs/{} --workdir w --config.model_overrides.scan_layers=False"
    assert segment_problems("train", line.format("demo.py")[len("python -m allava_jax.train"):]) == []
    assert segment_problems("train", line.format("allava_stage1.py")[len("python -m allava_jax.train"):]) == [
        "train: --config.model_overrides.scan_layers: no field "
        "'model_overrides.scan_layers' in configs/allava_stage1.py"]
    assert flag_problems("`--config.model_overrides.scan_layers=False`, `--config.FIELD`", "docs/training.md") == []


def test_flags_table_mismatches_are_reported():
    text = "\n".join([
        "## Flags", "", "### `convert export`", "",
        "| flag | default | what |", "| --- | --- | --- |",
        "| `--checkpoint` | required | |",
        "| `--out` | | |",
        "| `--dtype` | `float32` | |",
        "| `--no-such` | | |",
        "", "## Failure modes", "| `--ignored` | | |",
    ])
    assert table_problems(text, "docs/convert.md") == [
        "convert export --out: the table says '', --help 'required'",
        "convert export --dtype: the table says '`float32`', --help '`auto`'",
        "convert export: the table lists --no-such, which the parser lacks",
        "convert export: --drop-lm-head-bias is missing from the flags table",
        "convert export: --format is missing from the flags table",
        "convert export: --max-shard-size is missing from the flags table",
        "convert export: --no-progress is missing from the flags table",
        "convert export: --tokenizer is missing from the flags table",
    ]


def test_foreign_flags_of_our_own_scripts_exist():
    """A flag credited to one of this repository's scripts is one that script takes."""
    ours = {flag: owner for flag, owner in FOREIGN_FLAGS.items() if (ROOT / owner).is_file()}
    assert ours
    for flag, owner in ours.items():
        assert re.search(rf"^\s*{re.escape(flag)}[)=|]", (ROOT / owner).read_text(), re.M), (flag, owner)
