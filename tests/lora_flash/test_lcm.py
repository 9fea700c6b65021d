"""``flash train --method lcm`` (LCM-LoRA, Luo et al. 2023): the skipping-step DDIM solver, the boundary condition,
the pseudo-Huber loss, the student as its own target, and the same run layout, resume and registry as noise matching."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from flash_helpers import run_cli
from safetensors.torch import load_file
from test_flash_train import tiny_config

from distill_common.checkpoint import list_checkpoints
from distill_common.errors import ConfigError
from distill_lora_flash import lcm
from distill_lora_flash.config import TrainConfig
from distill_lora_flash.training import train


def _abar() -> torch.Tensor:
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod


def test_skipping_grid_is_lcm_schedulers_50_point_grid_and_steps_back_k():
    from diffusers import LCMScheduler

    solver = lcm.SkippingDDIMSolver(_abar(), skip=20)
    assert len(solver.timesteps) == 50 and solver.timesteps[0] == 19 and solver.timesteps[-1] == 999
    scheduler = LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler.set_timesteps(50, original_inference_steps=50)
    assert sorted(scheduler.timesteps.tolist()) == solver.timesteps.tolist()  # the student samples on this grid
    torch.manual_seed(0)
    t, s = solver.draw(256, "cpu")
    assert set(t.tolist()) <= set(solver.timesteps.tolist()) and torch.equal(s, (t - 20).clamp(min=0))
    assert (s == 0).any()  # t = 19 steps to the data end
    with pytest.raises(ConfigError, match="--lcm-skip"):
        lcm.SkippingDDIMSolver(_abar(), skip=0)


def test_boundary_condition_and_ddim_step():
    c_skip, c_out = lcm.boundary_scalings(torch.tensor([0, 1, 19, 999]))
    assert c_skip[0] == 1 and c_out[0] == 0  # f(x, 0) = x
    # sigma_d = 0.5, t / 0.1: c_skip(1) = 0.25 / (100 + 0.25), c_out(1) = 10 / sqrt(100.25)
    assert c_skip[1].item() == pytest.approx(0.25 / 100.25) and c_out[1].item() == pytest.approx(10 / 100.25**0.5)
    assert c_skip[3] < 1e-6 and c_out[3] == pytest.approx(1.0, abs=1e-6)
    solver = lcm.SkippingDDIMSolver(_abar(), 20)
    x0, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    s = torch.tensor([0, 500])
    abar = _abar()[s].view(-1, 1, 1, 1)
    torch.testing.assert_close(solver.step(x0, eps, s), abar.sqrt() * x0 + (1 - abar).sqrt() * eps)
    # x0/eps from an epsilon and a v prediction agree
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    x_t = alpha * x0 + sigma * eps
    v = alpha * eps - sigma * x0
    for out, kind in ((eps, "epsilon"), (v, "v_prediction")):
        got_x0, got_eps = lcm.predicted_x0_and_eps(out, x_t, alpha, sigma, kind)
        torch.testing.assert_close(got_x0, x0, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got_eps, eps, atol=1e-4, rtol=1e-4)


def test_pseudo_huber_is_l1_like_far_and_l2_like_near():
    a = torch.zeros(1, 4)
    assert lcm.pseudo_huber(a, torch.full((1, 4), 3.0), 1e-3).item() == pytest.approx(3.0 - 1e-3, rel=1e-4)
    near = lcm.pseudo_huber(a, torch.full((1, 4), 1e-5), 1e-3).item()
    assert near == pytest.approx(1e-10 / 2e-3, rel=1e-2)


def test_student_is_its_own_no_grad_target(tiny_sd_path):
    """The target is computed by the LoRA student (adapters on) without gradient; the teacher has adapters off."""
    from distill_common.models import add_lora, load_sd_components
    from distill_lora_flash.training import encode_prompts

    parts = load_sd_components(tiny_sd_path)
    unet = parts.unet
    add_lora(unet, rank=4, alpha=4, init_lora_weights=False)
    calls: list[tuple[bool, bool]] = []  # (grad enabled, adapters enabled)
    unet.register_forward_pre_hook(lambda m, a: calls.append((torch.is_grad_enabled(), not m._disable_adapters
                                                              if hasattr(m, "_disable_adapters") else True)))
    cond = encode_prompts(parts.tokenizer, parts.text_encoder, ["a cat"], torch.device("cpu"))
    uncond = encode_prompts(parts.tokenizer, parts.text_encoder, [""], torch.device("cpu"))
    method = lcm.LCMMethod(parts.scheduler.alphas_cumprod, guidance_min=6, guidance_max=6, loss="l2")
    torch.manual_seed(0)
    loss, logs = method(unet, torch.randn(1, 4, 16, 16), cond, uncond)
    assert loss.requires_grad and logs["guidance"] == 6.0
    assert [grad for grad, _ in calls] == [True, False, False]  # student, teacher (CFG batch), target
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in unet.named_parameters() if "lora_" in n)


def test_noise_matching_weight_adds_the_cfg_teachers_term_to_the_consistency_loss(tiny_sd_path):
    """``--lcm-noise-matching-weight w``: loss = LCM + w * noise matching, each on its own noise, with both sets of logs;
    at the same RNG state the total is exactly the sum of the two components run in that order."""
    from diffusers import DDPMScheduler

    from distill_common.models import add_lora, load_sd_components
    from distill_lora_flash.losses import NoiseMatchingLoss, NoiseMatchingMethod
    from distill_lora_flash.training import encode_prompts

    parts = load_sd_components(tiny_sd_path)
    unet = parts.unet
    add_lora(unet, rank=4, alpha=4, init_lora_weights=False)
    cond = encode_prompts(parts.tokenizer, parts.text_encoder, ["a cat", "a dog"], torch.device("cpu"))
    uncond = encode_prompts(parts.tokenizer, parts.text_encoder, ["", ""], torch.device("cpu"))
    abar = parts.scheduler.alphas_cumprod
    consistency = lcm.LCMMethod(abar, guidance_min=7.5, guidance_max=7.5)
    sampler = lambda b, device: torch.randint(0, 1000, (b,), device=device)  # noqa: E731
    matching = NoiseMatchingMethod(NoiseMatchingLoss(abar, 7.5, 5.0), DDPMScheduler.from_config(parts.scheduler.config),
                                   sampler)
    combined = lcm.WeightedMethods([(1.0, consistency), (0.5, matching)])
    latents = torch.randn(2, 4, 16, 16)
    torch.manual_seed(3)
    loss, logs = combined(unet, latents, cond, uncond)
    torch.manual_seed(3)
    with torch.no_grad():
        alone_lcm, _ = consistency(unet, latents, cond, uncond)
        alone_nm, _ = matching(unet, latents, cond, uncond)
    torch.testing.assert_close(loss.detach(), alone_lcm + 0.5 * alone_nm)
    assert combined.name == "lcm+noise_matching" and alone_nm > 0
    assert {"lcm/loss", "lcm/lcm_loss", "lcm/guidance", "noise_matching/loss", "noise_matching/mse"} <= set(logs)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in unet.named_parameters() if "lora_" in n)
    with pytest.raises(ConfigError, match="weights >= 0"):
        lcm.WeightedMethods([(-1.0, consistency)])


def test_lcm_with_noise_matching_trains_resumes_and_is_a_resume_invariant(tiny_sd_path, data_root, tmp_path):
    cfg = tiny_config(tiny_sd_path, data_root, tmp_path, method="lcm", lcm_guidance_min=7.5, lcm_guidance_max=7.5,
                      lcm_noise_matching_weight=0.5)
    cfg.validate()
    result = train(cfg)
    assert result.global_step == 4 and {"lcm/lcm_loss", "noise_matching/mse", "loss"} <= set(result.metrics)
    with pytest.raises(ConfigError, match="lcm_noise_matching_weight"):  # the run folder was started with 0.5
        train(tiny_config(tiny_sd_path, data_root, tmp_path, method="lcm", lcm_guidance_min=7.5,
                          lcm_guidance_max=7.5, lcm_noise_matching_weight=1.0))
    with pytest.raises(ConfigError, match="--lcm-noise-matching-weight"):
        TrainConfig(method="noise_matching", lcm_noise_matching_weight=0.5).validate()


def test_lcm_training_run_layout_resume_and_config_errors(tiny_sd_path, data_root, tmp_path):
    cfg = tiny_config(tiny_sd_path, data_root, tmp_path, method="lcm", lcm_guidance_min=3.0, lcm_guidance_max=9.0)
    cfg.validate()
    result = train(cfg)
    run = tmp_path / "run"
    assert result.global_step == 4 and {"lcm_loss", "guidance", "loss"} <= set(result.metrics)
    assert 3.0 <= result.metrics["guidance"] <= 9.0
    assert [step for step, _ in list_checkpoints(run / "lora")] == [2, 4]
    manifest = json.loads((run / "generator" / "generator.json").read_text())
    assert manifest["method"] == "lcm" and manifest["pipeline"] == "StableDiffusionPipeline"
    final = load_file(run / "lora" / "final" / "pytorch_lora_weights.safetensors")

    shutil.rmtree(run / "lora" / "checkpoint-4")
    shutil.rmtree(run / "lora" / "final")
    resumed = train(cfg)
    assert resumed.resumed_from == run / "lora" / "checkpoint-2"
    again = load_file(run / "lora" / "final" / "pytorch_lora_weights.safetensors")
    for key in final:
        torch.testing.assert_close(again[key], final[key], rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="method"):
        train(tiny_config(tiny_sd_path, data_root, tmp_path, method="noise_matching"))

    with pytest.raises(ConfigError, match="--lcm-guidance-min"):
        TrainConfig(lcm_guidance_min=9, lcm_guidance_max=3).validate()


@pytest.mark.parametrize("args, needle", [
    (["--method", "lcd"], "--method"),
    (["--lcm-skip", "0"], "--lcm-skip"),
    (["--lcm-huber-c", "nan"], "--lcm-huber-c"),
    (["--lcm-guidance-max", "inf"], "--lcm-guidance-max"),
    (["--lcm-loss", "l1"], "--lcm-loss"),
    (["--lcm-noise-matching-weight", "-1"], "--lcm-noise-matching-weight"),
    (["--lcm-noise-matching-weight", "0.5"], "--lcm-noise-matching-weight"),
    (["--method", "lcm", "--use-discrete-timesteps"], "--use-discrete-timesteps"),
    (["--teacher-guidance", "inf"], "--teacher-guidance"),
])
def test_lcm_options_fail_in_one_line(args, needle, capsys, tmp_path):
    code, out, err = run_cli(["train", "--output-dir", str(tmp_path), *args], capsys)
    assert code != 0 and needle in err
    assert len([line for line in err.strip().splitlines() if line.strip()]) <= 3, err


def test_help_lists_the_new_options(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    code, out, _ = run_cli(["train", "--help"], capsys)
    text = " ".join(out.split())
    for flag in ("--method", "--lcm-skip", "--lcm-guidance-min", "--lcm-guidance-max", "--lcm-loss", "--lcm-huber-c",
                 "--lcm-noise-matching-weight", "stable-diffusion-v1-5/stable-diffusion-v1-5"):
        assert flag in text, flag
