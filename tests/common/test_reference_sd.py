"""The reference text-to-image model: captions, the resumable component-training loop, the shipped folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill_common.errors import ConfigError, DataError, ModelLoadError
from distill_common.models.tiny_sd import TinySDSpec, build_tiny_text_encoder, build_tiny_unet, build_tiny_vae
from distill_common.reference_sd import (
    REFERENCE_SD_DIR,
    read_sha256sums,
    verify_sha256sums,
    write_sha256sums,
)
from distill_common.reference_sd.captions import (
    HELD_OUT_TEMPLATES,
    TRAIN_TEMPLATES,
    class_captions,
    class_of_caption,
    evaluation_prompts,
    template_set,
)
from distill_common.reference_sd.tasks import UNetTask, VAETask, encode_moments
from distill_common.reference_sd.training import ComponentTrainConfig, lr_factor, train_component

SPEC = TinySDSpec(sample_size=4, cross_attention_dim=16, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                  attention_head_dim=2, norm_num_groups=8, vae_block_out_channels=(8, 8), text_layers=1,
                  text_heads=2, text_intermediate_size=16)


def test_captions_templates_disjoint_and_class_is_recoverable():
    assert len(TRAIN_TEMPLATES) >= 10 and len(HELD_OUT_TEMPLATES) >= 5
    assert not set(TRAIN_TEMPLATES) & set(HELD_OUT_TEMPLATES)
    table = class_captions("held_out")
    for cls, row in enumerate(table):
        assert all(class_of_caption(c) == cls for c in row)
    assert table[0][0] == "a snapshot of an airplane"  # the article follows the class name
    prompts, labels = evaluation_prompts(25)
    assert labels[:10] == list(range(10)) and all(class_of_caption(p) == y for p, y in zip(prompts, labels, strict=True))
    assert class_of_caption("a cat and a dog") is None and class_of_caption("a bowl of soup") is None
    with pytest.raises(DataError, match="held_out"):
        template_set("validation")


def test_lr_schedule_warms_up_then_decays_to_its_floor():
    cfg = ComponentTrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(99, cfg) == pytest.approx(0.1, abs=0.01)
    assert lr_factor(50, ComponentTrainConfig(steps=100, warmup_steps=10, lr_schedule="constant")) == 1.0


@pytest.mark.parametrize("field,value", [("learning_rate", float("nan")), ("steps", 0), ("ema_decay", 1.0),
                                         ("lr_schedule", "linear"), ("precision", "fp8")])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ConfigError):
        ComponentTrainConfig(**{field: value}).validate()


def _vae_task(images):
    return VAETask(build_tiny_vae(SPEC), images)


def test_vae_training_resumes_bit_identically(tmp_path: Path):
    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    cfg = ComponentTrainConfig(steps=4, batch_size=4, warmup_steps=1, checkpoint_every=2, precision="fp32",
                               ema_decay=0.9)
    straight = train_component(_vae_task(images), cfg, tmp_path / "a")
    half = ComponentTrainConfig(**{**cfg.__dict__, "steps": 2})
    train_component(_vae_task(images), half, tmp_path / "b")  # stops at 2 (a killed run)
    resumed = train_component(_vae_task(images), cfg, tmp_path / "b")  # resumes from checkpoint-2
    assert straight["steps"] == resumed["steps"] == 4
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a/export/vae/diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "b/export/vae/diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the export sets SD's latent scaling factor from the data: 1 / std of the latents
    import json

    factor = json.loads((tmp_path / "a/export/vae/config.json").read_text())["scaling_factor"]
    assert factor != 0.18215 and factor > 0


def test_vae_decoder_fine_tune_keeps_the_encoder_and_its_scaling(tmp_path: Path):
    """Fine-tuning only the decoder leaves the latent space a UNet was trained on untouched: the encoder's
    weights and the scaling factor are exported unchanged, and the decoder's do change."""
    import json

    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    base = build_tiny_vae(SPEC)
    base.register_to_config(scaling_factor=0.7)
    base.save_pretrained(tmp_path / "base", safe_serialization=True)
    cfg = ComponentTrainConfig(steps=3, batch_size=4, warmup_steps=1, checkpoint_every=3, precision="fp32",
                               learning_rate=1e-2, ema_decay=0.0)
    task = VAETask(AutoencoderKL.from_pretrained(tmp_path / "base"), images, decoder_only=True)
    train_component(task, cfg, tmp_path / "ft")
    before = load_file(str(tmp_path / "base/diffusion_pytorch_model.safetensors"))
    after = load_file(str(tmp_path / "ft/export/vae/diffusion_pytorch_model.safetensors"))
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    tuned = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and tuned
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in tuned)
    assert json.loads((tmp_path / "ft/export/vae/config.json").read_text())["scaling_factor"] == 0.7


