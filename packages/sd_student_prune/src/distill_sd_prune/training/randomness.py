"""Per-step random generators derived from (seed, purpose, step, process): a resumed run draws exactly the
noise, timesteps, caption drops and latents an uninterrupted run would have drawn, without replaying any RNG
stream."""

from __future__ import annotations

import hashlib

import torch


def derived_seed(seed: int, purpose: str, index: int, rank: int = 0) -> int:
    digest = hashlib.sha256(f"{seed}:{purpose}:{index}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def step_generator(
    seed: int, purpose: str, index: int, rank: int = 0, device: torch.device | str = "cpu"
) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derived_seed(seed, purpose, index, rank))
