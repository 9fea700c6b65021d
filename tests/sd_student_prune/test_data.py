"""The training stream: COCO captions through pycocotools, teacher latents and text embeddings, the on-disk
cache giving the very batches the uncached path gives, and the resumable batch order."""

from __future__ import annotations

import pytest
import torch

from distill_common.errors import DataError
from distill_common.models import load_sd_components
from distill_sd_prune.data import (
    ResumableBatchSampler,
    TrainingStream,
    load_coco_captions,
    open_or_build_cache,
)


def test_cached_and_uncached_streams_give_the_same_batches(tiny_sd_path, data_root, tmp_path):
    components = load_sd_components(tiny_sd_path, include=("vae", "text_encoder", "tokenizer"))
    dataset = load_coco_captions(data_root, "train", 64, limit=3, show_progress=False)
    assert len(dataset) == sum(len(r.captions) for r in dataset.records) >= 15  # one sample per caption
    cache = open_or_build_cache(
        dataset,
        components,
        tmp_path,
        str(tiny_sd_path),
        "train",
        64,
        True,
        False,
        torch.float32,
        show_progress=False,
    )
    manifest = cache.folder / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    again = open_or_build_cache(
        dataset,
        components,
        tmp_path,
        str(tiny_sd_path),
        "train",
        64,
        True,
        False,
        torch.float32,
        show_progress=False,
    )
    assert again.folder == cache.folder and manifest.stat().st_mtime_ns == stamp  # reused, not rebuilt
    kwargs = dict(batch_size=2, seed=3, device=torch.device("cpu"))
    plain = TrainingStream(dataset, components, **kwargs).iterate(start=4)
    cached = TrainingStream(dataset, components, cache=cache, **kwargs).iterate(start=4)
    for _ in range(2):
        a, b = next(plain), next(cached)
        assert a.index == b.index and a.captions == b.captions
        assert a.latents.shape == (2, 4, 16, 16) and a.text_embeds.shape == (2, 77, 32)
        torch.testing.assert_close(a.latents, b.latents, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.text_embeds, b.text_embeds, rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception, match="random flip"):
        open_or_build_cache(dataset, components, tmp_path, "x", "train", 64, True, True, torch.float32)


def test_batch_order_resumes_and_shards():
    fresh = ResumableBatchSampler(10, 3, seed=1)
    stream = iter(fresh)
    batches = [next(stream) for _ in range(7)]  # crosses two epochs of 3 batches
    assert all(len(set(b)) == 3 for b in batches)
    assert next(iter(ResumableBatchSampler(10, 3, seed=1, start_batch=5))) == batches[5]
    rank0 = ResumableBatchSampler(10, 3, seed=1, num_replicas=2, rank=0)
    rank1 = ResumableBatchSampler(10, 3, seed=1, num_replicas=2, rank=1)
    assert [rank0.batch(0), rank1.batch(0), rank0.batch(1)] == batches[:3]
    with pytest.raises(DataError, match="batch"):
        ResumableBatchSampler(2, 3)
