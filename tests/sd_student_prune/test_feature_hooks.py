"""Forward hooks record the named blocks' outputs with the expected shapes, on the bare model, under
Accelerate's ``prepare`` and under DistributedDataParallel (``module.`` prefixes)."""

from __future__ import annotations

import os

import pytest
import torch

from distill_common.errors import ConfigError
from distill_sd_prune.architecture import build_student, feature_block_pairs
from distill_sd_prune.losses import FeatureRecorder, resolve_module
from distill_sd_prune.training.student_model import DistillStudent

# tiny teacher: channels (32, 32, 64, 64), latent 16 -> down 8, 4, 2, 2; mid 2; up 4, 8, 16, 16
TEACHER_SHAPES = {
    "down_blocks.0": (2, 32, 8, 8),
    "down_blocks.1": (2, 32, 4, 4),
    "down_blocks.2": (2, 64, 2, 2),
    "down_blocks.3": (2, 64, 2, 2),
    "mid_block": (2, 64, 2, 2),
    "up_blocks.0": (2, 64, 4, 4),
    "up_blocks.1": (2, 64, 8, 8),
    "up_blocks.2": (2, 32, 16, 16),
    "up_blocks.3": (2, 32, 16, 16),
    "down_blocks.2.attentions.1": (2, 64, 4, 4),
}


def shapes(recorder):
    return {k: tuple(v.shape) for k, v in recorder.features.items()}


def test_recorder_captures_block_outputs(teacher_unet, unet_inputs):
    with FeatureRecorder(teacher_unet, list(TEACHER_SHAPES), detach=True) as recorder:
        with torch.no_grad():
            teacher_unet(*unet_inputs)
        assert shapes(recorder) == TEACHER_SHAPES
        assert not any(t.requires_grad for t in recorder.features.values())
    recorder.clear()
    with torch.no_grad():
        teacher_unet(*unet_inputs)
    assert recorder.features == {}  # hooks are gone after the context
    with pytest.raises(ConfigError, match="down_blocks"):
        FeatureRecorder(teacher_unet, ["down_block.0"])


def test_student_features_pair_with_the_teachers_at_equal_shapes(teacher_unet, unet_inputs):
    build = build_student(teacher_unet, "sd_tiny", 0.5)
    pairs = feature_block_pairs(build.unet, teacher_unet.config, "sd_tiny")
    assert pairs["down_blocks.2"] == "down_blocks.2.attentions.1" and pairs["up_blocks.0"] == "up_blocks.1"
    model = DistillStudent(build.unet, pairs, teacher_unet)
    assert len(model.projections) == len(pairs)  # half width everywhere: every pair needs a ConvProjection
    with FeatureRecorder(teacher_unet, pairs.values(), detach=True) as teacher_rec:
        with torch.no_grad():
            teacher_unet(*unet_inputs)
        prediction, features = model(*unet_inputs)
    assert prediction.shape == (2, 4, 16, 16)
    for s_name, t_name in pairs.items():
        assert features[s_name].shape == teacher_rec.features[t_name].shape == TEACHER_SHAPES[t_name]
        assert features[s_name].requires_grad


def test_hooks_under_accelerate_prepare(teacher_unet, unet_inputs):
    from accelerate.state import AcceleratorState

    from distill_common.runtime import make_accelerator

    build = build_student(teacher_unet, "sd_small")
    pairs = feature_block_pairs(build.unet, teacher_unet.config, "sd_small")
    accelerator = make_accelerator("bf16", device="cpu")  # resets a state left by earlier tests
    model = accelerator.prepare(DistillStudent(build.unet, pairs, teacher_unet))
    names = ["unet.down_blocks.0", "module.unet.up_blocks.3", "unet.mid_block"]
    try:
        with FeatureRecorder(model, names) as recorder:
            prediction, features = model(*unet_inputs)
    finally:
        AcceleratorState._reset_state()  # do not leak bf16 into later tests
    assert (
        recorder.features["unet.mid_block"].dtype == torch.bfloat16
    )  # the prepared forward runs under autocast
    assert shapes(recorder) == {
        "unet.down_blocks.0": (2, 32, 8, 8),
        "unet.up_blocks.3": (2, 32, 16, 16),
        "unet.mid_block": (2, 64, 2, 2),
    }
    assert {k: tuple(v.shape) for k, v in features.items()} == {
        k: TEACHER_SHAPES[v] for k, v in pairs.items()
    }


def test_hooks_under_distributed_data_parallel(teacher_unet, unet_inputs, tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    build = build_student(teacher_unet, "sd_tiny")
    pairs = feature_block_pairs(build.unet, teacher_unet.config, "sd_tiny")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(DistillStudent(build.unet, pairs, teacher_unet))
        assert resolve_module(ddp, "module.unet.down_blocks.1") is build.unet.down_blocks[1]
        assert resolve_module(ddp, "unet.down_blocks.1") is build.unet.down_blocks[1]
        with FeatureRecorder(ddp, ["module.unet.up_blocks.0", "unet.down_blocks.2"]) as recorder:
            prediction, features = ddp(*unet_inputs)
            (prediction.square().mean() + sum(f.square().mean() for f in features.values())).backward()
        assert shapes(recorder) == {"unet.up_blocks.0": (2, 64, 8, 8), "unet.down_blocks.2": (2, 64, 4, 4)}
        assert set(features) == set(pairs)
        assert build.unet.conv_in.weight.grad is not None
    finally:
        dist.destroy_process_group()
