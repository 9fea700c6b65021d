"""The pipeline's overall line: stage N of M and the whole run's time left, estimated from the configured work of the
unfinished stages and the measured speed of the finished ones (never a number before a stage has been timed)."""

from __future__ import annotations

import io
import re
import types
from pathlib import Path

import pytest
from rich.console import Console

from distill_rf_cifar import pipeline
from distill_rf_cifar.config import smoke_pipeline
from distill_rf_cifar.pipeline import STAGES, estimate_remaining, stage_costs
from distill_rf_cifar.stages import StageOutcome

COSTS = {"teacher": 100.0, "pairs": 50.0, "four_step": 200.0, "one_step": 100.0, "evaluation": 20.0}


def test_no_estimate_before_a_stage_with_work_was_timed() -> None:
    assert estimate_remaining(COSTS, {}) is None
    assert estimate_remaining({**COSTS, "teacher": 0.0}, {"teacher": 3.0}) is None  # a given teacher: only logged
    assert estimate_remaining(COSTS, {"teacher": None}) is None  # skipped (an earlier call did it): no speed


def test_each_kind_is_scaled_by_its_own_measured_speed() -> None:
    # the teacher trained at 0.1 s per unit; nothing sampled yet: every stage left goes at that speed
    assert estimate_remaining(COSTS, {"teacher": 10.0}) == pytest.approx((50 + 200 + 100 + 20) * 0.1)
    # pairs sampled at 0.4 s per unit: the evaluation (sampling) follows it, the students (training) the teacher
    left = estimate_remaining(COSTS, {"teacher": 10.0, "pairs": 20.0})
    assert left == pytest.approx((200 + 100) * 0.1 + 20 * 0.4)
    # the four-step student trained faster than the teacher: the training speed is their pooled rate
    left = estimate_remaining(COSTS, {"teacher": 10.0, "pairs": 20.0, "four_step": 5.0})
    assert left == pytest.approx(100 * 15.0 / 300 + 20 * 0.4)
    assert estimate_remaining(COSTS, dict.fromkeys(COSTS, 1.0)) == 0.0


def test_skipped_stages_are_neither_left_nor_timed() -> None:
    # resumed: teacher and pairs were done before this call; the four-step student was timed now
    left = estimate_remaining(COSTS, {"teacher": None, "pairs": None, "four_step": 20.0})
    assert left == pytest.approx(100 * 0.1 + 20 * 0.1)  # no sampling speed yet: the overall one


def test_stage_costs_follow_the_configuration() -> None:
    cfg = smoke_pipeline()
    costs = stage_costs(cfg)
    assert list(costs) == list(STAGES)
    assert costs["teacher"] == 0.0  # --teacher reference is logged, not trained
    cfg.teacher_source = "scratch"
    assert stage_costs(cfg)["teacher"] == cfg.teacher.steps * cfg.teacher.batch_size * pipeline.TRAIN_FORWARDS
    assert costs["pairs"] == cfg.pairs.num_pairs * cfg.pairs.steps * 2  # guidance 2: two forwards a step
    cfg.pairs.num_pairs *= 2
    assert stage_costs(cfg)["pairs"] == 2 * costs["pairs"]
    assert costs["one_step"] == cfg.one_step.steps * cfg.one_step.batch_size * pipeline.TRAIN_FORWARDS


def test_pipeline_prints_stage_of_total_and_the_time_left(tmp_path: Path, data_root: Path, monkeypatch) -> None:
    """The real run_pipeline with its stages replaced by ones that take a known time on a fake clock: each stage's
    heading is followed by 'stage N/5', and the time left after stage 1 is the rest's cost at stage 1's speed."""
    cfg = smoke_pipeline()
    cfg.teacher_source, cfg.track, cfg.output_dir = "scratch", False, tmp_path / "run"
    cfg.data.data_root = data_root
    costs = stage_costs(cfg)
    clock = [0.0]
    monkeypatch.setattr(pipeline, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    speed = {"train": 0.01, "sample": 0.05}  # seconds per unit of cost

    def stage(name: str, kind: str, folder: Path, generator: bool = True) -> StageOutcome:
        clock[0] += costs[name] * speed[kind]
        return StageOutcome(name, folder, True, folder / "generator" if generator else None)

    monkeypatch.setattr(pipeline, "train_teacher", lambda c, **_: stage("teacher", "train", c.output_dir))
    monkeypatch.setattr(pipeline, "make_pairs", lambda c, **_: stage("pairs", "sample", c.output_dir, False))
    students = iter(("four_step", "one_step"))
    monkeypatch.setattr(pipeline, "distill_student", lambda c, **_: stage(next(students), "train", c.folder))

    def evaluate(c, **_):
        stage("evaluation", "sample", c.output_dir)
        protocol = {"generated_n": 10, "reference_n": 20, "reference_set": "cifar10-train"}
        return types.SimpleNamespace(rows=[], protocol=protocol, grid_path=None, plot_paths=[], report_paths={}), None

    monkeypatch.setattr(pipeline, "evaluate", evaluate)
    out = io.StringIO()
    result = pipeline.run_pipeline(cfg, console=Console(file=out, width=200), progress=False)
    assert result.finished
    lines = [line for line in out.getvalue().splitlines() if line.startswith("pipeline: stage")]
    assert [re.match(r"pipeline: stage (\d)/(\d)", line).groups() for line in lines] == [
        (str(n), "5") for n in range(1, 6)]
    assert lines[0].endswith("0:00 elapsed, time left known after one stage")
    assert max(len(line) for line in lines) <= 80
    train_rate = speed["train"]  # after the teacher: every stage left at the teacher's speed
    left = sum(costs[s] for s in STAGES[1:]) * train_rate
    assert f"{pipeline._clock(costs['teacher'] * train_rate)} elapsed, {pipeline._duration(left)} left" in lines[1]
    # after the pairs: students at the training speed, the evaluation at the sampling speed
    left = (costs["four_step"] + costs["one_step"]) * speed["train"] + costs["evaluation"] * speed["sample"]
    assert f"{pipeline._duration(left)} left" in lines[2]
    assert f"{pipeline._duration(costs['evaluation'] * speed['sample'])} left" in lines[4]
