"""``distill flash train`` on the tiny SD pipeline and COCO captions: layout, timestep grids, Min-SNR, exact resume,
the final LoRA in diffusers' format, and the registered generator."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from distill_common.checkpoint import list_checkpoints
from distill_common.errors import ConfigError
from distill_lora_flash import losses
from distill_lora_flash.config import TrainConfig
from distill_lora_flash.training import train

GRID_248 = {139, 259, 379, 499, 639, 759, 879, 999}


def tiny_config(tiny_sd_path: Path, data_root: Path, out: Path, **changes) -> TrainConfig:
    base = dict(base_model=str(tiny_sd_path), output_dir=out, run_name="run", data_root=data_root,
                max_train_samples=6, resolution=64, batch_size=1, gradient_accumulation_steps=2, max_steps=4,
                checkpointing_steps=2, validation_steps=0, validation_prompts=["a cat"], validation_teacher_steps=2,
                validation_step_counts=[2], learning_rate=1e-3, track=False, device="cpu", log_every=1)
    base.update(changes)
    return TrainConfig(**base)


@pytest.fixture
def recorded_losses(monkeypatch):
    """Spy on the loss: records every (timesteps, snr_weight) the training loop feeds it."""
    calls: list[tuple[list[int], float]] = []
    original = losses.NoiseMatchingLoss.__call__

    def spy(self, unet, x_t, t, cond, uncond):
        loss, logs = original(self, unet, x_t, t, cond, uncond)
        calls.append((t.tolist(), logs["snr_weight"]))
        return loss, logs

    monkeypatch.setattr(losses.NoiseMatchingLoss, "__call__", spy)
    return calls


def lora_file(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "pytorch_lora_weights.safetensors")


def test_discrete_min_snr_training_writes_the_layout_and_resumes_exactly(tiny_sd_path, data_root, tmp_path,
                                                                          recorded_losses):
    cfg = tiny_config(tiny_sd_path, data_root, tmp_path, use_discrete_timesteps=True, discrete_steps=[2, 4, 8],
                      snr_gamma=5.0, gradient_checkpointing=True)
    result = train(cfg)
    run = tmp_path / "run"
    assert result.global_step == 4 and result.resumed_from is None
    assert [step for step, _ in list_checkpoints(run / "lora")] == [2, 4]
    for folder in [p for _, p in list_checkpoints(run / "lora")] + [run / "lora" / "final"]:
        assert (folder / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(p.name for p in (run / "lora" / "checkpoint-2").iterdir()) == [
        "pytorch_lora_weights.safetensors", "training_state.pt"]
    assert not [p for p in (run / "lora").iterdir() if p.name.startswith(".")]  # no temporary leftovers
    manifest = json.loads((run / "generator" / "generator.json").read_text())
    assert manifest["family"] == "lora_flash" and manifest["lora"] == "pytorch_lora_weights.safetensors"
    assert manifest["discrete_timesteps"]["8"] == [999, 879, 759, 639, 499, 379, 259, 139]
    assert Path(manifest["base_model"]) == tiny_sd_path.resolve()

    # every drawn timestep is on the 2/4/8-step LCM grid; Min-SNR-5 only touches t=139 (SNR 5.4) there
    assert len(recorded_losses) == 8  # 4 optimiser steps x 2 micro-batches
    drawn = {t for ts, _ in recorded_losses for t in ts}
    assert drawn <= GRID_248
    for ts, weight in recorded_losses:
        assert weight == pytest.approx(0.930, abs=0.01) if ts == [139] else weight == pytest.approx(1.0)

    # a kill after checkpoint 2: the rerun resumes there and ends on exactly the same LoRA; the checkpoint
    # is renamed to the zero-padded name older versions wrote (checkpoint-0000002), which must still resume
    uninterrupted = lora_file(run / "lora" / "final")
    shutil.rmtree(run / "lora" / "checkpoint-4")
    shutil.rmtree(run / "lora" / "final")
    (run / "lora" / "checkpoint-2").rename(run / "lora" / "checkpoint-0000002")
    recorded_losses.clear()
    resumed = train(cfg)
    assert resumed.resumed_from == run / "lora" / "checkpoint-0000002" and resumed.global_step == 4
    assert (run / "lora" / "checkpoint-4").is_dir()
    assert len(recorded_losses) == 4  # only the last 2 optimiser steps ran again
    again = lora_file(run / "lora" / "final")
    assert again.keys() == uninterrupted.keys()
    for key in again:
        torch.testing.assert_close(again[key], uninterrupted[key], rtol=0, atol=1e-6)


def test_uniform_timesteps_without_min_snr_and_the_lora_loads_in_diffusers(tiny_sd_path, data_root, tmp_path,
                                                                            recorded_losses):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    cfg = tiny_config(tiny_sd_path, data_root, tmp_path, use_discrete_timesteps=False, snr_gamma=0.0, max_steps=3,
                      checkpointing_steps=10, learning_rate=5e-3, precision="bf16")
    result = train(cfg)
    assert result.global_step == 3 and list_checkpoints(tmp_path / "run" / "lora") == []
    drawn = [t for ts, _ in recorded_losses for t in ts]
    assert len(drawn) == 6 and not set(drawn) <= GRID_248
    assert all(weight == 1.0 for _, weight in recorded_losses)  # weighting off

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)

    def sample():
        return pipe("a cat", num_inference_steps=2, guidance_scale=0, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    before = sample()
    pipe.load_lora_weights(result.final_dir)  # the diffusers reader, straight from the run folder
    after = sample()
    assert (after - before).abs().max() > 1e-4


def test_resume_refuses_other_options_and_never(tiny_sd_path, data_root, tmp_path):
    cfg = tiny_config(tiny_sd_path, data_root, tmp_path, max_steps=2, checkpointing_steps=1,
                      gradient_accumulation_steps=1)
    train(cfg)
    with pytest.raises(ConfigError, match="lora_rank"):
        train(tiny_config(tiny_sd_path, data_root, tmp_path, max_steps=2, checkpointing_steps=1,
                          gradient_accumulation_steps=1, lora_rank=8))
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(tiny_config(tiny_sd_path, data_root, tmp_path, max_steps=2, resume="never"))


def test_training_data_sources(tmp_path, data_root):
    """COCO captions by default; --data-dir in both local layouts."""
    from distill_lora_flash.data import training_dataset

    for i, colour in enumerate(("red", "blue")):
        (tmp_path / "pairs" / "images").mkdir(parents=True, exist_ok=True)
        (tmp_path / "pairs" / "captions").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), colour).save(tmp_path / "pairs" / "images" / f"{i}.png")
        (tmp_path / "pairs" / "captions" / f"{i}.txt").write_text(f"a {colour} square\n")
        (tmp_path / "meta").mkdir(exist_ok=True)
        Image.new("RGB", (40, 30), colour).save(tmp_path / "meta" / f"{i}.png")
    (tmp_path / "meta" / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{i}.png", "text": f"a {c} square"}) + "\n"
                for i, c in enumerate(("red", "blue"))))
    for layout in ("pairs", "meta"):
        ds = training_dataset(TrainConfig(data_dir=tmp_path / layout, resolution=16))
        sample = ds[0]
        assert sample["pixel_values"].shape == (3, 16, 16) and sample["caption"] == "a red square"
    coco = training_dataset(TrainConfig(data_root=data_root, resolution=16, max_train_samples=3))
    assert len(coco) == 3 and coco.stats()["num_images"] == 3
    # augmentation is a function of (seed, epoch, index): repeatable, and it does not consume the global RNG
    flip = training_dataset(TrainConfig(data_root=data_root, resolution=16, max_train_samples=3, random_flip=True))
    state = torch.get_rng_state()
    first = flip[1]["pixel_values"]
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(flip[1]["pixel_values"], first)


def test_cifar10_data_source_captions_with_the_reference_models_training_templates(data_root):
    """--data-source cifar10: 32 px CIFAR-10 train images whose caption is one of their class's training templates
    (never a held-out one), drawn per (seed, epoch, index); a wrong resolution or a second data option is refused."""
    from distill_common.data.cifar10 import open_cifar10
    from distill_common.reference_sd.captions import class_captions, class_of_caption
    from distill_lora_flash.data import training_dataset

    ds = training_dataset(TrainConfig(data_root=data_root, data_source="cifar10", resolution=32, max_train_samples=8))
    labels = open_cifar10(data_root, "train", limit=8, show_progress=False).labels
    train_templates, held_out = class_captions("train"), class_captions("held_out")
    assert len(ds) == 8
    for i in range(8):
        sample = ds[i]
        assert sample["pixel_values"].shape == (3, 32, 32) and -1 <= sample["pixel_values"].min()
        assert sample["caption"] in train_templates[labels[i]] and class_of_caption(sample["caption"]) == labels[i]
        assert not any(sample["caption"] in row for row in held_out)
    drawn = {training_dataset(TrainConfig(data_root=data_root, data_source="cifar10", resolution=32,
                                          max_train_samples=8, seed=seed))[0]["caption"] for seed in range(12)}
    assert len(drawn) > 1  # the template is drawn, not fixed
    with pytest.raises(ConfigError, match="--resolution 32"):
        TrainConfig(data_source="cifar10").validate()
    with pytest.raises(ConfigError, match="--data-source"):
        TrainConfig(data_source="cifar10", resolution=32, data_dir=Path("x")).validate()
    with pytest.raises(ConfigError, match="coco, cifar10"):
        TrainConfig(data_source="imagenet").validate()


@pytest.mark.slow
def test_cli_training_logs_validation_and_registers_a_generator(tiny_sd_path, data_root, tmp_path, mlflow_uri,
                                                                 capsys, monkeypatch):
    from distill_common.cli import run_app
    from distill_common.generator import load_generator
    from distill_common.tracking import list_versions
    from distill_lora_flash.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DISTILL_DATA_ROOT", str(data_root))
    prompts = tmp_path / "val.txt"
    prompts.write_text("a cat\n")
    try:
        run_app(app, ["train", "--base-model", str(tiny_sd_path), "--output_dir", str(tmp_path / "runs"),
                      "--run_name", "cli", "--resolution", "64", "--max_train_steps", "2",
                      "--gradient_accumulation_steps", "1", "--checkpointing-steps", "1", "--validation-steps", "1",
                      "--validation-teacher-steps", "2", "--validation-step-counts", "2", "4",
                      "--validation-prompts-file", str(prompts), "--max-train-samples", "2",
                      "--use-discrete-timesteps", "--learning-rate", "1e-3", "--register-name", "flash_test"])
    except SystemExit as exc:
        assert exc.code in (0, None), capsys.readouterr().err
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "cli"
    assert "registered flash_test version 1" in out
    assert sorted(p.name for p in (run / "validation").iterdir()) == ["step_0000001.png", "step_0000002.png"]
    assert (run / "mlflow_run_id").is_file()
    versions = list_versions("flash_test")
    assert len(versions) == 1
    gen = load_generator("models:/flash_test/1", device="cpu")
    assert (gen.family, gen.condition_kind, gen.resolution) == ("lora_flash", "prompt", 64)
    images = gen.generate(["a cat", "a dog"], 2, [0, 1])
    assert images.shape == (2, 3, 64, 64)

    import mlflow.pyfunc
    import pandas as pd

    from distill_common.tracking import decode_image

    model = mlflow.pyfunc.load_model("models:/flash_test/1")
    out = model.predict(pd.DataFrame({"condition": ["a cat"], "seed": [0], "steps": [2]}))
    assert decode_image(out["image"][0]).size == (64, 64)
