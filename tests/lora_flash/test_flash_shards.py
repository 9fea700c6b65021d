"""``flash train --data-shards``: streamed WebDataset caption shards (written here from the shared COCO subset),
the shard position in every checkpoint, and an exact resume."""

from __future__ import annotations

import shutil

import pytest
import torch
from caption_shards import write_caption_shards
from flash_helpers import run_cli
from safetensors.torch import load_file
from test_flash_train import tiny_config

from distill_common.checkpoint import load_training_state
from distill_lora_flash.training import train


@pytest.fixture(scope="module")
def shards(coco_root, tmp_path_factory):
    return write_caption_shards(coco_root, tmp_path_factory.mktemp("flash_shards"), num_shards=3, per_shard=3,
                                corrupt=((0, 1), (1, 1), (2, 1)))


@pytest.mark.parametrize("method", ["lcm"])
def test_streamed_training_checkpoints_the_shard_position_and_resumes_exactly(tiny_sd_path, data_root, tmp_path,
                                                                              shards, method):
    cfg = tiny_config(tiny_sd_path, data_root, tmp_path, data_shards=shards, max_train_samples=None, method=method,
                      max_steps=4, checkpointing_steps=2, gradient_accumulation_steps=2)
    cfg.validate()
    result = train(cfg)
    run = tmp_path / "run"
    # 8 samples were consumed; every shard has one corrupt sample, so at least 2 were skipped and counted
    assert result.metrics["data_corrupt"] >= 2
    state = load_training_state(run / "lora" / "checkpoint-2")
    (position,) = state["data"]
    assert position["epoch"] == 0 and position["num_yielded"] == 4 and position["world_size"] == 1
    final = load_file(run / "lora" / "final" / "pytorch_lora_weights.safetensors")

    shutil.rmtree(run / "lora" / "checkpoint-4")
    shutil.rmtree(run / "lora" / "final")
    resumed = train(cfg)
    assert resumed.resumed_from == run / "lora" / "checkpoint-2"
    assert load_training_state(run / "lora" / "checkpoint-4")["data"][0]["num_yielded"] == 8
    again = load_file(run / "lora" / "final" / "pytorch_lora_weights.safetensors")
    for key in final:
        torch.testing.assert_close(again[key], final[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("extra, needle", [
    (["--data-dir", "x"], "--data-shards or --dataset-name"),
    (["--dataloader-num-workers", "2"], "--dataloader-num-workers 0"),
    (["--max-train-samples", "3"], "--max-train-samples"),
])
def test_shard_option_errors_are_one_line(shards, tmp_path, capsys, extra, needle):
    code, _, err = run_cli(["train", "--output-dir", str(tmp_path), "--data-shards", shards, *extra], capsys)
    assert code != 0 and needle in err and len(err.strip().splitlines()) <= 3, err


def test_missing_shards_fail_in_one_line(tmp_path, capsys):
    code, _, err = run_cli(["train", "--output-dir", str(tmp_path), "--data-shards",
                            str(tmp_path / "{00000..00009}.tar")], capsys)
    assert code != 0 and "10 of 10 shard files do not exist" in err and len(err.strip().splitlines()) <= 3, err
