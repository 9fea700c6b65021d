"""Captioned image data sets for text-to-image distillation: samples ``{"pixel_values", "caption", "image_id"}``.

Sources: a Hugging Face data set (``hub``), a local folder (``folder``: ``images/`` + ``captions/``, images with
side-by-side ``.txt`` files, or ``metadata.jsonl``), an ``imagefolder`` with ``metadata.jsonl``, and MS-COCO 2017
captions (Lin et al., 2014; Chen et al., 2015) read with pycocotools (``coco``).

Caption modes: ``random`` gives one sample per image whose caption is drawn from (seed, epoch, index), so a
resumed run sees the same captions (call :meth:`CaptionedImageDataset.set_epoch` each epoch); ``all`` gives one
sample per caption. Unreadable images are skipped and counted (or raise with ``strict=True``): headers are
checked when the data set is built (``verify=True``), so the counts in :meth:`stats` are known in the main
process; an image that only fails at full decode (e.g. truncated) is skipped lazily by taking the next sample.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from rich.progress import track
from torch.utils.data import Dataset

from distill_common.data.hub import load_hub_dataset
from distill_common.data.root import find_dataset_dir, resolve_data_root
from distill_common.data.transforms import build_image_transform
from distill_common.errors import ConfigError, DataError, unknown_choice

CAPTIONED_SOURCES = ("hub", "folder", "imagefolder", "coco")
CAPTION_MODES = ("random", "all")
COCO_SPLITS = ("train", "val")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
FOLDER_LAYOUTS = (
    "images/*.png|jpg + captions/*.txt (same stem)",
    "*.png|jpg with a matching *.txt side by side",
    "metadata.jsonl (file_name + caption column) beside the images",
)
# Errors PIL raises for unreadable images (UnidentifiedImageError and truncation are OSErrors).
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

Transform = Callable[[Image.Image], torch.Tensor]


@dataclass(frozen=True)
class CaptionedRecord:
    """One image with its captions; ``location`` is a file path or a row index into a hub table."""

    image_id: str
    location: str | int
    captions: tuple[str, ...]


def _clean_caption(text: str) -> str:
    return " ".join(str(text).split())


def _open_file(record: CaptionedRecord) -> Image.Image:
    return Image.open(record.location)


class CaptionedImageDataset(Dataset):
    """Map-style captioned image data set over :class:`CaptionedRecord` rows (see the module docstring)."""

    def __init__(
        self,
        records: Sequence[CaptionedRecord],
        transform: Transform,
        *,
        open_image: Callable[[CaptionedRecord], Image.Image] = _open_file,
        caption_mode: str = "random",
        seed: int = 0,
        strict: bool = False,
        description: str = "captioned images",
        num_missing: int = 0,
        num_missing_captions: int = 0,
        num_uncaptioned: int = 0,
        corrupt: Sequence[str] = (),
    ) -> None:
        if caption_mode not in CAPTION_MODES:
            raise unknown_choice("caption mode", caption_mode, CAPTION_MODES)
        self.records = [r for r in records if r.captions]
        if not self.records:
            raise DataError(f"no captioned images in {description}; check the data root and the layout")
        self.transform = transform
        self.open_image = open_image
        self.caption_mode = caption_mode
        self.seed = seed
        self.strict = strict
        self.description = description
        self.num_missing = num_missing
        self.num_missing_captions = num_missing_captions
        self.num_uncaptioned = num_uncaptioned
        self.corrupt_at_index: list[str] = list(corrupt)
        self.corrupt_at_load: dict[int, str] = {}  # record index -> reason, found in __getitem__
        self.epoch = 0
        self._pairs: list[tuple[int, int]] = []
        if caption_mode == "all":
            self._pairs = [(r, c) for r, rec in enumerate(self.records) for c in range(len(rec.captions))]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random captions ``__getitem__`` returns (``random`` mode)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self._pairs) if self.caption_mode == "all" else len(self.records)

    def _locate(self, index: int) -> tuple[int, int]:
        if self.caption_mode == "all":
            return self._pairs[index]
        # A string seed is hashed with SHA-512 by `random`, so this is stable across processes and runs.
        pick = random.Random(f"{self.seed}:{self.epoch}:{index}").randrange(len(self.records[index].captions))
        return index, pick

    def caption_at(self, index: int) -> tuple[str, str]:
        """(image_id, caption) of sample ``index`` this epoch, without decoding the image."""
        record_index, caption_index = self._locate(index)
        record = self.records[record_index]
        return record.image_id, record.captions[caption_index]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        for step in range(n):  # a corrupt image yields the next readable sample, deterministically
            record_index, caption_index = self._locate((index + step) % n)
            if record_index in self.corrupt_at_load:
                continue
            record = self.records[record_index]
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    with self.open_image(record) as image:
                        pixel_values = self.transform(image)  # (3, R, R) in [-1, 1]
            except _IMAGE_ERRORS as err:
                if self.strict:
                    raise DataError(
                        f"unreadable image {record.location} ({err}); replace or delete it, or turn off strict data checking"
                    ) from err
                self.corrupt_at_load[record_index] = f"{record.location}: {err}"
                continue
            return {
                "pixel_values": pixel_values,
                "caption": record.captions[caption_index],
                "image_id": record.image_id,
            }
        raise DataError(f"every image in {self.description} is unreadable; check the files")

    @property
    def num_corrupt(self) -> int:
        """Unreadable images found so far (at build time, plus any found while loading in this process)."""
        return len(self.corrupt_at_index) + len(self.corrupt_at_load)

    def stats(self) -> dict[str, int]:
        """Counts to log with the run's metrics."""
        return {
            "num_images": len(self.records),
            "num_captions": sum(len(r.captions) for r in self.records),
            "num_samples": len(self),
            "num_missing": self.num_missing,
            "num_missing_captions": self.num_missing_captions,
            "num_uncaptioned": self.num_uncaptioned,
            "num_corrupt": self.num_corrupt,
        }


