"""The one training loop: exact resume after a kill, divergence error, reports; every recipe trains a few steps."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from rf_helpers import tiny_loop, tiny_unet_config

from distill_common.checkpoint import list_checkpoints
from distill_common.errors import ConfigError, TrainingDivergedError
from distill_rf_cifar.config import FlowConfig, RecipeConfig
from distill_rf_cifar.generator import load_model
from distill_rf_cifar.losses import (
    KStepDistillationLoss,
    LossOutput,
    ProgressiveDistillationLoss,
    RectifiedFlowLoss,
)
from distill_rf_cifar.models import build_unet
from distill_rf_cifar.pairs import load_pairs
from distill_rf_cifar.recipes import RECIPES, build_recipe, run_recipe
from distill_rf_cifar.training import EpochOrder, TrainingCallback, train


class Recorder(TrainingCallback):
    def __init__(self):
        self.metrics, self.samples, self.checkpoints = [], [], []

    def on_metrics(self, step, metrics):
        self.metrics.append((step, metrics))

    def on_samples(self, step, images):
        self.samples.append((step, images.shape))

    def on_checkpoint(self, step, folder):
        self.checkpoints.append(step)


def _fresh_model():
    torch.manual_seed(0)
    return build_unet(tiny_unet_config(dropout=0.1))  # dropout: the restored RNG must drive it identically


def test_kill_and_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, cifar_images):
    loop = tiny_loop(steps=6, checkpoint_every=2, keep_checkpoints=0)
    full, model_full, ema_full = train(loop, _fresh_model(), RectifiedFlowLoss(), cifar_images, tmp_path / "full",
                                       progress=False)
    assert full.finished and full.step == 6

    killed, _, _ = train(dataclasses.replace(loop, stop_at_step=3), _fresh_model(), RectifiedFlowLoss(), cifar_images,
                         tmp_path / "resumed", progress=False)
    assert not killed.finished and killed.step == 3
    assert [s for s, _ in list_checkpoints(tmp_path / "resumed" / "checkpoints")] == [2, 3]
    # a new process would rebuild the model from scratch: other initial weights must not matter
    torch.manual_seed(999)
    resumed, model_res, ema_res = train(loop, build_unet(tiny_unet_config(dropout=0.1)), RectifiedFlowLoss(),
                                        cifar_images, tmp_path / "resumed", progress=False)
    assert resumed.finished and resumed.resumed_from == 3
    for (name, a), b in zip(model_full.state_dict().items(), model_res.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for name in ema_full.shadow:
        assert torch.equal(ema_full.shadow[name], ema_res.shadow[name]), name
    assert ema_full.num_updates == ema_res.num_updates == 6


def test_data_position_is_epoch_and_index():
    order = EpochOrder(size=10, batch_size=4, seed=3)
    seen = [order.next_indices() for _ in range(5)]  # 2 batches per epoch (last 2 samples dropped)
    assert order.state() == {"epoch": 2, "index": 4}
    assert len(set(torch.cat(seen[:2]).tolist())) == 8  # no repeats within an epoch
    again = EpochOrder(size=10, batch_size=4, seed=3)
    again.load_state({"epoch": 1, "index": 4})
    assert torch.equal(again.next_indices(), seen[3])
    with pytest.raises(ConfigError, match="batch size 16 exceeds the 10 training samples"):
        EpochOrder(size=10, batch_size=16, seed=0)


class NaNAfter:
    """A loss that turns NaN at its third call."""

    def __init__(self):
        self.inner, self.calls = RectifiedFlowLoss(), 0

    def __call__(self, model, batch):
        self.calls += 1
        out = self.inner(model, batch)
        if self.calls == 3:
            return LossOutput(out.loss * float("nan"), out.per_sample, out.t)
        return out


def test_nan_loss_stops_with_the_step_and_the_fix(tmp_path, cifar_images):
    with pytest.raises(TrainingDivergedError, match=r"loss became nan at step 3 .*lower the learning rate"):
        train(tiny_loop(steps=5), _fresh_model(), NaNAfter(), cifar_images, tmp_path, progress=False)


def test_reports_loss_per_t_bin_samples_and_checkpoints(tmp_path, cifar_images):
    rec = Recorder()
    loop = tiny_loop(steps=4, log_every=2, checkpoint_every=2, keep_checkpoints=1, sample_every=2, time_bins=2)
    train(loop, _fresh_model(), RectifiedFlowLoss("uniform"), cifar_images, tmp_path, callback=rec, progress=False,
          sample_fn=lambda m: torch.rand(3, 3, 32, 32))
    steps = [s for s, _ in rec.metrics]
    assert steps == [2, 4]
    keys = set(rec.metrics[0][1])
    assert {"loss", "lr", "grad_norm", "steps_per_second"} <= keys
    assert keys & {"loss_t0.00-0.50", "loss_t0.50-1.00"}
    assert rec.samples == [(2, (3, 3, 32, 32)), (4, (3, 3, 32, 32))]
    assert rec.checkpoints == [2, 4]
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [4]  # keep_checkpoints=1 pruned step 2


def _changed(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("recipe", ["one_step", "k_step", "reflow", "progressive"])
def test_each_student_recipe_trains_a_few_steps_from_the_teacher(recipe, tmp_path, teacher_dir, pairs_dir,
                                                                  cifar_images):
    opts = RecipeConfig(progressive_start=8, progressive_end=2)
    phases = build_recipe(recipe, opts, FlowConfig(), steps=4, teacher_steps=8, guidance=1.5)
    student = load_model(teacher_dir)
    run = run_recipe(phases, student, tiny_loop(steps=4), {"pairs": load_pairs(pairs_dir, teacher_dir),
                                                           "images": cifar_images},
                     tmp_path, progress=False)
    assert run.finished
    assert _changed(run.model, load_model(teacher_dir))
    for phase in phases:
        assert (tmp_path / phase.name / "final" / "model.safetensors").is_file()
    expected_steps = {"one_step": 1, "k_step": 4, "reflow": 1, "progressive": 2}[recipe]
    assert phases[-1].sample_steps == expected_steps
    if recipe == "progressive":
        assert [p.name for p in phases] == ["round1_8to4", "round2_4to2"]
        assert phases[0].guidance == 1.0  # students sample without CFG


def test_teacher_recipe_and_unknown_recipe(tmp_path, cifar_images):
    assert set(RECIPES) == {"teacher", "one_step", "k_step", "reflow", "progressive", "adversarial", "consistency",
                            "guided", "dmd", "guided_progressive"}
    phases = build_recipe("teacher", RecipeConfig(), FlowConfig(), steps=2)
    model = _fresh_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run = run_recipe(phases, model, tiny_loop(steps=2), {"images": cifar_images}, tmp_path, progress=False)
    assert run.finished and any(not torch.equal(before[k], v) for k, v in run.model.state_dict().items())
    with pytest.raises(ConfigError, match="unknown recipe 'lcm'; valid choices: 'adversarial', 'consistency', "
                       "'dmd', 'guided', 'guided_progressive', 'k_step', 'one_step'"):
        build_recipe("lcm", RecipeConfig(), FlowConfig(), steps=2)
    assert [p.name for p in build_recipe("four_step", RecipeConfig(), FlowConfig(), steps=2)] == ["k_step"]  # old name


def test_k_step_loss_draws_t_from_the_k_fixed_points_and_is_zero_on_straight_pairs():
    seen = []

    class Straight(torch.nn.Module):
        """Returns exactly the pair's velocity: a perfect k-step student."""

        null_class = 10

        def forward(self, x, t, y):
            seen.append(t.clone())
            return self.v

    x0, x1 = torch.randn(64, 3, 32, 32), torch.randn(64, 3, 32, 32)
    model = Straight()
    model.v = x1 - x0
    out = KStepDistillationLoss(k=4)(model, {"x0": x0, "x1": x1, "y": torch.zeros(64, dtype=torch.long)})
    assert set(torch.cat(seen).tolist()) == {0.0, 0.25, 0.5, 0.75}
    assert float(out.loss) == 0.0


