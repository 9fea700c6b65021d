"""Guidance-conditioned distillation, SDS against a teacher known in closed form, and progressive distillation
round by round (issue 12, items 3-5)."""

from __future__ import annotations

import json

import pytest
import torch
from rf_helpers import tiny_unet_config
from torch import nn
from typer.testing import CliRunner

from distill_common.errors import ConfigError
from distill_rf_cifar.cli import app
from distill_rf_cifar.config import FlowConfig, RecipeConfig
from distill_rf_cifar.generator import RFGenerator, load_generator, save_generator
from distill_rf_cifar.losses import GuidanceConditionedLoss, ProgressiveDistillationLoss, ScoreDistillation
from distill_rf_cifar.models import build_unet, with_guidance_embedding
from distill_rf_cifar.recipes import build_recipe
from distill_rf_cifar.samplers import halve_grid, progressive_step_counts, sample_euler

runner = CliRunner()


def _teacher(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_unet(tiny_unet_config()).eval()
    with torch.no_grad():  # a random UNet's class embedding is small; make v_c and v_u clearly different
        model.net.class_embedding.weight.mul_(20)
    return model


def _inputs(b: int = 4):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(b, 3, 32, 32, generator=g), torch.rand(b, generator=g), torch.tensor([1, 3, 5, 7][:b]))


# ---------------------------------------------------------------------------------------------- guided (item 3)


def test_guided_student_starts_as_the_conditional_teacher_and_learns_the_cfg_output():
    teacher = _teacher()
    x, t, y = _inputs()
    w = torch.tensor([1.0, 2.5, 4.0, 7.0])
    with torch.no_grad():
        v_c = teacher(x, t, y)
        v_u = teacher(x, t, torch.full_like(y, teacher.null_class))
    assert (v_c - v_u).abs().mean() > 1e-3  # the check below would be vacuous otherwise

    student = with_guidance_embedding(teacher)
    assert student.guidance_conditioned and not teacher.guidance_conditioned
    with torch.no_grad():
        assert torch.allclose(student(x, t, y, w), v_c, atol=1e-5)  # zero-initialised w-embedding

    loss = GuidanceConditionedLoss(teacher, 1.0, 8.0, "uniform")
    target = loss.target(x, t, y, w)
    assert torch.allclose(target, v_u + w.view(-1, 1, 1, 1) * (v_c - v_u), atol=1e-5)

    # the loss regresses the student on exactly that target, at its own x_t, t and w
    torch.manual_seed(5)
    out = loss(student, {"x1": x, "y": y})
    torch.manual_seed(5)
    x0 = torch.randn_like(x)
    t2 = torch.rand(4)
    w2 = 1.0 + 7.0 * torch.rand(4)
    xt = t2.view(-1, 1, 1, 1) * x + (1 - t2.view(-1, 1, 1, 1)) * x0
    with torch.no_grad():
        manual = teacher(xt, t2, torch.full_like(y, teacher.null_class))
        manual = manual + w2.view(-1, 1, 1, 1) * (teacher(xt, t2, y) - manual)
        expected = (student(xt, t2, y, w2) - manual).square().mean(dim=(1, 2, 3))
    assert torch.allclose(out.per_sample, expected, rtol=1e-4)

    with torch.no_grad():  # once trained, w is an input that changes the output
        student.guidance_embedding.linear_2.weight.normal_()
        assert not torch.allclose(student(x, t, y, torch.full((4,), 1.0)), student(x, t, y, torch.full((4,), 5.0)))
    with pytest.raises(ConfigError, match="guidance range"):
        GuidanceConditionedLoss(teacher, 5.0, 2.0)


