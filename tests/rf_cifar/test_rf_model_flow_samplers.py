"""UNet sizes and errors, the RF convention, CFG in one forward, sampler call counts, RK45 vs fine Euler, seeds."""

from __future__ import annotations

import math

import pytest
import torch
from rf_helpers import tiny_unet_config

from distill_common.errors import ConfigError, ModelLoadError
from distill_rf_cifar.config import UNetConfig, paper_pipeline, smoke_pipeline
from distill_rf_cifar.flow import guided_velocity, interpolate, model_fn, noise_for_seeds, time_sampler
from distill_rf_cifar.generator import RFGenerator, load_model, save_generator
from distill_rf_cifar.models import build_unet, count_parameters
from distill_rf_cifar.samplers import (
    CountingModelFn,
    get_sampler,
    sample_euler,
    sample_heun,
    sample_rk45,
    time_grid,
)


def test_unet_sizes_match_the_stated_counts():
    with torch.device("meta"):
        assert count_parameters(build_unet(UNetConfig())) == 3_085_827  # 12.3 MB fp32, the seed teacher's size
        assert count_parameters(build_unet(smoke_pipeline().model)) == 264_307
        assert count_parameters(build_unet(paper_pipeline().model)) == 35_751_939  # DDPM's CIFAR-10 UNet


def test_unet_forward_and_config_errors():
    model = build_unet(tiny_unet_config())
    out = model(torch.randn(3, 3, 32, 32), torch.rand(3), torch.tensor([0, 9, 10]))  # 10 = null class
    assert out.shape == (3, 3, 32, 32)
    with pytest.raises(ConfigError, match="GroupNorm groups 32 do not divide 8"):
        build_unet(tiny_unet_config(norm_groups=32))
    with pytest.raises(ConfigError, match="not levels of this UNet"):
        build_unet(tiny_unet_config(attention_resolutions=[4]))


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path):
    folder = save_generator(tmp_path / "g", build_unet(tiny_unet_config()), role="teacher", default_steps=2)
    config = folder / "model_config.json"
    config.write_text(config.read_text().replace('"base_channels": 8', '"base_channels": 12'))
    with pytest.raises(ModelLoadError, match="another architecture"):
        load_model(folder)