def test_kstep_rollout_trains_on_the_students_own_states_towards_the_teachers_image():
    """v(x, t, y) = -x: j Euler steps of 1/4 from x0 reach x0 (3/4)^j; the target from there is (x1 - x_s) / (1 - s)."""
    inputs = []

    class Shrink(torch.nn.Module):
        null_class = 10

        def forward(self, x, t, y):
            inputs.append((x.clone(), t.clone()))
            return -x

    torch.manual_seed(0)
    x0, x1 = torch.randn(256, 3, 4, 4), torch.randn(256, 3, 4, 4)
    out = KStepDistillationLoss(k=4, rollout=1.0)(Shrink(), {"x0": x0, "x1": x1, "y": torch.zeros(256, dtype=torch.long)})
    xt, t = inputs[-1]  # the graded forward
    steps = (t * 4).round().long()
    assert set(steps.tolist()) == {0, 1, 2, 3}
    expected_state = x0 * (0.75 ** steps.view(-1, 1, 1, 1).float())
    assert torch.allclose(xt, expected_state, atol=1e-6)  # every t > 0 sample starts where the student's steps lead
    target = (x1 - xt) / (1 - t.view(-1, 1, 1, 1))
    per = (-xt - target).square().mean(dim=(1, 2, 3))
    assert torch.allclose(out.per_sample, per, atol=1e-5)
    line = KStepDistillationLoss(k=4, rollout=0.0)
    inputs.clear()
    line(Shrink(), {"x0": x0, "x1": x1, "y": torch.zeros(256, dtype=torch.long)})
    xt, t = inputs[-1]
    assert len(inputs) == 1 and torch.allclose(xt, t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * x0)
    with pytest.raises(ConfigError, match="rollout share"):
        KStepDistillationLoss(k=4, rollout=1.5)