def test_guided_generator_costs_one_call_per_step_and_counts_nfe_honestly(tmp_path):
    teacher = _teacher()
    folder = save_generator(tmp_path / "student", with_guidance_embedding(teacher), role="guided", default_steps=4,
                            default_guidance=3.0, guidance_range=[1.0, 8.0])
    manifest = json.loads((folder / "generator.json").read_text())
    assert manifest["guidance_conditioned"] is True and manifest["guidance_range"] == [1.0, 8.0]
    student = load_generator(folder, device="cpu")
    assert student.model.guidance_conditioned

    seen = {"teacher": 0, "student": 0}  # images the network evaluated
    teacher.register_forward_hook(lambda m, a, o: seen.__setitem__("teacher", seen["teacher"] + a[0].shape[0]))
    student.model.register_forward_hook(lambda m, a, o: seen.__setitem__("student", seen["student"] + a[0].shape[0]))
    cfg_gen = RFGenerator(teacher, default_steps=4)
    a = cfg_gen.generate([1, 2, 3], 4, seeds=[0, 1, 2], guidance=3.0)
    assert cfg_gen.last_nfe == 8 and seen["teacher"] == 8 * 3  # CFG: 2 NFE per step, as one doubled batch
    b = student.generate([1, 2, 3], 4, seeds=[0, 1, 2], guidance=3.0)
    assert student.last_nfe == 4 and seen["student"] == 4 * 3  # one call per step
    assert not torch.allclose(a, b, atol=1e-3)  # the untrained student is the conditional model, not CFG ...
    assert torch.allclose(b, cfg_gen.generate([1, 2, 3], 4, seeds=[0, 1, 2], guidance=1.0), atol=1e-5)  # ... this
    assert cfg_gen.last_nfe == 4
    with pytest.raises(ConfigError, match=r"learned w in \[1, 8\]"):
        student.generate([1], 2, seeds=[0], guidance=12.0)


def test_guided_recipe_trains_and_exports_a_w_conditioned_generator(tmp_path, teacher_dir, data_root):
    out = tmp_path / "guided"
    result = runner.invoke(app, ["distill", "--recipe", "guided", "--teacher", str(teacher_dir), "--output-dir", str(out),
                                 "--no-track", "--train-steps", "3", "--train-batch-size", "8", "--train-device", "cpu",
                                 "--options-guidance-min", "1", "--options-guidance-max", "4", "--data-root",
                                 str(data_root), "--data-limit", "32"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "generator" / "generator.json").read_text())
    assert manifest["guidance_conditioned"] and manifest["guidance_range"] == [1.0, 4.0] and manifest["role"] == "guided"
    gen = load_generator(out / "generator", device="cpu")
    imgs = gen.generate([0, 1], 2, seeds=[0, 1], guidance=3.0)
    assert imgs.shape == (2, 3, 32, 32) and gen.last_nfe == 2
    sample = runner.invoke(app, ["sample", "--generator", str(out / "generator"), "--classes", "1", "--per-class", "2",
                                 "--guidance", "2", "--steps", "3", "--output-dir", str(tmp_path / "s"), "--device", "cpu"])
    assert sample.exit_code == 0 and "NFE 3" in sample.output


# ------------------------------------------------------------------------------------------------- SDS (item 4)


class GaussianFlow(nn.Module):
    """The exact rectified-flow velocity for data x1 ~ N(mu_y, s^2 I) and noise x0 ~ N(0, I).

    x_t = t x1 + (1 - t) x0 is Gaussian with mean t mu and variance sig2 = t^2 s^2 + (1 - t)^2, and
    Cov(x1, x_t) = t s^2, Cov(x0, x_t) = 1 - t, so
    v(x, t) = E[x1 - x0 | x_t = x] = mu + (t s^2 - (1 - t)) / sig2 * (x - t mu).
    The null class (CFG) has mu = 0.
    """

    def __init__(self, mus: torch.Tensor, s: float) -> None:
        super().__init__()
        self.num_classes = mus.shape[0]
        self.null_class = self.num_classes
        self.register_buffer("mus", torch.cat([mus, torch.zeros_like(mus[:1])]))  # (K + 1, 3, H, W)
        self.s = s

    def forward(self, x, t, y):
        t = t.view(-1, 1, 1, 1)
        mu = self.mus[y]
        sig2 = t**2 * self.s**2 + (1 - t) ** 2
        return mu + (t * self.s**2 - (1 - t)) / sig2 * (x - t * mu)


