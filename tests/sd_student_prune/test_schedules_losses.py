"""Schedules at their endpoints (alpha(t) 1 -> 0.5, caption dropout, progressive DDPM chain, LR) and the loss
terms, the balancer and the weighted objective that reports every term and weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from distill_common.models.tiny_sd import SD15_SCHEDULER_CONFIG
from distill_sd_prune.losses import (
    DistillObjective,
    LossWeights,
    MagnitudeBalancer,
    feature_kd,
    noise_mse,
    output_kd,
)
from distill_sd_prune.schedules import (
    CaptionDropoutSchedule,
    KDAlphaSchedule,
    ProgressiveChain,
    build_lr_scheduler,
    training_progress,
)

STEPS = 7


def test_kd_alpha_decays_linearly_from_one_to_a_half():
    alpha = KDAlphaSchedule()
    assert alpha(training_progress(0, STEPS)) == 1.0
    assert alpha(training_progress(STEPS - 1, STEPS)) == 0.5
    assert alpha(training_progress(3, STEPS)) == pytest.approx(0.75)
    objective = DistillObjective(LossWeights(task=1.0, output_kd=1.0), alpha)
    terms = {"task": torch.tensor(2.0), "output_kd": torch.tensor(3.0)}
    total, report = objective(terms, training_progress(0, STEPS))
    assert report["weight/task"] == 0.0 and report["weight/output_kd"] == 1.0 and float(total) == 3.0
    total, report = objective(terms, training_progress(STEPS - 1, STEPS))
    assert report["weight/task"] == report["weight/output_kd"] == 0.5 and float(total) == 2.5
    assert report["loss/task"] == 2.0 and report["loss/output_kd"] == 3.0 and report["kd_alpha"] == 0.5


def test_caption_dropout_rate_grows_and_replaces_by_the_empty_prompt():
    schedule = CaptionDropoutSchedule(0.0, 0.1)
    assert schedule.rate(training_progress(0, STEPS)) == 0.0
    assert schedule.rate(training_progress(STEPS - 1, STEPS)) == pytest.approx(0.1)
    embeds, empty = torch.randn(4000, 3, 2), torch.zeros(3, 2)
    out, mask = schedule.apply(embeds, empty, 0.0, torch.Generator().manual_seed(0))
    assert not mask.any() and torch.equal(out, embeds)
    out, mask = schedule.apply(embeds, empty, 1.0, torch.Generator().manual_seed(0))
    assert 0.08 < mask.float().mean() < 0.12
    assert torch.equal(out[mask], torch.zeros_like(out[mask])) and torch.equal(out[~mask], embeds[~mask])
    assert torch.equal(
        CaptionDropoutSchedule(1.0, 1.0).apply(embeds[:5], empty, 0.5)[0], torch.zeros(5, 3, 2)
    )


def test_progressive_chain_runs_from_the_full_chain_to_the_inference_chain():
    chain = ProgressiveChain(SD15_SCHEDULER_CONFIG, start_steps=1000, end_steps=25, stages=4)
    assert chain.stage_lengths() == [1000, 292, 85, 25]
    first = chain.timesteps_at(training_progress(0, STEPS))
    assert sorted(first.tolist()) == list(range(1000))
    inference = DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    inference.set_timesteps(25)
    last = chain.timesteps_at(training_progress(STEPS - 1, STEPS))
    assert torch.equal(last, inference.timesteps)
    lengths = [chain.chain_length(training_progress(s, STEPS)) for s in range(STEPS)]
    assert lengths == sorted(lengths, reverse=True)
    draws = chain.sample(64, 1.0, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) <= set(inference.timesteps.tolist())


def test_learning_rate_schedules():
    params = [torch.nn.Parameter(torch.zeros(1))]
    onecycle = build_lr_scheduler("onecycle", torch.optim.AdamW(params, lr=1e-3), 10, 1e-3)
    lrs = []
    for _ in range(10):
        lrs.append(onecycle.get_last_lr()[0])
        onecycle.optimizer.step()
        onecycle.step()
    assert (
        lrs[0] == pytest.approx(1e-3 / 25) and max(lrs) == pytest.approx(1e-3, rel=0.05) and lrs[-1] < lrs[0]
    )
    warm = build_lr_scheduler("constant", torch.optim.AdamW(params, lr=1e-3), 10, 1e-3, warmup_steps=4)
    assert warm.get_last_lr()[0] == pytest.approx(2.5e-4)


def test_loss_terms():
    a, b = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert float(noise_mse(a, a)) == 0.0
    torch.testing.assert_close(output_kd(a, b), F.mse_loss(a, b))
    feats_s = {"x": a, "y": b}
    feats_t = {"tx": b, "ty": b}
    total, per_block = feature_kd(feats_s, feats_t, {"x": "tx", "y": "ty"})
    torch.testing.assert_close(total, F.mse_loss(a, b))
    assert float(per_block["y"]) == 0.0
    with pytest.raises(RuntimeError, match="shapes"):
        feature_kd({"x": a}, {"tx": torch.randn(2, 8, 8, 8)}, {"x": "tx"})


def test_balancer_rescales_kd_terms_to_the_task_magnitude():
    balancer = MagnitudeBalancer(beta=0.5)
    objective = DistillObjective(LossWeights(task=1.0, feature_kd=2.0), balancer=balancer)
    terms = {"task": torch.tensor(1.0), "feature_kd": torch.tensor(100.0)}
    _, first = objective(terms, 0.0)
    assert first["weight/feature_kd"] == 2.0  # nothing seen yet
    _, second = objective(terms, 0.5)
    assert second["weight/feature_kd"] == pytest.approx(2.0 / 100)
    restored = MagnitudeBalancer()
    restored.load_state_dict(balancer.state_dict())
    assert restored.factors(["task", "feature_kd"]) == balancer.factors(["task", "feature_kd"])
