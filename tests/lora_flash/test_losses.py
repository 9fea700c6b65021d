"""The teacher target (CFG on the frozen base UNet), Min-SNR weights and the noise-matching loss, against
hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from distill_common.errors import ConfigError
from distill_common.models import add_lora, load_sd_components
from distill_common.models.tiny_sd import SD15_SCHEDULER_CONFIG
from distill_lora_flash.losses import CFGTeacher, NoiseMatchingLoss, classifier_free_guidance, min_snr_weights


def sd15_alphas_cumprod_numpy() -> np.ndarray:
    """SD 1.5's 'scaled_linear' schedule written out: betas = linspace(sqrt(b0), sqrt(b1), 1000)^2."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


@pytest.mark.parametrize("gamma", [1.0, 5.0, 20.0])
def test_min_snr_weights_equal_the_formula(gamma):
    abar = sd15_alphas_cumprod_numpy()
    alphas_cumprod = DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG).alphas_cumprod
    np.testing.assert_allclose(alphas_cumprod.numpy(), abar, rtol=1e-5)
    t = torch.tensor([0, 1, 10, 50, 139, 259, 499, 759, 999])
    snr = abar[t.numpy()] / (1.0 - abar[t.numpy()])
    expected_eps = np.minimum(snr, gamma) / snr
    expected_v = np.minimum(snr, gamma) / (snr + 1.0)
    np.testing.assert_allclose(min_snr_weights(alphas_cumprod, t, gamma).numpy(), expected_eps, rtol=1e-4)
    np.testing.assert_allclose(min_snr_weights(alphas_cumprod, t, gamma, "v_prediction").numpy(), expected_v,
                               rtol=1e-4)
    # high-noise steps (SNR < gamma) keep weight 1 for epsilon; the cleanest steps are down-weighted
    assert min_snr_weights(alphas_cumprod, torch.tensor([999]), gamma).item() == pytest.approx(1.0)
    assert min_snr_weights(alphas_cumprod, torch.tensor([0]), gamma).item() < 0.02


def test_min_snr_off_and_bad_values():
    alphas_cumprod = DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG).alphas_cumprod
    t = torch.tensor([0, 500, 999])
    assert torch.equal(min_snr_weights(alphas_cumprod, t, None), torch.ones(3))
    assert torch.equal(min_snr_weights(alphas_cumprod, t, 0.0), torch.ones(3))
    with pytest.raises(ConfigError, match="snr-gamma"):
        min_snr_weights(alphas_cumprod, t, -1.0)
    with pytest.raises(ConfigError, match="prediction type"):
        min_snr_weights(alphas_cumprod, t, 5.0, "sample")


@pytest.fixture
def lora_unet_and_base(tiny_sd_path):
    """The student UNet (tiny SD + a LoRA whose B is non-zero) and an independent copy of the base UNet."""
    student = load_sd_components(tiny_sd_path, include=("unet",)).unet
    torch.manual_seed(1)
    add_lora(student, rank=4, alpha=4, init_lora_weights=False)
    base = load_sd_components(tiny_sd_path, include=("unet",)).unet
    return student, base


def test_teacher_target_is_cfg_of_the_frozen_base_unet(lora_unet_and_base):
    student, base = lora_unet_and_base
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 4, 16, 16, generator=g)  # (B, 4, h, w)
    t = torch.tensor([999, 259])
    cond = torch.randn(2, 77, 32, generator=g)
    uncond = torch.randn(1, 77, 32, generator=g).expand(2, -1, -1)
    w = 7.5
    with torch.no_grad():
        eps_u = base(x_t, t, encoder_hidden_states=uncond).sample  # two separate forwards of the base UNet
        eps_c = base(x_t, t, encoder_hidden_states=cond).sample
        by_hand = eps_u + w * (eps_c - eps_u)
        target = CFGTeacher(student, w)(x_t, t, cond, uncond)
        lora_cond = student(x_t, t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(target, by_hand, rtol=1e-4, atol=1e-5)
    assert (lora_cond - eps_c).abs().max() > 1e-3  # the LoRA is on again after the teacher pass
    torch.testing.assert_close(classifier_free_guidance(eps_u, eps_c, 1.0), eps_c)


def test_noise_matching_loss_equals_the_weighted_mse(lora_unet_and_base):
    student, base = lora_unet_and_base
    alphas_cumprod = DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG).alphas_cumprod
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([19, 759])  # a low-noise step (down-weighted by Min-SNR) and a high-noise one
    cond = torch.randn(2, 77, 32, generator=g)
    uncond = torch.zeros(2, 77, 32)
    loss_fn = NoiseMatchingLoss(alphas_cumprod, teacher_guidance=3.0, snr_gamma=5.0)
    loss, logs = loss_fn(student, x_t, t, cond, uncond)
    with torch.no_grad():
        eps_u = base(x_t, t, encoder_hidden_states=uncond).sample
        eps_c = base(x_t, t, encoder_hidden_states=cond).sample
        target = eps_u + 3.0 * (eps_c - eps_u)
        pred = student(x_t, t, encoder_hidden_states=cond).sample
    per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    abar = sd15_alphas_cumprod_numpy()[t.numpy()]
    snr = abar / (1 - abar)
    weights = torch.tensor(np.minimum(snr, 5.0) / snr, dtype=torch.float32)
    assert weights[0] < 0.5 and weights[1] == pytest.approx(1.0)
    torch.testing.assert_close(loss.detach(), (per_sample * weights).mean(), rtol=1e-4, atol=1e-6)
    assert logs["snr_weight"] == pytest.approx(float(weights.mean()), rel=1e-4)
    loss.backward()  # only the LoRA receives gradients
    grads = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
