"""Config dataclasses → Typer options, --config precedence, --preset, --dry-run, aliases and list syntax."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from distill_common.config import (
    cli_flag,
    config_command,
    flatten,
    from_dict,
    nested,
    option,
    resolve_config,
    save_config,
)
from distill_common.errors import ConfigError


@dataclass
class OptimConfig:
    learning_rate: float = option(1e-4, "Peak learning rate.")
    warmup_steps: int = option(10, "Linear warm-up steps.")


@dataclass
class DemoConfig:
    num_images: int = option(4, "Images per prompt.")
    sampler: str = option("euler", "ODE solver.", choices=("euler", "heun", "rk45"))
    steps: list[int] = option([2, 4, 8], "Step counts to evaluate.")
    compare_baseline: bool = option(False, "Also run the 30-step baseline.")
    outdir: Path = option(Path("outputs"), "Output folder.")
    clip_model: str | None = option(None, "CLIP model id or folder.")
    optim: OptimConfig = nested(OptimConfig, "Optimiser.")


PRESETS = {"smoke": lambda: DemoConfig(num_images=1, steps=[1]), "big": lambda: DemoConfig(num_images=64)}


def make_app(seen: list):
    app = typer.Typer()

    @config_command(app, "run", DemoConfig, presets=PRESETS)
    def run(cfg: DemoConfig) -> None:
        """Run the demo."""
        seen.append(cfg)

    @app.command("noop")
    def noop() -> None:  # a second command keeps Typer in multi-command mode
        pass

    return app


runner = CliRunner()


def invoke(args: list[str]):
    seen: list = []
    result = runner.invoke(make_app(seen), ["run", *args])
    return result, seen


def test_defaults_and_types():
    result, seen = invoke([])
    assert result.exit_code == 0, result.output
    cfg = seen[0]
    assert cfg == DemoConfig()
    assert isinstance(cfg.outdir, Path) and cfg.steps == [2, 4, 8]


def test_flags_aliases_and_list_syntaxes():
    for args in (["--steps", "1", "2", "3"], ["--steps", "1,2,3"], ["--steps=1,2,3"],
                 ["--steps", "1", "--steps", "2,3"], ["--steps=1", "--steps", "2", "3"]):  # a repeated flag adds
        result, seen = invoke(args + ["--num_images", "7", "--compare-baseline", "--optim-learning-rate", "0.5"])
        assert result.exit_code == 0, result.output
        cfg = seen[0]
        assert cfg.steps == [1, 2, 3]
        assert cfg.num_images == 7 and cfg.compare_baseline is True
        assert cfg.optim.learning_rate == 0.5


def test_choices_are_validated_with_the_valid_names():
    result, seen = invoke(["--sampler", "dpm"])
    assert result.exit_code != 0 and not seen
    assert "euler" in str(result.exception) and "dpm" in str(result.exception)


def test_config_file_precedence(tmp_path: Path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"num_images": 9, "sampler": "heun", "optim": {"warmup_steps": 3}}))
    result, seen = invoke(["--preset", "smoke", "--config", str(cfg_file), "--sampler", "rk45"])
    assert result.exit_code == 0, result.output
    cfg = seen[0]
    assert cfg.num_images == 9  # file beats preset
    assert cfg.steps == [1]  # preset beats default
    assert cfg.sampler == "rk45"  # flag beats file
    assert cfg.optim.warmup_steps == 3 and cfg.optim.learning_rate == 1e-4


def test_json_config_and_unknown_key(tmp_path: Path):
    good = tmp_path / "c.json"
    good.write_text(json.dumps({"num_images": 2}))
    result, seen = invoke(["--config", str(good)])
    assert seen[0].num_images == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"num_imagez": 2}))
    result, seen = invoke(["--config", str(bad)])
    assert result.exit_code != 0 and "num_images" in str(result.exception)


def test_dry_run_prints_resolved_config_and_does_not_run():
    result, seen = invoke(["--dry-run", "--num-images", "3", "--preset", "big"])
    assert result.exit_code == 0
    assert not seen
    printed = yaml.safe_load(result.output)
    assert printed["num_images"] == 3 and printed["optim"]["learning_rate"] == 1e-4


def test_help_lists_field_docs_and_choices():
    result = runner.invoke(make_app([]), ["run", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "Images per prompt." in result.output
    assert "rk45" in result.output and "--dry-run" in result.output


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError, match="smoke"):
        resolve_config(DemoConfig, presets=PRESETS, preset="nope")


def test_save_flatten_round_trip(tmp_path: Path):
    cfg = DemoConfig(num_images=5, steps=[1, 2])
    path = save_config(cfg, tmp_path / "resolved.yaml")
    assert from_dict(DemoConfig, yaml.safe_load(path.read_text())) == cfg
    flat = flatten(cfg)
    assert flat["optim.learning_rate"] == 1e-4 and flat["outdir"] == "outputs"


def test_bad_type_is_a_config_error():
    with pytest.raises(ConfigError, match="num_images"):
        from_dict(DemoConfig, {"num_images": "many"})


@dataclass
class DataSection:
    data_root: Path | None = option(None, "Data root.")
    random_flip: bool = option(True, "Flips.")
    limit: int | None = option(None, "First N images.")


@dataclass
class PairsSection:
    num_pairs: int = option(8, "Pairs.")
    pairs_flip: bool = option(False, "Section name inside the field name.")


@dataclass
class SectionsConfig:
    data: DataSection = nested(DataSection, "Data.")
    pairs: PairsSection = nested(PairsSection, "Pairs.")
    steps: int = option(100, "Steps.")


SECTION_PRESETS = {"small": lambda: SectionsConfig(steps=7, pairs=PairsSection(num_pairs=3)),
                   "big": lambda: SectionsConfig(steps=1000)}


def sections_app(seen: list, default_preset: str | None = "small"):
    app = typer.Typer()

    @config_command(app, "run", SectionsConfig, presets=SECTION_PRESETS, default_preset=default_preset)
    def run(cfg: SectionsConfig) -> None:
        """Run it."""
        seen.append(cfg)

    app.command("noop")(lambda: None)
    return app


def test_flags_do_not_repeat_their_section_and_old_spellings_still_parse_unseen():
    assert cli_flag(("data", "data_root")) == "--data-root"
    assert cli_flag(("pairs", "num_pairs")) == "--num-pairs"
    assert cli_flag(("data", "random_flip")) == "--data-random-flip"
    assert cli_flag(("model", "norm_groups")) == "--model-norm-groups"
    help_text = runner.invoke(sections_app([]), ["run", "--help"], env={"COLUMNS": "200"}).output
    assert "--data-root" in help_text and "--num-pairs" in help_text and "--pairs-flip" in help_text
    assert "--data-data-root" not in help_text and "--pairs-num-pairs" not in help_text
    for args in (["--data-root", "/d", "--num-pairs", "5", "--no-pairs-flip"],
                 ["--data-data-root", "/d", "--pairs-num-pairs=5", "--no-pairs-pairs-flip"],
                 ["--data_data_root", "/d", "--pairs_num_pairs", "5", "--no-pairs-flip"]):
        seen: list = []
        result = runner.invoke(sections_app(seen), ["run", *args])
        assert result.exit_code == 0, (args, result.output)
        assert seen[0].data.data_root == Path("/d") and seen[0].pairs.num_pairs == 5, args
        assert seen[0].pairs.pairs_flip is False


def test_two_fields_with_one_flag_are_refused_when_the_command_is_built():
    @dataclass
    class Clash:
        data: DataSection = nested(DataSection, "Data.")
        data_root: str = option("x", "Also --data-root.")

    with pytest.raises(ValueError, match="--data-root"):
        config_command(typer.Typer(), "run", Clash)(lambda cfg: None)


def test_help_shows_the_default_presets_values_and_names_it():
    help_text = " ".join(runner.invoke(sections_app([]), ["run", "--help"], env={"COLUMNS": "200"}).output.split())
    assert "[default: 7]" in help_text and "[default: 3]" in help_text and "[default: 100]" not in help_text
    assert "'small' preset" in help_text and "--preset big" in help_text
    seen: list = []
    assert runner.invoke(sections_app(seen), ["run"]).exit_code == 0
    assert seen[0].steps == 7 and seen[0].pairs.num_pairs == 3  # what the help said
    # A flag equal to the shown default is still an explicit value: it beats a --preset that differs.
    seen = []
    assert runner.invoke(sections_app(seen), ["run", "--preset", "big", "--steps", "7"]).exit_code == 0
    assert seen[0].steps == 7
    without = " ".join(runner.invoke(sections_app([], None), ["run", "--help"], env={"COLUMNS": "200"}).output.split())
    assert "[default: 100]" in without and "preset's" not in without
