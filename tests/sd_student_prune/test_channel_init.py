"""Channel narrowing: slicing and projection give the teacher's outputs where widths match, cut tensors per
segment (heads, GEGLU halves, [hidden | skip] inputs, sinusoid frequencies) otherwise; ConvProjection inverts
slicing at the start."""

from __future__ import annotations

import pytest
import torch
from prune_helpers import run_unet

from distill_sd_prune.architecture import ConvProjection, build_student


@pytest.mark.parametrize("init", ["slice", "project"])
def test_equal_width_init_reproduces_the_teacher(init, teacher_unet, unet_inputs):
    same = build_student(teacher_unet, "none", 1.0, init)
    assert torch.equal(run_unet(same.unet, unet_inputs), run_unet(teacher_unet, unet_inputs))
    pruned = build_student(teacher_unet, "sd_small", 1.0, init)
    reference = build_student(teacher_unet, "sd_small", 1.0, "slice")
    assert torch.equal(run_unet(pruned.unet, unet_inputs), run_unet(reference.unet, unet_inputs))
    assert pruned.transfer.counts()["narrowed"] == 0


def test_slicing_cuts_each_segment(teacher_unet):
    s = build_student(teacher_unet, "none", 0.5, "slice").unet.state_dict()
    t = teacher_unet.state_dict()
    assert torch.equal(s["conv_in.weight"], t["conv_in.weight"][:16])
    # 2 heads: teacher head dim 16, student 8 -> rows 0..7 and 16..23
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert torch.equal(s[q], torch.cat([t[q][0:8, :16], t[q][16:24, :16]]))
    out = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight"
    assert torch.equal(s[out], torch.cat([t[out][:16, 0:8], t[out][:16, 16:24]], dim=1))
    # GEGLU value | gate halves: 2 x 128 -> 2 x 64
    geglu = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"
    assert torch.equal(s[geglu], torch.cat([t[geglu][0:64, :16], t[geglu][128:192, :16]]))
    conv1 = "up_blocks.3.resnets.0.conv1.weight"  # input = [hidden 32 | skip 32] -> [16 | 16]
    assert torch.equal(s[conv1], torch.cat([t[conv1][:16, 0:16], t[conv1][:16, 32:48]], dim=1))


def test_slicing_keeps_the_exact_timestep_frequencies(teacher_unet):
    student = build_student(teacher_unet, "none", 0.5, "slice").unet
    timesteps = torch.tensor([3, 250, 999])
    t_features, s_features = (
        teacher_unet.time_proj(timesteps),
        student.time_proj(timesteps),
    )  # (3, 32), (3, 16)
    picked = torch.cat(
        [torch.arange(0, 16, 2), torch.arange(16, 32, 2)]
    )  # cos | sin halves, every other frequency
    torch.testing.assert_close(s_features, t_features[:, picked], rtol=0, atol=1e-6)
    w_s, w_t = student.time_embedding.linear_1.weight, teacher_unet.time_embedding.linear_1.weight
    assert torch.equal(w_s, w_t[:64][:, picked])


def test_projection_averages_channel_groups(teacher_unet):
    s = build_student(teacher_unet, "none", 0.5, "project").unet.state_dict()
    t = teacher_unet.state_dict()
    torch.testing.assert_close(
        s["conv_in.bias"], (t["conv_in.bias"][0::2] + t["conv_in.bias"][1::2]) / 2**0.5
    )
    torch.testing.assert_close(
        s["conv_norm_out.weight"], (t["conv_norm_out.weight"][0::2] + t["conv_norm_out.weight"][1::2]) / 2
    )
    assert torch.equal(s["conv_out.bias"], t["conv_out.bias"])


@pytest.mark.parametrize("plan", ["sd_small", "sd_tiny"])
def test_narrow_pruned_students_run(plan, teacher_unet, unet_inputs):
    for init in ("slice", "project", "random"):
        out = run_unet(build_student(teacher_unet, plan, 0.5, init).unet, unet_inputs)
        assert out.shape == (2, 4, 16, 16) and torch.isfinite(out).all()


def test_conv_projection_is_identity_at_equal_width_and_undoes_slicing():
    h = torch.randn(2, 32, 4, 4)
    torch.testing.assert_close(ConvProjection(32, 32)(h), h)
    back = ConvProjection(16, 32, "slice")(h[:, :16])
    torch.testing.assert_close(back[:, :16], h[:, :16])
    assert torch.count_nonzero(back[:, 16:]) == 0
    with pytest.raises(ValueError, match="expects"):
        ConvProjection(16, 32)(h)
