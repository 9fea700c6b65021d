"""Streaming WebDataset caption shards (distill_common.data.shards): captions from .txt and .json, epochs, split by
rank, exact resume from a saved position, corrupt samples skipped and counted, one-line errors."""

from __future__ import annotations

import itertools
import tarfile

import pytest
import torch
from caption_shards import coco_pairs, write_caption_shards

from distill_common.data.shards import CaptionShardStream, expand_shards
from distill_common.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def shards(coco_root, tmp_path_factory):
    return write_caption_shards(coco_root, tmp_path_factory.mktemp("shards"), num_shards=3, per_shard=4,
                                corrupt=((1, 2),))


def take(stream, n):
    return list(itertools.islice(iter(stream), n))


def test_stream_reads_txt_and_json_captions_and_counts_corrupt(shards, coco_root):
    stream = CaptionShardStream(shards, resolution=32, seed=0)
    assert len(stream.urls) == 3
    samples = take(stream, 11)  # 12 samples, one corrupt: exactly one epoch
    assert stream.num_corrupt == 1 and stream.epoch == 0
    captions = {c for _, c in coco_pairs(coco_root, 12)}
    assert {s["caption"] for s in samples} <= {" ".join(c.split()) for c in captions}
    assert len({s["image_id"] for s in samples}) == 11
    assert all(s["pixel_values"].shape == (3, 32, 32) for s in samples)
    assert all(-1.0 <= s["pixel_values"].min() and s["pixel_values"].max() <= 1.0 for s in samples)
    assert any(s["image_id"].endswith("00000001") for s in samples)  # a .json-captioned sample
    nxt = take(stream, 1)[0]  # epoch 2 starts with another shard order
    assert stream.epoch == 1 and nxt["caption"]
    assert stream.stats()["num_corrupt"] == 1


def test_resume_from_state_gives_the_same_samples(shards):
    full = CaptionShardStream(shards, resolution=32, seed=3, random_flip=True)
    reference = take(full, 17)
    first = CaptionShardStream(shards, resolution=32, seed=3, random_flip=True)
    iterator = iter(first)
    head = [next(iterator) for _ in range(6)]
    state = first.state_dict()
    resumed = CaptionShardStream(shards, resolution=32, seed=3, random_flip=True)
    resumed.load_state_dict(state)
    before = torch.get_rng_state()
    tail = take(resumed, 11)
    assert torch.equal(torch.get_rng_state(), before)  # augmentation never touches the global RNG
    for got, want in zip(head + tail, reference, strict=True):
        assert got["image_id"] == want["image_id"] and got["caption"] == want["caption"]
        torch.testing.assert_close(got["pixel_values"], want["pixel_values"], rtol=0, atol=0)


def test_shards_split_by_rank(shards):
    ranks = [CaptionShardStream(shards, resolution=16, seed=1, rank=r, world_size=2) for r in range(2)]
    own = [set(s.shards_of_epoch(0)) for s in ranks]
    assert not own[0] & own[1] and own[0] | own[1] == set(expand_shards(shards))
    seen = [{x["image_id"].split("/")[0] for x in take(s, 3)} for s in ranks]
    assert seen[0] <= {u.rsplit("/", 1)[1] for u in own[0]} and seen[1] <= {u.rsplit("/", 1)[1] for u in own[1]}
    with pytest.raises(ConfigError, match="every process needs at least one shard"):
        CaptionShardStream(shards, resolution=16, rank=0, world_size=4)
    with pytest.raises(ConfigError, match="this run has 2"):
        ranks[0].load_state_dict({**ranks[0].state_dict(), "world_size": 1})


def test_bad_shards_and_patterns(tmp_path, shards):
    with pytest.raises(ConfigError, match="do not exist"):
        expand_shards(str(tmp_path / "{00000..00002}.tar"))
    with pytest.raises(ConfigError, match="empty"):
        expand_shards(" ")
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"\x00garbage" * 100)
    empty = tmp_path / "nocaption.tar"
    with tarfile.open(empty, "w") as tar:
        info = tarfile.TarInfo("a.jpg")
        info.size = 3
        import io
        tar.addfile(info, io.BytesIO(b"abc"))
    stream = CaptionShardStream([str(broken), str(empty)], resolution=16)
    with pytest.raises(DataError, match="no readable samples"):
        take(stream, 1)
    assert stream.num_corrupt == 1
    mixed = CaptionShardStream([str(broken), *expand_shards(shards)], resolution=16)
    assert len(take(mixed, 12)) == 12  # a broken shard is skipped (and counted), the others stream on
    assert mixed.num_bad_shards >= 1 or mixed.num_corrupt >= 1
