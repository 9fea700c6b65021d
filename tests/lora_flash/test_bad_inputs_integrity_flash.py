"""Issue 24 on `distill flash`: another --lcm-original-steps never reuses the old images (row 2); a '#' prompt, a
multi-line --prompt and a folder as --init-image (row 16). Cheap: no pipeline is loaded."""

from __future__ import annotations

from dataclasses import replace

import pytest

from distill_common.errors import ConfigError


def test_another_lcm_original_steps_discards_the_cached_images(tmp_path):
    from distill_lora_flash.config import EvalConfig
    from distill_lora_flash.evaluation import _fingerprint, _reset_stale_images

    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(b"weights")
    cfg = EvalConfig(prompt="a cat", lora_path=lora, output_dir=tmp_path / "out")
    out = tmp_path / "out"
    _reset_stale_images(out, _fingerprint(cfg, lora))
    (out / "images" / "flash_s4").mkdir(parents=True)
    (out / "images" / "flash_s4" / "00000.png").write_bytes(b"old")
    _reset_stale_images(out, _fingerprint(cfg, lora))  # same settings: kept
    assert (out / "images" / "flash_s4" / "00000.png").is_file()
    _reset_stale_images(out, _fingerprint(replace(cfg, lcm_original_steps=cfg.lcm_original_steps + 1), lora))
    assert not (out / "images").exists()


def test_the_lcm_schedule_is_part_of_the_benchmark_image_key():
    from diffusers import DDPMScheduler

    from distill_eval.benchmark import generator_fingerprint
    from distill_lora_flash.schedule import FlashSchedule

    class Student:  # the attributes FlashGenerator keeps (no pipeline needed for the key)
        def __init__(self, original_steps: int):
            self.schedule = FlashSchedule.from_scheduler(DDPMScheduler(), original_steps)
            self.scheduler = self.schedule.scheduler()
            self.default_guidance = 0.0

    assert generator_fingerprint(Student(50)) == generator_fingerprint(Student(50))
    assert generator_fingerprint(Student(50)) != generator_fingerprint(Student(20))


def test_prompt_starting_with_hash_reaches_the_benchmark_verbatim():
    from distill_eval.benchmark import BenchmarkConfig, _prompts

    assert _prompts(BenchmarkConfig(generators=["s=x"], prompts=["# a cat"])) == ["# a cat"]


@pytest.mark.parametrize("flags, expect", [
    (["--prompt", "a cat\na dog"], "line break"),
    (["--prompt", "   "], "empty"),
])
def test_flash_eval_prompt_checks(tmp_path, flags, expect):
    from typer.testing import CliRunner

    from distill_lora_flash.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["eval", *flags, "--output-dir", str(out), "--no-track"])
    assert isinstance(result.exception, ConfigError) and expect in str(result.exception), result.output
    assert not out.exists()


def test_turbo_init_image_folder_says_it_is_a_folder(tmp_path):
    from distill_lora_flash.config import TurboConfig

    with pytest.raises(ConfigError, match="is a folder; pass one PNG or JPEG file"):
        TurboConfig(init_image=tmp_path).validate()