def test_convention_and_time_samplers():
    x0, x1 = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    assert torch.equal(interpolate(x0, x1, torch.tensor([0.0, 1.0]))[0], x0[0])
    assert torch.equal(interpolate(x0, x1, torch.tensor([0.0, 1.0]))[1], x1[1])
    t = time_sampler("logit_normal")(10_000, generator=torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1 and abs(float(t.mean()) - 0.5) < 0.01 and float(t.std()) < 0.25
    with pytest.raises(ConfigError, match="valid choices: 'logit_normal', 'uniform'"):
        time_sampler("cosine")
    with pytest.raises(ConfigError, match="'euler', 'heun', 'rk45'"):
        get_sampler("dpm")


class CountingUNet(torch.nn.Module):
    """Wraps a UNet and counts forward calls and the batch sizes they saw."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls, self.batches = inner, 0, []
        self.null_class, self.num_classes = inner.null_class, inner.num_classes

    def forward(self, x, t, y):
        self.calls += 1
        self.batches.append(x.shape[0])
        return self.inner(x, t, y)


@pytest.mark.parametrize("steps", [1, 4, 7])
def test_euler_with_n_steps_calls_the_network_exactly_n_times(steps):
    net = CountingUNet(build_unet(tiny_unet_config()).eval())
    gen = RFGenerator(net, default_steps=steps)
    gen.generate([1, 2, 3], seeds=[0, 1, 2])
    assert net.calls == steps and gen.last_nfe == steps
    net.calls = 0
    gen.generate([1, 2, 3], seeds=[0, 1, 2], guidance=2.0)  # CFG: still one (doubled) forward per step
    assert net.calls == steps and set(net.batches[-steps:]) == {6}
    net.calls = 0
    gen.generate([1], seeds=[0], sampler="heun")
    assert net.calls == 2 * steps - 1 and gen.last_nfe == 2 * steps - 1  # the step onto the data is Euler


def test_cfg_is_uncond_plus_w_times_difference():
    torch.manual_seed(0)
    model = build_unet(tiny_unet_config()).eval()
    x, t, y = torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([3, 5])
    with torch.no_grad():
        v_u = model(x, t, torch.full_like(y, model.null_class))
        v_c = model(x, t, y)
        guided = guided_velocity(model, x, t, y, guidance=3.0)
        assert torch.allclose(guided, v_u + 3.0 * (v_c - v_u), atol=1e-5)
        assert torch.equal(guided_velocity(model, x, t, y, guidance=1.0), v_c)


def test_rk45_agrees_with_fine_euler_on_a_smooth_field():
    # dx/dt = -x cos(2t) + sin(t): smooth, non-autonomous; exact solution via integrating factor
    def field(x, t):
        t = float(t)
        return -x * math.cos(2 * t) + math.sin(t)

    x0 = torch.linspace(-2, 2, 12, dtype=torch.float64).reshape(1, 3, 2, 2)
    counter = CountingModelFn(field)
    rk = sample_rk45(counter, x0, time_grid(1).double(), rtol=1e-8, atol=1e-8)
    fine = sample_euler(field, x0, time_grid(20_000).double())
    heun = sample_heun(field, x0, time_grid(200).double())
    assert torch.allclose(rk, fine, atol=2e-4)
    assert torch.allclose(rk, heun, atol=1e-4)
    # second order even with its last step Euler: 4x the steps, ~16x smaller error; far ahead of Euler at equal NFE
    heun_50 = sample_heun(field, x0, time_grid(50).double())
    euler_same_nfe = sample_euler(field, x0, time_grid(2 * 200 - 1).double())
    assert (heun_50 - rk).abs().max() > 10 * (heun - rk).abs().max()
    assert (euler_same_nfe - rk).abs().max() > 10 * (heun - rk).abs().max()
    assert 10 < counter.calls < 2000  # adaptive: the NFE is counted
    coarse = sample_euler(field, x0, time_grid(4).double())
    assert (coarse - rk).abs().max() > 10 * (fine - rk).abs().max()  # the comparison is not vacuous


def test_fixed_seeds_give_identical_images_whatever_the_batch():
    torch.manual_seed(0)
    gen = RFGenerator(build_unet(tiny_unet_config()).eval(), default_steps=3)
    a = gen.generate([0, 1, 2, 3], seeds=[10, 11, 12, 13])
    b = gen.generate([0, 1, 2, 3], seeds=[10, 11, 12, 13])
    assert torch.equal(a, b)
    c = gen.generate([2, 7], seeds=[12, 99])  # seed 12 again, in another batch
    assert torch.allclose(a[2], c[0], atol=1e-5)
    assert not torch.allclose(a[0], a[1])
    assert a.shape == (4, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(noise_for_seeds([5])[0], torch.randn((3, 32, 32), generator=torch.Generator().manual_seed(5)))
    with pytest.raises(ConfigError, match="class labels must lie in 0..9"):
        gen.generate([10], seeds=[0])


def test_model_fn_accepts_scalar_time():
    model = build_unet(tiny_unet_config()).eval()
    fn = model_fn(model, torch.tensor([1, 2]))
    with torch.no_grad():
        assert fn(torch.randn(2, 3, 32, 32), torch.tensor(0.5)).shape == (2, 3, 32, 32)


def test_heun_never_evaluates_the_network_at_the_data_end():
    # Karras et al. 2022, Algorithm 1: the step onto the data (t = 1) is an Euler step, so 2N - 1 calls
    seen: list[float] = []

    def field(x, t):
        seen.append(float(t))
        return torch.ones_like(x) * (100.0 if float(t) >= 1.0 else 1.0)  # a velocity that is garbage only at t = 1

    x0 = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    out = sample_heun(field, x0, time_grid(4).double())
    assert len(seen) == 2 * 4 - 1 and max(seen) < 1.0
    assert torch.allclose(out, torch.ones_like(out))  # exact for a constant field
