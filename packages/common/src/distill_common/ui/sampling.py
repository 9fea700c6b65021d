"""One timed batch of images per model, as the page shows them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from distill_common.errors import ConfigError
from distill_common.generator import Generator
from distill_common.runtime import timed

DISPLAY_SIZE = 192  # small images (CIFAR 32x32) are enlarged with nearest-neighbour for the page


@dataclass
class Sample:
    """One model's images for the chosen conditions, with the measured time per image."""

    label: str
    uri: str
    steps: int
    ms_per_image: float
    images: list[Image.Image]
    conditions: list[str]

    @property
    def summary(self) -> str:
        return f"{self.steps} step{'s' if self.steps != 1 else ''} · {self.ms_per_image:.1f} ms/image"

    @property
    def timing_note(self) -> str:
        """What the ms/image measured, so it is not read as the evaluation's number (other batch size)."""
        return (f"timed on this page: one batch of {len(self.images)}, warm (after a 1-step warm-up call); "
                "the Metrics tab's ms/image come from the evaluation's larger batches")

    def caption(self, i: int) -> str:
        return f"{self.label} · {self.summary} · {self.conditions[i]}"


def seeds_for(seed: int, n: int) -> list[int]:
    """One seed per condition; the same list for every model, so they all start from the same noise."""
    return [seed + i for i in range(n)]


def to_pil(images) -> list[Image.Image]:
    """(N, 3, H, W) floats in [0, 1] -> RGB images enlarged to at least ``DISPLAY_SIZE``."""
    out = []
    for img in images:
        arr = (img.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
        pil = Image.fromarray(arr)
        if pil.width < DISPLAY_SIZE:
            factor = -(-DISPLAY_SIZE // pil.width)
            pil = pil.resize((pil.width * factor, pil.height * factor), Image.Resampling.NEAREST)
        out.append(pil)
    return out


def warm_up(generator: Generator) -> None:
    """One 1-step image, so lazy initialisation (kernels, caches) is not billed to the first measured batch."""
    condition = 0 if generator.condition_kind == "class" else "a photograph"
    generator.generate([condition], 1, [0], None)


def generate_sample(generator: Generator, label: str, uri: str, conditions: Sequence[Any], names: Sequence[str],
                    steps: int, seed: int, guidance: float | None) -> Sample:
    """Generate one image per condition and time it (device-synchronised, :func:`distill_common.runtime.timed`)."""
    if not conditions:
        raise ConfigError("no condition chosen; pick at least one class or enter a prompt")
    if steps < 1:
        raise ConfigError(f"steps must be at least 1, got {steps}")
    seeds = seeds_for(seed, len(conditions))
    with timed(getattr(generator, "device", None)) as t:
        images = generator.generate(list(conditions), int(steps), seeds, guidance)  # (N, 3, H, W)
    ms = 1000.0 * t["seconds"] / len(conditions)
    return Sample(label, uri, int(steps), ms, to_pil(images), [str(n) for n in names])
