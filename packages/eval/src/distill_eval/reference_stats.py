"""Reference statistics (mu, sigma and features for KID), computed once per reference set and cached.

A cache entry is a safetensors file keyed by the reference set's name, the image count, the resolution, the
resize method, the extractor's weight hash, the feature precision (bf16 entries carry ``-bf16``) and a fingerprint of the source files (names and sizes), so any
change of protocol or data misses the cache.

Reference sets (resolved under the data root: ``data_root``, else ``$DISTILL_DATA_ROOT``):

- ``cifar10-train`` / ``cifar10-test``: the WebDataset shards (native 32x32; JPEG re-encodings, so FIDs
  are not comparable with published CIFAR-10 numbers taken on the lossless release);
- ``coco-val2017`` / ``coco-train2017``: the COCO image folders (about 640x480);
- ``folder:PATH`` (or any existing folder path): every image file in PATH, sorted by name.

Images not already ``resolution`` x ``resolution`` are center-cropped to a square and resized to it with
the protocol's resize method (antialiased, on float pixels, rounded to uint8); the extractor then brings
them to 299x299 the same way it treats generated images. With resize ``none`` such images are refused.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_image

from distill_common.checkpoint import load_weights, save_weights
from distill_common.data.cifar10 import open_cifar10
from distill_common.data.cifar10_download import SPLIT_FILES, download_cifar10, find_batches
from distill_common.data.root import resolve_data_root
from distill_common.errors import ConfigError, DataError, DistillError, unknown_choice
from distill_eval.features import extract_features, feature_statistics
from distill_eval.inception import INPUT_SIZE, RESIZE_METHODS, InceptionFeatureExtractor, default_cache_dir
from distill_eval.protocol import MetricProtocol

REFERENCE_SETS = ("cifar10-train", "cifar10-test", "coco-val2017", "coco-train2017")
FOLDER_PREFIX = "folder:"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CIFAR_RESOLUTION = 32
KID_FEATURES = 10_000  # features kept for KID: enough for 10 disjoint subsets of the usual 1,000


@dataclass(frozen=True, eq=False)
class ReferenceStats:
    """FID statistics (float64) and up to ``KID_FEATURES`` features (float32) of one reference set."""

    reference_set: str
    reference_n: int
    resolution: int
    resize: str
    extractor_hash: str
    mu: torch.Tensor  # (2048,)
    sigma: torch.Tensor  # (2048, 2048)
    features: torch.Tensor  # (K, 2048), the first K images
    path: Path | None = None  # the cache file
    feature_precision: str = "fp32"  # the extractor's forward precision

    def protocol(self, generated_n: int) -> MetricProtocol:
        """The protocol of a result that scores ``generated_n`` images against this reference."""
        return MetricProtocol(
            extractor_hash=self.extractor_hash,
            reference_set=self.reference_set,
            reference_n=self.reference_n,
            generated_n=int(generated_n),
            resolution=self.resolution,
            resize=self.resize,
            feature_precision=self.feature_precision,
        )


@dataclass(frozen=True)
class _Source:
    name: str  # protocol name of the set
    kind: str  # "cifar" | "folder"
    files: tuple[Path, ...]  # the shards or the image files
    split: str = ""
    shard_dir: Path | None = None


def _image_files(folder: Path) -> tuple[Path, ...]:
    return tuple(sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS))


def _resolve_source(spec: str | Path, data_root: str | Path | None) -> _Source:
    text = str(spec)
    if text.startswith(FOLDER_PREFIX) or (text not in REFERENCE_SETS and Path(text).expanduser().is_dir()):
        folder = Path(text.removeprefix(FOLDER_PREFIX)).expanduser().resolve()
        if not folder.is_dir():
            raise DataError(f"reference folder {folder} does not exist; pass folder:PATH with an existing image folder")
        files = _image_files(folder)
        if not files:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}; pass a folder of images")
        tag = hashlib.sha256(str(folder).encode()).hexdigest()[:8]
        return _Source(f"folder:{folder.name}-{tag}", "folder", files)
    if text not in REFERENCE_SETS:
        raise unknown_choice("reference set", text, (*REFERENCE_SETS, "folder:PATH"))
    if text.startswith("cifar10-"):
        split = text.removeprefix("cifar10-")
        try:
            root = resolve_data_root(data_root)
        except DataError:
            if data_root:
                raise
            root = None  # no data root at all: the python batches in the cache (downloaded when missing)
        shard_dir = (root / "cifar10" if (root / "cifar10").is_dir() else root) if root else None
        shards = tuple(sorted(shard_dir.glob(f"{split}-*.tar"))) if shard_dir else ()
        if not shards:
            batches = find_batches(root) or (download_cifar10() if root is None else None)
            if batches is None:
                raise DataError(f"no CIFAR-10 {split} shards in {shard_dir}; pass --data-root with the folder holding "
                                "cifar10/")
            shards = tuple(batches / name for name in SPLIT_FILES[split])
        return _Source(text, "cifar", shards, split=split, shard_dir=root)
    root = resolve_data_root(data_root)
    split = text.removeprefix("coco-")
    folder = root / "coco2017" / split
    files = _image_files(folder) if folder.is_dir() else ()
    if not files:
        raise DataError(f"no COCO {split} images in {folder}; pass --data-root with the folder holding coco2017/")
    return _Source(text, "folder", files)


def protocol_resize(reference: str | Path) -> str:
    """The resize a reference set's protocol uses: ``none`` for the 32 px CIFAR-10 sets (torch-fidelity's own
    resize inside the network, the TTUR protocol), ``bicubic`` for COCO and image folders (photos of any size,
    center-cropped and resized with antialiasing, clean-fid style)."""
    return "none" if str(reference).startswith("cifar10-") else "bicubic"


def _fingerprint(files: tuple[Path, ...]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}:{path.stat().st_size};".encode())
    return digest.hexdigest()[:8]


def to_square_uint8(image: torch.Tensor, resolution: int, resize: str) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, R, R) uint8: center square crop, then an antialiased ``resize`` to R."""
    height, width = image.shape[-2:]
    if (height, width) == (resolution, resolution):
        return image
    if resize == "none":
        raise ConfigError(
            f"reference image is {height}x{width}, not {resolution}x{resolution}, and resize is 'none'; "
            "pass --resize bicubic (or bilinear) or --resolution matching the images"
        )
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = image[:, top : top + side, left : left + side].float().unsqueeze(0)
    resized = F.interpolate(square, size=(resolution, resolution), mode=resize, align_corners=False, antialias=True)
    return resized.round_().clamp_(0, 255).to(torch.uint8)[0]


