"""Fixtures of the sd_student_prune tests: the tiny SD 1.5-shaped teacher (``tiny_sd_path`` from
tests/conftest.py) loaded once, and fixed UNet inputs (latent 16 -> 64x64 images)."""

from __future__ import annotations

import pytest
import torch
from prune_helpers import run_unet  # noqa: F401  (re-exported for older imports)


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    """Tiny models run fastest on one thread on a shared, busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def teacher_unet(tiny_sd_path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(tiny_sd_path / "unet")).eval()


@pytest.fixture(scope="session")
def unet_inputs():
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=g)  # (B, 4, h, w)
    text = torch.randn(2, 77, 32, generator=g)  # (B, 77, D)
    return sample, torch.tensor([10, 700]), text


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory):
    """A tiny random CLIPModel + CLIPProcessor folder (the real CLIP tokenizer), for CLIPScore offline."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from distill_common.models.tokenizer import clip_tokenizer

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    folder = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=clip_tokenizer(),
    )
    processor.save_pretrained(folder)
    return folder
