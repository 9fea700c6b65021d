"""The LCM schedule shared by sampling and training: timesteps, discrete grid, and refusal of mismatches."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import LCMScheduler

from distill_common.errors import ConfigError, ModelLoadError
from distill_common.models.tiny_sd import SD15_SCHEDULER_CONFIG
from distill_lora_flash.schedule import FlashSchedule

# FIELD_NOTES: "2 -> [999, 499]; 4 -> [999, 759, 499, 259]; 8 -> [999, 879, 759, 639, 499, 379, 259, 139]"
FIELD_NOTES_STEPS = {
    2: [999, 499],
    4: [999, 759, 499, 259],
    8: [999, 879, 759, 639, 499, 379, 259, 139],
}


def sd15_schedule(**kw) -> FlashSchedule:
    return FlashSchedule.from_scheduler(SD15_SCHEDULER_CONFIG, **kw)


def lcm_by_hand(num_steps: int, original: int = 50, train_steps: int = 1000) -> list[int]:
    """LCM's construction: origin grid k*(T/original) - 1 for k = 1..original, read from its end at the indices
    floor(i * original / num_steps), i = 0..num_steps-1 (evenly spread, so 4 steps pick 0, 12, 25, 37)."""
    origin = [k * (train_steps // original) - 1 for k in range(1, original + 1)][::-1]
    return [origin[(i * original) // num_steps] for i in range(num_steps)]


@pytest.mark.parametrize("steps", [2, 4, 8])
def test_lcm_timesteps_match_field_notes_and_the_construction(steps):
    schedule = sd15_schedule()
    assert schedule.timesteps(steps) == FIELD_NOTES_STEPS[steps]
    assert schedule.timesteps(steps) == lcm_by_hand(steps)
    sched = schedule.scheduler()
    assert isinstance(sched, LCMScheduler) and sched.config.timestep_spacing == "trailing"


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_timestep_spacing_does_not_change_lcm_steps(spacing):
    """Reconciles the issue's 'trailing spacing' with FIELD_NOTES: LCM ignores timestep_spacing for these counts."""
    sched = LCMScheduler.from_config({**SD15_SCHEDULER_CONFIG, "timestep_spacing": spacing})
    for steps, expected in FIELD_NOTES_STEPS.items():
        sched.set_timesteps(steps)
        assert sched.timesteps.tolist() == expected


def test_grid_is_the_union_and_the_sampler_draws_only_from_it():
    schedule = sd15_schedule()
    grid = schedule.grid([2, 4, 8])
    assert grid.tolist() == sorted(set(sum(FIELD_NOTES_STEPS.values(), [])))
    sampler = schedule.timestep_sampler([2, 4, 8])
    draws = sampler(4000, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == set(grid.tolist())  # every grid point, nothing else
    assert sampler.is_discrete
    uniform = schedule.timestep_sampler(None)
    draws = uniform(4000, generator=torch.Generator().manual_seed(0))
    assert not uniform.is_discrete
    assert 0 <= int(draws.min()) and int(draws.max()) <= 999 and len(set(draws.tolist())) > 900


def test_other_step_counts_and_grid_sizes():
    assert sd15_schedule().timesteps(1) == [999]
    assert sd15_schedule(original_inference_steps=25).timesteps(2) == lcm_by_hand(2, original=25)
    with pytest.raises(ConfigError, match="1 to 50 steps"):
        sd15_schedule().timesteps(51)


def test_a_sampler_on_another_grid_is_refused():
    schedule = sd15_schedule()
    schedule.verify(schedule.scheduler(), [2, 4, 8])  # same object: accepted
    other = LCMScheduler.from_config({**SD15_SCHEDULER_CONFIG, "original_inference_steps": 40})
    with pytest.raises(ConfigError, match="differ from the training grid"):
        schedule.verify(other, [2, 4, 8])


def test_a_noise_schedule_with_other_betas_is_refused():
    from diffusers import DDPMScheduler

    schedule = sd15_schedule()
    schedule.verify_noise_schedule(DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG))
    with pytest.raises(ConfigError, match="noise schedule differs"):
        schedule.verify_noise_schedule(DDPMScheduler.from_config({**SD15_SCHEDULER_CONFIG, "beta_end": 0.02}))


def test_a_generator_folder_trained_on_another_grid_is_refused(tiny_sd_path, tiny_lora, tmp_path):
    from distill_lora_flash.generator import load_generator, write_generator_folder

    folder = write_generator_folder(tmp_path / "gen", base_model=str(tiny_sd_path),
                                    lora_file=tiny_lora / "pytorch_lora_weights.safetensors",
                                    schedule=sd15_schedule(), discrete_steps=[2, 4])
    manifest = json.loads((folder / "generator.json").read_text())
    assert manifest["discrete_timesteps"] == {"2": [999, 499], "4": [999, 759, 499, 259]}
    gen = load_generator(folder, device="cpu")
    assert gen.scheduler.config.original_inference_steps == 50
    manifest["discrete_timesteps"]["4"] = [999, 749, 499, 249]
    (folder / "generator.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match="trained on the 4-step LCM timesteps"):
        load_generator(folder, device="cpu")