def test_unet_task_learns_and_exports_a_text_encoder(tmp_path: Path):
    from distill_common.models.tokenizer import clip_tokenizer

    vae = build_tiny_vae(SPEC).eval()
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    moments = encode_moments(vae, images, batch=8, bf16=False)
    assert moments.shape == (16, 8, 4, 4) and moments.dtype == torch.float16
    tok = clip_tokenizer()
    table = class_captions("train")
    ids = tok([c for row in table for c in row], padding="max_length", max_length=77, truncation=True,
              return_tensors="pt").input_ids.view(10, len(table[0]), 77)
    empty = tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    unet, te = build_tiny_unet(SPEC), build_tiny_text_encoder(SPEC)
    before = {k: v.clone() for k, v in te.state_dict().items()}
    task = UNetTask(unet, te, moments, torch.arange(16) % 10, ids, empty, scaling_factor=1.0)
    cfg = ComponentTrainConfig(steps=3, batch_size=4, warmup_steps=1, precision="fp32", ema_decay=0.0)
    summary = train_component(task, cfg, tmp_path)
    assert summary["images_seen"] == 12 and (tmp_path / "export/unet/config.json").is_file()
    assert any(not torch.equal(before[k], v) for k, v in te.state_dict().items())  # trained jointly
    frozen = build_tiny_text_encoder(SPEC)
    UNetTask(build_tiny_unet(SPEC), frozen, moments, torch.arange(16) % 10, ids, empty, scaling_factor=1.0,
             train_text_encoder=False)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_sha256sums_catch_an_altered_or_missing_file(tmp_path: Path):
    folder = tmp_path / "pipeline"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "w.bin").write_bytes(b"weights")
    sums = write_sha256sums(folder, tmp_path / "SHA256SUMS")
    assert list(sums) == ["pipeline/unet/w.bin"] == list(read_sha256sums(tmp_path / "SHA256SUMS"))
    verify_sha256sums(tmp_path, tmp_path / "SHA256SUMS")
    (folder / "unet" / "w.bin").write_bytes(b"weightz")
    with pytest.raises(ModelLoadError, match="sha256"):
        verify_sha256sums(tmp_path, tmp_path / "SHA256SUMS")
    (folder / "unet" / "w.bin").unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        verify_sha256sums(tmp_path, tmp_path / "SHA256SUMS")


shipped = pytest.mark.skipif(not (REFERENCE_SD_DIR / "model_index.json").is_file(),
                             reason="the reference model's weights are not in this checkout")


