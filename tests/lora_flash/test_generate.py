"""``distill flash generate`` on the tiny SD pipeline: exact file names, summary, seeds, fast failures."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flash_helpers import files_under, run_cli
from PIL import Image


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_generate_writes_exactly_the_seed_file_names(tiny_sd_path, tiny_lora, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_cli(["generate", "--base-model", str(tiny_sd_path), "--lora_path", str(tiny_lora),
                                 "--steps", "2", "4", "--num_images", "2", "--batch-size", "2", "--seed", "7",
                                 "--outdir", str(out), "--clip-model", "none"], capsys)
    assert code == 0, err
    assert files_under(out) == {
        "image_s2_i0_seed7.png", "image_s2_i1_seed7.png", "image_s4_i0_seed7.png", "image_s4_i1_seed7.png",
        "grid_s2_seed7.png", "grid_s4_seed7.png", "summary.csv", "summary.json", "summary.md",
    }
    assert Image.open(out / "image_s2_i0_seed7.png").size == (64, 64)
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["steps"] for r in rows] == ["2", "4"]
    assert all(float(r["time_per_image_s"]) > 0 and r["speedup"] == "" and r["clip_score"] == "" for r in rows)
    assert "CLIPScore n/a" in stdout and "Flash LoRA vs baseline" in stdout


def test_generate_with_baseline_writes_comparisons_and_the_summary(tiny_sd_path, tiny_lora, tiny_clip_path,
                                                                   prompts_file, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run_cli(["generate", "--base-model", str(tiny_sd_path), "--lora-path", str(tiny_lora),
                                 "--prompts_file", str(prompts_file), "--steps", "2,4", "--num-images", "1",
                                 "--batch_size", "2", "--compare_baseline", "--baseline_steps", "3", "--seed", "0",
                                 "--outdir", str(out), "--clip_model", str(tiny_clip_path)], capsys)
    assert code == 0, err
    assert files_under(out) == {
        "image_s2_i0_seed0.png", "image_s2_i1_seed0.png", "image_s4_i0_seed0.png", "image_s4_i1_seed0.png",
        "grid_s2_seed0.png", "grid_s4_seed0.png",
        "baseline/baseline_s3_i0_seed0.png", "baseline/baseline_s3_i1_seed0.png", "baseline/grid_baseline_s3_seed0.png",
        "compare_baseline3_flash2_seed0.png", "compare_baseline3_flash4_seed0.png",
        "summary.csv", "summary.json", "summary.md",
    }
    # baseline top row, Flash bottom row
    compare = png(out / "compare_baseline3_flash2_seed0.png")
    grid_pad = 2
    top_left = compare[grid_pad:grid_pad + 64, grid_pad:grid_pad + 64]
    bottom_left = compare[2 * grid_pad + 64:2 * grid_pad + 128, grid_pad:grid_pad + 64]
    np.testing.assert_array_equal(top_left, png(out / "baseline/baseline_s3_i0_seed0.png"))
    np.testing.assert_array_equal(bottom_left, png(out / "image_s2_i0_seed0.png"))
    assert np.abs(top_left - bottom_left).max() > 0  # the LoRA and the sampler change the image

    summary = json.loads((out / "summary.json").read_text())
    rows = {(r["configuration"].split()[0], r["steps"]): r for r in summary["rows"]}
    base, s2, s4 = rows[("baseline", 3)], rows[("flash", 2)], rows[("flash", 4)]
    assert (base["unet_calls"], base["unet_rows"]) == (3, 6)  # CFG doubles the batch rows
    assert (s2["unet_calls"], s2["unet_rows"]) == (2, 2)
    assert base["speedup"] == pytest.approx(1.0)
    for row in (s2, s4):
        assert row["speedup"] == pytest.approx(base["time_per_image_s"] / row["time_per_image_s"])
        assert 0 <= row["clip_score"] <= 100
        assert row["quality_retention"] == pytest.approx(row["clip_score"] / base["clip_score"])
    assert summary["meta"]["clip_model"] == str(tiny_clip_path)


def test_each_image_depends_only_on_its_seed(tiny_sd_path, tiny_lora):
    """One seed per image: batch size and neighbours do not change an image; LCM noise is seeded too."""
    from distill_lora_flash.generator import FlashGenerator
    from distill_lora_flash.loading import LoraSource, apply_lora, load_base_pipeline
    from distill_lora_flash.schedule import FlashSchedule

    pipe = load_base_pipeline(tiny_sd_path)
    apply_lora(pipe, LoraSource(tiny_lora / "pytorch_lora_weights.safetensors", "tiny"))
    gen = FlashGenerator(pipe, FlashSchedule.from_scheduler(pipe.scheduler))
    together = gen.generate(["a cat", "a dog", "a cat"], 4, [3, 4, 5])
    alone = gen.generate(["a dog"], 4, [4])
    assert together.shape == (3, 3, 64, 64) and 0 <= together.min() and together.max() <= 1
    torch.testing.assert_close(together[1:2], alone, atol=1e-5, rtol=0)
    assert (together[0] - together[2]).abs().max() > 1e-3  # same prompt, other seed


def test_fused_lora_gives_the_unfused_images(tiny_sd_path, tiny_lora):
    from distill_lora_flash.generator import FlashGenerator
    from distill_lora_flash.loading import LoraSource, apply_lora, load_base_pipeline
    from distill_lora_flash.schedule import FlashSchedule

    lora = LoraSource(tiny_lora / "pytorch_lora_weights.safetensors", "tiny")
    images = []
    for fuse in (False, True):
        pipe = load_base_pipeline(tiny_sd_path)
        apply_lora(pipe, lora, fuse=fuse)
        images.append(FlashGenerator(pipe, FlashSchedule.from_scheduler(pipe.scheduler)).generate(["a cat"], 2, [0]))
        has_adapter = any("lora" in name for name, _ in pipe.unet.named_parameters())
        assert has_adapter != fuse  # fused: merged into the weights, adapter layers unloaded
    torch.testing.assert_close(images[0], images[1], atol=2e-3, rtol=0)


def test_unreachable_lora_id_fails_fast_with_one_line(tiny_sd_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hf_cache"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hf_cache"))
    start = time.perf_counter()
    code, _, err = run_cli(["generate", "--base-model", str(tiny_sd_path), "--lora-id", "jasperai/flash-sd",
                            "--outdir", str(tmp_path / "out")], capsys)
    elapsed = time.perf_counter() - start
    assert code == 2 and elapsed < 10
    line = " ".join(err.split())  # rich may wrap the single message
    assert err.strip().startswith("error:") and err.count("error:") == 1
    assert "jasperai/flash-sd" in line and "offline" in line and "--lora-path" in line
    assert not (tmp_path / "out").exists()


def test_unreachable_base_model_fails_fast(tiny_lora, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    code, _, err = run_cli(["generate", "--base-model", "someone/not-cached-sd15", "--lora-path", str(tiny_lora),
                            "--outdir", str(tmp_path / "out")], capsys)
    assert code == 2 and time.perf_counter() - start < 10
    line = " ".join(err.split())
    assert "someone/not-cached-sd15" in line and "local" in line and "hf download" in line


def test_bad_lora_path_and_bad_options(tiny_sd_path, tmp_path, capsys):
    code, _, err = run_cli(["generate", "--base-model", str(tiny_sd_path), "--lora-path", str(tmp_path / "nope")],
                           capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli(["generate", "--steps", "0"], capsys)
    assert code == 2 and "positive" in err


def test_dry_run_shows_seed_options(capsys):
    code, out, _ = run_cli(["generate", "--num_images", "3", "--compare_baseline", "--baseline_outdir", "b",
                            "--dry-run"], capsys)
    assert code == 0
    assert "num_images: 3" in out and "compare_baseline: true" in out and "baseline_outdir: b" in out


def test_without_seed_a_seed_is_drawn_logged_and_left_out_of_the_file_names(tiny_sd_path, tiny_lora, tmp_path,
                                                                            capsys):
    """Seed 001's default: no --seed. The drawn seed is printed and recorded, and repeating it gives the same image."""
    out = tmp_path / "drawn"
    code, stdout, err = run_cli(["generate", "--base-model", str(tiny_sd_path), "--lora-path", str(tiny_lora),
                                 "--steps", "2", "--outdir", str(out), "--clip-model", "none"], capsys)
    assert code == 0, err
    assert files_under(out) == {"image_s2_i0.png", "grid_s2.png", "summary.csv", "summary.json", "summary.md"}
    meta = json.loads((out / "summary.json").read_text())["meta"]
    seed = meta["seed"]
    assert meta["seed_drawn"] is True and f"seed {seed} (drawn" in " ".join(stdout.split())
    code, _, err = run_cli(["generate", "--base-model", str(tiny_sd_path), "--lora-path", str(tiny_lora),
                            "--steps", "2", "--seed", str(seed), "--outdir", str(tmp_path / "again"),
                            "--clip-model", "none"], capsys)
    assert code == 0, err
    np.testing.assert_array_equal(png(out / "image_s2_i0.png"), png(tmp_path / "again" / f"image_s2_i0_seed{seed}.png"))


