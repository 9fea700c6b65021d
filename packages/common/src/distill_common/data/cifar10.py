"""CIFAR-10 (Krizhevsky, 2009) as a map-style Dataset of ``(image (3, 32, 32) in [-1, 1], label)``.

Three sources: WebDataset shards (``train-*.tar`` / ``test-*.tar`` with ``KEY.jpg`` + ``KEY.cls``), an image
folder ``class_name/*.png|jpg``, or the Hub data set ``uoft-cs/cifar10``.

Shards are indexed once with ``tarfile`` (member offsets; ~0.25 s per 5,000-sample shard) and JPEGs are decoded
lazily with ``torchvision.io.decode_jpeg`` into a shared uint8 cache (N, 3, 32, 32) (150 MB for the train
split). Measured on 2 CPU cores: indexing the train split 2.4 s, decoding all 50,000 images 1.5 s
(PIL: 4 s), so :meth:`Cifar10Shards.preload` is cheap; call it before forking DataLoader workers so they share
the decoded pixels instead of each filling a private cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.progress import track
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode, decode_jpeg

from distill_common.data.hub import load_hub_dataset
from distill_common.data.images import check_images
from distill_common.data.root import find_dataset_dir, resolve_data_root
from distill_common.data.transforms import build_image_transform
from distill_common.errors import DataError, unknown_choice

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR10_SPLITS = ("train", "test")
CIFAR10_SOURCES = ("shards", "folder", "hub")
CIFAR10_HUB_NAME = "uoft-cs/cifar10"
CIFAR10_RESOLUTION = 32
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

Transform = Callable[[Image.Image | torch.Tensor], torch.Tensor]


def _check_split(split: str) -> None:
    if split not in CIFAR10_SPLITS:
        raise unknown_choice("CIFAR-10 split", split, CIFAR10_SPLITS)


SHARD_MANIFEST = "manifest.json"
SHARD_MANIFEST_FORMAT = "distill-cifar10-shards/1"


def _manifest_path(shard_dir: Path) -> tuple[Path, bool]:
    """The shards' manifest: shipped next to them (read-only), else one the data layer keeps in the user cache."""
    shipped = shard_dir / SHARD_MANIFEST
    if shipped.is_file():
        return shipped, True
    from distill_common.data.cifar10_download import cache_dir

    tag = hashlib.sha256(str(shard_dir.resolve()).encode()).hexdigest()[:16]
    return cache_dir() / "shard-manifests" / f"{tag}.json", False


