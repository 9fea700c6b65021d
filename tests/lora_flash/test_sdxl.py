"""SDXL in ``flash train`` / ``flash eval`` (two text encoders, pooled embeddings, time ids) on the tiny SDXL; the
supported pipeline classes; the default base model id and the hint for the removed one."""

from __future__ import annotations

import json
import shutil

import pytest
from test_flash_train import tiny_config

from distill_common.errors import ConfigError, ModelLoadError


def test_default_base_model_is_the_new_sd15_id_and_the_removed_one_names_it(monkeypatch):
    from distill_common.models.sd_loading import resolve_model_source
    from distill_lora_flash.config import EvalConfig, GenerateConfig, TrainConfig

    for cls in (GenerateConfig, TrainConfig, EvalConfig):
        assert cls().base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        resolve_model_source("runwayml/stable-diffusion-v1-5", cache_dir="/nonexistent-cache")
    message = str(info.value)
    assert "\n" not in message and "--base-model stable-diffusion-v1-5/stable-diffusion-v1-5" in message


def test_unsupported_pipeline_class_is_one_line(tiny_sd_path, tmp_path, data_root):
    from distill_lora_flash.loading import load_base_pipeline
    from distill_lora_flash.training import train

    folder = tmp_path / "kandinsky"
    shutil.copytree(tiny_sd_path, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "KandinskyPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    for call in (lambda: load_base_pipeline(folder),
                 lambda: train(tiny_config(folder, data_root, tmp_path / "out"))):
        with pytest.raises(ConfigError) as info:
            call()
        text = str(info.value)
        assert "KandinskyPipeline" in text and "StableDiffusionPipeline and StableDiffusionXLPipeline" in text
        assert "\n" not in text


@pytest.fixture(scope="module")
def tiny_sdxl_path(tmp_path_factory):
    from distill_common.models.tiny_sdxl import save_tiny_sdxl

    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl") / "model")


@pytest.mark.parametrize("method", ["noise_matching", "lcm"])
def test_sdxl_training_and_eval(tiny_sdxl_path, data_root, tmp_path, method, monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    from distill_lora_flash import conditioning
    from distill_lora_flash.config import EvalConfig
    from distill_lora_flash.evaluation import build_eval_generators
    from distill_lora_flash.training import TrainHooks, train

    seen: list[dict] = []
    original = conditioning.unet_forward

    def spy(unet, x, t, cond):
        seen.append(conditioning.as_conditioning(cond).unet_kwargs())
        return original(unet, x, t, cond)

    monkeypatch.setattr(conditioning, "unet_forward", spy)
    monkeypatch.setattr("distill_lora_flash.losses.unet_forward", spy)
    monkeypatch.setattr("distill_lora_flash.lcm.unet_forward", spy)
    cfg = tiny_config(tiny_sdxl_path, data_root, tmp_path, method=method, max_steps=2, checkpointing_steps=2,
                      gradient_accumulation_steps=1, max_train_samples=2)
    shown: dict = {}
    result = train(cfg, TrainHooks(images=lambda step, images: shown.update(images)))
    assert result.global_step == 2
    assert shown["student_s2"].shape == (1, 3, 64, 64) and shown["teacher"].shape == (1, 3, 64, 64)
    added = seen[0]["added_cond_kwargs"]
    assert added["time_ids"].tolist()[0] == [64, 64, 0, 0, 64, 64]
    assert added["text_embeds"].shape[-1] == 32 and seen[0]["encoder_hidden_states"].shape[-1] == 64
    # the teacher's CFG batch (uncond, cond): SDXL's force_zeros_for_empty_prompt gives a zero unconditional branch
    teacher_calls = [k for k in seen if k["encoder_hidden_states"].shape[0] == 2]
    assert teacher_calls and all(k["encoder_hidden_states"][0].abs().sum() == 0
                                 and k["added_cond_kwargs"]["text_embeds"][0].abs().sum() == 0
                                 and k["encoder_hidden_states"][1].abs().sum() > 0 for k in teacher_calls)
    manifest = json.loads((result.generator_dir / "generator.json").read_text())
    assert manifest["pipeline"] == "StableDiffusionXLPipeline"

    models = build_eval_generators(EvalConfig(base_model=str(tiny_sdxl_path), lora_path=result.final_dir,
                                              device="cpu", track=False, control=True))
    baseline, student, control = models.baseline, models.students["flash"], models.students["base"]
    assert isinstance(student.pipe, StableDiffusionXLPipeline) and student.pipe.unet is not baseline.pipe.unet
    assert isinstance(control.pipe, StableDiffusionXLPipeline) and control.pipe.unet is baseline.pipe.unet
    assert control.pipe is not baseline.pipe  # its own scheduler slot: sampling one never changes the other's
    images = student.generate(["a cat"], 2, [0])
    assert images.shape == (1, 3, 64, 64)
    assert baseline.generate(["a cat"], 2, [0]).shape == (1, 3, 64, 64)


@pytest.mark.slow
def test_cli_lcm_on_sdxl_logs_registers_and_evaluates(tiny_sdxl_path, data_root, tmp_path, mlflow_uri, capsys,
                                                      monkeypatch, prompts_file):
    from flash_helpers import run_cli
    from mlflow import MlflowClient

    from distill_common.tracking import list_versions

    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["train", "--method", "lcm", "--base-model", str(tiny_sdxl_path), "--output-dir",
                              str(tmp_path / "runs"), "--run-name", "lcm", "--resolution", "64", "--max-steps", "2",
                              "--gradient-accumulation-steps", "1", "--checkpointing-steps", "1",
                              "--validation-steps", "0", "--validation-teacher-steps", "2",
                              "--validation-step-counts", "2", "--max-train-samples", "2", "--data-root",
                              str(data_root), "--register-name", "flash_lcm_xl", "--lcm-guidance-min", "5",
                              "--lcm-guidance-max", "5"], capsys)
    assert code == 0, err
    assert "registered flash_lcm_xl version 1" in out
    (version,) = list_versions("flash_lcm_xl")
    client = MlflowClient(mlflow_uri)
    run_id = (tmp_path / "runs" / "lcm" / "mlflow_run_id").read_text().strip()
    metrics = client.get_run(run_id).data.metrics
    assert metrics["train.guidance"] == 5.0 and "train.lcm_loss" in metrics
    assert client.get_model_version("flash_lcm_xl", "1").tags["method"] == "lcm"

    out_dir = tmp_path / "eval"
    code, out, err = run_cli(["eval", "--base-model", str(tiny_sdxl_path), "--lora-path",
                              str(tmp_path / "runs" / "lcm" / "lora" / "final"), "--prompts-file", str(prompts_file),
                              "--steps", "2", "--baseline-steps", "2", "--num-images", "1", "--batch-size", "2",
                              "--timing-repeats", "1", "--clip-model", "none", "--output-dir", str(out_dir),
                              "--device", "cpu", "--no-track"], capsys)
    assert code == 0, err
    rows = {(r["model"], r["steps"]) for r in json.loads((out_dir / "flash_eval.json").read_text())["rows"]}
    assert rows == {("baseline", 2), ("flash", 2)}
