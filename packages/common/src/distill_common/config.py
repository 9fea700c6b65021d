"""Typed dataclass configs as the single source of options, and their Typer command-line form.

A config is a (possibly nested) dataclass whose fields are declared with :func:`option`::

    @dataclass
    class TrainConfig:
        learning_rate: float = option(1e-4, "Peak learning rate of AdamW.")
        sampler: str = option("euler", "ODE solver.", choices=("euler", "heun", "rk45"))
        steps: list[int] = option([2, 4, 8], "Step counts to evaluate.")

:func:`config_command` turns such a dataclass into a Typer command whose options are generated from
the fields (help text, types, choices), plus ``--config FILE`` (YAML or JSON, overridden by flags),
``--preset NAME`` (named defaults, overridden by the file and flags) and ``--dry-run`` (print the
resolved config and exit). Every multi-word option also accepts the underscore spelling
(``--num-images`` and ``--num_images``; only the first is shown in ``--help``), and list options accept
``--steps 2 4 8``, ``--steps 2,4,8`` or a repeated flag. A command with many options shows its top-level options
in full and one line per section in ``--help``; ``--help-all`` shows every option.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import textwrap
import types
import typing
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import typer
import yaml
from rich.markup import escape

from distill_common.errors import ConfigError, DistillError, unknown_choice

C = TypeVar("C")

_MISSING = dataclasses.MISSING


# The --tracking-uri option of every command that reads the registry (distill registry …, rf sample, …).
TRACKING_URI_HELP = ("MLflow store to read (default: $MLFLOW_TRACKING_URI, else ./mlflow.db); a local store that "
                     "does not exist is an error, never created.")


def option(
    default: Any,
    help: str,
    *,
    choices: Sequence[Any] | None = None,
    renamed: Mapping[Any, Any] | None = None,
    aliases: Sequence[str] = (),
    cli: bool = True,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """Declare a config field with its help text, optional valid choices, its valid range and extra CLI spellings.

    ``ge`` / ``gt`` / ``le`` / ``lt`` bound a number (every item of a list); None values are not checked.
    ``renamed`` maps deprecated values to their new names: still accepted, replaced with a one-line note.
    """
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    metadata = {"help": help, "choices": tuple(choices) if choices else None, "aliases": tuple(aliases), "cli": cli,
                "range": bounds or None, "renamed": dict(renamed) if renamed else None}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=metadata)
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        return dataclasses.field(default_factory=lambda d=default: dataclasses.replace(d), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def nested(cls: type, help: str = "") -> Any:
    """Declare a nested config section (its fields become ``--section-field`` options)."""
    return dataclasses.field(default_factory=cls, metadata={"help": help, "nested": True})


# --------------------------------------------------------------------------------------- helpers


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _list_item_type(tp: Any) -> Any | None:
    origin = typing.get_origin(tp)
    if origin in (list, tuple, Sequence, typing.Sequence):
        args = typing.get_args(tp)
        return args[0] if args else str
    return None


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a value read from a file or the command line to the field's declared type."""
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"option '{name}' may not be null")
    item = _list_item_type(base)
    if item is not None:
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, item, name) for v in value]
    if base is bool:
        if isinstance(value, str):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"option '{name}' expects true/false, got {value!r}")
        return bool(value)
    if base in (int, float, str):
        try:
            if base is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return base(value)
        except (TypeError, ValueError):
            raise ConfigError(f"option '{name}' expects {base.__name__}, got {value!r}") from None
    if base is Path:
        return Path(value)
    return value


def cli_flag(path: Sequence[str]) -> str:
    """The command-line spelling of the config field at ``path`` (e.g. ``("train", "steps")`` -> ``--train-steps``).

    The one field -> flag rule: the generated options and every error hint use it. A field whose name already
    holds its section's name is not prefixed twice: ``("data", "data_root")`` -> ``--data-root``,
    ``("pairs", "num_pairs")`` -> ``--num-pairs``.
    """
    parts = list(path)
    if len(parts) >= 2:
        section, words = parts[-2].split("_"), parts[-1].split("_")
        n = len(section)
        if any(words[i : i + n] == section for i in range(len(words) - n + 1)):
            del parts[-2]
    return "--" + "-".join(parts).replace("_", "-")


class FlagNamer:
    """Names the options of one config section as the command spells them: ``flag("steps")`` -> ``--train-steps``.

    ``validate(self, flag)`` methods receive one, so their hints name the option of the command being run.
    """

    def __init__(self, prefix: Sequence[str] = ()) -> None:
        self.prefix = tuple(prefix)

    def __call__(self, name: str) -> str:
        return cli_flag((*self.prefix, name))

    def sub(self, name: str) -> FlagNamer:
        return FlagNamer((*self.prefix, name))


