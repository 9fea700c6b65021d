"""Fixtures of the lora_flash tests: a random LoRA for the tiny SD pipeline, a tiny CLIP model, one CPU thread."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny models run fastest on one thread; two threads on two busy cores spin and run 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_lora(tiny_sd_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers-format LoRA (rank 4, random A and B) for the tiny UNet: its folder."""
    from distill_common.models import add_lora, load_sd_components, save_lora

    unet = load_sd_components(tiny_sd_path, include=("unet",)).unet
    torch.manual_seed(0)
    add_lora(unet, rank=4, alpha=4, init_lora_weights=False)
    folder = tmp_path_factory.mktemp("tiny_lora")
    save_lora(unet, folder)
    return folder


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised CLIPModel + CLIPProcessor (real CLIP tokenizer, 32 px images) saved as a folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from distill_common.models.tokenizer import clip_tokenizer

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=16,
    )
    model = CLIPModel(config)
    # Random towers give cosines around 0, which CLIPScore clamps to 0. Shift both pooled features towards a shared
    # direction so scores are positive (and still vary with the image and the text).
    with torch.no_grad():
        for norm in (model.text_model.final_layer_norm, model.vision_model.post_layernorm):
            norm.weight.fill_(0.3)
            norm.bias.fill_(1.0)
        for proj in (model.text_projection, model.visual_projection):
            proj.weight.copy_(torch.eye(16, 32) + 0.05 * torch.randn(16, 32))
    folder = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(folder)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=clip_tokenizer(),
    )
    processor.save_pretrained(folder)
    return folder


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("a red cube on a table\n# a comment line\n\na dog riding a bicycle\n")
    return path


@pytest.fixture(scope="session")
def tiny_sd_turbo_path(tiny_sd_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD pipeline with SD-Turbo's scheduler (Euler, trailing spacing), as a diffusers folder."""
    from distill_common.models.tiny_sdxl import turbo_scheduler

    folder = tmp_path_factory.mktemp("tiny_sd_turbo") / "model"
    shutil.copytree(tiny_sd_path, folder)
    scheduler = turbo_scheduler("sd")
    shutil.rmtree(folder / "scheduler")
    scheduler.save_pretrained(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="session")
def tiny_sdxl_turbo_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SDXL-architecture pipeline with SDXL-Turbo's scheduler (Euler ancestral, trailing)."""
    from distill_common.models.tiny_sdxl import save_tiny_sdxl

    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl_turbo") / "model")


@pytest.fixture
def init_image(tmp_path: Path) -> Path:
    """A 100x80 noise image (not square, not the model's size: it is center-cropped and resized)."""
    import numpy as np
    from PIL import Image

    path = tmp_path / "init.png"
    Image.fromarray((np.random.RandomState(0).rand(80, 100, 3) * 255).astype("uint8")).save(path)
    return path
