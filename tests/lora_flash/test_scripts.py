"""The seed's shell entry points ``scripts/train_lora.sh`` and ``scripts/eval_lora.sh``, run as a user runs them
(a subprocess, the seed's flag spellings) on the tiny SD pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def run_script(name: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, DISTILL_PYTHON=sys.executable, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([str(REPO / "scripts" / name), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_train_then_eval_scripts_with_the_seed_flags(tiny_sd_path, data_root, tmp_path):
    run_script("train_lora.sh", [
        "--base_model", str(tiny_sd_path), "--data_root", str(data_root), "--max_train_samples", "2",
        "--resolution", "64", "--train_batch_size", "1", "--grad_accum", "2", "--max_train_steps", "2",
        "--checkpointing_steps", "1", "--validation_steps", "0", "--validation_step_counts", "2",
        "--validation_teacher_steps", "2", "--no-track", "--device", "cpu"], tmp_path)
    run = tmp_path / "checkpoints" / "flash-lora"  # seed 001's --output_dir default: ./checkpoints
    assert sorted(p.name for p in (run / "lora").iterdir()) == ["checkpoint-1", "checkpoint-2", "final"]
    assert yaml.safe_load((run / "train_config.yaml").read_text())["gradient_accumulation_steps"] == 2

    out = tmp_path / "eval"
    proc = run_script("eval_lora.sh", [
        "--base_model", str(tiny_sd_path), "--lora_path", str(run / "lora" / "final"), "--prompt", "a red cube",
        "--steps", "2 4", "--baseline_steps", "2", "--timing_repeats", "1", "--batch_size", "1",
        "--clip_model", "none", "--no-track", "--output_dir", str(out), "--device", "cpu"], tmp_path)
    report = json.loads((out / "flash_eval.json").read_text())
    assert {(r["model"], r["steps"]) for r in report["rows"]} == {("baseline", 2), ("flash", 2), ("flash", 4)}
    assert (out / "prompt.txt").read_text() == "a red cube\n" and "a red cube" in report["meta"]["prompts"]
    assert all(r["num_images"] == 1 for r in report["rows"])
    assert "Flash LoRA evaluation" in proc.stdout
