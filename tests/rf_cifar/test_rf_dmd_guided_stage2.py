"""DMD2 (issue 23): the distribution-matching gradient on a case with known values, the update order of the two time-
scale rule (N fake-score steps per student step), no gradient between the student and the fake score, the GAN term,
checkpoint/resume of both networks and both optimisers; guided distillation's stage two keeps the w-conditioning."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from rf_helpers import tiny_loop, tiny_unet_config
from typer.testing import CliRunner

from distill_common.errors import ConfigError
from distill_rf_cifar.config import FlowConfig, RecipeConfig
from distill_rf_cifar.generator import load_generator, load_model
from distill_rf_cifar.losses import DistributionMatchingLoss, ProgressiveDistillationLoss
from distill_rf_cifar.recipes import build_recipe
from distill_rf_cifar.training import train


class _Scale(torch.nn.Module):
    """v(x, t) = a x."""

    null_class = 10

    def __init__(self, a: float):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))

    def forward(self, x, t, y):
        return self.a * x


class _Offset(torch.nn.Module):
    """A student whose one-step image is x0 + P: the gradient reaching P is the one reaching the image."""

    null_class = 10

    def __init__(self, b: int):
        super().__init__()
        self.p = torch.nn.Parameter(torch.randn(b, 3, 32, 32))

    def forward(self, x, t, y):
        return self.p.expand_as(x)


def test_dmd_gradient_is_fake_minus_real_prediction_normalised_by_the_real_error():
    torch.manual_seed(0)
    loss = DistributionMatchingLoss(_Scale(-1.0), fake_updates=1)
    with torch.no_grad():
        loss.fake.a.fill_(-0.5)
    x, eps = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)
    t, y = torch.tensor([0.1, 0.5, 0.9]), torch.zeros(3, dtype=torch.long)
    xt = t.view(-1, 1, 1, 1) * x + (1 - t.view(-1, 1, 1, 1)) * eps
    r = (1 - t).view(-1, 1, 1, 1)
    x_real, x_fake = xt + r * (-1.0 * xt), xt + r * (-0.5 * xt)  # x_hat = x_t + (1 - t) v
    expected = (x_fake - x_real) / (x - x_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(loss.dmd_gradient(x, y, t, eps), expected, atol=1e-5)
    # equal scores: no gradient at all
    same = DistributionMatchingLoss(_Scale(-1.0))
    assert torch.equal(same.dmd_gradient(x, y, t, eps), torch.zeros_like(x))

    # the student's loss passes exactly grad / (C H W) / B to its image and nothing to either score network
    student, batch = _Offset(3), {"x1": torch.randn(3, 3, 32, 32), "y": y}
    torch.manual_seed(1)
    out = loss(student, batch)
    torch.manual_seed(1)
    x0 = torch.randn(3, 3, 32, 32)
    x_s = x0 + student.p.detach()
    t_drawn = 0.02 + 0.96 * torch.rand(3)
    grad = loss.dmd_gradient(x_s, y, t_drawn, torch.randn(3, 3, 32, 32))
    out.loss.backward()
    assert torch.allclose(student.p.grad, grad / (3 * 32 * 32) / 3, atol=1e-9)
    assert loss.fake.a.grad is None and loss.real.a.grad is None
    assert set(out.metrics) >= {"loss_dmd", "dmd_grad_rms"}


def _images(b=8):
    return {"x1": torch.rand(b, 3, 32, 32) * 2 - 1, "y": torch.arange(b) % 10}


def test_two_time_scale_update_order_and_no_gradient_across_the_two_networks(tmp_path):
    from distill_rf_cifar.models import build_unet

    torch.manual_seed(0)
    teacher = build_unet(tiny_unet_config())
    student = build_unet(tiny_unet_config())
    student.load_state_dict(teacher.state_dict())
    loss = DistributionMatchingLoss(teacher, fake_updates=3, fake_learning_rate=1e-2, gan_weight=0.5, head_channels=8)
    events: list[str] = []
    fake_step = loss.fake_step
    loss.fake_step = lambda *a, **k: (events.append("F"), fake_step(*a, **k))[1]
    forward = loss.forward
    loss.forward = lambda *a, **k: (events.append("G"), forward(*a, **k))[1]

    # the student's step: gradients reach the student only, neither the fake network nor the GAN head
    out = loss(student, _images())
    out.loss.backward()
    assert all(p.grad is None for p in loss.fake.parameters()) and all(p.grad is None for p in loss.head.parameters())
    assert all(p.requires_grad for p in loss.fake.parameters())  # unfrozen again for its own steps
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert "loss_g_gan" in out.metrics
    # the fake network's steps: its weights and the head move, the student's weights and gradients stay untouched
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    grads_before = [p.grad.clone() for p in student.parameters() if p.grad is not None]
    fake_before = {k: v.clone() for k, v in loss.extra_weights().items()}
    stats = loss.after_step(student)
    assert events == ["G", "F", "F", "F"] and loss.fake_steps_done == 3
    assert {"loss_fake", "loss_d_gan", "d_acc_real", "d_acc_fake"} <= set(stats)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in student_before.items())
    assert all(torch.equal(a, p.grad) for a, p in zip(grads_before, [p for p in student.parameters()
                                                                      if p.grad is not None], strict=True))
    moved = [k for k, v in loss.extra_weights().items() if not torch.equal(v, fake_before[k])]
    assert any(k.startswith("fake.") for k in moved) and any(k.startswith("head.") for k in moved)
    assert loss.after_step(student) == {}  # nothing pending: no extra fake steps without a student step

    # through the one loop: 2 student steps, 3 fake steps after each, in that order
    events.clear()
    loss.fake_steps_done = 0
    train(tiny_loop(steps=2), student, loss, _Data(), tmp_path / "order", progress=False)
    assert events == ["G", "F", "F", "F"] * 2 and loss.fake_steps_done == 6


class _Data:
    def __len__(self):
        return 16

    def batch(self, indices):
        g = torch.Generator().manual_seed(int(indices[0]))
        return {"x1": torch.rand(len(indices), 3, 32, 32, generator=g) * 2 - 1, "y": indices % 10}


def test_dmd_recipe_trains_through_the_one_loop_and_resumes_both_networks_exactly(tmp_path, teacher_dir, cifar_images):
    opts = RecipeConfig(dmd_fake_updates=2, dmd_gan_weight=0.1, dmd_head_channels=8, dmd_fake_learning_rate=1e-3)
    phases = build_recipe("dmd", opts, FlowConfig(), steps=4, guidance=2.0)
    assert [(p.name, p.data, p.sample_steps) for p in phases] == [("dmd", "images", 1)]
    loop = tiny_loop(steps=4, checkpoint_every=2, keep_checkpoints=0)

    loss_full = phases[0].make_loss(load_model(teacher_dir))
    assert loss_full.guidance == 2.0 and loss_full.fake_updates == 2
    torch.manual_seed(0)
    _, full, _ = train(loop, load_model(teacher_dir), loss_full, cifar_images, tmp_path / "full", progress=False)
    assert loss_full.fake_steps_done == 8
    assert (tmp_path / "full" / "checkpoints" / "checkpoint-2" / "extra.safetensors").is_file()

    loss_a = phases[0].make_loss(load_model(teacher_dir))
    train(dataclasses.replace(loop, stop_at_step=3), load_model(teacher_dir), loss_a, cifar_images, tmp_path / "res",
          progress=False)
    loss_b = phases[0].make_loss(load_model(teacher_dir))  # a new process: fresh fake network and optimiser
    _, resumed, _ = train(loop, load_model(teacher_dir), loss_b, cifar_images, tmp_path / "res", progress=False)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for k, v in loss_full.extra_weights().items():  # fake score and GAN head
        assert torch.equal(v, loss_b.extra_weights()[k]), k
    assert loss_b.fake_steps_done == 8
    sa, sb = loss_full.fake_optimizer.state_dict(), loss_b.fake_optimizer.state_dict()
    assert sb["state"] and all(torch.equal(sa["state"][i]["exp_avg"], sb["state"][i]["exp_avg"]) for i in sa["state"])


def test_dmd_options_are_checked_with_the_fix():
    with pytest.raises(ConfigError, match="--options-dmd-fake-updates 5"):
        build_recipe("dmd", RecipeConfig(dmd_fake_updates=0), FlowConfig(), steps=4)
    with pytest.raises(ConfigError, match="--options-dmd-t-min"):
        build_recipe("dmd", RecipeConfig(dmd_t_min=0.9, dmd_t_max=0.5), FlowConfig(), steps=4)
    with pytest.raises(ConfigError, match="unknown recipe 'dmd3'; valid choices: .*'dmd'.*'guided_progressive'"):
        build_recipe("dmd3", RecipeConfig(), FlowConfig(), steps=4)


def test_dmd_through_the_distill_command_exports_a_one_step_generator(tmp_path, teacher_dir, data_root):
    from distill_rf_cifar.cli import app

    out = tmp_path / "dmd"
    result = CliRunner().invoke(app, ["distill", "--recipe", "dmd", "--teacher", str(teacher_dir), "--output-dir",
                                      str(out), "--no-track", "--train-steps", "2", "--train-batch-size", "8",
                                      "--train-device", "cpu", "--train-precision", "fp32",
                                      "--options-dmd-fake-updates", "2", "--data-root", str(data_root),
                                      "--data-limit", "16"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "generator" / "generator.json").read_text())
    assert manifest["role"] == "dmd" and manifest["default_steps"] == 1 and manifest["sampler"] == "euler"
    gen = load_generator(out / "generator", device="cpu")
    assert gen.generate([0, 1], seeds=[0, 1]).shape == (2, 3, 32, 32) and gen.last_nfe == 1


# ------------------------------------------------------------------------------------------ guided, stage two


class _WTeacher(torch.nn.Module):
    """A w-conditioned toy: v = -x * w; records the w of every call."""

    null_class = 10
    guidance_conditioned = True

    def __init__(self):
        super().__init__()
        self.calls: list[torch.Tensor] = []

    def forward(self, x, t, y, w=None):
        self.calls.append(w.clone())
        return -x * w.view(-1, 1, 1, 1)


def test_stage_two_target_comes_from_the_w_conditioned_teacher_at_the_students_w():
    teacher, student = _WTeacher(), _WTeacher()
    loss = ProgressiveDistillationLoss(teacher, 4, guidance_range=(1.0, 5.0))
    torch.manual_seed(0)
    out = loss(student, {"x1": torch.randn(6, 3, 32, 32), "y": torch.zeros(6, dtype=torch.long)})
    assert len(student.calls) == 1 and len(teacher.calls) == 2  # two teacher Euler steps per student step
    w = student.calls[0]
    assert w.shape == (6,) and ((1.0 <= w) & (w <= 5.0)).all() and w.unique().numel() == 6
    assert all(torch.equal(c, w) for c in teacher.calls)  # the target at the same w as the student
    # the target itself: two Euler steps of v = -w x from a over h = 1/4 each: x (1 - w h)^2, velocity / (2 h)
    xa = torch.randn(2, 3, 32, 32)
    wv = torch.tensor([1.5, 3.0])
    target = loss.target(xa, torch.tensor([0, 1]), torch.zeros(2, dtype=torch.long), wv)
    expected = (xa * ((1 - wv * 0.25) ** 2).view(-1, 1, 1, 1) - xa) / 0.5
    assert torch.allclose(target, expected, atol=1e-6)
    assert out.loss.ndim == 0
    with pytest.raises(ConfigError, match="w-conditioned teacher"):
        ProgressiveDistillationLoss(_Scale(-1.0), 4, guidance_range=(1.0, 5.0))


def test_guided_progressive_keeps_w_conditioning_through_the_rounds(tmp_path, teacher_dir, data_root):
    from distill_rf_cifar.cli import app

    out = tmp_path / "gp"
    result = CliRunner().invoke(app, ["distill", "--recipe", "guided_progressive", "--teacher", str(teacher_dir),
                                      "--output-dir", str(out), "--no-track", "--train-steps", "6",
                                      "--train-batch-size", "8", "--train-learning-rate", "1e-2",
                                      "--train-device", "cpu", "--train-precision", "fp32",
                                      "--options-progressive-start", "8", "--options-guided-end", "2",
                                      "--options-guidance-min", "1", "--options-guidance-max", "4",
                                      "--data-root", str(data_root), "--data-limit", "16"])
    assert result.exit_code == 0, result.output
    phases = build_recipe("guided_progressive", RecipeConfig(progressive_start=8, guided_end=2, guidance_max=4.0),
                          FlowConfig(), steps=6)
    assert [(p.name, p.sample_steps, p.steps) for p in phases] == [("guided", 8, 2), ("round1_8to4", 4, 2),
                                                                     ("round2_4to2", 2, 2)]
    manifest = json.loads((out / "generator" / "generator.json").read_text())
    assert manifest["guidance_conditioned"] and manifest["guidance_range"] == [1.0, 4.0]
    assert manifest["default_steps"] == 2 and manifest["guided_stage"] == 2
    for phase in ("guided", "round1_8to4"):  # every round's model is w-conditioned too
        assert json.loads((out / phase / "generator" / "generator.json").read_text())["guidance_conditioned"]
    gen = load_generator(out / "generator", device="cpu")
    a = gen.generate([1, 2], 2, seeds=[0, 1], guidance=1.0)
    b = gen.generate([1, 2], 2, seeds=[0, 1], guidance=4.0)
    assert gen.last_nfe == 2 and not torch.allclose(a, b, atol=1e-4)  # w still steers the 2-step student
    with pytest.raises(ConfigError, match="--options-guided-end"):
        build_recipe("guided_progressive", RecipeConfig(progressive_start=8, guided_end=3), FlowConfig(), steps=6)
