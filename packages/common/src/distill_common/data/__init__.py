"""Data layer: the data root, image transforms, CIFAR-10, captioned image sets (folders, COCO, Hub) and prompts."""

from distill_common.data.captioned import (
    CAPTION_MODES,
    CAPTIONED_SOURCES,
    FOLDER_LAYOUTS,
    CaptionedImageDataset,
    CaptionedRecord,
    load_captioned,
)
from distill_common.data.cifar10 import (
    CIFAR10_CLASSES,
    CIFAR10_HUB_NAME,
    CIFAR10_SOURCES,
    CIFAR10_SPLITS,
    Cifar10Batches,
    Cifar10Hub,
    Cifar10ImageFolder,
    Cifar10Shards,
    load_cifar10,
    open_cifar10,
)
from distill_common.data.hub import hub_offline, hub_reachable, load_hub_dataset
from distill_common.data.prompts import coco_captions, coco_prompt_subset, load_prompts_file
from distill_common.data.root import DATA_ROOT_ENV, default_data_root, find_dataset_dir, resolve_data_root
from distill_common.data.shards import CaptionShardStream, expand_shards, iter_batches
from distill_common.data.transforms import ImageTransform, build_image_transform, to_unit_range

__all__ = [
    "CAPTIONED_SOURCES",
    "CAPTION_MODES",
    "CIFAR10_CLASSES",
    "CIFAR10_HUB_NAME",
    "CIFAR10_SOURCES",
    "CIFAR10_SPLITS",
    "DATA_ROOT_ENV",
    "FOLDER_LAYOUTS",
    "CaptionedImageDataset",
    "CaptionShardStream",
    "CaptionedRecord",
    "Cifar10Batches",
    "Cifar10Hub",
    "Cifar10ImageFolder",
    "Cifar10Shards",
    "ImageTransform",
    "build_image_transform",
    "coco_captions",
    "coco_prompt_subset",
    "default_data_root",
    "expand_shards",
    "find_dataset_dir",
    "hub_offline",
    "hub_reachable",
    "iter_batches",
    "load_captioned",
    "load_cifar10",
    "open_cifar10",
    "load_hub_dataset",
    "load_prompts_file",
    "resolve_data_root",
    "to_unit_range",
]
