"""Prompt sets for text-to-image evaluation: a prompts file, or a seeded subset of the COCO 2017 val captions
(the standard 30k/5k-caption protocol of text-to-image FID and CLIPScore, e.g. Saharia et al., 2022)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from distill_common.data.root import find_dataset_dir
from distill_common.errors import DataError, unknown_choice

COCO_PROMPT_SPLITS = ("train", "val")


def load_prompts_file(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped; whitespace is trimmed."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(
            f"prompts file {file} not found; pass --prompts with a text file of one prompt per line"
        )
    prompts = [
        line.strip()
        for line in file.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not prompts:
        raise DataError(
            f"prompts file {file} has no prompts (only blank or # lines); add one prompt per line"
        )
    return prompts


def coco_captions(root: str | Path | None, split: str = "val") -> list[str]:
    """Every caption of ``captions_{split}2017.json`` (whether or not its image is present), by annotation id."""
    if split not in COCO_PROMPT_SPLITS:
        raise unknown_choice("COCO split", split, COCO_PROMPT_SPLITS)
    marker = f"annotations/captions_{split}2017.json"
    ann_file = find_dataset_dir(root, "coco2017", marker) / marker
    try:
        annotations = json.loads(ann_file.read_text(encoding="utf-8"))["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{ann_file} is not a COCO caption file ({err}); re-download it") from err
    return [" ".join(a["caption"].split()) for a in sorted(annotations, key=lambda a: a["id"])]


def coco_prompt_subset(root: str | Path | None, n: int, seed: int = 0, split: str = "val") -> list[str]:
    """``n`` captions drawn without replacement from all COCO ``split`` captions; the same for the same seed."""
    captions = coco_captions(root, split)
    if not 1 <= n <= len(captions):
        raise DataError(
            f"asked for {n} COCO {split} prompts but there are {len(captions)}; pass 1 <= n <= {len(captions)}"
        )
    picks = random.Random(seed).sample(range(len(captions)), n)
    return [captions[i] for i in picks]
