"""The tiny SD factory: SD 1.5's architecture at toy widths, deterministic, and a faithful diffusers folder."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from distill_common.models.tiny_sd import TinySDSpec, build_tiny_sd, tiny_sd_folder

PROMPT = "a photo of a cat"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread; on a shared, busy CPU extra OpenMP threads only spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def generate(pipe, seed: int = 0, prompt: str = PROMPT) -> torch.Tensor:
    out = pipe(prompt, num_inference_steps=2, height=64, width=64, output_type="pt",
               generator=torch.Generator().manual_seed(seed))
    return out.images  # (1, 3, 64, 64) in [0, 1]


@pytest.fixture(scope="module")
def tiny_pipe():
    return build_tiny_sd()


def test_unet_has_sd15_block_structure(tiny_pipe) -> None:
    config = tiny_pipe.unet.config
    assert tuple(config.down_block_types) == (
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    assert tuple(config.up_block_types) == ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    assert config.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert config.layers_per_block == 2 and config.in_channels == 4 and config.out_channels == 4
    assert config.sample_size == 16
    assert config.cross_attention_dim == tiny_pipe.text_encoder.config.hidden_size == 32
    assert len(tiny_pipe.unet.down_blocks[0].resnets) == 2 and len(tiny_pipe.unet.up_blocks[0].resnets) == 3


def test_vae_text_encoder_and_scheduler_match_sd15(tiny_pipe) -> None:
    vae = tiny_pipe.vae.config
    assert vae.latent_channels == 4 and vae.scaling_factor == pytest.approx(0.18215)
    assert tiny_pipe.vae_scale_factor == 4 == TinySDSpec().vae_scale_factor  # 3 VAE blocks: latent 16 -> image 64
    text = tiny_pipe.text_encoder.config
    assert (text.vocab_size, text.max_position_embeddings, text.num_hidden_layers) == (49408, 77, 2)
    assert text.eos_token_id == tiny_pipe.tokenizer.eos_token_id == 49407
    assert len(tiny_pipe.tokenizer) == 49408
    sched = tiny_pipe.scheduler
    assert type(sched).__name__ == "PNDMScheduler"
    assert (sched.config.beta_schedule, sched.config.prediction_type) == ("scaled_linear", "epsilon")
    assert (sched.config.beta_start, sched.config.beta_end, sched.config.num_train_timesteps) == (0.00085, 0.012, 1000)
    assert tiny_pipe.safety_checker is None and tiny_pipe.config.requires_safety_checker is False
    with torch.no_grad():
        latents = tiny_pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean  # (1, 4, 16, 16)
    assert latents.shape == (1, 4, 16, 16)


def test_same_seed_same_weights_other_seed_other_weights(tiny_pipe) -> None:
    again = build_tiny_sd(seed=0)
    other = build_tiny_sd(seed=1)
    for name in ("unet", "vae", "text_encoder"):
        ours, same, diff = (dict(getattr(p, name).named_parameters()) for p in (tiny_pipe, again, other))
        assert all(torch.equal(ours[k], same[k]) for k in ours)
        assert not all(torch.equal(ours[k], diff[k]) for k in ours)


def test_saved_folder_round_trip_gives_identical_images(tiny_pipe, tiny_sd_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    assert (tiny_sd_path / "model_index.json").is_file()
    assert (tiny_sd_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    loaded.set_progress_bar_config(disable=True)
    first = generate(tiny_pipe, seed=3)
    assert first.shape == (1, 3, 64, 64) and torch.isfinite(first).all()
    assert torch.equal(generate(loaded, seed=3), first)
    assert not torch.equal(generate(loaded, seed=4), first)  # the seed matters
    assert not torch.equal(generate(loaded, seed=3, prompt="a red car"), first)  # so does the prompt


def test_two_step_64px_generation_is_fast(tiny_pipe) -> None:
    """CPU time on one thread (see _one_thread), so other processes sharing the machine do not make it flaky."""
    generate(tiny_pipe)  # warm-up
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        generate(tiny_pipe)
        best = min(best, time.process_time() - start)
    assert best < 1.0, f"2-step 64x64 generation took {best:.2f} s of CPU time"


def test_cached_folder_is_built_once(tmp_path: Path) -> None:
    first = tiny_sd_folder(tmp_path)
    stamp = (first / "unet" / "config.json").stat().st_mtime_ns
    assert tiny_sd_folder(tmp_path) == first
    assert (first / "unet" / "config.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no staging leftovers
    other = tiny_sd_folder(tmp_path, spec=TinySDSpec(seed=1))
    assert other != first and (other / "model_index.json").is_file()


def test_sd15_sized_spec_builds_sd15s_unet_at_512_px():
    """The GPU check's random SD 1.5-sized model: SD 1.5's 859,520,964 UNet parameters (distill-sd's figure), VAE
    factor 8, 512 px images from 64x64 latents. Built on the meta device (no weights)."""
    from diffusers import UNet2DConditionModel

    from distill_common.models import SD15_UNET_CONFIG
    from distill_common.models.tiny_sd import SD15_SIZED_SPEC, build_tiny_unet

    with torch.device("meta"):
        unet = build_tiny_unet(SD15_SIZED_SPEC)
        reference = UNet2DConditionModel.from_config(SD15_UNET_CONFIG)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert [tuple(p.shape) for p in unet.parameters()] == [tuple(p.shape) for p in reference.parameters()]
    assert SD15_SIZED_SPEC.vae_scale_factor == 8 and SD15_SIZED_SPEC.image_size == 512
