"""``distill flash eval``: baseline vs LoRA students (and the no-LoRA control) through the shared benchmark, with
its report and MLflow run, and its per-model image cache."""

from __future__ import annotations

import json

import pytest
from flash_helpers import run_cli

from distill_common.cli import run_app
from distill_lora_flash.cli import app


@pytest.mark.slow
def test_eval_writes_the_report_and_logs_it(tiny_sd_path, tiny_lora, tiny_clip_path, prompts_file, tmp_path,
                                            mlflow_uri, capsys):
    out = tmp_path / "eval"
    args = ["eval", "--base-model", str(tiny_sd_path), "--lora_path", str(tiny_lora), "--prompts_file",
            str(prompts_file), "--steps", "2", "4", "--baseline_steps", "3", "--num_images", "2", "--batch-size", "2",
            "--timing-repeats", "1", "--clip-model", str(tiny_clip_path), "--output_dir", str(out), "--device", "cpu"]
    try:
        run_app(app, args)
    except SystemExit as exc:
        assert exc.code in (0, None), capsys.readouterr().err
    stdout = capsys.readouterr().out
    assert "Flash LoRA evaluation" in stdout
    for name in ("flash_eval.csv", "flash_eval.json", "flash_eval.md", "benchmark.csv", "benchmark.md", "grid.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "flash_eval.json").read_text())
    rows = {(r["model"], r["steps"]): r for r in report["rows"]}
    assert set(rows) == {("baseline", 3), ("flash", 2), ("flash", 4)}
    base = rows[("baseline", 3)]
    assert base["lpips_to_teacher"] == 0.0 and base["speedup_vs_teacher"] == pytest.approx(1.0)
    assert base["guidance"] == 7.5 and rows[("flash", 2)]["guidance"] == 0.0
    for key in (("flash", 2), ("flash", 4)):
        row = rows[key]
        assert row["num_images"] == 4  # 2 prompts x 2 images, seeds 0..3
        assert row["lpips_to_teacher"] > 0  # other sampler and LoRA: not the baseline's image
        assert row["speedup_vs_teacher"] == pytest.approx(base["ms_per_image"] / row["ms_per_image"])
        assert row["quality_retention"] == pytest.approx(row["clip_score"] / base["clip_score"])
    assert report["meta"]["seeds"] == "0..3"

    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    (exp,) = [e for e in client.search_experiments() if e.name == "lora_flash_eval"]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.tags["kind"] == "evaluation"
    metrics = run.data.metrics
    assert metrics["flash.s2.quality_retention"] == pytest.approx(rows[("flash", 2)]["quality_retention"])
    assert "flash.s4.lpips_to_teacher" in metrics and "baseline.s3.ms_per_image" in metrics
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "report")}
    assert "report/flash_eval.md" in artifacts


def test_eval_refuses_missing_prompts(capsys):
    try:
        run_app(app, ["eval", "--coco-prompts", "0"])
    except SystemExit as exc:
        assert exc.code == 2
    assert "no prompts" in capsys.readouterr().err


def _save_random_lora(tiny_sd_path, folder, seed: int):
    """A diffusers-format LoRA (rank 4, random A and B drawn from ``seed``) for the tiny UNet, saved in ``folder``."""
    import torch

    from distill_common.models import add_lora, load_sd_components, save_lora

    unet = load_sd_components(tiny_sd_path, include=("unet",)).unet
    torch.manual_seed(seed)
    add_lora(unet, rank=4, alpha=4, init_lora_weights=False)
    folder.mkdir(parents=True, exist_ok=True)
    save_lora(unet, folder)
    return folder


def _snapshot(out, labels):
    """{image path: (mtime_ns, bytes)} of every PNG of the given labels' folders."""
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for label in labels
            for p in sorted((out / "images").glob(f"{label}_s*/*.png"))}


@pytest.mark.slow
def test_two_loras_and_the_control_share_one_table_and_cache_per_model(tiny_sd_path, tiny_lora, prompts_file,
                                                                       tmp_path, capsys):
    lora_b = _save_random_lora(tiny_sd_path, tmp_path / "run_b" / "lora" / "final", seed=1)
    out = tmp_path / "eval"
    common = ["eval", "--base-model", str(tiny_sd_path), "--prompts-file", str(prompts_file), "--steps", "1", "2",
              "--baseline-steps", "2", "--num-images", "1", "--batch-size", "2", "--timing-repeats", "1",
              "--clip-model", "none", "--output-dir", str(out), "--device", "cpu", "--no-track", "--control"]

    def rows():
        report = json.loads((out / "flash_eval.json").read_text())
        return {(r["model"], r["steps"]): r for r in report["rows"]}, report["meta"]

    # 1. one LoRA + the control
    code, _, err = run_cli([*common, "--lora-path", f"seed={tiny_lora}"], capsys)
    assert code == 0, err
    first, _ = rows()
    assert set(first) == {("baseline", 2), ("seed", 1), ("seed", 2), ("base", 1), ("base", 2)}
    kept = _snapshot(out, ["baseline", "base", "seed"])
    assert len(kept) == 2 * 5  # 2 prompts x 1 image per folder

    # 2. a second LoRA: only its images are made; the baseline, the control and the first LoRA are reused
    code, stdout, err = run_cli([*common, "--lora-path", f"seed={tiny_lora},lcm={lora_b}"], capsys)
    assert code == 0, err
    second, meta = rows()
    assert set(second) == {("baseline", 2)} | {(m, s) for m in ("seed", "lcm", "base") for s in (1, 2)}
    assert [r["role"] for r in second.values()].count("teacher") == 1
    assert _snapshot(out, ["baseline", "base", "seed"]) == kept
    assert "reusing" in stdout and meta["feature_precision"].startswith("fp32")
    assert meta["control"].startswith("'base'") and "lcm=" in meta["lora"]
    for key, row in second.items():
        if key[0] != "baseline":
            assert row["guidance"] == 0.0 and row["lpips_to_teacher"] > 0
    for s in (1, 2):  # the control is the base model at the student schedule: other images than either LoRA's
        assert second[("base", s)]["lpips_to_teacher"] != second[("seed", s)]["lpips_to_teacher"]
        assert second[("lcm", s)]["lpips_to_teacher"] != second[("seed", s)]["lpips_to_teacher"]
    lcm_before = _snapshot(out, ["lcm"])

    # 3. the second LoRA's file changes: its images, and only its, are made again
    _save_random_lora(tiny_sd_path, lora_b, seed=2)
    code, stdout, err = run_cli([*common, "--lora-path", f"seed={tiny_lora}", "--lora-path", f"lcm={lora_b}"], capsys)
    assert code == 0, err
    third, _ = rows()
    assert _snapshot(out, ["baseline", "base", "seed"]) == kept
    lcm_after = _snapshot(out, ["lcm"])
    assert set(lcm_after) == set(lcm_before)
    assert all(lcm_after[p][0] != lcm_before[p][0] for p in lcm_after)  # every lcm image rewritten
    assert "lora_sha256" in stdout  # the note names what changed
    assert third[("lcm", 2)]["lpips_to_teacher"] != second[("lcm", 2)]["lpips_to_teacher"]
    assert third[("seed", 2)]["lpips_to_teacher"] == pytest.approx(second[("seed", 2)]["lpips_to_teacher"])


