"""The CLI as documented: every ``distill ...`` example in README.md and the package READMEs names commands and
options that exist and parses; every option's ``--help`` default is the value a bare command runs with."""

from __future__ import annotations

import functools
import re
import shlex
from pathlib import Path

import pytest
import yaml

from distill_common import cli
from distill_common.errors import DistillError

REPO = Path(__file__).resolve().parents[2]
READMES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "packages").glob("*/README.md"))]
# `python -m MODULE` forms of the same commands (accelerate launch ... -m MODULE ARGS).
MODULE_PREFIX = {"distill_common.cli": [], "distill_rf_cifar.cli": ["rf"], "distill_lora_flash.cli": ["flash"],
                 "distill_sd_prune.cli": ["prune"], "distill_eval.cli": ["eval"]}
SCRIPT_PREFIX = {"distill": [], "distill-rf": ["rf"], "distill-flash": ["flash"], "distill-prune": ["prune"],
                 "distill-eval": ["eval"]}


@functools.cache
def _root():
    return cli.build()


def _command_line(text: str) -> list[str] | None:
    """The ``distill`` argv of one shell line (after ``distill``/``distill-rf``/``-m distill_common.cli``), or None."""
    text = re.sub(r"\s#.*$", "", text.replace("\\|", "|")).strip()
    try:
        words = shlex.split(text)
    except ValueError:
        return None
    for i, w in enumerate(words):
        if w in SCRIPT_PREFIX and (i == 0 or words[i - 1] in ("$", "&&", ";", "|")):
            return SCRIPT_PREFIX[w] + words[i + 1 :]
        if w == "-m" and i + 1 < len(words) and words[i + 1] in MODULE_PREFIX:
            return MODULE_PREFIX[words[i + 1]] + words[i + 2 :]
    return None


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) for each command in fenced code blocks (with ``\\`` continuations) and inline code spans
    (``where`` ends in ``inline``: prose names a command without its required arguments)."""
    found = []
    for readme in READMES:
        lines = readme.read_text().splitlines()
        fenced, i = False, 0
        while i < len(lines):
            line, where = lines[i], f"{readme.relative_to(REPO)}:{i + 1}"
            if line.lstrip().startswith("```"):
                fenced = not fenced
            elif fenced:
                while line.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line.rstrip()[:-1] + " " + lines[i].strip()
                argv = _command_line(line)
                if argv is not None:
                    found.append((where, argv))
            else:
                for span in re.findall(r"`([^`]+)`", line):
                    argv = _command_line(span)
                    if argv is not None:
                        found.append((f"{where} inline", argv))
            i += 1
    return found


def _option_names(cmd) -> set[str]:
    names = {"--help"}
    for p in cmd.params:
        if p.param_type_name == "option":
            names.update(p.opts, p.secondary_opts)
    names.update(getattr(cmd, "renamed_flags", {}))
    return names


def resolve(root, argv: list[str]) -> tuple[list[str], object, list[str]]:
    """Walk sub-commands: (command path, the leaf command, its arguments)."""
    path, cmd = [], root
    while hasattr(cmd, "commands") and argv and not argv[0].startswith("-"):
        if argv[0] not in cmd.commands:
            raise KeyError(f"'distill {' '.join(path + argv[:1])}' is no command; valid: {sorted(cmd.commands)}")
        path.append(argv[0])
        cmd, argv = cmd.commands[argv[0]], argv[1:]
    return path, cmd, argv


def test_the_readmes_document_commands():
    commands = documented_commands()
    assert len(commands) >= 30, commands  # the extractor still finds the examples
    assert {tuple(a[:2]) for _, a in commands} >= {("rf", "pipeline"), ("flash", "generate"), ("prune", "train"),
                                                   ("eval", "benchmark"), ("registry", "promote")}


@pytest.mark.parametrize("where,argv", documented_commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_documented_command_and_options_exist_and_parse(where, argv):
    root = _root()
    path, cmd, args = resolve(root, list(argv))
    args = [a.strip("[]") for a in args if a not in ("[...]", "...", "…")]
    if not path:
        assert set(a.split("=")[0] for a in args if a.startswith("--")) <= _option_names(cmd), where
        return
    if hasattr(cmd, "commands"):  # a group named alone (`distill flash`): nothing else to check
        assert not args, f"{where}: {argv}"
        return
    known = _option_names(cmd)
    unknown = [a for a in args if a.startswith("--") and a.split("=")[0] not in known]
    assert not unknown, f"{where}: 'distill {' '.join(path)}' has no option {unknown}"
    if where.endswith("inline") or "|" in " ".join(args):  # prose, or alternatives (`--recipe one_step|four_step`)
        return
    # Parsing converts every value to its type (no command runs: make_context does not invoke).
    cmd.make_context(" ".join(["distill", *path]), args, resilient_parsing=False)


def _bare_defaults_cases() -> list[list[str]]:
    out = []

    def walk(cmd, path):
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                walk(sub, path + [name])
        elif hasattr(cmd, "list_flags"):  # generated from a config dataclass
            out.append(path)

    walk(_root(), [])
    return out


@pytest.mark.parametrize("path", _bare_defaults_cases(), ids=" ".join)
def test_help_defaults_are_what_a_bare_command_runs_with(path, capsys):
    root = _root()
    _, cmd, _ = resolve(root, list(path))
    try:
        code = cmd.main(["--dry-run"], prog_name="distill", standalone_mode=False)
    except DistillError as exc:  # needs options (e.g. --generators): nothing runs bare
        pytest.skip(f"'distill {' '.join(path)}' needs options: {exc}")
    out = capsys.readouterr().out
    assert code in (0, None), out
    resolved: dict[str, object] = {}

    def flat(d, prefix):
        for k, v in d.items():
            flat(v, prefix + (k,)) if isinstance(v, dict) else resolved.__setitem__("__".join(prefix + (k,)), v)

    flat(yaml.safe_load(out), ())
    checked = 0
    for p in cmd.params:
        if p.name not in resolved:
            continue
        value, shown = resolved[p.name], p.default
        if isinstance(value, list):
            value = ",".join(map(str, value))
        if shown is not None and not isinstance(shown, (bool, int, float)):
            shown = str(shown)
        assert shown == value, f"distill {' '.join(path)} --help shows {p.opts[0]} {shown!r}, runs with {value!r}"
        checked += 1
    assert checked >= 1


@pytest.mark.parametrize("path", _bare_defaults_cases(), ids=" ".join)
def test_no_option_repeats_its_section(path):
    _, cmd, _ = resolve(_root(), list(path))
    for p in cmd.params:
        *sections, _field = p.name.split("__")
        shown = p.opts[0][2:].split("-")
        for section in sections:
            words = section.split("_")
            hits = sum(shown[i : i + len(words)] == words for i in range(len(shown)))
            assert hits <= 1, f"distill {' '.join(path)} {p.opts[0]} repeats its section '{section}'"


def _all_paths(cmd, path=()):
    yield path
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _all_paths(sub, (*path, name))


def _help(path, *flags: str) -> str:
    """What ``distill PATH --help`` prints in an 80-column terminal."""
    import contextlib
    import io
    import os
    from unittest import mock

    out = io.StringIO()
    with mock.patch.dict(os.environ, {"COLUMNS": "80"}), contextlib.redirect_stdout(out):
        code = _root().main([*path, *(flags or ("--help",))], prog_name="distill", standalone_mode=False)
    assert code in (0, None), out.getvalue()
    return out.getvalue()


@pytest.mark.parametrize("path", list(_all_paths(_root())), ids=lambda p: " ".join(p) or "distill")
def test_help_fits_80_columns_without_type_noise_or_underscore_spellings(path):
    text = _help(path)
    assert "<bool>" not in text
    wide = [line for line in text.splitlines() if len(line) > 80]
    assert not wide, wide
    assert not re.findall(r"--[a-z0-9]+_[a-z0-9_]+", text), "underscore spellings are accepted, not shown"
    cmd = resolve(_root(), list(path))[1]
    for name in getattr(cmd, "commands", {}):  # a group lists every one of its commands
        assert re.search(rf"^\s+{re.escape(name)}\s", text, re.M), (path, name)


def test_the_pipeline_help_is_short_and_help_all_shows_every_option():
    short, full = _help(("rf", "pipeline")), _help(("rf", "pipeline"), "--help-all")
    assert len(short.splitlines()) <= 200 < len(full.splitlines())
    assert "--teacher-learning-rate" not in short and "--teacher-learning-rate" in full
    assert "learning-rate" in short and "--teacher-*" in short  # folded, still named
    assert "--data-root" in short and "--teacher-source" in short  # the options a first run needs
    root = _root()
    _, cmd, _ = resolve(root, ["rf", "pipeline"])
    ctx = cmd.make_context("distill rf pipeline", ["--teacher_learning_rate", "0.1", "--data_root", "/x"])
    assert ctx.params["teacher__learning_rate"] == 0.1  # the hidden underscore spelling still parses


def test_the_readme_is_short_and_says_how_to_get_commands_on_path():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert "source .venv/bin/activate" in text and "make demo" in text and "make test" in text
    assert "## Stable Diffusion students" in text and "## How to read the numbers" in text
    box = [line for line in text.split("## How to read the numbers")[1].split("##")[0].splitlines()
           if line.startswith(">")]
    assert len(box) == 5 and "JPEG" in "".join(box)
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:  # written for a reader who was not there
        words = doc.read_text()
        assert not re.search(r"\bissue\b|#\d+\b|this session|was lent", words, re.I), doc
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (REPO / image).is_file(), image
    assert len(re.findall(r"!\[", text)) >= 2


@pytest.mark.parametrize("path,field", [(("rf", "sample"), "generator"), (("rf", "sds"), "teacher"),
                                        (("rf", "evaluate"), "teacher"), (("eval", "benchmark"), "teacher")])
def test_bare_commands_default_to_the_shipped_generators(path, field, capsys):
    """What a bare command would load resolves to a generator shipped with the package (no run needed first)."""
    from distill_common.generator import resolve_generator_folder

    _, cmd, _ = resolve(_root(), list(path))
    assert cmd.main(["--dry-run"], prog_name="distill", standalone_mode=False) in (0, None)
    source = yaml.safe_load(capsys.readouterr().out)[field]
    folder = resolve_generator_folder(source)
    assert source == "reference" and (folder / "generator.json").is_file() and (folder / "model.safetensors").is_file()
