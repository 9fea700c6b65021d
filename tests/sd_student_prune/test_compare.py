"""``distill prune compare`` end to end on a tiny teacher of the reference model's shape (one layer per block,
32 px images): every row trains a few steps on captioned CIFAR-10, every model is scored on one protocol under
two sampling settings, the table / grid are written, the winner goes through the promotion gate, V2.1's periodic
evaluation uses the same protocol code stamped as periodic, and a rerun resumes instead of retraining. No number
is checked: only that each one exists, has its interval and comes from the stated protocol."""

from __future__ import annotations

import json

import pytest
import torch
from test_reference_plans import TINY_REFERENCE_SPEC
from typer.testing import CliRunner

from distill_common.errors import ConfigError
from distill_common.models.tiny_sd import tiny_sd_folder
from distill_sd_prune.cli import app
from distill_sd_prune.evaluation.compare import COLUMNS, ROWS


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory):
    return tiny_sd_folder(tmp_path_factory.mktemp("tiny_reference"), spec=TINY_REFERENCE_SPEC)


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    from distill_eval.classifier import CifarClassifier, save_classifier

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("classifier")
    save_classifier(CifarClassifier(width=4), folder)
    return folder


def compare_args(teacher, classifier, data_root, out, **overrides):
    options = {
        "--base-model": str(teacher),
        "--output-dir": str(out),
        "--max-steps": "2",
        "--batch-size": "2",
        "--data-root": str(data_root),
        "--data-limit": "4",
        "--no-data-cache": None,
        "--checkpoint-every": "1",
        "--eval-every": "2",
        "--eval-num-images": "2",
        "--num-images": "4",
        "--reference-n": "8",
        "--recipe-steps": "2",
        "--teacher-steps": "2",
        "--bootstrap-resamples": "10",
        "--eval-batch-size": "4",
        "--timing-repeats": "1",
        "--grid-rows": "3",
        "--classifier": str(classifier),
        "--device": "cpu",
        **overrides,
    }
    args = ["compare"]
    for flag, value in options.items():
        args += [flag] if value is None else [flag, value]
    return args