@shipped
def test_shipped_sha256_match_and_from_pretrained_loads_it():
    from diffusers import StableDiffusionPipeline

    verify_sha256sums()
    pipe = StableDiffusionPipeline.from_pretrained(str(REFERENCE_SD_DIR), torch_dtype=torch.float32)
    assert pipe.safety_checker is None
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.prediction_type == "epsilon"
    from diffusers import DDIMScheduler

    assert DDIMScheduler.from_config(pipe.scheduler.config).config.clip_sample is False  # latents are not in [-1, 1]
    assert pipe.tokenizer.vocab_size == 49408
    size = sum(f.stat().st_size for f in REFERENCE_SD_DIR.rglob("*") if f.is_file())
    assert size <= 30e6
    out = pipe(["a photo of a cat"], num_inference_steps=2, guidance_scale=2.0, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


@shipped
def test_reference_name_resolves_to_the_shipped_folder_not_a_local_one(tmp_path: Path, monkeypatch):
    from distill_common.models.sd_loading import resolve_model_source

    monkeypatch.chdir(tmp_path)
    (tmp_path / "reference").mkdir()
    with pytest.warns(UserWarning, match="./reference"):
        source = resolve_model_source("reference")
    assert Path(source.location) == REFERENCE_SD_DIR.resolve()
    assert Path(resolve_model_source("./reference").location) == (tmp_path / "reference").resolve()


def test_altered_shipped_model_is_refused(tmp_path: Path, monkeypatch):
    import distill_common.reference_sd as ref

    root = tmp_path / "reference_sd"
    (root / "pipeline").mkdir(parents=True)
    (root / "pipeline" / "model_index.json").write_text("{}")
    write_sha256sums(root / "pipeline", root / "SHA256SUMS")
    (root / "pipeline" / "model_index.json").write_text('{"_class_name": "x"}')
    monkeypatch.setattr(ref, "REFERENCE_SD_ROOT", root)
    monkeypatch.setattr(ref, "REFERENCE_SD_DIR", root / "pipeline")
    monkeypatch.setattr(ref, "SHA256_FILE", root / "SHA256SUMS")
    ref.reference_sd_folder.cache_clear()
    try:
        with pytest.raises(ModelLoadError, match="altered"):
            ref.reference_sd_folder()
    finally:
        ref.reference_sd_folder.cache_clear()


def _reference_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("reference_sd_tool", Path(__file__).parents[2] / "tools" / "reference_sd.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.mark.slow
@pytest.mark.skipif(not (REFERENCE_SD_DIR / "model_index.json").is_file(), reason="the reference model is not here")
def test_teacher_evaluation_resumes_from_its_partial_images(tmp_path: Path, data_root, monkeypatch):
    """A killed long-protocol evaluation keeps the images it generated: a rerun reads them back and generates only
    the rest, then scores all of them and removes the partial file."""
    from typer.testing import CliRunner

    from distill_common.checkpoint import save_weights

    tool = _reference_tool()

    args = ["eval-teacher", "--configs", "pndm:2:5", "--num-images", "4", "--batch-size", "2", "--reference-n", "20",
            "--data-root", str(data_root), "--threads", "0", "--out-dir", str(tmp_path)]
    pipe = tool._load_pipeline("reference")
    key, _ = tool._teacher_key("pndm", 2, 5.0, 4, "held_out", tool._model_digest(pipe), pipe.scheduler)
    marker = torch.full((2, 3, 32, 32), 7, dtype=torch.uint8)  # no generated image is a flat 7/255 field
    save_weights({"images": marker}, tmp_path / f"teacher-{key}.partial.safetensors", {"seconds": "1.0"})
    result = CliRunner().invoke(tool.app, args)
    assert result.exit_code == 0, result.output
    assert "resuming after 2 images" in result.output
    from safetensors.torch import load_file

    first = load_file(tmp_path / f"teacher-{key}-first100.safetensors")["images"]
    assert first.shape == (4, 3, 32, 32) and torch.equal(first[:2], marker) and not torch.equal(first[2:], marker)
    assert not (tmp_path / f"teacher-{key}.partial.safetensors").exists()
    assert (tmp_path / f"teacher-{key}.json").is_file()


@pytest.mark.parametrize("spec", ["heun:30:4", "pndm:thirty:4", "pndm:30", "dpm:0:4", "dpm:30:-1"])
def test_teacher_evaluation_rejects_a_bad_configuration_before_loading_anything(tmp_path: Path, spec):
    from typer.testing import CliRunner

    result = CliRunner().invoke(_reference_tool().app, ["eval-teacher", "--configs", f"pndm:30:4,{spec}",
                                                        "--model", str(tmp_path / "absent"), "--out-dir", str(tmp_path)])
    message = str(result.exception) + result.output
    assert result.exit_code != 0 and "\n" not in message.strip()
    assert "bad configuration" in message and "ddpm, pndm, ddim, euler, euler_a, dpm" in message
    assert list(tmp_path.iterdir()) == []


def test_teacher_evaluation_key_changes_with_the_sampler_config():
    """Two DDIM samplers that differ only in ``clip_sample`` are two evaluations: the saved score of one is never
    reused for the other; the same config gives the same key."""
    from diffusers import DDIMScheduler

    from distill_common.models.tiny_sd import sd15_scheduler
    from distill_sd_prune.sampling.pipeline import make_scheduler

    key = _reference_tool()._teacher_key
    base = dict(sd15_scheduler().config)
    unclipped = make_scheduler("ddim", base)
    clipped = DDIMScheduler.from_config({**base, "clip_sample": True})
    assert unclipped.config.clip_sample is False and clipped.config.clip_sample is True
    a, config = key("ddim", 30, 4.0, 500, "held_out", "abc", unclipped)
    assert a == key("ddim", 30, 4.0, 500, "held_out", "abc", make_scheduler("ddim", base))[0]
    assert a != key("ddim", 30, 4.0, 500, "held_out", "abc", clipped)[0]
    assert a.startswith("ddim-30-w4-n500-held_out-abc-s") and config["clip_sample"] is False


@pytest.mark.slow
@pytest.mark.skipif(not (REFERENCE_SD_DIR / "model_index.json").is_file(), reason="the reference model is not here")
def test_teacher_evaluation_names_an_unreadable_partial_file(tmp_path: Path, data_root):
    """A truncated partial-images file stops the run with one line that names it and the fix; the file is kept."""
    from typer.testing import CliRunner

    tool = _reference_tool()
    pipe = tool._load_pipeline("reference")
    key, _ = tool._teacher_key("pndm", 2, 5.0, 4, "held_out", tool._model_digest(pipe), pipe.scheduler)
    partial = tmp_path / f"teacher-{key}.partial.safetensors"
    partial.write_bytes(b"\x10\x00\x00\x00not a safetensors file")
    result = CliRunner().invoke(tool.app, ["eval-teacher", "--configs", "pndm:2:5", "--num-images", "4",
                                           "--batch-size", "2", "--reference-n", "20", "--data-root", str(data_root),
                                           "--threads", "0", "--out-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert "cannot read the saved images" in str(result.exception) + result.output and partial.name in str(result.exception) + result.output
    assert partial.is_file() and not (tmp_path / f"teacher-{key}.json").exists()