def _verify_records(
    records: list[CaptionedRecord], strict: bool, show_progress: bool
) -> tuple[list[CaptionedRecord], list[str]]:
    """Keep records whose file opens as an image (header parse + PIL ``verify``); list the others."""
    good: list[CaptionedRecord] = []
    bad: list[str] = []
    for record in track(
        records, description="checking images", disable=not show_progress or len(records) < 2000
    ):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(record.location) as image:
                    image.verify()
        except _IMAGE_ERRORS as err:
            if strict:
                raise DataError(
                    f"unreadable image {record.location} ({err}); replace or delete it, or turn off strict data checking"
                ) from err
            bad.append(f"{record.location}: {err}")
            continue
        good.append(record)
    return good, bad


def _read_captions_file(path: Path) -> tuple[str, ...]:
    """Each non-blank line of a caption file is one caption."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return tuple(_clean_caption(line) for line in lines if line.strip())


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _empty_folder_error(folder: Path) -> DataError:
    layouts = "; ".join(FOLDER_LAYOUTS)
    return DataError(
        f"no captioned images in {folder}; looked for: {layouts}; pass --data-root with a folder in one of these layouts"
    )


def _records_from_pairs(image_dir: Path, caption_dir: Path) -> tuple[list[CaptionedRecord], int, int]:
    """Images and ``.txt`` captions matched by stem. Returns (records, captions without image, images without)."""
    images = {p.stem: p for p in _image_files(image_dir)}
    caption_files = {p.stem: p for p in caption_dir.glob("*.txt")}
    records = [
        CaptionedRecord(stem, str(images[stem]), _read_captions_file(caption_files[stem]))
        for stem in sorted(images)
        if stem in caption_files
    ]
    missing = len(set(caption_files) - set(images))
    uncaptioned = len(set(images) - set(caption_files))
    return records, missing, uncaptioned


def _records_from_metadata(folder: Path, caption_column: str) -> tuple[list[CaptionedRecord], int, int]:
    """``metadata.jsonl`` in the ``datasets`` imagefolder convention: one JSON object per line with ``file_name``
    and ``caption_column`` (a string or a list); several lines for one file add captions."""
    metadata = folder / "metadata.jsonl"
    captions: dict[str, list[str]] = {}
    for line_number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{metadata}:{line_number} is not valid JSON ({err.msg}); fix that line") from err
        if "file_name" not in row or caption_column not in row:
            raise DataError(
                f"{metadata}:{line_number} lacks 'file_name' or {caption_column!r} (keys: {sorted(row)}); "
                f"add them or pass --caption-column with the right key"
            )
        texts = row[caption_column] if isinstance(row[caption_column], list) else [row[caption_column]]
        captions.setdefault(row["file_name"], []).extend(_clean_caption(t) for t in texts if str(t).strip())
    records, missing = [], 0
    for file_name in sorted(captions):
        path = folder / file_name
        if not path.is_file():
            missing += 1
            continue
        records.append(
            CaptionedRecord(Path(file_name).with_suffix("").as_posix(), str(path), tuple(captions[file_name]))
        )
    return records, missing, 0


def _split_folder(root: str | Path | None, split: str | None) -> Path:
    base = resolve_data_root(root)
    return base / split if split and (base / split).is_dir() else base


def _folder_records(folder: Path, caption_column: str, layout: str) -> tuple[list[CaptionedRecord], int, int]:
    if layout == "imagefolder":
        if not (folder / "metadata.jsonl").is_file():
            raise _empty_folder_error(folder)
        return _records_from_metadata(folder, caption_column)
    if (folder / "images").is_dir() and (folder / "captions").is_dir():
        return _records_from_pairs(folder / "images", folder / "captions")
    if (folder / "metadata.jsonl").is_file():
        return _records_from_metadata(folder, caption_column)
    return _records_from_pairs(folder, folder)


def _coco_records(coco_root: Path, split: str) -> tuple[list[CaptionedRecord], int, int, Path, Path]:
    """Records for the locally present images of ``captions_{split}2017.json``; missing images are counted."""
    from pycocotools.coco import COCO

    ann_file = coco_root / "annotations" / f"captions_{split}2017.json"
    image_dir = coco_root / f"{split}2017"
    if not ann_file.is_file():
        raise DataError(
            f"COCO caption file {ann_file} not found; pass --data-root with coco2017/annotations/"
        )
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco = COCO(str(ann_file))
    present = set(os.listdir(image_dir)) if image_dir.is_dir() else set()
    records: list[CaptionedRecord] = []
    missing_images = missing_captions = 0
    for image_id in sorted(coco.imgs):
        anns = sorted(coco.imgToAnns.get(image_id, []), key=lambda a: a["id"])
        file_name = coco.imgs[image_id]["file_name"]
        if file_name not in present:
            missing_images += 1
            missing_captions += len(anns)
            continue
        captions = tuple(_clean_caption(a["caption"]) for a in anns if str(a["caption"]).strip())
        records.append(CaptionedRecord(str(image_id), str(image_dir / file_name), captions))
    return records, missing_images, missing_captions, ann_file, image_dir


def load_captioned(
    source: str,
    root: str | Path | None = None,
    *,
    split: str = "train",
    resolution: int = 512,
    center_crop: bool = True,
    random_flip: bool = False,
    caption_mode: str = "random",
    seed: int = 0,
    strict: bool = False,
    verify: bool = True,
    limit: int | None = None,
    hub_name: str | None = None,
    image_column: str = "image",
    caption_column: str = "text",
    id_column: str | None = None,
    transform: Transform | None = None,
    show_progress: bool = True,
) -> CaptionedImageDataset:
    """A captioned image data set from ``source`` (one of :data:`CAPTIONED_SOURCES`).

    - ``hub``: ``datasets.load_dataset(hub_name, split=split)`` with ``image_column`` / ``caption_column``
      (a string or list of strings) and optional ``id_column``.
    - ``folder``: ``root[/split]`` in any of :data:`FOLDER_LAYOUTS`.
    - ``imagefolder``: ``root[/split]/metadata.jsonl`` with ``file_name`` and ``caption_column``.
    - ``coco``: ``root`` is the data root or the ``coco2017`` folder; ``split`` is ``train`` or ``val``.

    ``limit`` keeps the first N images (sorted by id/name) before verification.
    """
    if source not in CAPTIONED_SOURCES:
        raise unknown_choice("captioned data source", source, CAPTIONED_SOURCES)
    if caption_mode not in CAPTION_MODES:
        raise unknown_choice("caption mode", caption_mode, CAPTION_MODES)
    if limit is not None and limit < 1:
        raise ConfigError(
            f"limit must be positive, got {limit}; pass --limit N with N >= 1 or leave it unset"
        )
    transform = transform or build_image_transform(
        resolution, center_crop=center_crop, random_flip=random_flip
    )
    common = {"caption_mode": caption_mode, "seed": seed, "strict": strict}

    if source == "hub":
        return _load_hub_captioned(
            hub_name, split, image_column, caption_column, id_column, limit, transform, common
        )

    missing_captions = uncaptioned = 0
    if source == "coco":
        if split not in COCO_SPLITS:
            raise unknown_choice("COCO split", split, COCO_SPLITS)
        coco_root = find_dataset_dir(root, "coco2017", f"annotations/captions_{split}2017.json")
        records, missing, missing_captions, ann_file, image_dir = _coco_records(coco_root, split)
        description = f"{image_dir} (annotations {ann_file})"
        if not records:
            raise DataError(
                f"none of the {missing} images listed in {ann_file} is in {image_dir}; "
                f"put the images there (layout annotations/captions_{split}2017.json + {split}2017/*.jpg)"
            )
    else:
        folder = _split_folder(root, split)
        records, missing, uncaptioned = _folder_records(folder, caption_column, source)
        description = str(folder)
        if not any(r.captions for r in records):
            raise _empty_folder_error(folder)
    records = [r for r in records if r.captions][:limit]
    corrupt: list[str] = []
    if verify:
        records, corrupt = _verify_records(records, strict, show_progress)
        if not records:
            raise DataError(f"all {len(corrupt)} images in {description} are unreadable; check the files")
    return CaptionedImageDataset(
        records,
        transform,
        description=description,
        num_missing=missing,
        num_missing_captions=missing_captions,
        num_uncaptioned=uncaptioned,
        corrupt=corrupt,
        **common,
    )


def _load_hub_captioned(
    hub_name: str | None,
    split: str,
    image_column: str,
    caption_column: str,
    id_column: str | None,
    limit: int | None,
    transform: Transform,
    common: dict,
) -> CaptionedImageDataset:
    if not hub_name:
        raise ConfigError(
            "source 'hub' needs a data set name; pass --hub-name OWNER/NAME (or use --source folder)"
        )
    fix = "pass --data-root with a local folder and use --source folder, imagefolder or coco"
    table = load_hub_dataset(hub_name, split, fix)
    wanted = [c for c in (image_column, caption_column, id_column) if c]
    absent = [c for c in wanted if c not in table.column_names]
    if absent:
        raise DataError(
            f"hub data set {hub_name!r} lacks columns {absent} (it has {table.column_names}); "
            f"pass --image-column / --caption-column with existing names"
        )
    if limit is not None:
        table = table.select(range(min(limit, len(table))))
    texts = table[caption_column]  # column access: no image decoding
    ids = table[id_column] if id_column else range(len(table))
    records = []
    for row, (image_id, text) in enumerate(zip(ids, texts, strict=True)):
        captions = text if isinstance(text, list) else [text]
        records.append(
            CaptionedRecord(
                str(image_id), row, tuple(_clean_caption(c) for c in captions if c and str(c).strip())
            )
        )
    if not any(r.captions for r in records):
        raise DataError(f"hub data set {hub_name!r} split {split!r} has no captioned rows; {fix}")

    def open_row(record: CaptionedRecord) -> Image.Image:
        return table[int(record.location)][image_column]

    return CaptionedImageDataset(
        records,
        transform,
        open_image=open_row,
        description=f"hub data set {hub_name!r} split {split!r}",
        **common,
    )


CIFAR10_CAPTION_RESOLUTION = 32


class _CifarImage:
    """``open_image`` of the captioned CIFAR-10 records: the decoded 32 px image as PIL (picklable for workers)."""

    def __init__(self, cifar: object) -> None:
        self.cifar = cifar

    def __call__(self, record: CaptionedRecord) -> Image.Image:
        return Image.fromarray(self.cifar.image_uint8(int(record.location)).permute(1, 2, 0).numpy())


def captioned_cifar10(
    root: str | Path | None = None,
    *,
    random_flip: bool = False,
    caption_mode: str = "random",
    seed: int = 0,
    limit: int | None = None,
    show_progress: bool = True,
) -> CaptionedImageDataset:
    """CIFAR-10 train images at 32 px captioned with the reference text-to-image model's training templates
    (``distill_common.reference_sd.captions.class_captions("train")``: "a photo of a cat", ...), its own training
    data, so the held-out templates stay unseen by students too. ``caption_mode`` ``random`` draws one template per
    image and epoch; ``all`` gives one sample per (image, template) pair."""
    from distill_common.data.cifar10 import open_cifar10
    from distill_common.reference_sd.captions import class_captions

    if caption_mode not in CAPTION_MODES:
        raise unknown_choice("caption mode", caption_mode, CAPTION_MODES)
    cifar = open_cifar10(root, "train", limit=limit, show_progress=show_progress)
    captions = class_captions("train")
    records = [CaptionedRecord(key, i, tuple(captions[label]))
               for i, (key, label) in enumerate(zip(cifar.keys, cifar.labels, strict=True))]
    return CaptionedImageDataset(
        records,
        build_image_transform(CIFAR10_CAPTION_RESOLUTION, center_crop=True, random_flip=random_flip),
        open_image=_CifarImage(cifar),
        caption_mode=caption_mode,
        seed=seed,
        description=f"CIFAR-10 train ({len(records)} images) x {len(captions[0])} caption templates",
    )
