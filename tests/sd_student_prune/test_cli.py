"""``distill prune prepare-unet`` and one-line errors for bad options."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from distill_common.errors import ConfigError
from distill_sd_prune.cli import app


def test_prepare_unet_writes_the_student_and_reports_params_and_macs(tiny_sd_path, tmp_path):
    out = tmp_path / "student"
    result = CliRunner().invoke(
        app,
        [
            "prepare-unet",
            "--teacher-model",
            str(tiny_sd_path),
            "--plan",
            "sd_small",
            "--width",
            "0.5",
            "--init",
            "project",
            "--resolution",
            "64",
            "--output-dir",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "teacher" in result.output and "UNet per call" in result.output
    described = json.loads((out / "prune_map.json").read_text())
    assert described["budget"] == "sd_small-w050" and described["init"] == "project"
    teacher, student = described["complexity"]
    assert student["params"] == described["student_params"] < teacher["params"] == described["teacher_params"]
    assert 0 < student["gmacs"] < teacher["gmacs"] and student["latent_size"] == 16
    assert described["module_map"]["up_blocks.0.resnets.1"] == "up_blocks.0.resnets.2"
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["prepare-unet", "--plan", "sd_huge"], "valid choices: 'bk_small', 'narrow', 'none', 'sd_small', 'sd_tiny'"),
        (["train", "--recipe", "v4"], "valid choices: 'v1', 'v2.1', 'v2.2', 'v3'"),
        (["train", "--data-resolution", "1024"], "outside 64..512"),
    ],
)
def test_bad_options_fail_with_one_line(args, message):
    result = CliRunner().invoke(app, [*args, "--dry-run"])
    assert isinstance(result.exception, ConfigError) and message in str(result.exception)
    assert "\n" not in str(result.exception)
