"""CLIPScore over a tiny CLIP built from a config (real CLIP tokenizer), and the unavailable-model path."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

import distill_eval.clip_score as clip_module
from distill_common.errors import ConfigError, DistillError
from distill_common.models.tokenizer import clip_tokenizer
from distill_eval.clip_score import CLIPScorer, ClipUnavailableError, clip_score_from_embeddings

CAPTIONS = [
    "a cat sitting on a red sofa", "two dogs running on the beach", "a plate of pasta with basil",
    "an airplane above the clouds", "a city street at night with neon lights", "a bowl of fruit",
    "a man riding a horse", "a small boat on a lake",
]


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    folder = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    tokenizer = clip_tokenizer(tmp_path_factory.getbasetemp() / "clip_tokenizer")
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def positive_scorer(folder: Path, batch_size: int) -> CLIPScorer:
    """The random tiny CLIP gives these pairs negative cosines; negating its image projection makes them positive,
    so scores are not all clamped to 0 and comparisons have power."""
    scorer = CLIPScorer.from_pretrained(folder, batch_size=batch_size)
    with torch.no_grad():
        scorer.model.visual_projection.weight.neg_()
    return scorer


@pytest.fixture(scope="module")
def scorer(tiny_clip_dir: Path) -> CLIPScorer:
    return positive_scorer(tiny_clip_dir, batch_size=3)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(len(CAPTIONS), 3, 48, 40, generator=torch.Generator().manual_seed(1))


def test_score_matches_a_hand_computation(tiny_clip_dir: Path, images: torch.Tensor) -> None:
    """100 * max(0, cos) of embeddings computed here with plain transformers calls, for both signs of cos."""
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    processor = CLIPProcessor.from_pretrained(tiny_clip_dir)
    with torch.no_grad():
        pixels = processor.image_processor(images=list(images), do_rescale=False, return_tensors="pt")["pixel_values"]
        image_out = model.get_image_features(pixel_values=pixels)
        tokens = processor.tokenizer(CAPTIONS, padding=True, return_tensors="pt")
        text_out = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    e_img = getattr(image_out, "pooler_output", image_out)
    e_txt = getattr(text_out, "pooler_output", text_out)
    cos = (e_img * e_txt).sum(-1) / (e_img.norm(dim=-1) * e_txt.norm(dim=-1))

    scorer = CLIPScorer.from_pretrained(tiny_clip_dir, batch_size=3)
    flipped = positive_scorer(tiny_clip_dir, batch_size=3)  # negates every image embedding, hence every cosine
    scores, flipped_scores = scorer(images, CAPTIONS), flipped(images, CAPTIONS)
    assert scores.shape == (len(CAPTIONS),)
    torch.testing.assert_close(scores, 100 * cos.clamp(min=0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(flipped_scores, 100 * (-cos).clamp(min=0), atol=1e-4, rtol=1e-4)
    both = torch.cat([scores, flipped_scores])
    assert (both == 0).sum() == len(CAPTIONS) and (both > 0).sum() == len(CAPTIONS)  # clamp and pass-through
    assert (both <= 100).all()


def test_negative_cosines_clamp_to_zero() -> None:
    image = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    text = torch.tensor([[-1.0, 0.2], [1.0, 1.0], [0.0, 1.0]])
    torch.testing.assert_close(clip_score_from_embeddings(image, text), torch.tensor([0.0, 100.0, 100.0]))


def test_batching_does_not_change_scores(tiny_clip_dir: Path, scorer: CLIPScorer, images: torch.Tensor) -> None:
    one_batch = positive_scorer(tiny_clip_dir, batch_size=len(CAPTIONS))
    scores = scorer(images, CAPTIONS)
    assert (scores > 0).all() and scores.std() > 0
    torch.testing.assert_close(scores, one_batch(images, CAPTIONS), atol=1e-4, rtol=1e-4)
    uint8 = (images * 255).round().to(torch.uint8)
    torch.testing.assert_close(scorer(uint8, CAPTIONS), scorer(uint8.float() / 255, CAPTIONS))


def test_mismatched_inputs_are_refused(scorer: CLIPScorer, images: torch.Tensor) -> None:
    with pytest.raises(ConfigError, match="one per image"):
        scorer(images, CAPTIONS[:-1])
    with pytest.raises(ConfigError, match="\\(B, 3, H, W\\)"):
        scorer(images[:, 0], CAPTIONS)


def test_hub_model_offline_fails_fast_naming_the_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hub_cache"))
    start = time.perf_counter()
    with pytest.raises(ClipUnavailableError) as err:
        CLIPScorer.from_pretrained("openai/clip-vit-large-patch14")
    assert time.perf_counter() - start < 10
    assert isinstance(err.value, DistillError)
    assert "--clip-model" in str(err.value) and "local folder" in str(err.value) and "\n" not in str(err.value)


def test_unreachable_hub_fails_fast_without_retries(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("DISTILL_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(clip_module, "host_reachable", lambda url, timeout=3.0: False)
    start = time.perf_counter()
    with pytest.raises(ClipUnavailableError, match="unreachable"):
        CLIPScorer.from_pretrained("someone/not-cached-clip-model")
    assert time.perf_counter() - start < 10


def test_bad_local_folders_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ClipUnavailableError, match="no such folder"):
        CLIPScorer.from_pretrained(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ClipUnavailableError, match="not a saved CLIPModel"):
        CLIPScorer.from_pretrained(empty)
