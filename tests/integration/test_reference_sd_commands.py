"""The shipped reference text-to-image model by name in the SD commands: flash train / generate / eval,
prune prepare-unet, eval benchmark (as the named generator ``sd-reference``), and the generator loader the page uses."""

from __future__ import annotations

import pytest

from distill_common.reference_sd import REFERENCE_SD_DIR

pytestmark = [pytest.mark.skipif(not (REFERENCE_SD_DIR / "model_index.json").is_file(),
                                 reason="the reference model's weights are not in this checkout"),
              pytest.mark.slow]


def _run(app, args, capsys) -> str:
    from distill_common.cli import run_app

    try:
        run_app(app, args)
    except SystemExit as exc:
        assert exc.code in (0, None), capsys.readouterr().err
    return capsys.readouterr().out


def test_flash_train_generate_eval_on_the_reference_model(data_root, tmp_path, mlflow_uri, capsys, monkeypatch):
    from distill_lora_flash.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DISTILL_DATA_ROOT", str(data_root))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na photo of a ship\n")
    _run(app, ["train", "--base-model", "reference", "--output_dir", str(tmp_path / "runs"), "--run_name", "ref",
               "--resolution", "32", "--max_train_steps", "1", "--checkpointing-steps", "1", "--validation-steps", "0",
               "--max-train-samples", "2", "--learning-rate", "1e-4"], capsys)
    lora = next((tmp_path / "runs" / "ref").rglob("*.safetensors"))
    _run(app, ["generate", "--base-model", "reference", "--lora-path", str(lora), "--prompts-file", str(prompts),
               "--steps", "2", "--seed", "0", "--outdir", str(tmp_path / "gen")], capsys)
    assert len(list((tmp_path / "gen").glob("image_s2_*.png"))) == 2


def test_prune_prepare_unet_on_the_reference_model(tmp_path, capsys):
    from distill_sd_prune.cli import app

    out = _run(app, ["prepare-unet", "--base-model", "reference", "--plan", "sd_tiny",
                     "--output-dir", str(tmp_path / "student")], capsys)
    assert "teacher" in out and (tmp_path / "student").is_dir()


def test_benchmark_teacher_sd_reference_with_class_accuracy(tmp_path, capsys):
    from distill_common.generator import load_generator
    from distill_eval.benchmark import BenchmarkConfig, run_benchmark

    gen = load_generator("sd-reference", device="cpu")
    assert gen.condition_kind == "prompt" and gen.resolution == 32 and gen.default_steps == 30
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na photo of a truck\n")
    cfg = BenchmarkConfig(teacher="sd-reference", teacher_steps=2, generators=["again=sd-reference"], steps=[1],
                          num_images=2, reference="none", prompts_file=prompts, batch_size=2, timing_repeats=1,
                          grid_rows=2, output_dir=tmp_path / "bench")
    result = run_benchmark(cfg)
    assert {r["model"] for r in result.rows} == {"teacher", "again"} or len(result.rows) == 2
    assert all(0.0 <= r["class_accuracy"] <= 1.0 for r in result.rows)
