"""Text conditioning of the UNet for SD 1.5 and SDXL, as one small object the losses pass around.

SD 1.5 (Rombach et al. 2022) conditions on one CLIP text encoder's last hidden state (B, 77, D). SDXL (Podell et al.
2023, "SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis") concatenates the penultimate
states of two text encoders and adds micro-conditioning: the pooled embedding of the second encoder
(``text_embeds``, (B, P)) and six size/crop numbers (``time_ids``, (B, 6)), passed as ``added_cond_kwargs``.
For training we use time ids ``(R, R, 0, 0, R, R)``: the images are resized to R and the crop origin is not tracked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from distill_common.errors import ConfigError

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


@dataclass
class Conditioning:
    """``hidden`` (B, L, D) cross-attention states; ``added`` SDXL's ``{text_embeds: (B, P), time_ids: (B, 6)}``."""

    hidden: torch.Tensor
    added: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return int(self.hidden.shape[0])

    def expand(self, batch: int) -> Conditioning:
        added = {k: v.expand(batch, *v.shape[1:]) for k, v in self.added.items()} if self.added else None
        return Conditioning(self.hidden.expand(batch, *self.hidden.shape[1:]), added)

    def unet_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.hidden}
        if self.added:
            kwargs["added_cond_kwargs"] = self.added
        return kwargs


def as_conditioning(cond: torch.Tensor | Conditioning) -> Conditioning:
    return cond if isinstance(cond, Conditioning) else Conditioning(cond)


def expand_conditioning(cond: torch.Tensor | Conditioning, batch: int) -> torch.Tensor | Conditioning:
    """A (1, ...) conditioning repeated to ``batch`` rows (a view)."""
    return cond.expand(batch) if isinstance(cond, Conditioning) else cond.expand(batch, *cond.shape[1:])


def cat_conditioning(first: torch.Tensor | Conditioning, second: torch.Tensor | Conditioning) -> Conditioning:
    a, b = as_conditioning(first), as_conditioning(second)
    added = {k: torch.cat([a.added[k], b.added[k]]) for k in a.added} if a.added else None
    return Conditioning(torch.cat([a.hidden, b.hidden]), added)


def unet_forward(unet: Any, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | Conditioning) -> torch.Tensor:
    """``unet(x, t, **cond).sample`` for SD 1.5 (a tensor) and SDXL (a :class:`Conditioning` with added kwargs)."""
    return unet(x, t, **as_conditioning(cond).unet_kwargs()).sample


def check_pipeline_class(name: str | None, model: str) -> str:
    """The pipeline class, if training and evaluation support it; else one line naming the supported ones."""
    if name not in SUPPORTED_PIPELINES:
        raise ConfigError(f"{model} is a {name or 'unknown'} model; flash train/eval support "
                          f"{' and '.join(SUPPORTED_PIPELINES)} folders or hub ids")
    return name


class SDTextEncoder:
    """Captions -> (B, 77, D): SD 1.5's CLIP last hidden state, padded to the tokenizer's length."""

    def __init__(self, tokenizer: Any, text_encoder: Any, device: torch.device) -> None:
        self.tokenizer, self.text_encoder, self.device = tokenizer, text_encoder, device

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0]


class SDXLTextEncoder:
    """Captions -> :class:`Conditioning` through the SDXL pipeline's own ``encode_prompt`` (both text encoders)."""

    def __init__(self, pipe: Any, resolution: int, device: torch.device) -> None:
        self.pipe, self.device = pipe, device
        self.time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)

    def __call__(self, prompts: Sequence[str]) -> Conditioning:
        hidden, _, pooled, _ = self.pipe.encode_prompt(list(prompts), device=self.device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
        time_ids = self.time_ids.to(self.device, hidden.dtype).expand(hidden.shape[0], -1)
        return Conditioning(hidden, {"text_embeds": pooled, "time_ids": time_ids})

    def unconditional(self) -> Conditioning:
        """The teacher's unconditional branch: zeros when the model sets ``force_zeros_for_empty_prompt`` (SDXL
        base does, and its pipeline samples CFG against zeros), else the encoded empty prompt."""
        empty = self([""])
        if getattr(self.pipe.config, "force_zeros_for_empty_prompt", False):
            return Conditioning(torch.zeros_like(empty.hidden), {"text_embeds": torch.zeros_like(empty.added["text_embeds"]),
                                                                 "time_ids": empty.added["time_ids"]})
        return empty