def test_seed_001_defaults(capsys):
    code, out, _ = run_cli(["generate", "--dry-run"], capsys)
    assert code == 0 and "outdir: outputs\n" in out and "num_images: 1\n" in out and "seed: null" in out
    code, out, _ = run_cli(["train", "--grad_accum", "3", "--dry-run"], capsys)
    assert code == 0 and "output_dir: checkpoints\n" in out and "gradient_accumulation_steps: 3" in out


def test_demo_prompts_and_the_seed_000_preset(tmp_path, capsys, monkeypatch):
    import yaml

    from distill_common.data.prompts import load_prompts_file
    from distill_lora_flash.prompts import demo_prompts_file

    prompts = load_prompts_file(demo_prompts_file())
    assert len(prompts) == 20 and len(set(prompts)) == 20
    monkeypatch.chdir(tmp_path)  # no demo_prompts.txt here: the packaged one is used
    code, out, err = run_cli(["eval", "--preset", "demo", "--dry-run"], capsys)
    assert code == 0, err
    cfg = yaml.safe_load(out)
    assert Path(cfg["prompts_file"]) == demo_prompts_file()
    assert (cfg["num_images"], cfg["steps"], cfg["baseline_steps"], cfg["baseline_guidance"]) == (10, [2, 4, 8], 30, 7.5)
    (tmp_path / "demo_prompts.txt").write_text("my own prompt\n")  # a local file of that name wins
    code, out, _ = run_cli(["generate", "--prompts_file", "demo_prompts.txt", "--dry-run"], capsys)
    assert code == 0 and "prompts_file: demo_prompts.txt" in out
    code, _, err = run_cli(["eval", "--preset", "demo", "--prompt", "a cat"], capsys)
    assert code == 2 and "either --prompt or --prompts-file" in err
