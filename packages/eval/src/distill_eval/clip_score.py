"""CLIPScore (Hessel et al., "CLIPScore: A Reference-free Evaluation Metric for Image Captioning", EMNLP 2021).

Per image-caption pair: ``100 * max(0, cos(E_img, E_txt))`` with the CLIP image and text embeddings (the
paper's rescaling weight w = 2.5 is replaced by 100, the convention of text-to-image evaluation and of
torchmetrics). The model is a ``transformers.CLIPModel`` named by the user (a hub id or a local folder
written by ``save_pretrained``). torchmetrics' ``CLIPScore`` is not used: it clamps the *mean* cosine rather
than each pair's, and only accepts a fixed list of hub ids (or a factory).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill_common.errors import ConfigError, ModelLoadError
from distill_eval.inception import host_reachable, is_offline

CLIP_SCALE = 100.0
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"


class ClipUnavailableError(ModelLoadError):
    """No CLIP model could be loaded (offline hub, missing cache, wrong folder)."""


def _unavailable(model: str, reason: str) -> ClipUnavailableError:
    return ClipUnavailableError(
        f"cannot load CLIP model {model!r} ({reason}); pass --clip-model with a local folder holding a CLIPModel "
        "and its CLIPProcessor saved with save_pretrained(DIR) (e.g. --clip-model /models/clip-vit-large-patch14), "
        "or a hub id that is already in the Hugging Face cache"
    )


def load_clip(model: str | Path) -> tuple[nn.Module, Any, Any]:
    """(CLIPModel, tokenizer, image processor) from a local folder or a hub id, failing fast when unreachable."""
    from huggingface_hub import constants as hub_constants
    from transformers import CLIPModel, CLIPProcessor

    name = str(model)
    local = Path(name).expanduser()

    def attempt(source: str, local_only: bool) -> tuple[nn.Module, Any, Any]:
        processor = CLIPProcessor.from_pretrained(source, local_files_only=local_only)
        clip = CLIPModel.from_pretrained(source, local_files_only=local_only)
        return clip, processor.tokenizer, processor.image_processor

    if local.is_dir():
        try:
            return attempt(str(local), True)
        except (OSError, ValueError, TypeError) as exc:
            raise _unavailable(name, f"the folder is not a saved CLIPModel + CLIPProcessor: {str(exc)[:160]}") from None
    if name.startswith((".", "/", "~")):
        raise _unavailable(name, "no such folder")
    try:
        return attempt(name, True)  # the Hugging Face cache, no network
    except (OSError, ValueError):
        pass
    if is_offline() or hub_constants.HF_HUB_OFFLINE:
        raise _unavailable(name, "offline mode is on and it is not in the Hugging Face cache")
    if not host_reachable(hub_constants.ENDPOINT):
        raise _unavailable(name, f"{hub_constants.ENDPOINT} is unreachable and it is not in the Hugging Face cache")
    try:
        return attempt(name, False)
    except (OSError, ValueError) as exc:
        raise _unavailable(name, str(exc).splitlines()[0][:160]) from None


def _pooled(output: Any) -> torch.Tensor:
    """transformers 5 returns a ModelOutput whose pooler_output is the projected embedding; 4.x a tensor."""
    return output.pooler_output if hasattr(output, "pooler_output") else output


class CLIPScorer(nn.Module):
    """Batched CLIPScore of images (B, 3, H, W) — float in [0, 1] or uint8 — against one caption each."""

    def __init__(self, clip_model: nn.Module, tokenizer: Any, image_processor: Any, batch_size: int = 32,
                 name: str = "") -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"CLIPScore batch size must be positive, got {batch_size}; pass --batch-size 1 or more")
        self.model = clip_model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.batch_size = batch_size
        self.name = name
        self.max_length = int(getattr(clip_model.config.text_config, "max_position_embeddings", 77))

    @classmethod
    def from_pretrained(cls, clip_model: str | Path = DEFAULT_CLIP_MODEL, batch_size: int = 32,
                        device: str | torch.device = "cpu") -> CLIPScorer:
        model, tokenizer, image_processor = load_clip(clip_model)
        return cls(model, tokenizer, image_processor, batch_size, name=str(clip_model)).to(device)

    def train(self, mode: bool = True) -> CLIPScorer:
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings (B, D); CLIP's own resize, center crop and normalisation."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ConfigError(f"CLIPScore needs images of shape (B, 3, H, W), got {tuple(images.shape)}")
        pixels = images.float() / 255.0 if images.dtype == torch.uint8 else images.float().clamp(0, 1)
        inputs = self.image_processor(images=list(pixels.cpu()), do_rescale=False, return_tensors="pt")
        embeds = _pooled(self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device)))
        return torch.nn.functional.normalize(embeds.float(), dim=-1)

    @torch.inference_mode()
    def embed_texts(self, captions: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings (B, D); captions longer than the text tower are truncated."""
        tokens = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        embeds = _pooled(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                      attention_mask=tokens["attention_mask"].to(self.device)))
        return torch.nn.functional.normalize(embeds.float(), dim=-1)

    def forward(self, images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """Per-pair CLIPScore (B,) = 100 * max(0, cos(E_img, E_txt)), computed in batches of ``batch_size``."""
        if isinstance(captions, str):
            captions = [captions]
        if images.shape[0] != len(captions):
            raise ConfigError(f"CLIPScore got {images.shape[0]} images but {len(captions)} captions; pass one per image")
        scores = []
        for start in range(0, len(captions), self.batch_size):
            stop = start + self.batch_size
            image_embeds = self.embed_images(images[start:stop])
            text_embeds = self.embed_texts(captions[start:stop])
            scores.append(clip_score_from_embeddings(image_embeds, text_embeds).cpu())
        return torch.cat(scores)


def clip_score_from_embeddings(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """100 * max(0, cos) per row of two (B, D) embedding matrices."""
    cos = torch.nn.functional.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)
    return CLIP_SCALE * cos.clamp(min=0)