MAX_SEED = 2**31 - 1  # every seed option's upper bound (image i's seed is seed + i: numpy needs < 2**32)
_RANGE_TEXT = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_RANGE_OK = {"ge": lambda v, b: v >= b, "gt": lambda v, b: v > b, "le": lambda v, b: v <= b, "lt": lambda v, b: v < b}


def _range_text(bounds: Mapping[str, float]) -> str:
    lo = next(((k, bounds[k]) for k in ("ge", "gt") if k in bounds), None)
    hi = next(((k, bounds[k]) for k in ("le", "lt") if k in bounds), None)
    if lo and hi:
        return f"in {'[' if lo[0] == 'ge' else '('}{lo[1]:g}, {hi[1]:g}{']' if hi[0] == 'le' else ')'}"
    k, b = lo or hi  # type: ignore[misc]
    return f"{_RANGE_TEXT[k]} {b:g}"


def _walk_checks(cfg: Any, prefix: tuple[str, ...] = ()) -> None:
    """Choices and ranges of every field, with the option named as the command spells it."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        path = (*prefix, f.name)
        if f.metadata.get("nested") or dataclasses.is_dataclass(value):
            _walk_checks(value, path)
            continue
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        renamed = f.metadata.get("renamed") or {}
        old = [v for v in values if isinstance(v, Hashable) and v in renamed]
        if old:  # a deprecated name: accepted, replaced, and said once
            values = [renamed.get(v, v) if isinstance(v, Hashable) else v for v in values]
            setattr(cfg, f.name, values if isinstance(value, list) else values[0])
            for v in dict.fromkeys(old):
                _note(f"{cli_flag(path)} {v} is now called {renamed[v]}; the old name still works for now")
        choices = f.metadata.get("choices")
        if choices:
            for v in values:
                if v not in choices:
                    raise unknown_choice(f"value for {cli_flag(path)}", v, choices)
        bounds = f.metadata.get("range")
        if f.name in ("seed", "seed_start") or f.name.endswith("_seed"):  # numpy and torch take seeds below 2**32
            for v in values:
                if isinstance(v, int) and not 0 <= v <= MAX_SEED:
                    raise ConfigError(f"{cli_flag(path)} must be in [0, {MAX_SEED}], got {v}; pass a smaller seed")
        for v in values:  # no option means NaN or infinity: refused whether or not the field has a range
            if isinstance(v, float) and not math.isfinite(v):
                within = f"a finite number {_range_text(bounds)}" if bounds else "a finite number"
                raise ConfigError(f"{cli_flag(path)} is {v}; pass {within}")
        if bounds:
            for v in values:
                if isinstance(v, (int, float)) and not all(_RANGE_OK[k](v, b) for k, b in bounds.items()):
                    raise ConfigError(f"{cli_flag(path)} must be {_range_text(bounds)}, got {v}; "
                                      f"pass {cli_flag(path)} with a value {_range_text(bounds)}")
                if isinstance(v, float) and v != v:
                    raise ConfigError(f"{cli_flag(path)} is NaN; pass a number {_range_text(bounds)}")


def _note(text: str) -> None:
    import sys

    print(f"note: {text}", file=sys.stderr)


def _validate_tree(cfg: Any, prefix: tuple[str, ...] = (), root: bool = True) -> None:
    """Call ``validate(flag)`` on every section (sections first), or a no-argument ``validate()`` on the root."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            _validate_tree(value, (*prefix, f.name), root=False)
    validate = getattr(cfg, "validate", None)
    if not callable(validate):
        return
    if inspect.signature(validate).parameters:
        validate(FlagNamer(prefix))
    elif root:
        validate()


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain JSON-able data (Paths as strings)."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def flatten(cfg: Any, sep: str = ".") -> dict[str, Any]:
    """Flatten a (nested) config into ``section.field`` keys, e.g. for MLflow params."""
    out: dict[str, Any] = {}

    def walk(d: Mapping[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, Mapping):
                walk(v, f"{prefix}{k}{sep}")
            else:
                out[f"{prefix}{k}"] = v

    walk(to_dict(cfg), "")
    return out


def from_dict(cls: type[C], data: Mapping[str, Any], base: C | None = None) -> C:
    """Build (or update ``base``) from a mapping; unknown keys are refused with the valid names."""
    cfg = dataclasses.replace(base) if base is not None else cls()
    hints = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise unknown_choice(f"config key for {cls.__name__}", key, fields)
        current = getattr(cfg, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key '{key}' is a section; give it a mapping")
            setattr(cfg, name, from_dict(type(current), value, current))
        else:
            setattr(cfg, name, _coerce(value, hints[name], name))
    return cfg


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file into a mapping."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass an existing YAML or JSON file to --config")
    text = p.read_text()
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of option names to values")
    return dict(data)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (or JSON when the suffix is .json)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    data = to_dict(cfg)
    p.write_text(json.dumps(data, indent=2) if p.suffix == ".json" else yaml.safe_dump(data, sort_keys=False))
    return p


def format_config(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ------------------------------------------------------------------------------- CLI generation


def _legacy_flags(path: Sequence[str]) -> list[str]:
    """Earlier spellings of a field's flag (section name repeated: ``--data-data-root``), still accepted, not shown."""
    old = "--" + "-".join(path).replace("_", "-")
    return [old, "--" + "_".join(path)] if old != cli_flag(path) else []


@dataclasses.dataclass
class _CliField:
    path: tuple[str, ...]  # ("model", "width")
    param: str  # python identifier: model_width
    flags: list[str]
    type: Any
    default: Any
    help: str
    choices: tuple[Any, ...] | None
    is_list: bool
    is_bool: bool
    hidden_flags: list[str] = dataclasses.field(default_factory=list)  # accepted, not shown in --help


def _cli_fields(cls: type, instance: Any = None, prefix: tuple[str, ...] = ()) -> list[_CliField]:
    instance = instance if instance is not None else cls()
    hints = _field_types(cls)
    out: list[_CliField] = []
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if f.metadata.get("nested") or dataclasses.is_dataclass(value):
            out += _cli_fields(type(value), value, prefix + (f.name,))
            continue
        if not f.metadata.get("cli", True):
            continue
        path = prefix + (f.name,)
        base, _ = _unwrap_optional(hints[f.name])
        dash = cli_flag(path)
        flags = [dash]
        under = "--" + dash[2:].replace("-", "_")
        aliases = f.metadata.get("aliases", ())
        flags += [a for a in aliases if a not in flags and "_" not in a]  # underscore spellings: accepted, not shown
        hidden = [h for h in [under, *_legacy_flags(path), *aliases] if h != dash and h not in flags]
        choices = f.metadata.get("choices")
        help_text = f.metadata.get("help", "")
        if choices:
            help_text += f" (choices: {', '.join(map(str, choices))})"
        if f.metadata.get("renamed"):
            help_text += " (old names: " + ", ".join(f"{k} = {v}" for k, v in f.metadata["renamed"].items()) + ")"
        out.append(
            _CliField(
                path=path,
                param="__".join(path),
                flags=flags,
                type=base,
                default=value,
                help=help_text,
                choices=choices,
                is_list=_list_item_type(base) is not None,
                is_bool=base is bool,
                hidden_flags=list(dict.fromkeys(hidden)),
            )
        )
    if prefix == ():
        seen: dict[str, tuple[str, ...]] = {}
        for cf in out:
            for flag in cf.flags:
                if flag in seen:
                    raise ValueError(f"{cls.__name__}: fields {'.'.join(seen[flag])} and {'.'.join(cf.path)} "
                                     f"both want {flag}; rename one")
                seen[flag] = cf.path
    return out


BRIEF_HELP_MAX_OPTIONS = 30  # above this many options, --help shows sections as one line each (--help-all: all)


class _ConfigCommand(typer.core.TyperCommand):
    """Accepts ``--steps 2 4 8`` for list options by joining the values before click parses them; plain help that
    fits 80 columns (no type column for flags, no underscore spellings), sections folded to one line each when
    the command has many options (``--help-all`` unfolds them)."""

    list_flags: frozenset[str] = frozenset()
    renamed_flags: Mapping[str, str] = types.MappingProxyType({})  # hidden earlier spelling -> shown flag
    sections: Mapping[str, str] = types.MappingProxyType({})  # section name -> its help text
    brief: frozenset[str] = frozenset()  # params of a section that --help still shows in full

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rich_markup_mode = None  # click's plain layout: one column of flags, help wrapped beside it

    def _folded(self, ctx: Any, param: Any) -> str | None:
        """The section a param is folded into in plain --help, or None when it is shown in full."""
        if ctx.meta.get("distill.help_all") or "__" not in (param.name or ""):
            return None
        options = [p for p in self.params if p.param_type_name == "option"]
        if len(options) <= BRIEF_HELP_MAX_OPTIONS or param.name in self.brief:
            return None
        return param.name.split("__")[0]

    def format_options(self, ctx: Any, formatter: Any) -> None:
        full, folded = [], {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            section = self._folded(ctx, param) if param.param_type_name == "option" else None
            if section is None:
                full.append(record)
            else:
                flag = param.opts[0]
                prefix = "--" + section.replace("_", "-") + "-"
                folded.setdefault(section, []).append(flag[len(prefix):] if flag.startswith(prefix) else flag)
        if full:
            with formatter.section("Options"):
                formatter.write_dl(full)
        if folded:
            rows = [(f"--{s.replace('_', '-')}-*", f"{self.sections.get(s, '').rstrip('.')}: {', '.join(names)}")
                    for s, names in folded.items()]
            first = max(len(name) for name, _ in rows) + 2
            width = max(formatter.width - formatter.current_indent - 2 - first, 30)
            with formatter.section("More options by section (each in full: --help-all)"):
                for name, text in rows:  # flag names are never split at their hyphens
                    lines = textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False)
                    for i, line in enumerate(lines):
                        lead = name.ljust(first) if i == 0 else " " * first
                        formatter.write(f"{'':>{formatter.current_indent}}{lead}{line}\n")

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        out: list[str] = []
        seen: dict[str, int] = {}  # list flag -> index of its values in ``out``: a repeated flag adds to them
        i = 0
        while i < len(args):
            tok = args[i]
            flag, eq, rest = tok.partition("=")
            if flag in self.renamed_flags:
                flag = self.renamed_flags[flag]
                tok = flag + eq + rest
            if flag in self.list_flags:
                values = [rest] if eq else []
                i += 1
                while not eq and i < len(args) and not (args[i].startswith("--") or (args[i].startswith("-") and not _is_number(args[i]))):
                    values.append(args[i])
                    i += 1
                key = flag.replace("_", "-")  # --a_b is the alias of --a-b: one list
                if key in seen:
                    out[seen[key]] = ",".join([out[seen[key]], *values])
                else:
                    seen[key] = len(out) + 1
                    out += [flag, ",".join(values)]
                continue
            out.append(tok)
            i += 1
        return super().parse_args(ctx, out)


def _print_help_all(ctx: typer.Context, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        ctx.meta["distill.help_all"] = True
        typer.echo(ctx.get_help(), color=ctx.color)
        raise typer.Exit(0)


def _explicit(ctx: Any, name: str) -> bool:
    """True when the user set the option (flag, env var), not when it holds its default.

    Typer vendors its own click, so the source is compared by name rather than by enum identity.
    """
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def config_command(
    app: typer.Typer,
    name: str,
    config_cls: type[C],
    *,
    presets: Mapping[str, Callable[[], C] | C] | None = None,
    default_preset: str | None = None,
    help: str | None = None,
    brief: Sequence[str] = (),
) -> Callable[[Callable[[C], Any]], Callable[[C], Any]]:
    """Register ``fn(cfg)`` as the Typer command ``name`` with one option per config field.

    Precedence, lowest first: dataclass defaults, ``--preset``, ``--config FILE``, explicit flags. ``--help``
    shows the values a bare command runs with (the ``default_preset``'s, after ``validate`` filled what it
    fills), and names the preset. ``brief`` names section fields (``"eval.num_images"``) that a folded ``--help``
    still shows in full; a field whose flag drops its section's name (``--data-root``, ``--num-pairs``) always is.
    """
    fields = _cli_fields(config_cls, _bare_config(config_cls, presets, default_preset))
    preset_names = tuple(presets or ())
    renamed = {}
    for cf in fields:
        for old in cf.hidden_flags:
            renamed[old] = cf.flags[0]
            if cf.is_bool:
                renamed[f"--no-{old[2:]}"] = f"--no-{cf.flags[0][2:]}"

    def decorator(fn: Callable[[C], Any]) -> Callable[[C], Any]:
        params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
        for cf in fields:
            if cf.is_list:
                annotation: Any = str
                default = ",".join(map(str, cf.default)) if cf.default is not None else None
            elif cf.is_bool:
                annotation, default = bool, cf.default
            elif cf.type is Path:
                annotation, default = Path, cf.default
            elif cf.type in (int, float, str):
                annotation, default = (cf.type | None if cf.default is None else cf.type), cf.default
            else:
                annotation, default = str, cf.default
            flags = list(cf.flags)
            if cf.is_bool:
                flags = [f"{f}/--no-{f[2:]}" for f in flags[:1]] + [f for f in flags[1:]]
            opt = typer.Option(default, *flags, help=escape(cf.help), show_default=True)  # "[i]" is not markup
            params.append(inspect.Parameter(cf.param, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=annotation))
        params.append(
            inspect.Parameter(
                "config_file",
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(None, "--config", help="YAML or JSON file of option values; flags override it."),
                annotation=Path | None,
            )
        )
        if preset_names:
            params.append(
                inspect.Parameter(
                    "preset",
                    inspect.Parameter.KEYWORD_ONLY,
                    default=typer.Option(
                        default_preset,
                        "--preset",
                        help=f"Named defaults: {', '.join(preset_names)}"
                        + (f" (the defaults shown here are {default_preset}'s)." if default_preset else "."),
                    ),
                    annotation=str | None,
                )
            )
        params.append(
            inspect.Parameter(
                "help_all",
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(False, "--help-all", is_eager=True, callback=_print_help_all,
                                     help="Show every option, each section's too, and exit."),
                annotation=bool,
            )
        )
        params.append(
            inspect.Parameter(
                "dry_run",
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(False, "--dry-run", help="Print the configuration that will run, and exit."),
                annotation=bool,
            )
        )

        @functools.wraps(fn)
        def command(ctx: typer.Context, **kwargs: Any) -> Any:
            kwargs.pop("help_all", None)
            cfg = resolve_config(
                config_cls,
                presets=presets,
                preset=kwargs.pop("preset", None),
                config_file=kwargs.pop("config_file", None),
                overrides={
                    cf.path: kwargs[cf.param]
                    for cf in fields
                    if _explicit(ctx, cf.param)
                },
            )
            if kwargs.pop("dry_run", False):  # a config may say what will really run (``dry_run_text``)
                typer.echo(cfg.dry_run_text() if callable(getattr(cfg, "dry_run_text", None)) else format_config(cfg))
                raise typer.Exit(0)
            return fn(cfg)

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__
        cmd_cls = type(f"{config_cls.__name__}Command", (_ConfigCommand,), {
            "list_flags": frozenset(f for cf in fields if cf.is_list for f in cf.flags),
            "renamed_flags": types.MappingProxyType(renamed),
            "sections": types.MappingProxyType(_section_help(config_cls)),
            "brief": frozenset(cf.param for cf in fields if ".".join(cf.path) in brief
                               or cf.flags[0] != "--" + "-".join(cf.path).replace("_", "-")),
        })
        text = help or inspect.cleandoc(fn.__doc__ or "")
        if default_preset is not None:
            others = ", ".join(p for p in preset_names if p != default_preset)
            text += (f"\n\nDefaults shown are the '{default_preset}' preset's, which a bare command runs"
                     + (f"; --preset {others.replace(', ', '|')} for the others." if others else "."))
        app.command(name, help=text, cls=cmd_cls)(command)
        return fn

    return decorator


def _section_help(cls: type) -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") or f.name for f in dataclasses.fields(cls)
            if f.metadata.get("nested") or (dataclasses.is_dataclass(f.type) if isinstance(f.type, type) else False)}


def _bare_config(config_cls: type[C], presets: Mapping[str, Callable[[], C] | C] | None, preset: str | None) -> C:
    """The config a command run without options resolves to; when that needs options (an error), the unresolved
    defaults."""
    try:
        return resolve_config(config_cls, presets=presets, preset=preset)
    except DistillError:
        return _preset_config(presets, preset) if preset is not None else config_cls()


def _preset_config(presets: Mapping[str, Callable[[], C] | C] | None, name: str) -> C:
    if not presets or name not in presets:
        raise unknown_choice("preset", name, presets or {})
    p = presets[name]
    return p() if callable(p) else dataclasses.replace(p)


def resolve_config(
    config_cls: type[C],
    *,
    presets: Mapping[str, Callable[[], C] | C] | None = None,
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: Mapping[tuple[str, ...], Any] | None = None,
) -> C:
    """Apply preset, then config file, then explicit overrides (keyed by field path); validate choices."""
    cfg = _preset_config(presets, preset) if preset is not None else config_cls()
    if config_file is not None:
        cfg = from_dict(config_cls, load_config_file(config_file), cfg)
    for path, value in (overrides or {}).items():
        nested_update: dict[str, Any] = {}
        d = nested_update
        for part in path[:-1]:
            d = d.setdefault(part, {})
        d[path[-1]] = value
        cfg = from_dict(config_cls, nested_update, cfg)
    _walk_checks(cfg)
    _validate_tree(cfg)
    return cfg
