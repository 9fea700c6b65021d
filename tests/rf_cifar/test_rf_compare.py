"""``distill rf compare`` on a tiny teacher: methods by registry name, one table and plot, a parent MLflow run with a
child run per method carrying its comparison metrics."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from distill_common.errors import ConfigError
from distill_rf_cifar.cli import app
from distill_rf_cifar.compare import compare_methods, resolve_teacher, select_methods
from distill_rf_cifar.config import EvalConfig
from distill_rf_cifar.recipes import RECIPES


def test_methods_are_the_registered_student_recipes():
    assert compare_methods() == [r for r in RECIPES if r != "teacher"]
    assert {"one_step", "k_step", "reflow", "progressive", "adversarial", "consistency", "guided"} <= set(
        compare_methods())
    assert select_methods([]) == compare_methods()
    assert select_methods(["consistency", "k_step", "consistency"]) == ["consistency", "k_step"]
    assert select_methods(["four_step"]) == ["k_step"]  # the old name of the k-step recipe
    with pytest.raises(ConfigError, match="unknown compare method 'lcm'; valid choices: .*'adversarial'"):
        select_methods(["lcm"])


def test_the_sweep_samples_a_guided_student_at_its_own_guidance_and_counts_nfe_honestly():
    """compare scores every method through evaluation.run_sweep, which generates with guidance=None: each generator's
    own default scale. A CFG teacher at w = 3 costs 2 NFE per step; the guidance-conditioned student at its default
    w = 3 costs 1, and its images are those of an explicit w = 3."""
    import torch
    from rf_helpers import tiny_unet_config

    from distill_rf_cifar.evaluation import _BoundSampler, sweep_entries
    from distill_rf_cifar.generator import RFGenerator
    from distill_rf_cifar.models import build_unet, with_guidance_embedding

    torch.manual_seed(0)
    teacher = build_unet(tiny_unet_config()).eval()
    with torch.no_grad():  # make w matter: v_c and v_u clearly different, a trained w-embedding
        teacher.net.class_embedding.weight.mul_(20)
        student = with_guidance_embedding(teacher)
        student.guidance_embedding.linear_2.weight.normal_()
    t_gen = RFGenerator(teacher, default_steps=2, default_guidance=3.0)
    s_gen = RFGenerator(student, role="guided", default_steps=2, default_guidance=3.0,
                        info={"guidance_range": [1.0, 8.0]})
    entries = sweep_entries(("teacher", t_gen), [("guided", s_gen)],
                            EvalConfig(teacher_steps=[2], teacher_rk45=False, student_steps=[1, 2]))
    nfe, images = {}, {}
    for e in entries:
        bound = _BoundSampler(e.generator, e.sampler)
        images[e.key] = bound.generate([1, 2], e.steps, [0, 1])  # as generate_to_folder calls it: guidance=None
        nfe[e.key] = bound.nfe[-1]
    assert nfe == {"teacher_s2": 4, "guided_s1": 1, "guided_s2": 2}
    assert torch.allclose(images["guided_s2"], s_gen.generate([1, 2], 2, [0, 1], guidance=3.0))
    assert not torch.allclose(images["guided_s2"], s_gen.generate([1, 2], 2, [0, 1], guidance=1.0), atol=1e-4)
    own = sweep_entries(("teacher", t_gen), [("guided", s_gen)],
                        EvalConfig(teacher_steps=[2], teacher_rk45=False, student_steps=[1, 2, 4],
                                   students_at_own_steps=True))
    assert [e.key for e in own] == ["teacher_s2", "guided_s2"]  # the student at its generator.json steps only


def test_teacher_is_a_generator_folder_a_uri_or_a_shipped_name(tmp_path, teacher_dir):
    assert resolve_teacher(str(teacher_dir)) == teacher_dir
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no generator.json"):
        resolve_teacher(str(tmp_path / "empty"))
    with pytest.raises(Exception, match="neither a folder nor a shipped generator"):
        resolve_teacher("no_such_teacher")


@pytest.mark.slow  # trains five methods, scores 12 configurations with Inception and LPIPS, logs to MLflow
def test_compare_on_a_tiny_teacher_writes_table_plot_and_parent_with_child_runs(tmp_path, teacher_dir, data_root,
                                                                              mlflow_uri):
    from mlflow import MlflowClient

    out = tmp_path / "cmp"
    # progressive: its per-round evaluation once opened a second top-level MLflow run inside the parent and crashed
    methods = ["k_step", "adversarial", "consistency", "guided", "progressive"]
    result = CliRunner().invoke(app, ["compare", "--preset", "tiny", "--teacher", str(teacher_dir), "--methods",
                                      *methods, "--output-dir", str(out), "--data-root", str(data_root),
                                      "--device", "cpu", "--train-device", "cpu", "--eval-num-images", "4",
                                      "--eval-reference-n", "8"])
    assert result.exit_code == 0, result.output
    assert (out / "compare.png").stat().st_size > 0 and (out / "compare.md").is_file()
    report = json.loads((out / "compare.json").read_text())
    rows = report["rows"]
    assert "4 optimizer steps per method" in report["meta"]["budget"]
    assert {(r["method"], r["steps"]) for r in rows} == {(m, s) for m in ["teacher", *methods] for s in (1, 2)}
    by = {(r["method"], r["steps"]): r for r in rows}
    assert by[("teacher", 2)]["lpips_to_teacher"] == pytest.approx(0.0, abs=1e-6)  # the reference itself
    assert by[("teacher", 1)]["lpips_to_teacher"] > 0
    assert by[("consistency", 2)]["sampler"] == "consistency" and by[("k_step", 2)]["sampler"] == "euler"
    # the guided student is loaded with its w-embedding and sampled at its own default guidance, one call per step
    assert by[("guided", 2)]["guidance"] == by[("teacher", 2)]["guidance"] == 1.0 and by[("guided", 2)]["nfe"] == 2
    for m in methods:
        assert by[(m, 1)]["train_seconds"] > 0 and by[(m, 1)]["train_steps"] == 4
        assert by[(m, 1)]["fid"] > 0 and by[(m, 1)]["ms_per_image"] > 0

    client = MlflowClient()
    summary = json.loads((out / "compare_summary.json").read_text())
    parent = client.get_run(summary["parent_run_id"])
    assert parent.data.tags["stage"] == "compare" and parent.data.tags["compare.methods"] == ",".join(methods)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    recipes = {c.data.tags.get("recipe"): c for c in children if c.data.tags.get("stage") == "distill"}
    assert set(recipes) == set(methods)
    for m, child in recipes.items():
        assert child.info.run_id == summary["children"][m]
        stage = json.loads((out / "students" / m / "stage.json").read_text())
        assert stage["model_uri"].startswith("models:/")  # logged as a pyfunc generator like every student
        assert {"compare.s1.fid", "compare.s2.fid", "compare.s1.lpips_to_teacher"} <= set(child.data.metrics)
    assert "train/loss_d" in recipes["adversarial"].data.metrics and "train/d_acc_fake" in recipes["adversarial"].data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "compare")}
    assert {"compare/compare.md", "compare/compare.png"} <= artifacts
