"""``distill flash generate`` on the tiny SD pipeline: exact file names, summary, seeds, fast failures."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill_common.cli import run_app
from distill_lora_flash.cli import app


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run ``distill flash ARGS`` in-process as the console script would; returns (exit code, stdout, stderr)."""
    code = 0
    try:
        run_app(app, args)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


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
                                 "--batch_size", "2", "--compare_baseline", "--baseline_steps", "3",
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
