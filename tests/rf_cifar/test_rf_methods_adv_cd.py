"""Adversarial distillation (ADD) and consistency distillation: losses on cases with known values, the exact
boundary condition, multistep consistency sampling, training through the one loop with exact resume, export."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from rf_helpers import tiny_loop
from typer.testing import CliRunner

from distill_rf_cifar.config import FlowConfig, RecipeConfig
from distill_rf_cifar.generator import RFGenerator, load_generator, load_model
from distill_rf_cifar.losses import (
    AdversarialDistillationLoss,
    ConsistencyDistillationLoss,
    consistency_function,
    hinge_discriminator_loss,
    hinge_generator_loss,
)
from distill_rf_cifar.pairs import load_pairs
from distill_rf_cifar.recipes import build_recipe
from distill_rf_cifar.samplers import CountingModelFn, sample_consistency, sample_euler, time_grid
from distill_rf_cifar.training import PairsWithImages, TrainingCallback, train


def test_hinge_losses_on_known_values():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - D): 0, 0.5, 2   -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + D): 0, 1, 2     -> mean 1
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(5 / 6 + 1)
    # two heads per sample are summed: (B, K) = (2, 2)
    real2 = torch.tensor([[0.0, 3.0], [0.5, -0.5]])  # per sample 1 + 0, 0.5 + 1.5 -> mean 1.5
    fake2 = torch.tensor([[-1.0, -3.0], [0.25, 0.0]])  # per sample 0 + 0, 1.25 + 1 -> mean 1.125
    assert hinge_discriminator_loss(real2, fake2).item() == pytest.approx(2.625)
    assert torch.equal(hinge_generator_loss(fake2), torch.tensor([4.0, -0.25]))
    assert hinge_discriminator_loss(torch.full((4,), 1.0), torch.full((4,), -1.0)).item() == 0.0  # margins met


class _Wild(torch.nn.Module):
    """Large, input-dependent outputs: a boundary that held only approximately would show."""

    null_class = 10

    def forward(self, x, t, y):
        return 1e6 * torch.sin(3 * x + t.view(-1, 1, 1, 1)) + 7.0


def test_consistency_boundary_condition_is_exact_at_t1_and_only_there():
    x = torch.randn(4, 3, 32, 32)
    y = torch.zeros(4, dtype=torch.long)
    assert torch.equal(consistency_function(_Wild(), x, torch.ones(4), y), x)
    assert not torch.allclose(consistency_function(_Wild(), x, torch.full((4,), 0.999), y), x)
    # the target network through the loss: on the last interval the target is the teacher's step x_hat itself
    loss = ConsistencyDistillationLoss(_Linear(), _Wild(), grid=1)
    x0 = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        target = consistency_function(loss.target, loss.teacher_step(x0, torch.zeros(4), 1.0, y), torch.ones(4), y)
    assert torch.equal(target, torch.zeros_like(x0))  # v = -x: one Euler step of size 1 from x0 lands on 0


class _Linear(torch.nn.Module):
    """v(x, t) = -x."""

    null_class = 10

    def forward(self, x, t, y):
        return -x


class _Zero(torch.nn.Module):
    null_class = 10

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y):
        return self.w * x


def test_consistency_loss_and_target_ema():
    torch.manual_seed(0)
    # grid 1: the student sits at t = 0 (x_t = noise), the target is the teacher's Euler step to t = 1 (= 0 here);
    # a zero-velocity student predicts f = x0, so the loss is mean(x0^2) per sample.
    loss = ConsistencyDistillationLoss(_Linear(), _Zero(), grid=1)
    batch = {"x1": torch.randn(6, 3, 32, 32), "y": torch.zeros(6, dtype=torch.long)}
    torch.manual_seed(1)
    out = loss(_Zero(), batch)
    torch.manual_seed(1)
    x0 = torch.randn_like(batch["x1"])
    assert torch.allclose(out.per_sample, x0.square().mean(dim=(1, 2, 3)))
    assert set(out.t.tolist()) == {0.0}
    # Heun on v = -x: x (1 - h + h^2 / 2); grid 4 draws t from {0, .25, .5, .75}
    heun = ConsistencyDistillationLoss(_Linear(), _Zero(), grid=4, solver="heun")
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(heun.teacher_step(x, torch.zeros(2), 0.25, torch.zeros(2, dtype=torch.long)),
                          x * (1 - 0.25 + 0.25**2 / 2))
    # ... and Euler on the step that ends at the data (t = 1), where the teacher is never trusted
    assert torch.allclose(heun.teacher_step(x, torch.full((2,), 0.75), 0.25, torch.zeros(2, dtype=torch.long)),
                          x * (1 - 0.25))
    assert set(heun(_Zero(), {"x1": torch.randn(64, 3, 32, 32), "y": torch.zeros(64, dtype=torch.long)}).t.tolist()) \
        <= {0.0, 0.25, 0.5, 0.75}
    # target EMA: theta- <- mu theta- + (1 - mu) theta
    online = _Zero()
    with torch.no_grad():
        online.w.fill_(1.0)
    cd = ConsistencyDistillationLoss(_Linear(), _Zero(), grid=2, target_decay=0.9)
    cd.after_step(online)
    cd.after_step(online)
    assert cd.target.w.item() == pytest.approx(1 - 0.9**2)


def test_multistep_consistency_sampling_steps_shapes_and_seed_independence_of_batch():
    seen = []

    def fn(x, t):
        seen.append(float(t))
        return -x + 0.1

    x0 = torch.randn(3, 3, 32, 32)
    for k, times in ((1, [0.0]), (2, [0.0, 0.5]), (4, [0.0, 0.25, 0.5, 0.75])):
        seen.clear()
        counting = CountingModelFn(fn)
        out = sample_consistency(counting, x0, time_grid(k))
        assert out.shape == x0.shape and counting.calls == k and seen == pytest.approx(times)
    # one consistency step is one Euler step from the noise
    assert torch.allclose(sample_consistency(fn, x0, time_grid(1)), sample_euler(fn, x0, time_grid(1)))
    # re-noising differs from the deterministic Euler path at 2+ steps, but an image depends on its seed only
    assert not torch.allclose(sample_consistency(fn, x0, time_grid(2)), sample_euler(fn, x0, time_grid(2)))
    torch.manual_seed(0)
    from rf_helpers import tiny_unet_config

    from distill_rf_cifar.models import build_unet

    gen = RFGenerator(build_unet(tiny_unet_config()), default_steps=4, sampler="consistency")
    a = gen.generate([1, 2, 3], 4, seeds=[5, 6, 7])
    b = gen.generate([9, 2], 4, seeds=[8, 6])
    assert a.shape == (3, 3, 32, 32) and gen.last_nfe == 4
    assert torch.allclose(a[1], b[1], atol=1e-6)


class _Rec(TrainingCallback):
    def __init__(self):
        self.metrics = []

    def on_metrics(self, step, metrics):
        self.metrics.append((step, metrics))


def test_adversarial_recipe_trains_student_and_discriminator_logs_both_and_resumes_exactly(
        tmp_path, teacher_dir, pairs_dir, cifar_images):
    opts = RecipeConfig(adv_steps=2, adv_d_learning_rate=1e-2, adv_head_channels=8)
    phases = build_recipe("adversarial", opts, FlowConfig(), steps=4)
    assert phases[0].data == "pairs+images" and phases[0].sample_steps == 2
    data = PairsWithImages(load_pairs(pairs_dir, teacher_dir), cifar_images)
    batch = data.batch(torch.arange(8))
    assert set(batch) == {"x0", "x1", "y", "real", "real_y"} and len(data) == 64  # the larger set sets the epoch

    loop = tiny_loop(steps=4, checkpoint_every=2, log_every=2, keep_checkpoints=0)
    loss_full = phases[0].make_loss(load_model(teacher_dir))
    heads_before = {k: v.clone() for k, v in loss_full.extra_weights().items()}
    rec = _Rec()
    torch.manual_seed(0)
    _, full, _ = train(loop, load_model(teacher_dir), loss_full, data, tmp_path / "full", callback=rec, progress=False)
    keys = set(rec.metrics[-1][1])
    assert {"loss", "loss_g_adv", "loss_distill", "loss_d", "r1", "d_acc_real", "d_acc_fake"} <= keys
    assert 0.0 <= rec.metrics[-1][1]["d_acc_real"] <= 1.0
    assert any(not torch.equal(heads_before[k], v) for k, v in loss_full.extra_weights().items())
    assert (tmp_path / "full" / "checkpoints" / "checkpoint-2" / "extra.safetensors").is_file()

    # killed at step 3, resumed in a new loss object: student and discriminator weights end up identical
    loss_a = phases[0].make_loss(load_model(teacher_dir))
    train(dataclasses.replace(loop, stop_at_step=3), load_model(teacher_dir), loss_a, data, tmp_path / "res",
          progress=False)
    loss_b = phases[0].make_loss(load_model(teacher_dir))
    _, resumed, _ = train(loop, load_model(teacher_dir), loss_b, data, tmp_path / "res", progress=False)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for k, v in loss_full.extra_weights().items():
        assert torch.equal(v, loss_b.extra_weights()[k]), k
    assert loss_b.d_optimizer.state_dict()["state"]  # Adam moments restored, not restarted

    with pytest.raises(Exception, match="1-4 steps"):
        AdversarialDistillationLoss(load_model(teacher_dir), k=8)


def test_consistency_recipe_through_the_distill_command_exports_a_consistency_generator(tmp_path, teacher_dir,
                                                                                         data_root):
    from distill_rf_cifar.cli import app

    out = tmp_path / "cd"
    result = CliRunner().invoke(app, ["distill", "--recipe", "consistency", "--teacher", str(teacher_dir),
                                      "--output-dir", str(out), "--no-track", "--train-steps", "3",
                                      "--train-batch-size", "8", "--train-device", "cpu", "--options-cd-grid", "4",
                                      "--data-root", str(data_root), "--data-limit", "32"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "generator" / "generator.json").read_text())
    assert manifest["role"] == "consistency" and manifest["sampler"] == "consistency"
    assert manifest["default_steps"] == 2
    gen = load_generator(out / "generator", device="cpu")
    for k in (1, 2, 4):
        images = gen.generate([0, 1], k, seeds=[0, 1])
        assert images.shape == (2, 3, 32, 32) and gen.last_nfe == k
    assert (out / "consistency" / "checkpoints").is_dir()
    ckpts = sorted((out / "consistency" / "checkpoints").iterdir())
    assert (ckpts[-1] / "extra.safetensors").is_file()  # the EMA target network is checkpointed
    assert not torch.equal(load_model(out / "generator").state_dict()["net.conv_in.weight"],
                           load_model(teacher_dir).state_dict()["net.conv_in.weight"])


def test_discriminator_r1_step_runs_through_an_encoder_with_attention():
    """R1 differentiates D twice; the reference teacher's encoder has self-attention, whose fused CPU kernel has no
    double backward (the compare run on the reference teacher failed there)."""
    from rf_helpers import tiny_unet_config

    from distill_rf_cifar.models.unet import build_unet

    torch.manual_seed(0)
    teacher = build_unet(tiny_unet_config(attention_resolutions=[16], mid_attention=True))
    loss = AdversarialDistillationLoss(teacher, k=2, r1_weight=0.1, head_channels=8)
    real, fake, y = torch.rand(4, 3, 32, 32) * 2 - 1, torch.rand(4, 3, 32, 32) * 2 - 1, torch.arange(4)
    stats = loss.discriminator_step(real, y, fake, y)
    assert stats["r1"] > 0 and all(map(lambda v: v == v, stats.values()))  # finite, non-zero gradient penalty


def test_adversarial_student_loss_is_hinge_plus_lambda_times_the_squared_norm_per_image():
    """-D(x_s) + lambda ||x_s - x_teacher||^2 with the norm summed over the image (a per-pixel mean weighed the
    distillation ~3,000x less at 32 px and the student collapsed in the compare run on the reference teacher)."""
    from rf_helpers import tiny_unet_config

    from distill_rf_cifar.models.unet import build_unet

    torch.manual_seed(0)
    loss = AdversarialDistillationLoss(build_unet(tiny_unet_config()), k=2, weight=0.5, head_channels=8)
    x0, x1, y = torch.randn(4, 3, 32, 32), torch.rand(4, 3, 32, 32) * 2 - 1, torch.arange(4)

    class OffByPointOne(torch.nn.Module):
        null_class = 10

        def forward(self, xt, t, y):  # lands every image exactly 0.1 above the teacher's
            return (x1 + 0.1 - xt) / (1 - t.view(-1, 1, 1, 1))

    out = loss(OffByPointOne(), {"x0": x0, "x1": x1, "y": y, "real": x1, "real_y": y})
    assert float(out.metrics["loss_distill"]) == pytest.approx(0.01 * 3 * 32 * 32, rel=1e-4)
    fake_logits = loss.discriminator(x1 + 0.1, y)
    expected = hinge_generator_loss(fake_logits) + 0.5 * 0.01 * 3 * 32 * 32
    assert torch.allclose(out.per_sample, expected.detach(), rtol=1e-4, atol=1e-4)