def check_shard_manifest(shard_dir: Path, split: str, facts: dict[str, dict[str, object]], complete: bool) -> None:
    """Refuse shards whose sample count or sha256 differs from their manifest (a truncated or swapped shard).

    Without a manifest, the first read writes one into the user cache (never into the data folder, which may be
    read-only); shards it has not seen yet are added to it.
    """
    path, shipped = _manifest_path(shard_dir)
    try:
        manifest = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        manifest = {}
    known: dict[str, dict[str, object]] = manifest.get("shards", {}) if isinstance(manifest, dict) else {}
    for name, fact in facts.items():
        want = known.get(name)
        if want is None:
            continue
        if want.get("count") != fact["count"] or want.get("sha256") != fact["sha256"]:
            undo = "" if shipped else f", or delete {path} if the new contents are intended"
            raise DataError(
                f"CIFAR-10 shard {shard_dir / name} holds {fact['count']} samples ({fact['bytes']} bytes, sha256 "
                f"{str(fact['sha256'])[:12]}) but its manifest {path} says {want.get('count')} (sha256 "
                f"{str(want.get('sha256'))[:12]}): it is truncated or was replaced; re-download it{undo}"
            )
    if complete:
        missing = sorted(n for n in known if n.startswith(f"{split}-") and n not in facts)
        if missing:
            raise DataError(f"CIFAR-10 shards {missing} listed in {path} are missing from {shard_dir}; restore them")
    new = {n: f for n, f in facts.items() if n not in known}
    if shipped or not new:
        return
    data = {"format": SHARD_MANIFEST_FORMAT, "shard_dir": str(shard_dir.resolve()), "shards": {**known, **new}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only loses the check for later reads


class Cifar10Shards(Dataset):
    """CIFAR-10 from WebDataset shards, indexed in place (samples in shard order, shards sorted by name).

    Attributes: ``keys`` (sample keys, e.g. ``train_cat_0001``), ``labels`` (class indices from ``KEY.cls``),
    ``shards`` (the tar files), ``classes`` (:data:`CIFAR10_CLASSES`).
    """

    classes = CIFAR10_CLASSES

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "train",
        transform: Transform | None = None,
        limit: int | None = None,
        preload: bool = False,
        show_progress: bool = True,
    ) -> None:
        _check_split(split)
        if limit is not None and limit < 1:
            raise DataError(
                f"limit must be positive, got {limit}; pass --limit N with N >= 1 or leave it unset"
            )
        self.split = split
        self.shard_dir = find_dataset_dir(root, "cifar10", f"{split}-*.tar")
        self.shards: list[Path] = sorted(self.shard_dir.glob(f"{split}-*.tar"))
        self.transform = transform or build_image_transform(CIFAR10_RESOLUTION)
        self.show_progress = show_progress
        self.keys: list[str] = []
        self.labels: list[int] = []
        shard_ids: list[int] = []
        offsets: list[int] = []
        sizes: list[int] = []
        facts: dict[str, dict[str, object]] = {}
        for shard_id, shard in enumerate(self.shards):
            rows, facts[shard.name] = self._index_shard(shard)
            for key, offset, size, label in rows:
                self.keys.append(key)
                self.labels.append(label)
                shard_ids.append(shard_id)
                offsets.append(offset)
                sizes.append(size)
                if limit is not None and len(self.keys) >= limit:
                    break
            if limit is not None and len(self.keys) >= limit:
                break
        if not self.keys:
            raise DataError(
                f"no CIFAR-10 samples in {self.shard_dir}/{split}-*.tar; pass --data-root with the shards"
            )
        check_shard_manifest(self.shard_dir, split, facts, complete=len(facts) == len(self.shards))
        self._shard_ids = np.asarray(shard_ids, dtype=np.int32)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._sizes = np.asarray(sizes, dtype=np.int64)
        n = len(self.keys)
        # Untouched pages of torch.empty cost no memory, so the full cache is allocated up front.
        self._images = torch.empty((n, 3, CIFAR10_RESOLUTION, CIFAR10_RESOLUTION), dtype=torch.uint8)
        self._decoded = torch.zeros(n, dtype=torch.bool)
        if preload:
            self.preload()

    @staticmethod
    def _index_shard(shard: Path) -> tuple[list[tuple[str, int, int, int]], dict[str, object]]:
        """(key, jpg offset, jpg size, label) per sample of one tar, in member order; and the shard's count and hash."""
        data = shard.read_bytes()
        jpgs: dict[str, tuple[int, int]] = {}
        labels: dict[str, int] = {}
        order: list[str] = []
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    base = member.name.rsplit("/", 1)[-1]
                    key, _, ext = base.partition(".")
                    if key not in jpgs and key not in labels:
                        order.append(key)
                    if ext == "jpg":
                        jpgs[key] = (member.offset_data, member.size)
                    elif ext == "cls":
                        text = data[member.offset_data : member.offset_data + member.size].decode().strip()
                        labels[key] = int(text)
        except (tarfile.TarError, ValueError, UnicodeDecodeError) as err:
            raise DataError(
                f"unreadable CIFAR-10 shard {shard} ({err}); re-download it or remove it"
            ) from err
        rows = []
        for key in order:
            if key not in jpgs or key not in labels:
                raise DataError(
                    f"sample {key!r} in {shard} lacks its .jpg or .cls member; re-download the shard"
                )
            label = labels[key]
            if not 0 <= label < len(CIFAR10_CLASSES):
                raise DataError(
                    f"sample {key!r} in {shard} has label {label} outside 0..9; re-download the shard"
                )
            rows.append((key, *jpgs[key], label))
        return rows, {"count": len(rows), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    def __len__(self) -> int:
        return len(self.keys)

    def _decode(self, index: int, payload: bytes) -> torch.Tensor:
        try:
            image = decode_jpeg(
                torch.frombuffer(bytearray(payload), dtype=torch.uint8), mode=ImageReadMode.RGB
            )
        except RuntimeError as err:
            shard = self.shards[self._shard_ids[index]]
            raise DataError(
                f"corrupt JPEG {self.keys[index]!r} in {shard} ({err}); re-download the shard"
            ) from err
        if tuple(image.shape) != (3, CIFAR10_RESOLUTION, CIFAR10_RESOLUTION):
            raise DataError(
                f"sample {self.keys[index]!r} is {tuple(image.shape)}, not (3, 32, 32); these are not CIFAR-10 shards"
            )
        return image

    def image_uint8(self, index: int) -> torch.Tensor:
        """The decoded image (3, 32, 32) uint8, from the cache or read from its shard."""
        if not self._decoded[index]:
            shard = self.shards[self._shard_ids[index]]
            with open(shard, "rb") as handle:
                handle.seek(int(self._offsets[index]))
                payload = handle.read(int(self._sizes[index]))
            self._images[index] = self._decode(index, payload)
            self._decoded[index] = True
        return self._images[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        return self.transform(self.image_uint8(index)), self.labels[index]

    def preload(self) -> Cifar10Shards:
        """Decode every image not yet cached (one sequential read per shard, with a progress bar)."""
        pending = torch.nonzero(~self._decoded).flatten().tolist()
        if not pending:
            return self
        by_shard: dict[int, list[int]] = {}
        for index in pending:
            by_shard.setdefault(int(self._shard_ids[index]), []).append(index)
        work = ((shard_id, index) for shard_id, indices in sorted(by_shard.items()) for index in indices)
        data, current = b"", -1
        for shard_id, index in track(
            work,
            total=len(pending),
            description=f"decoding CIFAR-10 {self.split}",
            disable=not self.show_progress,
        ):
            if shard_id != current:
                data, current = self.shards[shard_id].read_bytes(), shard_id
            start = int(self._offsets[index])
            self._images[index] = self._decode(index, data[start : start + int(self._sizes[index])])
            self._decoded[index] = True
        return self

    def uint8_images(self) -> torch.Tensor:
        """All images as one uint8 tensor (N, 3, 32, 32), e.g. the real set for FID; decodes what is missing."""
        return self.preload()._images

    def class_counts(self) -> dict[str, int]:
        """Samples per class name, from the index (no decoding)."""
        counts = Counter(self.labels)
        return {name: counts.get(i, 0) for i, name in enumerate(CIFAR10_CLASSES)}


class Cifar10Batches(Dataset):
    """CIFAR-10 from the official python batches (``cifar-10-batches-py``), e.g. the copy downloaded into the cache.

    Same interface as :class:`Cifar10Shards` (``labels``, ``keys``, ``uint8_images()``, ``class_counts()``).
    """

    classes = CIFAR10_CLASSES

    def __init__(self, folder: str | Path, split: str = "train", transform: Transform | None = None,
                 limit: int | None = None) -> None:
        from distill_common.data.cifar10_download import load_batches

        _check_split(split)
        if limit is not None and limit < 1:
            raise DataError(f"limit must be positive, got {limit}; pass --limit N with N >= 1 or leave it unset")
        images, labels = load_batches(folder, split)
        self.split, self.folder = split, Path(folder)
        self.transform = transform or build_image_transform(CIFAR10_RESOLUTION)
        self._images = images[:limit]  # (N, 3, 32, 32) uint8
        self.labels: list[int] = labels[: len(self._images)]
        bad = [v for v in self.labels if not 0 <= v < len(CIFAR10_CLASSES)]
        if bad:
            raise DataError(f"labels {sorted(set(bad))[:3]} in {folder} are outside 0..9; delete the folder to "
                            "download CIFAR-10 again")
        self.keys = [f"{split}_{i:05d}" for i in range(len(self.labels))]

    def __len__(self) -> int:
        return len(self.labels)

    def image_uint8(self, index: int) -> torch.Tensor:
        return self._images[index]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self._images[index]), self.labels[index]

    def preload(self) -> Cifar10Batches:
        return self

    def uint8_images(self) -> torch.Tensor:
        return self._images

    def class_counts(self) -> dict[str, int]:
        counts = Counter(self.labels)
        return {name: counts.get(i, 0) for i, name in enumerate(CIFAR10_CLASSES)}


def open_cifar10(
    root: str | Path | None = None,
    split: str = "train",
    transform: Transform | None = None,
    limit: int | None = None,
    *,
    preload: bool = False,
    show_progress: bool = True,
) -> Cifar10Shards | Cifar10Batches:
    """CIFAR-10 from wherever it is: the data root's shards, else its (or the cache's) python batches, else -- when
    no data root is configured at all -- the official archive downloaded once into the user cache."""
    from distill_common.data.cifar10_download import download_cifar10

    kind, folder = locate_cifar10(root, split)
    if kind == "shards":
        return Cifar10Shards(folder, split, transform, limit, preload=preload, show_progress=show_progress)
    if kind == "batches":
        return Cifar10Batches(folder, split, transform, limit)
    return Cifar10Batches(download_cifar10(show_progress=show_progress), split, transform, limit)


def locate_cifar10(root: str | Path | None = None, split: str = "train") -> tuple[str, Path | None]:
    """Where :func:`open_cifar10` will read CIFAR-10 from, without reading it: ``("shards", folder)``,
    ``("batches", folder)`` or ``("download", None)`` (no data root configured at all). A configured root without
    CIFAR-10 is a one-line DataError, so commands can check it before any stage or model load."""
    from distill_common.data.cifar10_download import find_batches, manual_fix

    _check_split(split)
    try:
        base = resolve_data_root(root)
    except DataError:
        if (root is not None and str(root) != "") or os.environ.get("DISTILL_DATA_ROOT"):
            raise
        base = None  # no data root anywhere: the cache, or a download
    if base is not None:
        for folder in (base, base / "cifar10"):
            if folder.is_dir() and any(folder.glob(f"{split}-*.tar")):
                return "shards", folder
    batches = find_batches(base)
    if batches is not None:
        return "batches", batches
    if base is not None:
        raise DataError(f"no CIFAR-10 in {base} (looked for cifar10/{split}-*.tar and cifar10/cifar-10-batches-py); "
                        f"{manual_fix()}")
    return "download", None


class Cifar10ImageFolder(ImageFolder):
    """CIFAR-10 from ``root/[split/]class_name/*.png|jpg``.

    Folder names that are all CIFAR-10 class names get their official indices (so a folder of only ``cat/``
    and ``dog/`` still labels 3 and 5); any other names are numbered in sorted order.
    """

    def __init__(
        self,
        root: str | Path | None = None,
        split: str = "train",
        transform: Transform | None = None,
        limit: int | None = None,
        strict: bool = False,
        strict_flag: str = "--strict",
    ) -> None:
        _check_split(split)
        base = resolve_data_root(root)
        folder = base / split if (base / split).is_dir() else base
        self.split = split
        try:
            super().__init__(
                str(folder),
                transform=transform or build_image_transform(CIFAR10_RESOLUTION),
                is_valid_file=lambda path: path.lower().endswith(IMAGE_EXTENSIONS),
            )
        except FileNotFoundError as err:
            raise DataError(
                f"no class folders with images in {folder} (looked for class_name/*.png|jpg, optionally under "
                f"{split}/); pass --data-root with such a folder or use --source shards"
            ) from err
        self.samples = self.samples[:limit]
        # Unreadable files (garbage bytes named .png) are dropped here and counted, or refused under strict.
        good, self.corrupt = check_images([path for path, _ in self.samples], strict, strict_flag)
        keep = {str(p) for p in good}
        self.samples = [(path, target) for path, target in self.samples if path in keep]
        if not self.samples:
            raise DataError(f"all {len(self.corrupt)} images in {folder} are unreadable (first: {self.corrupt[0]}); "
                            "check the files")
        self.imgs = self.samples
        self.targets = [target for _, target in self.samples]

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        names = sorted(entry.name for entry in Path(directory).iterdir() if entry.is_dir())
        if not names:
            raise FileNotFoundError(f"no class folders in {directory}")
        if set(names) <= set(CIFAR10_CLASSES):
            present = [name for name in CIFAR10_CLASSES if name in names]
            return present, {name: CIFAR10_CLASSES.index(name) for name in present}
        return names, {name: i for i, name in enumerate(names)}

    @property
    def labels(self) -> list[int]:
        return list(self.targets)


class Cifar10Hub(Dataset):
    """CIFAR-10 from a Hugging Face data set (default ``uoft-cs/cifar10``: columns ``img`` and ``label``)."""

    classes = CIFAR10_CLASSES

    def __init__(
        self,
        split: str = "train",
        transform: Transform | None = None,
        limit: int | None = None,
        name: str = CIFAR10_HUB_NAME,
        image_column: str = "img",
        label_column: str = "label",
    ) -> None:
        _check_split(split)
        fix = "pass --data-root with the CIFAR-10 shards (train-*.tar, test-*.tar) and use --source shards"
        table = load_hub_dataset(name, split, fix)
        missing = [c for c in (image_column, label_column) if c not in table.column_names]
        if missing:
            raise DataError(
                f"hub data set {name!r} lacks columns {missing} (it has {table.column_names}); {fix}"
            )
        if limit is not None:
            table = table.select(range(min(limit, len(table))))
        self.table = table
        self.split = split
        self.transform = transform or build_image_transform(CIFAR10_RESOLUTION)
        self.image_column = image_column
        self.labels: list[int] = [int(v) for v in table[label_column]]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.table[index][self.image_column]), self.labels[index]


