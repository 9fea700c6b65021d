"""Generators (student and teacher, one loader through the ``distill.generators`` entry point), ``distill
prune generate``, and ``distill prune evaluate`` stamping registered students and moving per-budget champions.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from distill_common.generator import load_generator
from distill_sd_prune.architecture import build_student
from distill_sd_prune.cli import app
from distill_sd_prune.evaluation.champions import promote_per_budget, register_student
from distill_sd_prune.sampling import (
    build_pipeline,
    make_scheduler,
    write_generator_folder,
    write_teacher_folder,
)

PROMPTS = ["a red bus on a street", "two cats on a sofa"]


def student_folder(teacher_unet, tiny_sd_path, folder, plan="sd_tiny", init="slice", **info):
    build = build_student(teacher_unet, plan, 1.0, init, seed=1)
    return write_generator_folder(
        folder,
        str(tiny_sd_path),
        unet=build.unet,
        resolution=64,
        plan=plan,
        budget=build.budget,
        params=sum(p.numel() for p in build.unet.parameters()),
        **info,
    )


def test_student_and_teacher_generators_share_seeds(teacher_unet, tiny_sd_path, tmp_path):
    student = load_generator(student_folder(teacher_unet, tiny_sd_path, tmp_path / "student"), device="cpu")
    assert (
        student.family == "sd_student_prune"
        and student.condition_kind == "prompt"
        and student.resolution == 64
    )
    a = student.generate(PROMPTS, 2, [5, 6], guidance=5.0)
    assert a.shape == (2, 3, 64, 64) and 0 <= float(a.min()) and float(a.max()) <= 1
    torch.testing.assert_close(
        a[1:], student.generate(PROMPTS[1:], 2, [6], guidance=5.0), atol=1e-4, rtol=0
    )  # per-image seed
    assert not torch.equal(a[0], student.generate(PROMPTS[:1], 2, [7], guidance=5.0)[0])
    teacher = load_generator(write_teacher_folder(tmp_path / "teacher", str(tiny_sd_path), 64), device="cpu")
    assert teacher.unet.config.layers_per_block == 2 and teacher.info["budget"] == "teacher"
    pipe = build_pipeline(
        teacher_unet,
        teacher.pipe.vae,
        teacher.pipe.text_encoder,
        teacher.pipe.tokenizer,
        make_scheduler("ddpm", teacher.pipe.scheduler.config),
    )
    direct = pipe(
        PROMPTS[0],
        num_inference_steps=2,
        guidance_scale=5.0,
        height=64,
        width=64,
        output_type="pt",
        generator=[torch.Generator().manual_seed(5)],
    ).images
    torch.testing.assert_close(teacher.generate(PROMPTS[:1], 2, [5], 5.0), direct.clamp(0, 1))
    outputs = {}
    for sampler in ("ddpm", "pndm", "ddim"):
        student.set_scheduler(sampler)
        outputs[sampler] = student.generate(PROMPTS[:1], 3, [5], guidance=3.0)
        assert torch.isfinite(outputs[sampler]).all()
    assert not torch.equal(outputs["ddpm"], outputs["ddim"])


def test_bundled_student_is_a_complete_diffusers_pipeline(teacher_unet, tiny_sd_path, tmp_path):
    from diffusers import StableDiffusionPipeline

    folder = student_folder(teacher_unet, tiny_sd_path, tmp_path / "bundled", bundle_base=True)
    assert json.loads((folder / "generator.json").read_text())["base_model"] == "."
    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    assert pipe.unet.config.mid_block_type is None
    gen = load_generator(folder, device="cpu")
    assert gen.generate(PROMPTS[:1], 2, [0]).shape == (1, 3, 64, 64)


def test_generate_command_writes_images(teacher_unet, tiny_sd_path, tmp_path):
    folder = student_folder(teacher_unet, tiny_sd_path, tmp_path / "student")
    out = tmp_path / "images"
    result = CliRunner().invoke(
        app,
        [
            "generate",
            "--generator",
            str(folder),
            "--prompts",
            *PROMPTS,
            "--steps",
            "2",
            "--scheduler",
            "ddim",
            "--output-dir",
            str(out),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert (out / "00000.png").is_file() and (out / "00001.png").is_file() and (out / "grid.png").is_file()
    assert json.loads((out / "prompts.json").read_text())["scheduler"] == "ddim"


@pytest.mark.slow
def test_evaluate_stamps_versions_and_crowns_the_best_per_budget(
    teacher_unet, tiny_sd_path, tiny_clip_path, data_root, tmp_path, mlflow_uri
):
    from distill_common import tracking

    specs = {
        "tiny_slice": ("sd_tiny", "slice"),
        "tiny_random": ("sd_tiny", "random"),
        "small": ("sd_small", "slice"),
    }
    versions = {}
    with tracking.start_run("unit", "register") as run:
        for label, (plan, init) in specs.items():
            folder = student_folder(teacher_unet, tiny_sd_path, tmp_path / label, plan, init)
            manifest = json.loads((folder / "generator.json").read_text())
            versions[label] = register_student(run, folder, "sd_student_prune", manifest)
    args = [
        "evaluate",
        "--generators",
        *(f"{k}=models:/sd_student_prune/{v}" for k, v in versions.items()),
        "--teacher-model",
        str(tiny_sd_path),
        "--steps",
        "2",
        "--guidance",
        "5",
        "3",
        "--num-images",
        "2",
        "--reference-n",
        "4",
        "--batch-size",
        "2",
        "--timing-repeats",
        "1",
        "--data-root",
        str(data_root),
        "--output-dir",
        str(tmp_path / "eval"),
        "--device",
        "cpu",
        "--clip-model",
        str(tiny_clip_path),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    rows = {(r["model"], r["guidance"]): r for r in report["rows"]}
    assert len(rows) == 8  # teacher + 3 students at CFG 5 and 3
    assert rows[("teacher", 5.0)]["lpips_to_teacher"] == 0.0 and rows[("small", 5.0)]["lpips_to_teacher"] > 0
    assert (
        rows[("teacher", 5.0)]["params"]
        > rows[("small", 5.0)]["params"]
        > rows[("tiny_slice", 5.0)]["params"]
    )
    assert all(r["fid"] > 0 and r["ms_per_image"] > 0 and r["gmacs"] > 0 for r in report["rows"])
    assert all(r["clip_score"] >= 0 for r in report["rows"])
    # FID through the shared benchmark path: resize picked from the protocol (COCO photos: bicubic), with intervals
    assert report["meta"]["protocol"]["resize"] == "bicubic"
    assert report["meta"]["protocol"]["reference_set"] == "coco-val2017"
    assert all(0 <= r["fid_ci95_low"] <= r["fid_ci95_high"] for r in report["rows"])
    info = {v.version: v for v in tracking.list_versions("sd_student_prune")}
    fids = {label: info[v].metrics["s2.fid"] for label, v in versions.items()}
    assert all(
        "s2.clip_score" in info[v].metrics and "s2.lpips_to_teacher" in info[v].metrics
        for v in versions.values()
    )
    assert fids["small"] == pytest.approx(rows[("small", 5.0)]["fid"])
    best_tiny = min(("tiny_slice", "tiny_random"), key=fids.get)
    assert tracking.version_by_alias("sd_student_prune", "champion-sd_tiny").version == versions[best_tiny]
    assert tracking.version_by_alias("sd_student_prune", "champion-sd_small").version == versions["small"]
    assert all(not d.changed for d in promote_per_budget("sd_student_prune", steps=2))  # idempotent