def test_duplicate_lora_labels_are_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "eval"
    code, _, err = run_cli(["eval", "--lora-path", f"a={tmp_path / 'x'}", "--lora-path", f"a={tmp_path / 'y'}",
                            "--prompt", "a cat", "--output-dir", str(out), "--no-track"], capsys)
    assert code == 2 and "'a' is given twice" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli(["eval", "--lora-path", f"{tmp_path}/r/lora/final,{tmp_path}/q/r/lora/final",
                            "--prompt", "a cat", "--output-dir", str(out), "--no-track"], capsys)
    assert code == 2 and "'r' is given twice" in err, err  # default labels from the run folders collide
    code, _, err = run_cli(["eval", "--lora-path", f"base={tmp_path}", "--prompt", "a cat", "--output-dir", str(out),
                            "--no-track"], capsys)
    assert code == 2 and "reserved" in err, err
    assert not out.exists()


def test_lora_labels_default_to_the_run_folder():
    from distill_lora_flash.config import lora_specs

    assert lora_specs(["runs/a/lora/final"]) == [("flash", "runs/a/lora/final")]  # a single path: today's label
    assert lora_specs(["runs/a/lora/final", "runs/b/lora/checkpoint-500", "x/k.safetensors", "lcm=runs/c"]) == [
        ("a", "runs/a/lora/final"), ("b-checkpoint-500", "runs/b/lora/checkpoint-500"), ("x", "x/k.safetensors"),
        ("lcm", "runs/c")]
    assert lora_specs(["runs/lr=1e-4/lora/final", "s=runs/lr=2/lora/final"]) == [
        ("lr-1e-4", "runs/lr=1e-4/lora/final"), ("s", "runs/lr=2/lora/final")]


def test_retention_columns_are_fractions_of_the_baseline_and_only_where_measured():
    from distill_lora_flash.evaluation import add_retention

    rows = [{"model": "baseline", "role": "teacher", "steps": 30, "class_accuracy": 0.8, "fid": 40.0},
            {"model": "seed", "role": "student", "steps": 2, "class_accuracy": 0.6, "fid": 60.0},
            {"model": "base", "role": "student", "steps": 2, "class_accuracy": 0.1, "fid": None}]
    add_retention(rows)
    assert rows[0]["class_accuracy_retention"] == 1.0 and rows[0]["fid_ratio"] == 1.0
    assert rows[1]["class_accuracy_retention"] == pytest.approx(0.75) and rows[1]["fid_ratio"] == pytest.approx(1.5)
    assert rows[2]["class_accuracy_retention"] == pytest.approx(0.125) and "fid_ratio" not in rows[2]
    assert not any("quality_retention" in r for r in rows)  # no CLIPScore: no column
    zero = [{"model": "baseline", "role": "teacher", "class_accuracy": 0.0}, {"model": "s", "class_accuracy": 0.5}]
    add_retention(zero)
    assert not any("class_accuracy_retention" in r for r in zero)  # no ratio to a baseline of 0


def test_a_generators_image_cache_key_does_not_depend_on_which_generator_sampled_before(tiny_sd_path, tiny_lora):
    """The baseline and the LoRA students share scheduler objects, and each installs its own scheduler on its pipeline
    before sampling. Their fingerprints (the image cache key) must stay what they were when freshly loaded, whatever
    sampled in between; otherwise cached images are regenerated for nothing in the next evaluation."""
    from distill_eval.benchmark import generator_fingerprint
    from distill_lora_flash.config import EvalConfig
    from distill_lora_flash.evaluation import build_eval_generators

    models = build_eval_generators(EvalConfig(base_model=str(tiny_sd_path), lora_path=[f"seed={tiny_lora}"],
                                              device="cpu", control=True))
    generators = {"baseline": models.baseline, **models.students}
    fresh = {label: generator_fingerprint(g) for label, g in generators.items()}
    assert len(set(fresh.values())) == len(fresh)  # baseline, LoRA and control are told apart
    for label in ("seed", "baseline", "base"):  # each samples once, in an order unlike the eval's
        generators[label].generate(["a red cube"], 1, [0])
        assert {lbl: generator_fingerprint(g) for lbl, g in generators.items()} == fresh, f"after {label} sampled"