def _folder_batches(files: tuple[Path, ...], resolution: int, resize: str, batch_size: int) -> Iterator[torch.Tensor]:
    pending: list[torch.Tensor] = []
    for path in files:
        try:
            image = decode_image(str(path), mode=ImageReadMode.RGB)  # (3, H, W) uint8
        except RuntimeError as err:
            raise DataError(f"cannot decode reference image {path} ({err}); remove or replace it") from None
        pending.append(to_square_uint8(image, resolution, resize))
        if len(pending) == batch_size:
            yield torch.stack(pending)
            pending = []
    if pending:
        yield torch.stack(pending)


def _cifar_batches(source: _Source, n: int | None, resolution: int, resize: str, batch_size: int,
                   progress: bool) -> tuple[int, Iterator[torch.Tensor]]:
    images = open_cifar10(source.shard_dir, source.split, limit=n, show_progress=progress).uint8_images()
    if resolution != CIFAR_RESOLUTION and resize == "none":
        raise ConfigError(
            f"CIFAR-10 images are 32x32 but resolution {resolution} was asked with resize 'none'; "
            "pass --resolution 32 or --resize bicubic"
        )

    def batches() -> Iterator[torch.Tensor]:
        for chunk in images.split(batch_size):  # (B, 3, 32, 32)
            if resolution != CIFAR_RESOLUTION:
                chunk = F.interpolate(chunk.float(), size=(resolution, resolution), mode=resize,
                                      align_corners=False, antialias=True).round_().clamp_(0, 255).to(torch.uint8)
            yield chunk

    return images.shape[0], batches()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def reference_stats(
    spec: str | Path,
    extractor: InceptionFeatureExtractor,
    cache_dir: str | Path | None = None,
    n: int | None = None,
    resolution: int | None = None,
    resize: str | None = None,
    data_root: str | Path | None = None,
    batch_size: int = 64,
    kid_features: int = KID_FEATURES,
    progress: bool = True,
) -> ReferenceStats:
    """Statistics of reference set ``spec`` under ``extractor``, read from the cache or computed and cached.

    ``n`` limits the set to its first n images (the shards are pre-shuffled; folders are sorted by name).
    ``resolution`` defaults to 32 for CIFAR-10 and to the extractor's 299 for folders. ``resize`` defaults
    to the extractor's resize method and must equal it (both sets must reach the network the same way).
    """
    resize = extractor.resize if resize is None else resize
    if resize not in RESIZE_METHODS:
        raise unknown_choice("resize method", resize, RESIZE_METHODS)
    if resize != extractor.resize:
        raise ConfigError(
            f"reference resize {resize!r} differs from the extractor's {extractor.resize!r}; "
            f"build InceptionFeatureExtractor(resize={resize!r}) or pass --resize {extractor.resize}"
        )
    if n is not None and n < 2:
        raise ConfigError(f"a reference set needs at least 2 images, got n={n}; pass --reference-n 2 or more")
    source = _resolve_source(spec, data_root)
    if resolution is None:
        resolution = CIFAR_RESOLUTION if source.kind == "cifar" else INPUT_SIZE
    files = source.files if source.kind == "cifar" or n is None else source.files[:n]
    count = f"n{n}" if source.kind == "cifar" else f"n{len(files)}"
    precision = getattr(extractor, "precision", "fp32")
    suffix = "" if precision == "fp32" else f"-{precision}"  # fp32 keys stay those of earlier caches
    key = f"{_slug(source.name)}-{count}-r{resolution}-{resize}-{extractor.extractor_hash}-{_fingerprint(files)}{suffix}"
    cache = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "reference_stats"
    path = cache / f"{key}.safetensors"
    if path.is_file():
        try:
            return _load(path)
        except DistillError as exc:  # a cache is derived data: a corrupt one is recomputed, and that is said
            print(f"note: {exc}; recomputing it", file=sys.stderr)
            path.unlink(missing_ok=True)

    if source.kind == "cifar":
        total, batches = _cifar_batches(source, n, resolution, resize, batch_size, progress)
    else:
        total, batches = len(files), _folder_batches(files, resolution, resize, batch_size)
    features = extract_features(batches, extractor, batch_size=batch_size, progress=progress, total=total)
    mu, sigma = feature_statistics(features)
    stats = ReferenceStats(
        reference_set=source.name,
        reference_n=int(features.shape[0]),
        resolution=int(resolution),
        resize=resize,
        extractor_hash=extractor.extractor_hash,
        mu=torch.from_numpy(mu).double(),
        sigma=torch.from_numpy(sigma).double(),
        features=features[:kid_features].float().contiguous(),
        path=path,
        feature_precision=precision,
    )
    cache.mkdir(parents=True, exist_ok=True)
    meta = {k: getattr(stats, k) for k in ("reference_set", "reference_n", "resolution", "resize", "extractor_hash",
                                           "feature_precision")}
    save_weights({"mu": stats.mu, "sigma": stats.sigma, "features": stats.features}, path,
                 metadata={"protocol": json.dumps(meta)})
    return stats


def _load(path: Path) -> ReferenceStats:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {}).get("protocol", "{}"))
        tensors = load_weights(path)
    except Exception:  # noqa: BLE001 - safetensors' own error type for a garbled header, a JSON error, ...
        raise DataError(f"reference statistics cache {path} is corrupt") from None
    if not isinstance(meta, dict) or not meta or set(tensors) != {"mu", "sigma", "features"}:
        raise DataError(f"reference statistics cache {path} is incomplete; delete it so it is recomputed")
    if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
        raise DataError(f"reference statistics cache {path} holds NaN or infinite values")
    return ReferenceStats(mu=tensors["mu"], sigma=tensors["sigma"], features=tensors["features"], path=path, **meta)
