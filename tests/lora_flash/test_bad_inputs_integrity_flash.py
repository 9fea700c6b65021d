"""Issue 24 on `distill flash`: another --lcm-original-steps never reuses the old images (row 2); a '#' prompt, a
multi-line --prompt and a folder as --init-image (row 16). Cheap: no pipeline is loaded."""

from __future__ import annotations

import pytest

from distill_common.errors import ConfigError


def test_another_lcm_original_steps_discards_the_cached_images(tmp_path):
    """Each image folder is keyed by what made it: the same student reuses its PNGs, another LCM grid (or another
    LoRA digest in ``cache_info``) deletes them before anything is generated."""
    from diffusers import DDPMScheduler

    from distill_eval.benchmark import image_cache_key, prepare_cache
    from distill_lora_flash.schedule import FlashSchedule

    class Student:  # the attributes FlashGenerator keeps (no pipeline needed for the key)
        def __init__(self, original_steps: int, lora_sha256: str = "a"):
            self.schedule = FlashSchedule.from_scheduler(DDPMScheduler(), original_steps)
            self.scheduler = self.schedule.scheduler()
            self.default_guidance = 0.0
            self.cache_info = {"base_model": "m", "lora_sha256": lora_sha256, "lora_scale": 1.0}

    def key(student):
        return image_cache_key(student, 4, seed=0, condition_rule="prompts", guidance=None,
                               extra=student.cache_info)

    folder = tmp_path / "images" / "flash_s4"
    assert prepare_cache(folder, key(Student(50)), label="flash_s4", note=lambda _: None) == 0
    (folder / "00000.png").write_bytes(b"old")
    assert prepare_cache(folder, key(Student(50)), label="flash_s4", note=lambda _: None) == 1  # same: kept
    notes = []
    assert prepare_cache(folder, key(Student(50, lora_sha256="b")), label="flash_s4", note=notes.append) == 0
    assert not (folder / "00000.png").exists() and "lora_sha256" in notes[0]
    (folder / "00000.png").write_bytes(b"old")
    assert prepare_cache(folder, key(Student(20, lora_sha256="b")), label="flash_s4", note=notes.append) == 0
    assert not (folder / "00000.png").exists()


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
