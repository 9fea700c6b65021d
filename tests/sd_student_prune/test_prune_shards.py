"""``prune train --data-shards``: the student trains on streamed WebDataset caption shards (written here from the
shared COCO subset), checkpoints the shard position and resumes exactly after a kill."""

from __future__ import annotations

import pytest
import torch
from caption_shards import write_caption_shards
from safetensors.torch import load_file
from typer.testing import CliRunner

from distill_common.checkpoint import list_checkpoints, load_training_state
from distill_common.errors import ConfigError
from distill_sd_prune.cli import app
from distill_sd_prune.training.config import TrainConfig
from distill_sd_prune.training.loop import train


class Killed(KeyboardInterrupt):
    pass


@pytest.fixture(scope="module")
def shards(coco_root, tmp_path_factory):
    return write_caption_shards(coco_root, tmp_path_factory.mktemp("prune_shards"), num_shards=2, per_shard=4,
                                corrupt=((0, 2),))


def shard_config(tiny_sd_path, shards, out) -> TrainConfig:
    cfg = TrainConfig(recipe="v1", teacher_model=str(tiny_sd_path), output_dir=out, max_steps=3, batch_size=2,
                      checkpoint_every=1, track=False)
    cfg.data.shards = shards
    cfg.data.center_crop, cfg.data.random_flip = False, True  # augmentation must resume exactly too
    return cfg


def test_streamed_training_resumes_exactly_after_a_kill(tiny_sd_path, shards, tmp_path):
    straight = train(shard_config(tiny_sd_path, shards, tmp_path / "straight"), show_progress=False)
    checkpoints = list_checkpoints(tmp_path / "straight" / "checkpoints")
    (position,) = load_training_state(checkpoints[-1][1])["data"]
    assert position["num_yielded"] == 6 and position["world_size"] == 1

    def kill_at_two(step, metrics):
        if step == 2:
            raise Killed()

    with pytest.raises(Killed):
        train(shard_config(tiny_sd_path, shards, tmp_path / "killed"), on_step=kill_at_two, show_progress=False)
    resumed = train(shard_config(tiny_sd_path, shards, tmp_path / "killed"), show_progress=False)
    assert resumed.resumed_from == 2 and resumed.steps == 3
    a = load_file(str(straight.final_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(resumed.final_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_shard_options_conflicts_are_one_line(tiny_sd_path, shards, tmp_path, capsys):
    from distill_common.cli import run_app

    for flag, value in (("cache", True), ("limit", 3), ("num_workers", 2)):
        cfg = shard_config(tiny_sd_path, shards, tmp_path)
        setattr(cfg.data, flag, value)
        with pytest.raises(ConfigError, match="does not apply to --data-shards"):
            cfg.validate()
    with pytest.raises(SystemExit) as exit_info:
        run_app(app, ["train", "--data-shards", str(tmp_path / "{0..3}.tar"), "--output-dir", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert exit_info.value.code != 0 and "4 of 4 shard files do not exist" in err and len(err.strip().splitlines()) <= 3
    assert "--data-shards" in CliRunner().invoke(app, ["train", "--help-all"], env={"COLUMNS": "200"}).output