def _posterior_noise(xt, t, mu, s):
    """E[x0 | x_t] from the joint Gaussian directly (not through the velocity): (1 - t) (x_t - t mu) / sig2."""
    t = t.view(-1, 1, 1, 1)
    return (1 - t) * (xt - t * mu) / (t**2 * s**2 + (1 - t) ** 2)


def test_gaussian_flow_velocity_is_the_conditional_expectation():
    torch.manual_seed(0)
    mu, s, n = torch.full((1, 3, 2, 2), 0.7), 0.5, 400_000
    model = GaussianFlow(mu, s)
    t = torch.full((n,), 0.3)
    x0, x1 = torch.randn(n, 3, 2, 2), mu + s * torch.randn(n, 3, 2, 2)
    xt = 0.3 * x1 + 0.7 * x0
    # regress x1 - x0 on x_t per coordinate: the slope and intercept must be the closed form's
    v = model(xt, t, torch.zeros(n, dtype=torch.long))
    resid = (x1 - x0) - v
    assert resid.mean().abs() < 5e-3 and (resid * (xt - xt.mean())).mean().abs() < 5e-3


@pytest.mark.parametrize("weighting", ["uniform", "noise_variance"])
def test_sds_gradient_is_w_t_times_eps_hat_minus_eps_for_a_gaussian_teacher(weighting):
    torch.manual_seed(0)
    mus, s = torch.randn(3, 3, 4, 4), 0.4
    teacher = GaussianFlow(mus, s)
    x = torch.rand(5, 3, 4, 4) * 2 - 1
    y = torch.tensor([0, 1, 2, 1, 0])
    t = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.95])
    eps = torch.randn_like(x)
    xt = t.view(-1, 1, 1, 1) * x + (1 - t.view(-1, 1, 1, 1)) * eps
    w_t = {"uniform": torch.ones(5), "noise_variance": (1 - t) ** 2}[weighting].view(-1, 1, 1, 1)
    for guidance in (1.0, 7.5):
        sds = ScoreDistillation(teacher, guidance=guidance, weighting=weighting)
        eps_c = _posterior_noise(xt, t, mus[y], s)
        eps_u = _posterior_noise(xt, t, torch.zeros_like(mus[y]), s)
        eps_hat = eps_u + guidance * (eps_c - eps_u)  # CFG is linear in the velocity, hence in eps_hat
        assert torch.allclose(sds.gradient(x, y, t, eps), w_t * (eps_hat - eps), atol=1e-5)

    # the surrogate's autograd gradient is that gradient
    xp = x.clone().requires_grad_(True)
    torch.manual_seed(3)
    out = ScoreDistillation(teacher, guidance=2.0, weighting=weighting)(xp, y)
    out.loss.backward()
    eps_again = (torch.manual_seed(3), torch.rand(5), torch.randn_like(x))[2]
    t_again = out.t
    expected = ScoreDistillation(teacher, guidance=2.0, weighting=weighting).gradient(x, y, t_again, eps_again)
    assert torch.allclose(xp.grad, expected, atol=1e-5)
    with pytest.raises(ConfigError, match="strictly inside"):
        ScoreDistillation(teacher, t_min=0.0)


def test_sds_on_a_gaussian_is_mode_seeking():
    from distill_rf_cifar.sds import optimise

    mus, s = torch.full((1, 3, 4, 4), 0.3), 0.5
    teacher = GaussianFlow(mus, s)
    noise = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    res = optimise(teacher, torch.zeros(6, dtype=torch.long), noise, guidance=1.0, iterations=300, learning_rate=0.05,
                   snapshots=4)
    assert [it for it, _ in res.trajectory] == [0, 100, 200, 300]
    # every seed lands near the mode mu; samples of the data have spread s = 0.5 per pixel
    assert (res.images - 0.3).abs().mean() < 0.1
    assert res.images.std(dim=0).mean() < 0.2 * s
    assert res.trajectory[0][1].std(dim=0).mean() > 0.5  # it started from spread-out noise


