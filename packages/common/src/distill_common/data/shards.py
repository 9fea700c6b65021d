"""Streaming captioned image shards in the WebDataset format (Aizman et al. 2019, "High Performance I/O For Large
Scale Deep Learning"; the format of LAION-5B, Schuhmann et al. 2022, on which LCM trains): tar files whose samples
are an image (``.jpg``/``.jpeg``/``.png``/``.webp``) plus a caption (``.txt``, or ``.json`` with a caption field),
grouped by file stem. Shards are named with brace patterns, ``'data/{00000..00099}.tar'``.

:class:`CaptionShardStream` is an endless stream of ``{"pixel_values", "caption", "image_id"}`` samples:

- **Epochs.** Each epoch visits this process's shards once, in an order drawn from (seed, epoch); samples keep their
  order inside a shard.
- **Several processes.** The epoch's shard order is split by rank: process ``r`` of ``n`` reads shards
  ``r, r + n, ...``; every process needs at least one shard.
- **Resume.** :meth:`state_dict` is the position of the next sample (epoch, shard, sample within the shard) plus
  the counters; :meth:`load_state_dict` continues from it, skipping the consumed samples of the shard without
  decoding them. The crop/flip of a sample depends only on (seed, epoch, shard, sample), never on the global RNG,
  so a resumed stream yields exactly the tensors an uninterrupted one would. The position advances before a sample
  is yielded, so after a batch is consumed it points past that batch.
- **Corrupt data.** A sample whose image does not decode, or that has no image or no caption, is skipped and counted
  (``num_corrupt``), as the map-style captioned data sets do; a shard that cannot be read, or breaks off, is counted
  in ``num_bad_shards`` and the stream moves to the next one.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import IterableDataset

from distill_common.data.transforms import build_image_transform
from distill_common.errors import ConfigError, DataError

SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SHARD_CAPTION_EXTENSIONS = ("txt", "json")
JSON_CAPTION_KEYS = ("caption", "text", "prompt", "TEXT")
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def expand_shards(spec: str) -> list[str]:
    """``'path/{00000..00099}.tar'`` -> the existing local files (brace expansion; ``::`` separates several
    patterns). Raises ConfigError (one line) for an empty pattern or missing files."""
    from braceexpand import braceexpand

    if not spec or not spec.strip():
        raise ConfigError("--data-shards is empty; pass a pattern like 'data/{00000..00099}.tar'")
    urls = [u for part in spec.split("::") for u in braceexpand(part.strip())]
    missing = [u for u in urls if not Path(u).expanduser().is_file()]
    if missing:
        raise ConfigError(f"--data-shards: {len(missing)} of {len(urls)} shard files do not exist (first: {missing[0]}); "
                          "check the pattern, e.g. 'data/{00000..00099}.tar'")
    return [str(Path(u).expanduser()) for u in urls]


def shards_fingerprint(urls: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(urls).encode()).hexdigest()[:16]


def _caption(sample: dict[str, Any], caption_key: str | None) -> str | None:
    if "txt" in sample:
        text = sample["txt"].decode("utf-8", errors="replace")
    elif "json" in sample:
        try:
            meta = json.loads(sample["json"].decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            return None
        keys = ((caption_key,) if caption_key else ()) + JSON_CAPTION_KEYS
        text = next((meta[k] for k in keys if isinstance(meta, dict) and isinstance(meta.get(k), str)), None)
        if text is None:
            return None
    else:
        return None
    text = " ".join(text.split())
    return text or None


class CaptionShardStream(IterableDataset):
    """An endless, resumable stream over WebDataset caption shards (see the module docstring)."""

    def __init__(self, shards: str | Sequence[str], *, resolution: int, center_crop: bool = False,
                 random_flip: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 caption_key: str | None = "text") -> None:
        self.urls = expand_shards(shards) if isinstance(shards, str) else [str(u) for u in shards]
        if not self.urls:
            raise ConfigError("--data-shards names no shard files")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside 0..{world_size - 1}")
        if len(self.urls) < world_size:
            raise ConfigError(f"--data-shards names {len(self.urls)} shards for {world_size} processes; every "
                              "process needs at least one shard: write more, smaller shards")
        self.transform = build_image_transform(resolution, center_crop=center_crop, random_flip=random_flip)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.caption_key = caption_key
        self.epoch, self.shard, self.sample = 0, 0, 0  # position of the next sample
        self.num_corrupt, self.num_bad_shards, self.num_yielded = 0, 0, 0
        self.corrupt_examples: list[str] = []

    # ------------------------------------------------------------------ position
    def shards_of_epoch(self, epoch: int) -> list[str]:
        """This process's shards in epoch ``epoch``: a (seed, epoch) permutation of all shards, split by rank."""
        order = list(self.urls)
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order[self.rank::self.world_size]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "shard": self.shard, "sample": self.sample, "num_corrupt": self.num_corrupt,
                "num_bad_shards": self.num_bad_shards, "num_yielded": self.num_yielded, "rank": self.rank,
                "world_size": self.world_size, "shards": shards_fingerprint(self.urls)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("shards") not in (None, shards_fingerprint(self.urls)):
            raise ConfigError("the checkpoint was written for other --data-shards; resume with the same shard pattern "
                              "or pass a new --run-name")
        if int(state.get("world_size", self.world_size)) != self.world_size:
            raise ConfigError(f"the checkpoint's data position is for {state.get('world_size')} processes, this run "
                              f"has {self.world_size}; resume with the same number of processes")
        self.epoch, self.shard, self.sample = int(state["epoch"]), int(state["shard"]), int(state["sample"])
        self.num_corrupt = int(state.get("num_corrupt", 0))
        self.num_bad_shards = int(state.get("num_bad_shards", 0))
        self.num_yielded = int(state.get("num_yielded", 0))

    def stats(self) -> dict[str, int]:
        return {"num_shards": len(self.urls), "num_corrupt": self.num_corrupt, "num_bad_shards": self.num_bad_shards,
                "num_samples_seen": self.num_yielded}

    # ------------------------------------------------------------------ reading
    def _raw_samples(self, url: str) -> Iterator[dict[str, Any]]:
        """Samples of one tar (key -> bytes), grouped by stem; a broken tar ends the shard and is counted."""
        from webdataset.tariterators import group_by_keys, tar_file_expander

        try:
            with open(url, "rb") as handle:
                yield from group_by_keys(tar_file_expander([{"stream": handle, "url": url}]))
        except (tarfile.TarError, OSError, EOFError, ValueError) as err:
            self.num_bad_shards += 1
            self._note(f"{url}: {err}")

    def _note(self, text: str) -> None:
        if len(self.corrupt_examples) < 20:
            self.corrupt_examples.append(text)

    def _decode(self, raw: dict[str, Any], url: str, epoch: int, shard: int, index: int) -> dict[str, Any] | None:
        image_ext = next((e for e in SHARD_IMAGE_EXTENSIONS if e in raw), None)
        caption = _caption(raw, self.caption_key)
        key = str(raw.get("__key__", index))
        if image_ext is None or caption is None:
            self._note(f"{url}:{key}: no {'image' if image_ext is None else 'caption'}")
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(raw[image_ext])) as image, torch.random.fork_rng(devices=[]):
                    torch.manual_seed(hash_seed(self.seed, epoch, shard + self.rank * 1_000_003, index))
                    pixels = self.transform(image)  # (3, R, R) in [-1, 1]
        except _IMAGE_ERRORS as err:
            self._note(f"{url}:{key}: {err}")
            return None
        return {"pixel_values": pixels, "caption": caption, "image_id": f"{Path(url).name}/{key}"}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            shards = self.shards_of_epoch(self.epoch)
            yielded_this_epoch, resumed_mid_epoch = 0, self.shard > 0 or self.sample > 0
            while self.shard < len(shards):
                url, shard, skip = shards[self.shard], self.shard, self.sample
                for index, raw in enumerate(self._raw_samples(url)):
                    if index < skip:
                        continue
                    self.sample = index + 1
                    sample = self._decode(raw, url, self.epoch, shard, index)
                    if sample is None:
                        self.num_corrupt += 1
                        continue
                    self.num_yielded += 1
                    yielded_this_epoch += 1
                    yield sample
                self.shard, self.sample = self.shard + 1, 0
            if yielded_this_epoch == 0 and not resumed_mid_epoch:
                raise DataError(f"no readable samples in this process's {len(shards)} shards (first: {shards[0]}; "
                                f"{self.num_corrupt} corrupt samples, e.g. {', '.join(self.corrupt_examples[:2])}); "
                                "each sample needs an image (.jpg/.png/.webp) and a .txt or .json caption")
            self.epoch, self.shard, self.sample = self.epoch + 1, 0, 0


def hash_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (no Python hash randomisation)."""
    digest = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def iter_batches(stream: Any, batch_size: int) -> Iterator[list[dict[str, Any]]]:
    """Lists of ``batch_size`` samples from an endless stream, pulled lazily (so its position stays exact)."""
    iterator = iter(stream)
    while True:
        yield [next(iterator) for _ in range(batch_size)]
