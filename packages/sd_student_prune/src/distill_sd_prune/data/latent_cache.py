"""An on-disk cache of VAE latent moments (per image) and CLIP text embeddings (per caption), as safetensors
shards.

One cache folder per fingerprint of (teacher VAE and text encoder configs and source, data split, resolution,
crop, dtype), so changing any of them builds a new cache instead of silently reusing a wrong one. The folder
is built in a temporary sibling and renamed into place (a kill leaves no half cache). Sizes for SD 1.5 in
fp16: latent moments 8x64x64 at 512 px = 64 KiB per image; a text embedding 77x768 = 116 KiB per caption (COCO
train: ~7.5 GB of latents and ~68 GB of text embeddings; the shared 80-image subset: a few MB).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import track
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from distill_common.checkpoint import atomic_dir
from distill_common.errors import DataError
from distill_sd_prune.data.encoding import encode_prompts, latent_moments

MANIFEST = "manifest.json"
SHARD_SIZE = 512
EMPTY_KEY = "__empty_prompt__"


def caption_key(caption: str) -> str:
    return hashlib.sha1(caption.encode("utf-8")).hexdigest()[:20]


def cache_fingerprint(fields: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(fields), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _save_shards(tensors: dict[str, torch.Tensor], folder: Path, prefix: str) -> dict[str, int]:
    index: dict[str, int] = {}
    keys = list(tensors)
    for shard, start in enumerate(range(0, len(keys), SHARD_SIZE)):
        chunk = {k: tensors[k].contiguous() for k in keys[start : start + SHARD_SIZE]}
        save_file(chunk, str(folder / f"{prefix}-{shard:05d}.safetensors"))
        index.update(dict.fromkeys(chunk, shard))
    return index


@torch.no_grad()
def build_latent_cache(
    dataset: Any,
    vae: Any,
    tokenizer: Any,
    text_encoder: Any,
    folder: Path,
    fingerprint_fields: Mapping[str, Any],
    dtype: torch.dtype = torch.float16,
    batch_size: int = 8,
    show_progress: bool = True,
) -> Path:
    """Encode every image's latent moments and every caption's text embedding of a
    ``CaptionedImageDataset``."""
    folder = Path(folder)
    moments: dict[str, torch.Tensor] = {}
    unreadable: list[str] = []
    records = list(dataset.records)
    starts = range(0, len(records), batch_size)
    for start in track(starts, description="caching latents", disable=not show_progress):
        pixels, ids = [], []
        for record in records[start : start + batch_size]:
            try:
                with dataset.open_image(record) as image:
                    pixels.append(dataset.transform(image))
                ids.append(record.image_id)
            except OSError as exc:
                unreadable.append(f"{record.location}: {exc}")
        if pixels:
            out = latent_moments(vae, torch.stack(pixels)).to("cpu", dtype)
            moments.update({i: m for i, m in zip(ids, out, strict=True)})
    captions = sorted({c for r in records for c in r.captions})
    embeds: dict[str, torch.Tensor] = {
        EMPTY_KEY: encode_prompts(tokenizer, text_encoder, [""])[0].to("cpu", dtype)
    }
    for start in track(range(0, len(captions), 32), description="caching text", disable=not show_progress):
        chunk = captions[start : start + 32]
        out = encode_prompts(tokenizer, text_encoder, chunk).to("cpu", dtype)
        embeds.update({caption_key(c): e for c, e in zip(chunk, out, strict=True)})
    if not moments:
        raise DataError(f"no readable image to cache in {dataset.description}; check the data root")
    with atomic_dir(folder) as tmp:
        manifest = {
            "fingerprint": dict(fingerprint_fields),
            "dtype": str(dtype).removeprefix("torch."),
            "latent_index": _save_shards(moments, tmp, "latents"),
            "text_index": _save_shards(embeds, tmp, "text"),
            "unreadable": unreadable,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest))
    return folder


@dataclass
class LatentCache:
    """Read side of a cache folder; shards are opened lazily in each (worker) process."""

    folder: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, folder: str | Path) -> LatentCache:
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise DataError(f"{folder} is not a latent cache (no {MANIFEST}); delete it so it is rebuilt")
        return cls(folder, json.loads(path.read_text()))

    def __post_init__(self) -> None:
        self._handles: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers reopen the shards
        return {"folder": self.folder, "manifest": self.manifest}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.folder, self.manifest, self._handles = state["folder"], state["manifest"], {}

    def _get(self, prefix: str, index_key: str, key: str) -> torch.Tensor:
        shard = self.manifest[index_key].get(key)
        if shard is None:
            raise DataError(
                f"{key!r} is not in the latent cache {self.folder}; delete the folder so it is rebuilt"
            )
        name = f"{prefix}-{shard:05d}.safetensors"
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.folder / name), framework="pt")
        return self._handles[name].get_tensor(key)

    def has_image(self, image_id: str) -> bool:
        return image_id in self.manifest["latent_index"]

    def moments(self, image_id: str) -> torch.Tensor:
        return self._get("latents", "latent_index", image_id)

    def text_embeds(self, caption: str) -> torch.Tensor:
        return self._get("text", "text_index", caption_key(caption))

    def empty_embeds(self) -> torch.Tensor:
        return self._get("text", "text_index", EMPTY_KEY)


class CachedLatentDataset(Dataset):
    """Samples of a ``CaptionedImageDataset`` (caption mode ``all``) served from a :class:`LatentCache`:
    ``{"moments": (2C, h, w), "text_embeds": (77, D), "caption": str}``."""

    def __init__(self, dataset: Any, cache: LatentCache) -> None:
        self.dataset = dataset
        self.cache = cache
        self.indices = [i for i in range(len(dataset)) if cache.has_image(dataset.caption_at(i)[0])]
        if not self.indices:
            raise DataError(f"the latent cache {cache.folder} holds none of the data set's images; delete it")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id, caption = self.dataset.caption_at(self.indices[index])
        return {
            "moments": self.cache.moments(image_id),
            "text_embeds": self.cache.text_embeds(caption),
            "caption": caption,
        }