def test_progressive_target_is_the_teachers_two_euler_steps():
    class Linear(torch.nn.Module):
        """v(x, t) = -x: two Euler steps of size h give x (1 - h)^2, so the target is x((1 - h)^2 - 1) / 2h."""

        null_class = 10

        def forward(self, x, t, y):
            return -x

    captured = {}

    class Student(torch.nn.Module):
        null_class = 10

        def forward(self, x, t, y):
            captured["x"] = x
            return torch.zeros_like(x)

    loss = ProgressiveDistillationLoss(Linear(), teacher_steps=4)
    out = loss(Student(), {"x1": torch.randn(8, 3, 32, 32), "y": torch.zeros(8, dtype=torch.long)})
    h = 0.25
    expected = (captured["x"] * ((1 - h) ** 2 - 1) / (2 * h)).square().mean(dim=(1, 2, 3))
    assert torch.allclose(out.per_sample, expected, atol=1e-6)
    assert set(out.t.tolist()) <= {0.0, 0.5}
    with pytest.raises(ConfigError, match="at least 2 steps"):
        ProgressiveDistillationLoss(Linear(), teacher_steps=1)


def test_unconditional_teacher_trains_and_samples(tmp_path, cifar_images):
    from distill_rf_cifar.generator import RFGenerator

    torch.manual_seed(0)
    model = build_unet(tiny_unet_config(num_classes=0))
    result, model, _ = train(tiny_loop(steps=2), model, RectifiedFlowLoss(), cifar_images, tmp_path, progress=False)
    assert result.finished
    gen = RFGenerator(model, default_steps=2, default_guidance=3.0)  # guidance is moot without classes
    images = gen.generate([0, 7], seeds=[1, 1])
    assert torch.equal(images[0], images[1]) and gen.last_nfe == 2


def test_one_step_lpips_distance_trains_the_student(pairs_dir, teacher_dir):
    from distill_rf_cifar.losses import PairDistillationLoss

    student = load_model(teacher_dir).train()
    loss = PairDistillationLoss(distance="lpips", lpips_resize=64)
    batch = load_pairs(pairs_dir).batch(torch.arange(4))
    out = loss(student, batch)
    assert out.loss.isfinite() and out.loss > 0 and out.t.eq(0).all() and out.per_sample.shape == (4,)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert not any(p.requires_grad for p in loss.endpoint.lpips.parameters())  # the metric itself stays frozen
