"""Write small WebDataset caption shards from the shared COCO 2017 subset (tests make their own shards)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def coco_pairs(coco_root: Path, n: int, split: str = "val") -> list[tuple[Path, str]]:
    """The first ``n`` (image file, first caption) pairs of the shared COCO split, by image id."""
    annotations = json.loads((coco_root / "annotations" / f"captions_{split}2017.json").read_text())
    folder = coco_root / f"{split}2017"
    captions: dict[int, str] = {}
    for ann in sorted(annotations["annotations"], key=lambda a: a["id"]):
        captions.setdefault(ann["image_id"], ann["caption"].strip())
    files = {img["id"]: folder / img["file_name"] for img in annotations["images"]}
    pairs = [(files[i], captions[i]) for i in sorted(captions) if i in files and files[i].is_file()]
    assert len(pairs) >= n, f"the shared COCO {split} subset has only {len(pairs)} captioned images"
    return pairs[:n]


def write_caption_shards(coco_root: Path, out: Path, num_shards: int = 3, per_shard: int = 4,
                         corrupt: tuple[tuple[int, int], ...] = ()) -> str:
    """``num_shards`` tars of ``per_shard`` samples each: even samples with a .txt caption, odd ones with .json.
    ``corrupt`` lists (shard, sample) whose image bytes are garbage. Returns the brace pattern."""
    out.mkdir(parents=True, exist_ok=True)
    pairs = coco_pairs(coco_root, num_shards * per_shard)
    for shard in range(num_shards):
        with tarfile.open(out / f"{shard:05d}.tar", "w") as tar:
            for i in range(per_shard):
                image, caption = pairs[shard * per_shard + i]
                key = f"{shard:05d}{i:04d}"
                data = b"not a jpeg at all" if (shard, i) in corrupt else image.read_bytes()
                _add(tar, f"{key}.jpg", data)
                if i % 2 == 0:
                    _add(tar, f"{key}.txt", caption.encode())
                else:
                    _add(tar, f"{key}.json", json.dumps({"caption": caption, "url": "coco"}).encode())
    return str(out / f"{{00000..{num_shards - 1:05d}}}.tar")
