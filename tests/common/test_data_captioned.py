"""Captioned image sets: COCO 2017 (partial download), local folder layouts, corrupt files, caption modes."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from distill_common.data import CaptionedImageDataset, load_captioned
from distill_common.errors import ConfigError, DataError

R = 32  # tiny resolution keeps decoding cheap


@pytest.fixture(scope="module")
def coco_val_json(coco_root: Path) -> dict:
    return json.loads((coco_root / "annotations" / "captions_val2017.json").read_text())


@pytest.fixture(scope="module")
def coco_val(coco_root: Path) -> CaptionedImageDataset:
    return load_captioned("coco", coco_root, split="val", resolution=R, seed=7)


def _captions_by_image(coco_json: dict) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for ann in coco_json["annotations"]:
        out.setdefault(str(ann["image_id"]), []).append(" ".join(ann["caption"].split()))
    return out


def test_coco_val_skips_and_counts_missing_images(
    coco_root: Path, coco_val: CaptionedImageDataset, coco_val_json: dict
) -> None:
    present = set(p.name for p in (coco_root / "val2017").iterdir())
    listed = {img["file_name"] for img in coco_val_json["images"]}
    assert len(listed) == 5000 and len(listed & present) == 159
    stats = coco_val.stats()
    assert len(coco_val) == stats["num_images"] == 159
    assert coco_val.num_missing == stats["num_missing"] == 5000 - 159
    assert (
        stats["num_captions"] + stats["num_missing_captions"] == len(coco_val_json["annotations"]) == 25_014
    )
    assert stats["num_corrupt"] == 0


def test_coco_sample_is_pixels_caption_and_id(coco_val: CaptionedImageDataset, coco_val_json: dict) -> None:
    captions = _captions_by_image(coco_val_json)
    sample = coco_val[3]
    assert set(sample) == {"pixel_values", "caption", "image_id"}
    pixels = sample["pixel_values"]
    assert pixels.shape == (3, R, R) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1 and pixels.std() > 0.05
    assert sample["caption"] in captions[sample["image_id"]]
    assert (sample["image_id"], sample["caption"]) == coco_val.caption_at(3)


def test_random_caption_mode_is_seeded_per_epoch(
    coco_root: Path, coco_val: CaptionedImageDataset, coco_val_json: dict
) -> None:
    captions = _captions_by_image(coco_val_json)
    epoch0 = [coco_val.caption_at(i) for i in range(len(coco_val))]
    assert all(c in captions[i] for i, c in epoch0)
    again = load_captioned("coco", coco_root, split="val", resolution=R, seed=7, verify=False)
    assert [again.caption_at(i) for i in range(len(again))] == epoch0  # same (seed, epoch): same captions
    again.set_epoch(1)
    epoch1 = [again.caption_at(i) for i in range(len(again))]
    assert [i for i, _ in epoch1] == [i for i, _ in epoch0]  # same images, in the same order
    assert (
        sum(a != b for a, b in zip(epoch0, epoch1, strict=True)) > len(epoch0) // 2
    )  # ~4/5 change with 5 captions
    again.set_epoch(0)
    assert [again.caption_at(i) for i in range(len(again))] == epoch0  # resumable
    other_seed = load_captioned("coco", coco_root, split="val", resolution=R, seed=8, verify=False)
    assert [other_seed.caption_at(i) for i in range(len(other_seed))] != epoch0


def test_all_caption_mode_gives_one_sample_per_caption(
    coco_root: Path, coco_val: CaptionedImageDataset, coco_val_json: dict
) -> None:
    everything = load_captioned(
        "coco", coco_root, split="val", resolution=R, caption_mode="all", verify=False
    )
    captions = _captions_by_image(coco_val_json)
    local_ids = {r.image_id for r in coco_val.records}
    expected = Counter((i, c) for i in local_ids for c in captions[i])
    assert len(everything) == sum(expected.values()) == everything.stats()["num_captions"]
    assert Counter(everything.caption_at(i) for i in range(len(everything))) == expected
    assert everything[len(everything) - 1]["caption"] == everything.caption_at(len(everything) - 1)[1]


def test_coco_train_split_is_complete(coco_root: Path) -> None:
    train = load_captioned("coco", coco_root.parent, split="train", resolution=R, caption_mode="all")
    assert train.stats()["num_images"] == 80 and len(train) == 400 and train.num_missing == 0


def test_coco_without_images_names_the_folders(tmp_path: Path, coco_root: Path) -> None:
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_train2017.json").write_bytes(
        (coco_root / "annotations" / "captions_train2017.json").read_bytes()
    )
    with pytest.raises(DataError, match="train2017"):
        load_captioned("coco", tmp_path, split="train")


def test_batches_collate(coco_val: CaptionedImageDataset) -> None:
    batch = next(iter(DataLoader(coco_val, batch_size=2)))
    assert batch["pixel_values"].shape == (2, 3, R, R) and len(batch["caption"]) == 2


def _small_real_images(coco_root: Path, count: int) -> list[Image.Image]:
    files = sorted((coco_root / "train2017").glob("*.jpg"))[:count]
    return [Image.open(f).convert("RGB").resize((48, 40)) for f in files]


def test_folder_layout_images_and_captions_dirs(tmp_path: Path, coco_root: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "captions").mkdir()
    for i, image in enumerate(_small_real_images(coco_root, 3)):
        image.save(tmp_path / "images" / f"img{i}.png")
    (tmp_path / "captions" / "img0.txt").write_text("a first caption\n\n  a second   caption \n")
    (tmp_path / "captions" / "img1.txt").write_text("only one")
    (tmp_path / "captions" / "orphan.txt").write_text("no image for me")  # img2 has no caption
    ds = load_captioned("folder", tmp_path, resolution=R, caption_mode="all")
    assert sorted(ds.caption_at(i) for i in range(len(ds))) == [
        ("img0", "a first caption"),
        ("img0", "a second caption"),
        ("img1", "only one"),
    ]
    assert ds.stats()["num_missing"] == 1 and ds.stats()["num_uncaptioned"] == 1
    assert ds[2]["pixel_values"].shape == (3, R, R)


def test_folder_layout_side_by_side_under_split(tmp_path: Path, coco_root: Path) -> None:
    folder = tmp_path / "train"
    folder.mkdir()
    for i, image in enumerate(_small_real_images(coco_root, 2)):
        image.save(folder / f"{i}.jpg")
        (folder / f"{i}.txt").write_text(f"caption {i}")
    ds = load_captioned("folder", tmp_path, split="train", resolution=R)
    assert len(ds) == 2 and [ds[i]["caption"] for i in range(2)] == ["caption 0", "caption 1"]
    assert [ds[i]["image_id"] for i in range(2)] == ["0", "1"]


def test_imagefolder_metadata_jsonl(tmp_path: Path, coco_root: Path) -> None:
    images = _small_real_images(coco_root, 2)
    images[0].save(tmp_path / "a.png")
    images[1].save(tmp_path / "b.png")
    rows = [
        {"file_name": "a.png", "text": "first of a"},
        {"file_name": "b.png", "text": ["b one", "b two"]},
        {"file_name": "a.png", "text": "second of a"},
        {"file_name": "gone.png", "text": "missing file"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for source in ("imagefolder", "folder"):  # "folder" detects metadata.jsonl too
        ds = load_captioned(source, tmp_path, resolution=R, caption_mode="all")
        assert sorted(ds.caption_at(i) for i in range(len(ds))) == [
            ("a", "first of a"),
            ("a", "second of a"),
            ("b", "b one"),
            ("b", "b two"),
        ]
        assert ds.num_missing == 1
    with pytest.raises(DataError, match="'caption'"):
        load_captioned("imagefolder", tmp_path, caption_column="caption")


def test_corrupt_file_is_skipped_and_counted_or_raises_when_strict(tmp_path: Path, coco_root: Path) -> None:
    for i, image in enumerate(_small_real_images(coco_root, 3)):
        image.save(tmp_path / f"good{i}.png")
        (tmp_path / f"good{i}.txt").write_text(f"good {i}")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not a png body" * 10)
    (tmp_path / "bad.txt").write_text("broken")
    ds = load_captioned("folder", tmp_path, resolution=R)
    assert len(ds) == 3 and ds.num_corrupt == 1 and ds.stats()["num_corrupt"] == 1
    assert "bad" not in {ds[i]["image_id"] for i in range(3)}
    with pytest.raises(DataError, match="bad.png"):
        load_captioned("folder", tmp_path, resolution=R, strict=True)


def test_truncated_image_is_skipped_at_load_time(tmp_path: Path, coco_root: Path) -> None:
    source = sorted((coco_root / "train2017").glob("*.jpg"))[:3]
    for i, path in enumerate(source):
        data = path.read_bytes()
        (tmp_path / f"{i}.jpg").write_bytes(
            data if i != 1 else data[: len(data) // 3]
        )  # 1.jpg: header intact
        (tmp_path / f"{i}.txt").write_text(f"caption {i}")
    ds = load_captioned("folder", tmp_path, resolution=R)
    assert len(ds) == 3 and ds.num_corrupt == 0  # the header still parses
    sample = ds[1]
    assert sample["image_id"] == "2" and ds.num_corrupt == 1  # deterministically the next readable sample
    assert ds[1]["image_id"] == "2" and ds.num_corrupt == 1  # counted once
    strict = load_captioned("folder", tmp_path, resolution=R, strict=True)
    with pytest.raises(DataError, match="1.jpg"):
        strict[1]


def test_empty_folder_names_path_and_layouts(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DataError) as err:
        load_captioned("folder", tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message
    assert (
        "images/" in message
        and "captions/" in message
        and "metadata.jsonl" in message
        and "side by side" in message
    )


def test_limit_and_bad_choices(coco_root: Path) -> None:
    assert len(load_captioned("coco", coco_root, split="val", limit=5, resolution=R)) == 5
    with pytest.raises(ConfigError, match="'all', 'random'"):
        load_captioned("coco", coco_root, split="val", caption_mode="first")
    with pytest.raises(ConfigError, match="'coco', 'folder', 'hub', 'imagefolder'"):
        load_captioned("laion", coco_root)
    with pytest.raises(ConfigError, match="'train', 'val'"):
        load_captioned("coco", coco_root, split="test")


def test_hub_source_offline_fails_fast() -> None:
    start = time.monotonic()
    with pytest.raises(DataError, match="--data-root"):
        load_captioned("hub", hub_name="lambdalabs/naruto-blip-captions", split="train")
    assert time.monotonic() - start < 10
    with pytest.raises(ConfigError, match="--hub-name"):
        load_captioned("hub")


def test_hub_source_reads_a_local_dataset_with_configured_columns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub code path on a data set saved locally (load_dataset of a local parquet folder)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")

    images = [Image.fromarray(np.full((20, 24, 3), v, dtype=np.uint8)) for v in (0, 255)]
    table = datasets.Dataset.from_dict(
        {"picture": images, "caps": [["dark", "black"], ["bright"]], "uid": ["x1", "x2"]},
        features=datasets.Features(
            {
                "picture": datasets.Image(),
                "caps": datasets.Sequence(datasets.Value("string")),
                "uid": datasets.Value("string"),
            }
        ),
    )
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    table.to_parquet(str(repo / "data" / "train-00000-of-00001.parquet"))
    ds = load_captioned(
        "hub",
        hub_name=str(repo),
        split="train",
        resolution=8,
        image_column="picture",
        caption_column="caps",
        id_column="uid",
        caption_mode="all",
    )
    assert len(ds) == 3
    first, last = ds[0], ds[2]
    assert first["image_id"] == "x1" and first["caption"] == "dark" and first["pixel_values"].max() == -1
    assert last["image_id"] == "x2" and last["caption"] == "bright" and last["pixel_values"].min() == 1
    with pytest.raises(DataError, match="lacks columns"):
        load_captioned("hub", hub_name=str(repo), split="train", image_column="image")
