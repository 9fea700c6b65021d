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
    for args in (["--steps", "1", "2", "3"], ["--steps", "1,2,3"], ["--steps=1,2,3"]):
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
