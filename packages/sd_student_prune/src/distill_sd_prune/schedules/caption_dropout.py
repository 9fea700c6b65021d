"""Caption dropout whose rate grows over training (the seed's V2.2): the probability of replacing a caption by
the empty prompt is linear in training progress from ``start`` to ``end``. It teaches the student the
unconditional prediction that classifier-free guidance (Ho & Salimans 2022) needs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distill_common.errors import ConfigError
from distill_sd_prune.schedules.progress import linear


@dataclass(frozen=True)
class CaptionDropoutSchedule:
    start: float = 0.0
    end: float = 0.0

    def __post_init__(self) -> None:
        for value in (self.start, self.end):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"caption dropout rates must lie in [0, 1], got {value}")

    @property
    def enabled(self) -> bool:
        return self.start > 0 or self.end > 0

    def rate(self, progress: float) -> float:
        return linear(self.start, self.end, progress)

    def apply(
        self,
        text_embeds: torch.Tensor,
        empty_embed: torch.Tensor,
        progress: float,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace each sample's embedding (B, L, D) by ``empty_embed`` (L, D) with probability
        ``rate(progress)``;
        returns the embeddings and the boolean drop mask (B,)."""
        rate = self.rate(progress)
        batch = text_embeds.shape[0]
        draws = torch.rand(
            batch, generator=generator, device=generator.device if generator is not None else "cpu"
        )
        mask = (draws < rate).to(text_embeds.device)
        if not bool(mask.any()):
            return text_embeds, mask
        empty = empty_embed.to(text_embeds.device, text_embeds.dtype).expand_as(text_embeds)
        return torch.where(mask[:, None, None], empty, text_embeds), mask