@pytest.mark.slow
def test_compare_trains_scores_tabulates_and_promotes_then_resumes(
    tiny_reference, tiny_classifier, data_root, tmp_path, mlflow_uri, monkeypatch
):
    from distill_common import tracking

    out = tmp_path / "compare"
    first_rows = [r for r in ROWS if not r.startswith("v1-tiny")]
    args = compare_args(tiny_reference, tiny_classifier, data_root, out, **{"--rows": ",".join(first_rows)})
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)

    report = json.loads((out / "comparison.json").read_text())
    rows = report["rows"]
    assert {(r["model"], r["setting"]) for r in rows} == {
        (m, s) for m in ("teacher", *first_rows) for s in ("recipe", "teacher")
    }
    for r in rows:
        for column in ("params", "gmacs", "ms_per_image", "fid", "fid_ci95_low", "fid_ci95_high",
                       "class_accuracy", "class_accuracy_ci95_low", "lpips_to_teacher"):
            assert r[column] is not None and r[column] >= 0, (r["model"], column)
        assert r["fid_ci95_low"] <= r["fid_ci95_high"]
    by = {(r["model"], r["setting"]): r for r in rows}
    assert by["teacher", "recipe"]["lpips_to_teacher"] == 0.0
    assert by["v2.1", "recipe"]["steps"] == 2 and by["v2.1", "teacher"]["sampler"] == "euler"
    assert by["v3", "recipe"]["budget"] == "sd_small" and by["v2.1", "recipe"]["budget"] == "none-w050"
    assert by["random", "recipe"]["init"] == "random" and by["v1", "recipe"]["init"] == "project"
    table = (out / "comparison.md").read_text().split("## Table")[1]
    header = table.strip().splitlines()[0]
    assert all(f" {c} |" in header for c in ("params", "gmacs", "ms_per_image", "fid", "class_accuracy",
                                             "lpips_to_teacher"))
    fid_cells = [line.split(" | ")[header.split(" | ").index("fid")] for line in table.strip().splitlines()[2:14]]
    assert all("[" in c and "]" in c for c in fid_cells)  # each FID with its 95% interval
    assert set(COLUMNS) >= {"params", "gmacs", "ms_per_image", "fid", "class_accuracy", "lpips_to_teacher"}
    protocol = report["meta"]["protocol"]
    assert protocol["reference_set"] == "cifar10-train" and protocol["reference_n"] == 8
    assert protocol["generated_n"] == 4 and protocol["resolution"] == 32
    assert any("V2.2 beats V2.1" in c for c in report["meta"]["claims"])
    assert (out / "grid.png").is_file()

    # periodic evaluation of V2.1: the same protocol code at a smaller N, stamped as such
    periodic = json.loads((out / "students" / "v2.1" / "periodic_eval_protocol.json").read_text())
    assert periodic["scoring_purpose"] == "periodic" and periodic["generated_n"] == 2
    assert periodic["reference_set"] == "cifar10-train" and periodic["scoring_templates"] == "held_out"
    history = report["meta"]["periodic"]["v2.1"]
    assert history and {"eval/fid", "eval/lpips_to_teacher", "eval/class_accuracy"} <= set(history[-1])
    assert "v1" not in report["meta"]["periodic"]

    # registry: every student registered and stamped under one protocol; the gate crowned one of them
    versions = tracking.list_versions("sd_student_prune_reference")
    assert len(versions) == len(first_rows)
    champion = tracking.version_by_alias("sd_student_prune_reference", tracking.CHAMPION)
    assert champion is not None and "promotion.reason" in champion.tags
    assert len({v.tags["eval.protocol"] for v in versions}) == 1
    # each version carries whether it met the goal at both settings; when some did, the champion is one of them
    goals = {v.tags["comparison.row"]: v.tags["comparison.goal"] for v in versions}
    assert goals == {m: ("met" if {by[m, "recipe"]["goal"], by[m, "teacher"]["goal"]} == {"met"} else "no")
                     for m in first_rows}
    if "met" in goals.values():
        assert goals[champion.tags["comparison.row"]] == "met"
    # the console names the promoted version by its row
    said = " ".join(result.output.split())
    assert f"promotion: sd_student_prune_reference v{champion.version} ({champion.tags['comparison.row']})" in said

    # a rerun resumes: nothing is retrained, rescored or registered twice
    import distill_sd_prune.training.loop as loop

    real_train = loop.train
    monkeypatch.setattr(loop, "train", lambda *a, **k: pytest.fail("a finished row was retrained"))
    (out / "comparison.json").unlink()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert json.loads((out / "comparison.json").read_text())["rows"] == rows
    assert len(tracking.list_versions("sd_student_prune_reference")) == len(first_rows)

    # the comparison grows: a rerun naming new rows trains and scores those only, and the table keeps the other
    # finished rows; a row whose training has not finished is left out and named
    (out / "students" / "random" / "done.json").rename(out / "students" / "random" / "done.json.bak")
    trained = []
    monkeypatch.setattr(loop, "train", lambda cfg, *a, **k: trained.append(cfg.output_dir.name) or real_train(
        cfg, *a, **k))
    result = CliRunner().invoke(app, compare_args(tiny_reference, tiny_classifier, data_root, out,
                                                  **{"--rows": "v1-tiny,v1-tiny-dropout,v1-tiny-long"}))
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert trained == ["v1-tiny", "v1-tiny-dropout", "v1-tiny-long"]
    grown = json.loads((out / "comparison.json").read_text())["rows"]
    assert [r for r in grown if not r["model"].startswith("v1-tiny")] == [r for r in rows if r["model"] != "random"]
    meta = json.loads((out / "comparison.json").read_text())["meta"]
    assert meta["rows not finished (not in the table)"] == "random" and "--rows random" in " ".join(result.output.split())
    (out / "students" / "random" / "done.json.bak").rename(out / "students" / "random" / "done.json")
    tiny = {r["setting"]: r for r in grown if r["model"] == "v1-tiny"}
    assert set(tiny) == {"recipe", "teacher"} and tiny["recipe"]["budget"] == "sd_tiny-w075"
    assert tiny["recipe"]["params"] < by["v3", "recipe"]["params"] and tiny["recipe"]["fid_ci95_low"] is not None
    # the longer-budget row trains twice the table's steps and says so in its row and in the budget line
    long = {r["setting"]: r for r in grown if r["model"] == "v1-tiny-long"}
    assert long["recipe"]["train_steps"] == 4 and tiny["recipe"]["train_steps"] == 2
    assert "v1-tiny-long: 4 steps" in meta["budget"]
    assert json.loads((out / "compare_config.json").read_text())["rows"] == [
        *first_rows, "v1-tiny", "v1-tiny-dropout", "v1-tiny-long"]
    assert len(tracking.list_versions("sd_student_prune_reference")) == len(ROWS)
    assert any("v1-tiny" in c for c in json.loads((out / "comparison.json").read_text())["meta"]["claims"])

    # the same folder with other options is refused in one line
    result = CliRunner().invoke(app, compare_args(tiny_reference, tiny_classifier, data_root, out,
                                                  **{"--max-steps": "3"}))
    assert isinstance(result.exception, ConfigError) and "max_steps" in str(result.exception)
    assert "\n" not in str(result.exception)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"--rows": "v1,v4"}, "valid choices: 'random', 'v1', 'v1-tiny', 'v1-tiny-dropout', 'v1-tiny-long', 'v2.1', 'v2.2', 'v3'"),
        ({"--rows": "v1,v1"}, "names a row twice"),
        ({"--v3-plan": "none"}, "valid choices: 'bk_small', 'sd_small', 'sd_tiny'"),
        ({"--num-images": "1"}, "--num-images"),
        ({"--v1-tiny-width": "1.5"}, "--v1-tiny-width"),
        ({"--v1-tiny-dropout": "0"}, "--v1-tiny-dropout"),
        ({"--v1-tiny-long-steps": "0"}, "--v1-tiny-long-steps"),
        ({"--no-track": None}, "--promote needs MLflow tracking"),
    ],
)
def test_bad_compare_options_fail_in_one_line_before_anything_is_written(tmp_path, overrides, message):
    out = tmp_path / "never"
    args = compare_args(tmp_path / "teacher", tmp_path / "classifier", tmp_path, out, **overrides)
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, ConfigError), result.output + repr(result.exception)
    assert message in str(result.exception) and "\n" not in str(result.exception)
    assert not out.exists()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_periodic_evaluation_uses_the_comparisons_feature_precision(tmp_path, precision):
    """V2.x's periodic FID is the comparison's protocol at a smaller N: same reference, templates and Inception
    precision, so its curve and the table's numbers are comparable."""
    from distill_sd_prune.evaluation.compare import CompareConfig, row_train_config

    cfg = CompareConfig(output_dir=tmp_path / "cmp", feature_precision=precision, reference_n=500)
    periodic = row_train_config(cfg, "v2.1").eval
    assert periodic.every and periodic.feature_precision == precision and periodic.reference_n == 500
    assert row_train_config(cfg, "v1").eval.every == 0


