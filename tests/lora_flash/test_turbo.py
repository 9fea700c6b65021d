"""``distill flash turbo`` on tiny SD-Turbo and SDXL-Turbo architectures: text-to-image and image-to-image through
diffusers' AutoPipelines, the model's own scheduler, the summary table, steps x strength refusal, offline failure."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from flash_helpers import files_under, run_cli
from PIL import Image

ARCH = {"sd": ("tiny_sd_turbo_path", "StableDiffusionPipeline", "EulerDiscrete"),
        "sdxl": ("tiny_sdxl_turbo_path", "StableDiffusionXLPipeline", "EulerAncestralDiscrete")}


@pytest.mark.parametrize("arch", ["sd", "sdxl"])
def test_turbo_text_to_image(arch, request, tiny_clip_path, tmp_path, capsys):
    fixture, pipeline, sampler = ARCH[arch]
    model = request.getfixturevalue(fixture)
    out = tmp_path / "out"
    code, stdout, err = run_cli(["turbo", "--model", str(model), "--prompt", "a red cube", "--steps", "1", "2",
                                 "--num_images", "2", "--batch-size", "2", "--seed", "3", "--outdir", str(out),
                                 "--clip-model", str(tiny_clip_path)], capsys)
    assert code == 0, err
    assert files_under(out) == {"image_s1_i0_seed3.png", "image_s1_i1_seed3.png", "image_s2_i0_seed3.png",
                                "image_s2_i1_seed3.png", "grid_s1_seed3.png", "grid_s2_seed3.png",
                                "summary.csv", "summary.json", "summary.md"}
    assert Image.open(out / "image_s1_i0_seed3.png").size == (64, 64)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["pipeline"] == pipeline and summary["meta"]["mode"] == "text2img"
    for row, steps in zip(summary["rows"], (1, 2), strict=True):
        assert row["configuration"] == f"turbo text2img ({sampler})"  # the model's own scheduler
        assert (row["steps"], row["guidance"], row["unet_calls"], row["unet_rows"]) == (steps, 0.0, steps, steps)
        assert row["time_per_image_s"] > 0 and row["speedup"] is None  # no baseline asked for
        assert 0 <= row["clip_score"] <= 100
    a, b = (np.asarray(Image.open(out / f"image_s1_i{i}_seed3.png"), dtype=np.int16) for i in (0, 1))
    assert np.abs(a - b).max() > 0  # seeds 3 and 4
    assert f"{pipeline} (text2img)" in stdout  # the summary table's title


@pytest.mark.parametrize("arch", ["sd", "sdxl"])
def test_turbo_image_to_image_with_baseline(arch, request, tiny_clip_path, init_image, tmp_path, capsys):
    fixture, pipeline, sampler = ARCH[arch]
    model = request.getfixturevalue(fixture)
    out = tmp_path / "out"
    code, _, err = run_cli(["turbo", "--model", str(model), "--prompt", "a red cube", "--init-image", str(init_image),
                            "--strength", "0.5", "--steps", "2", "4", "--seed", "1", "--compare-baseline",
                            "--baseline-steps", "4", "--outdir", str(out), "--clip-model", str(tiny_clip_path)], capsys)
    assert code == 0, err
    assert files_under(out) == {"image_s2_i0_seed1.png", "image_s4_i0_seed1.png", "grid_s2_seed1.png",
                                "grid_s4_seed1.png", "baseline/baseline_s4_i0_seed1.png",
                                "baseline/grid_baseline_s4_seed1.png", "compare_baseline4_turbo2_seed1.png",
                                "compare_baseline4_turbo4_seed1.png", "summary.csv", "summary.json", "summary.md"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["pipeline"] == pipeline.replace("Pipeline", "Img2ImgPipeline")
    assert summary["meta"]["strength"] == 0.5
    base, s2, s4 = summary["rows"]
    # diffusers runs int(steps x strength) UNet steps from the noised start image; CFG doubles the rows
    assert (base["unet_calls"], base["unet_rows"], base["guidance"]) == (2, 4, 7.5)
    assert (s2["unet_calls"], s2["unet_rows"]) == (1, 1) and (s4["unet_calls"], s4["unet_rows"]) == (2, 2)
    assert s2["configuration"] == f"turbo img2img ({sampler})"
    for row in (s2, s4):
        assert row["speedup"] == pytest.approx(base["time_per_image_s"] / row["time_per_image_s"])
        assert row["quality_retention"] == pytest.approx(row["clip_score"] / base["clip_score"])
    assert Image.open(out / "image_s2_i0_seed1.png").size == (64, 64)


def test_image_to_image_follows_the_start_image_and_the_seed(tiny_sdxl_turbo_path):
    from distill_lora_flash.turbo import TurboGenerator, load_turbo_pipeline

    pipe = load_turbo_pipeline(tiny_sdxl_turbo_path)
    black, white = Image.new("RGB", (64, 64), (0, 0, 0)), Image.new("RGB", (64, 64), (255, 255, 255))
    from_black = TurboGenerator(pipe, init_image=black, strength=0.5).generate(["a cat", "a dog"], 2, [0, 1])
    from_white = TurboGenerator(pipe, init_image=white, strength=0.5).generate(["a cat", "a dog"], 2, [0, 1])
    assert from_black.shape == (2, 3, 64, 64)
    # half-noised: the start image still shows (a random VAE and UNet make the effect small, but far above the
    # 1e-5 run-to-run noise checked below)
    assert (from_white - from_black).abs().max() > 1e-3
    alone = TurboGenerator(pipe, init_image=black, strength=0.5).generate(["a dog"], 2, [1])
    torch.testing.assert_close(from_black[1:], alone, atol=1e-5, rtol=0)  # an image depends only on its seed


def test_steps_times_strength_below_one_is_refused_in_one_line(init_image, capsys):
    code, _, err = run_cli(["turbo", "--init-image", str(init_image), "--steps", "1", "--strength", "0.5"], capsys)
    line = " ".join(err.split())
    assert code == 2 and err.count("error:") == 1
    assert "steps x strength >= 1" in line and "--steps to 2" in line and "--strength to 1" in line
    code, _, err = run_cli(["turbo", "--init-image", str(init_image), "--steps", "3", "--strength", "0.3"], capsys)
    assert code == 2 and "int(3 x 0.3) = 0" in " ".join(err.split())
    code, out, _ = run_cli(["turbo", "--init-image", str(init_image), "--steps", "2", "--strength", "0.5",
                            "--dry-run"], capsys)  # the tutorial's 2 steps at strength 0.5
    assert code == 0 and "strength: 0.5" in out
    code, _, err = run_cli(["turbo", "--init-image", str(init_image), "--strength", "0"], capsys)
    assert code == 2 and "(0, 1]" in err
    code, _, err = run_cli(["turbo", "--init-image", str(init_image.parent / "missing.png")], capsys)
    assert code == 2 and "does not exist" in err


def test_default_steps_are_one_for_text_and_two_for_image_to_image(init_image):
    from distill_lora_flash.config import TurboConfig

    assert TurboConfig().step_counts == [1]
    cfg = TurboConfig(init_image=init_image)
    cfg.validate()
    assert cfg.step_counts == [2] and cfg.strength == 0.5


@pytest.mark.parametrize("hub_id", ["stabilityai/sd-turbo", "stabilityai/sdxl-turbo"])
def test_offline_hub_id_fails_fast_with_the_local_folder_hint(hub_id, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hf_cache"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hf_cache"))
    start = time.perf_counter()
    code, _, err = run_cli(["turbo", "--model", hub_id, "--outdir", str(tmp_path / "out")], capsys)
    line = " ".join(err.split())
    assert code == 2 and time.perf_counter() - start < 10 and err.count("error:") == 1
    assert hub_id in line and "offline" in line and f"hf download {hub_id}" in line and "local" in line
    assert not (tmp_path / "out").exists()


def test_the_tiny_sdxl_has_sdxl_structure(tiny_sdxl_turbo_path):
    """Two text encoders (the second with a projection) feeding a text_time-conditioned UNet, CLIP's vocabulary."""
    def config(sub: str) -> dict:
        return json.loads((tiny_sdxl_turbo_path / sub / "config.json").read_text())

    index = json.loads((tiny_sdxl_turbo_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and "safety_checker" not in index
    assert index["scheduler"] == ["diffusers", "EulerAncestralDiscreteScheduler"]
    unet, te1, te2 = config("unet"), config("text_encoder"), config("text_encoder_2")
    assert te2["architectures"] == ["CLIPTextModelWithProjection"] and te1["architectures"] == ["CLIPTextModel"]
    assert unet["addition_embed_type"] == "text_time"
    assert unet["cross_attention_dim"] == te1["hidden_size"] + te2["hidden_size"]
    assert unet["projection_class_embeddings_input_dim"] == te2["projection_dim"] + 6 * unet["addition_time_embed_dim"]
    assert te1["vocab_size"] == te2["vocab_size"] == 49408
    scheduler = json.loads((tiny_sdxl_turbo_path / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["timestep_spacing"] == "trailing"