def test_sds_command_writes_grids_and_diversity(tmp_path, teacher_dir):
    out = tmp_path / "sds"
    result = runner.invoke(app, ["sds", "--teacher", str(teacher_dir), "--class-label", "2", "--seeds", "3",
                                 "--guidance-scales", "1", "20", "--iterations", "4", "--snapshots", "3",
                                 "--output-dir", str(out), "--device", "cpu", "--no-track"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    for rel in ("trajectory_w1.png", "trajectory_w20.png", "final.png", "sds.md", "images/w20/seed2.png"):
        assert (out / rel).is_file(), rel
    rows = json.loads((out / "sds.json").read_text())["rows"]
    assert [r["guidance"] for r in rows] == [1.0, 20.0]
    assert all(r["sds_lpips_diversity"] > 0 and r["teacher_lpips_diversity"] > 0 for r in rows)
    bad = runner.invoke(app, ["sds", "--teacher", str(teacher_dir), "--seeds", "1", "--no-track"])
    assert isinstance(bad.exception, ConfigError) and "--seeds 8" in str(bad.exception)


# ------------------------------------------------------------------------------------------ progressive (item 5)


def test_progressive_counts_round_up_and_unreachable_ends_are_refused():
    assert progressive_step_counts(1000, 8) == [1000, 500, 250, 125, 63, 32, 16, 8]
    assert progressive_step_counts(32, 4) == [32, 16, 8, 4]
    grid = [i / 125 for i in range(126)]
    half = halve_grid(grid)
    assert len(half) - 1 == 63 and half[-2:] == [124 / 125, 1.0] and half[1] == 2 / 125
    with pytest.raises(ConfigError, match="never reaches 8; it reaches 50, 25, 13, 7, 4, 2, 1"):
        build_recipe("progressive", RecipeConfig(progressive_start=100, progressive_end=8), FlowConfig(), 10)
    phases = build_recipe("progressive", RecipeConfig(progressive_start=1000, progressive_end=8), FlowConfig(), 70)
    assert [p.sample_steps for p in phases] == [500, 250, 125, 63, 32, 16, 8]
    assert "time_grid" not in phases[2].export and len(phases[3].export["time_grid"]) == 64


def _euler(model, x, grid, y):
    return sample_euler(lambda xx, tt: model(xx, tt.expand(xx.shape[0]), y), x, torch.tensor(grid))


def test_progressive_targets_round_by_round_collapse_teacher_euler_steps():
    """Rounds 6 -> 3 -> 2: round 1 on a uniform grid, round 2 on the odd grid [0, 2/6, 4/6, 1] whose last step is
    single; each target moves x_a to where the round's teacher's Euler steps between the student's points land."""
    torch.manual_seed(0)
    phases = build_recipe("progressive", RecipeConfig(progressive_start=6, progressive_end=2), FlowConfig(), 4)
    assert [p.name for p in phases] == ["round1_6to3", "round2_3to2"]
    assert phases[0].export["teacher_steps"] == 6 and "time_grid" not in phases[0].export
    assert phases[1].export["time_grid"] == pytest.approx([0, 4 / 6, 1])

    x, _, y = _inputs(2)
    teacher1, teacher2 = _teacher(0), _teacher(1)  # round 2's teacher is round 1's student: another network
    for phase, teacher, student_grid in ((phases[0], teacher1, [0, 2 / 6, 4 / 6, 1]), (phases[1], teacher2, [0, 4 / 6, 1])):
        loss = phase.make_loss(teacher)
        assert isinstance(loss, ProgressiveDistillationLoss)
        assert loss.student_grid.tolist() == pytest.approx(student_grid)
        teacher_grid = loss.teacher_grid.tolist()
        for i in range(len(student_grid) - 1):
            a, c = student_grid[i], student_grid[i + 1]
            inner = [u for u in teacher_grid if a - 1e-9 <= u <= c + 1e-9]  # the teacher's steps from a to c
            target = loss.target(x, torch.full((2,), i), y)
            with torch.no_grad():
                landed = _euler(loss.teacher, x, inner, y)
            assert len(inner) in (2, 3)
            assert torch.allclose(x + (c - a) * target, landed, atol=1e-5), (phase.name, i, inner)
    # round 2, last step: one single teacher step, so the target is the teacher's velocity itself
    loss2 = phases[1].make_loss(teacher2)
    with torch.no_grad():
        v = teacher2(x, torch.full((2,), 4 / 6), y)
    assert torch.allclose(loss2.target(x, torch.full((2,), 1), y), v, atol=1e-5)


def test_generator_samples_on_its_recorded_grid(tmp_path):
    model = _teacher()
    folder = save_generator(tmp_path / "g", model, role="progressive", default_steps=2, time_grid=[0.0, 2 / 3, 1.0])
    gen = load_generator(folder, device="cpu")
    assert gen.grid == pytest.approx([0, 2 / 3, 1])
    from distill_rf_cifar.flow import noise_for_seeds

    x0 = noise_for_seeds([0, 1])
    y = torch.tensor([4, 4])
    with torch.no_grad():
        assert torch.allclose(gen.sample(x0, y, 2), _euler(model, x0, [0, 2 / 3, 1], y), atol=1e-5)
        assert torch.allclose(gen.sample(x0, y, 3), _euler(model, x0, [0, 1 / 3, 2 / 3, 1], y), atol=1e-5)
    with pytest.raises(ConfigError, match="increase from 0 to 1"):
        RFGenerator(model, time_grid=[0.0, 0.7, 0.5, 1.0])


@pytest.mark.slow
def test_progressive_rounds_are_exported_and_evaluated(tmp_path, teacher_dir, data_root):
    out = tmp_path / "progressive"
    result = runner.invoke(app, ["distill", "--recipe", "progressive", "--teacher", str(teacher_dir), "--output-dir",
                                 str(out), "--no-track", "--train-steps", "4", "--train-batch-size", "8",
                                 "--train-device", "cpu", "--options-progressive-start", "6",
                                 "--options-progressive-end", "2", "--data-root", str(data_root), "--data-limit", "32",
                                 "--rounds-num-images", "10", "--rounds-reference-n", "20", "--rounds-batch-size", "10"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    r1 = json.loads((out / "round1_6to3" / "generator" / "generator.json").read_text())
    r2 = json.loads((out / "round2_3to2" / "generator" / "generator.json").read_text())
    assert (r1["default_steps"], r2["default_steps"]) == (3, 2) and r2["time_grid"] == pytest.approx([0, 4 / 6, 1])
    rows = json.loads((out / "rounds" / "rounds.json").read_text())["rows"]
    assert [(r["round"], r["teacher_steps"], r["steps"], r["nfe"]) for r in rows] == [(1, 6, 3, 3), (2, 3, 2, 2)]
    assert all(r["fid"] > 0 and r["teacher_fid_same_steps"] > 0 for r in rows)
    assert all(r["fid_ci95_low"] <= r["fid"] <= r["fid_ci95_high"] for r in rows)  # every round carries its interval
    assert all(r["teacher_ci95_low"] <= r["teacher_fid_same_steps"] <= r["teacher_ci95_high"] for r in rows)
    assert all(r["teacher_same_steps"] == f"{r['teacher_fid_same_steps']:.2f} [{r['teacher_ci95_low']:.2f}, "
               f"{r['teacher_ci95_high']:.2f}]" for r in rows)  # the table's one-cell form
    assert (out / "rounds" / "plots" / "fid_vs_nfe.png").is_file() and (out / "rounds" / "rounds.md").is_file()
