"""The block plans apply to any SD-family UNet from its config: the reference text-to-image model's UNet
(``REFERENCE_SD_SPEC``: layers_per_block 1, widths 64/96/128/128, random weights here: the tests never need the
trained ones), and ``distill prune prepare-unet --base-model`` on a tiny folder of that shape."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from distill_common.errors import DistillError
from distill_common.models.tiny_sd import TinySDSpec, build_tiny_unet, tiny_sd_folder
from distill_common.reference_sd.spec import REFERENCE_SD_SPEC
from distill_sd_prune.architecture import build_student, count_parameters, student_unet_config
from distill_sd_prune.architecture.pruning import PRUNE_PLANS, plan_notes
from distill_sd_prune.cli import app

# The reference model's shape (one layer per block, VAE factor 2, 32 px images) at tiny widths.
TINY_REFERENCE_SPEC = TinySDSpec(
    sample_size=16,
    cross_attention_dim=16,
    block_out_channels=(16, 16, 32, 32),
    layers_per_block=1,
    attention_head_dim=2,
    norm_num_groups=8,
    vae_block_out_channels=(8, 16),
    vae_layers_per_block=1,
    text_layers=1,
    text_heads=2,
    text_intermediate_size=32,
)


@pytest.fixture(scope="module")
def reference_unet():
    return build_tiny_unet(REFERENCE_SD_SPEC).eval()


def test_every_plan_builds_from_the_reference_unet_config_and_runs(reference_unet):
    sample = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 77, REFERENCE_SD_SPEC.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    params = {"teacher": count_parameters(reference_unet)}
    for plan in PRUNE_PLANS:
        build = build_student(reference_unet, plan, None, "slice")
        with torch.no_grad():
            out = build.unet(sample, torch.tensor([500]), text).sample
        assert out.shape == sample.shape and torch.isfinite(out).all(), plan
        params[plan] = count_parameters(build.unet)
    # layers_per_block 1: sd_small has no repeated layer to drop and falls back to BK-SDM-Small's mid-block removal
    small = student_unet_config(reference_unet.config, "sd_small")
    assert small["mid_block_type"] is None and small["layers_per_block"] == [1, 1, 1, 1]
    assert params["teacher"] == params["none"] > params["sd_small"] == params["bk_small"] > params["sd_tiny"]
    assert plan_notes(reference_unet.config, "sd_small") and not plan_notes(reference_unet.config, "narrow")
    tiny = student_unet_config(reference_unet.config, "sd_tiny")
    assert tiny["block_out_channels"] == [64, 96, 128] and len(tiny["up_block_types"]) == 3
    # the width-pruned plan: half the channels (multiples of 32 norm groups), a quarter-ish of the parameters
    narrow = student_unet_config(reference_unet.config, "narrow")
    assert narrow["block_out_channels"] == [32, 64, 64, 64]
    assert params["narrow"] <= 0.5 * params["teacher"]


def test_equal_width_plans_copy_the_reference_teachers_kept_layers_exactly(reference_unet):
    build = build_student(reference_unet, "sd_tiny", 1.0, "slice")
    teacher = reference_unet.state_dict()
    student = build.unet.state_dict()
    mapped = {"up_blocks.0.resnets.0.conv1.weight": "up_blocks.1.resnets.0.conv1.weight",
              "down_blocks.0.attentions.0.proj_in.weight": "down_blocks.0.attentions.0.proj_in.weight"}
    for s_key, t_key in mapped.items():
        assert torch.equal(student[s_key], teacher[t_key])


def test_prepare_unet_takes_base_model_and_prints_params_and_macs_beside_the_teacher(tmp_path):
    base = tiny_sd_folder(tmp_path / "cache", spec=TINY_REFERENCE_SPEC)
    for plan in ("sd_small", "sd_tiny", "narrow"):
        out = tmp_path / plan
        result = CliRunner().invoke(
            app, ["prepare-unet", "--base-model", str(base), "--plan", plan, "--output-dir", str(out)]
        )
        assert result.exit_code == 0, result.output + repr(result.exception)
        described = json.loads((out / "prune_map.json").read_text())
        teacher, student = described["complexity"]
        assert described["resolution"] == 32 and student["latent_size"] == 16  # the teacher's own size
        assert student["params"] < teacher["params"] and 0 < student["gmacs"] < teacher["gmacs"]
        assert student["params_vs_teacher"] < 1 and 0 < student["gmacs_vs_teacher"] < 1
        assert "teacher" in result.output
    assert described["budget"] == "narrow-w050"
    assert "mid block is removed" in " ".join(json.loads((tmp_path / "sd_small" / "prune_map.json").read_text())["notes"])


def test_reference_by_name_before_its_weights_ship_is_one_line(tmp_path):
    from distill_common.reference_sd import REFERENCE_SD_DIR

    if (REFERENCE_SD_DIR / "model_index.json").is_file():
        pytest.skip("the reference model's weights are shipped in this install")
    result = CliRunner().invoke(
        app, ["prepare-unet", "--base-model", "reference", "--plan", "sd_tiny", "--output-dir", str(tmp_path / "o")]
    )
    assert isinstance(result.exception, DistillError) and "\n" not in str(result.exception)
    assert "reference" in str(result.exception)