def test_the_v1_tiny_row_is_v1s_recipe_on_the_narrowed_sd_tiny_plan_under_half_the_reference_teacher(tmp_path):
    """The row aimed at the goal: BK-SDM-Tiny's block removal plus narrowing, trained with V1's recipe (projection
    init, feature KD, progressive chain); at the default width it keeps under half the reference UNet's parameters."""
    from distill_common.models.tiny_sd import build_tiny_unet
    from distill_common.reference_sd.spec import REFERENCE_SD_SPEC
    from distill_sd_prune.architecture import build_student, count_parameters
    from distill_sd_prune.evaluation.compare import CompareConfig, row_train_config

    cfg = CompareConfig(output_dir=tmp_path / "cmp")
    tiny, v1 = row_train_config(cfg, "v1-tiny"), row_train_config(cfg, "v1")
    assert (tiny.recipe, tiny.student.plan, tiny.student.width, tiny.student.init) == ("v1", "sd_tiny", 0.75, "project")
    assert tiny.schedule.timesteps == v1.schedule.timesteps == "progressive"
    assert tiny.loss.feature_kd_weight == v1.loss.feature_kd_weight > 0
    assert tiny.output_dir.name == "v1-tiny" and tiny.max_steps == v1.max_steps
    assert row_train_config(CompareConfig(output_dir=tmp_path, v1_tiny_width=0.5), "v1-tiny").student.width == 0.5
    # V1 never drops a caption; the dropout row replaces a constant share by the empty prompt, nothing else changes
    assert tiny.schedule.caption_dropout_start == tiny.schedule.caption_dropout_end == 0
    dropout = row_train_config(cfg, "v1-tiny-dropout")
    assert dropout.schedule.caption_dropout_start == dropout.schedule.caption_dropout_end == 0.1
    assert (dropout.recipe, dropout.student, dropout.loss) == (tiny.recipe, tiny.student, tiny.loss)
    # the longer-budget row is the dropout row with more steps (twice the table's by default), in its own folder;
    # the default rows are the table's one budget
    long = row_train_config(cfg, "v1-tiny-long")
    assert (long.student, long.loss, long.schedule) == (dropout.student, dropout.loss, dropout.schedule)
    assert long.max_steps == 2 * cfg.max_steps and long.output_dir.name == "v1-tiny-long"
    assert row_train_config(CompareConfig(output_dir=tmp_path, v1_tiny_long_steps=3000), "v1-tiny-long").max_steps == 3000
    assert "v1-tiny-long" not in CompareConfig().rows and "v1-tiny-dropout" in CompareConfig().rows
    teacher = build_tiny_unet(REFERENCE_SD_SPEC)
    student = build_student(teacher, tiny.student.plan, tiny.student.width, tiny.student.init).unet
    assert count_parameters(student) <= 0.5 * count_parameters(teacher)


def test_the_goal_of_a_student_is_met_only_at_every_setting():
    from distill_sd_prune.evaluation.compare import goal_of

    rows = [{"model": "a", "goal": "met"}, {"model": "a", "goal": "met"}, {"model": "b", "goal": "met"},
            {"model": "b", "goal": "no"}, {"model": "c", "goal": "n/a (no classifier)"}]
    assert [goal_of(rows, m) for m in ("a", "b", "c")] == ["met", "no", "n/a (no classifier)"]
