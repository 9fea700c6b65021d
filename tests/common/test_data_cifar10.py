"""CIFAR-10 on the real shared shards: counts, labels, pixels, image folders and the offline Hub source."""

from __future__ import annotations

import io
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill_common.data import CIFAR10_CLASSES, Cifar10Shards, load_cifar10
from distill_common.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def test_split(cifar_root: Path) -> Cifar10Shards:
    return load_cifar10("shards", "test", cifar_root, show_progress=False)


def _first_members(shard: Path, count: int) -> list[tuple[str, np.ndarray, int]]:
    """(key, RGB pixels via PIL, label) of the first samples of a shard, read independently of the loader."""
    out: dict[str, dict] = {}
    with tarfile.open(shard) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            data = tar.extractfile(member).read()
            out.setdefault(key, {})[ext] = data
            if len(out) > count:
                break
    rows = []
    for key, parts in list(out.items())[:count]:
        pixels = np.asarray(Image.open(io.BytesIO(parts["jpg"])).convert("RGB"))
        rows.append((key, pixels, int(parts["cls"].decode())))
    return rows


def test_split_sizes(cifar_root: Path, test_split: Cifar10Shards) -> None:
    assert len(test_split) == 10_000
    train = load_cifar10("shards", "train", cifar_root.parent, show_progress=False)  # data root works too
    assert len(train) == 50_000
    assert set(train.class_counts().values()) == {5_000}
    assert not set(train.keys) & set(test_split.keys)


def test_test_split_has_1000_per_class(test_split: Cifar10Shards) -> None:
    assert test_split.class_counts() == dict.fromkeys(CIFAR10_CLASSES, 1_000)
    assert Counter(test_split.labels) == dict.fromkeys(range(10), 1_000)


def test_labels_match_the_class_name_in_each_key(test_split: Cifar10Shards) -> None:
    # keys look like test_<class>_<n>; the label comes from KEY.cls
    mismatched = [
        k
        for k, y in zip(test_split.keys, test_split.labels, strict=True)
        if k.split("_")[1] != CIFAR10_CLASSES[y]
    ]
    assert mismatched == []


def test_items_are_images_in_minus_one_one_matching_an_independent_decode(test_split: Cifar10Shards) -> None:
    reference = _first_members(test_split.shards[0], 5)
    for index, (key, pixels, label) in enumerate(reference):
        image, y = test_split[index]
        assert test_split.keys[index] == key and y == label
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert image.min() >= -1.0 and image.max() <= 1.0 and image.std() > 0.05
        as_uint8 = ((image + 1) * 127.5).round().permute(1, 2, 0).numpy()
        # torchvision and PIL both use libjpeg; allow for IDCT rounding differences
        assert np.abs(as_uint8 - pixels.astype(np.float32)).mean() < 2.0
    assert test_split[-1][0].shape == (3, 32, 32)
    with pytest.raises(IndexError):
        test_split[len(test_split)]


def test_limit_and_preload(cifar_root: Path, test_split: Cifar10Shards) -> None:
    small = load_cifar10("shards", "test", cifar_root, limit=300, show_progress=False)
    assert len(small) == 300 and small.keys == test_split.keys[:300]
    lazy = torch.stack([small[i][0] for i in range(0, 300, 50)])
    images = small.uint8_images()
    assert images.shape == (300, 3, 32, 32) and images.dtype == torch.uint8
    torch.testing.assert_close(lazy, images[::50].float() / 127.5 - 1.0)


def test_random_flip_only_mirrors(cifar_root: Path) -> None:
    plain = load_cifar10("shards", "test", cifar_root, limit=4, show_progress=False)
    flipped = load_cifar10("shards", "test", cifar_root, limit=4, random_flip=True, show_progress=False)
    torch.manual_seed(0)
    seen = set()
    for _ in range(16):
        image, base = flipped[2][0], plain[2][0]
        assert torch.equal(image, base) or torch.equal(image, base.flip(-1))
        seen.add(torch.equal(image, base))
    assert seen == {True, False}


def test_env_var_data_root(cifar_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILL_DATA_ROOT", str(cifar_root.parent))
    assert len(load_cifar10("shards", "test", None, limit=10, show_progress=False)) == 10


def test_bad_choices_list_valid_ones(cifar_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'folder', 'hub', 'shards'"):
        load_cifar10("lmdb", "train", cifar_root)
    with pytest.raises(ConfigError, match="'test', 'train'"):
        load_cifar10("shards", "validation", cifar_root)
    with pytest.raises(DataError, match="train-\\*.tar"):
        load_cifar10("shards", "train", tmp_path)


def _write_pngs(folder: Path, pixels: list[np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(folder / f"{i:03d}.png")


def test_image_folder_uses_official_indices(tmp_path: Path, test_split: Cifar10Shards) -> None:
    cats = [test_split.image_uint8(i).permute(1, 2, 0).numpy() for i in range(3)]
    dogs = [test_split.image_uint8(i).permute(1, 2, 0).numpy() for i in range(3, 5)]
    _write_pngs(tmp_path / "train" / "cat", cats)
    _write_pngs(tmp_path / "train" / "dog", dogs)
    ds = load_cifar10("folder", "train", tmp_path)
    assert len(ds) == 5 and sorted(ds.labels) == [3, 3, 3, 5, 5]
    image, label = ds[0]
    assert label == 3 and image.shape == (3, 32, 32)
    torch.testing.assert_close(image, test_split[0][0])  # PNG is lossless: identical to the shard sample
    assert len(load_cifar10("folder", "train", tmp_path, limit=2)) == 2


def test_image_folder_with_other_names_is_sorted(tmp_path: Path) -> None:
    pixels = [np.full((40, 48, 3), v, dtype=np.uint8) for v in (10, 200)]
    _write_pngs(tmp_path / "zebra", pixels[:1])
    _write_pngs(tmp_path / "apple", pixels[1:])
    ds = load_cifar10("folder", "train", tmp_path)  # no train/ subfolder: the root itself
    assert ds.classes == ["apple", "zebra"]
    by_label = {label: image for image, label in (ds[0], ds[1])}
    assert by_label[0].shape == (3, 32, 32)  # resized from 48x40
    assert by_label[0].mean() > by_label[1].mean()  # apple is the bright one


def test_empty_image_folder_names_the_path(tmp_path: Path) -> None:
    (tmp_path / "cat").mkdir()
    with pytest.raises(DataError) as err:
        load_cifar10("folder", "test", tmp_path)
    assert str(tmp_path) in str(err.value) and "class_name/" in str(err.value)


def test_hub_source_offline_fails_fast() -> None:
    start = time.monotonic()
    with pytest.raises(DataError, match="--data-root"):
        load_cifar10("hub", "train")
    assert time.monotonic() - start < 10


def test_hub_source_unreachable_without_offline_flags_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.monotonic()
    with pytest.raises(DataError, match="unreachable.*--data-root"):
        load_cifar10("hub", "test")
    assert time.monotonic() - start < 10