def load_cifar10(
    source: str = "shards",
    split: str = "train",
    root: str | Path | None = None,
    limit: int | None = None,
    *,
    random_flip: bool = False,
    transform: Transform | None = None,
    preload: bool = False,
    hub_name: str = CIFAR10_HUB_NAME,
    show_progress: bool = True,
    strict: bool = False,
    strict_flag: str = "--strict",
) -> Dataset:
    """CIFAR-10 as ``(image float (3, 32, 32) in [-1, 1], label int)``.

    ``root`` is the data root (holding ``cifar10/``) or the shard/image folder itself; None reads
    ``DISTILL_DATA_ROOT``. Unreadable files of a ``folder`` source are skipped and counted (``.corrupt``), or
    refused with ``strict``. ``random_flip`` adds the horizontal flips used for CIFAR-10 training
    (Ho et al., 2020, Appendix B); ``transform`` replaces the default transform entirely.
    """
    if source not in CIFAR10_SOURCES:
        raise unknown_choice("CIFAR-10 source", source, CIFAR10_SOURCES)
    transform = transform or build_image_transform(
        CIFAR10_RESOLUTION, center_crop=True, random_flip=random_flip
    )
    if source == "shards":
        return open_cifar10(root, split, transform, limit, preload=preload, show_progress=show_progress)
    if source == "folder":
        return Cifar10ImageFolder(root, split, transform, limit, strict=strict, strict_flag=strict_flag)
    return Cifar10Hub(split, transform, limit, name=hub_name)
