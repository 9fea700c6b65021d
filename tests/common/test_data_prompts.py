"""Prompt sets: a prompts file, and a seeded subset of all COCO 2017 val captions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distill_common.data import coco_captions, coco_prompt_subset, load_prompts_file
from distill_common.errors import DataError


def test_prompts_file_skips_blanks_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("# evaluation prompts\n\n  a red cube on a table  \n   # indented comment\na cat\n\n")
    assert load_prompts_file(path) == ["a red cube on a table", "a cat"]


def test_prompts_file_missing_or_empty(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_prompts_file(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(DataError, match="no prompts"):
        load_prompts_file(tmp_path / "empty.txt")


def test_coco_subset_is_seeded_and_uses_all_captions(coco_root: Path) -> None:
    coco = json.loads((coco_root / "annotations" / "captions_val2017.json").read_text())
    all_captions = coco_captions(coco_root)
    assert len(all_captions) == len(coco["annotations"]) == 25_014
    first = coco_prompt_subset(coco_root, 200, seed=3)
    assert first == coco_prompt_subset(coco_root.parent, 200, seed=3)  # data root or coco2017/ alike
    assert first != coco_prompt_subset(coco_root, 200, seed=4)
    assert len(first) == 200 and set(first) <= set(all_captions)
    # captions of images that are not downloaded are used too (only 159 of 5000 are local)
    present = {p.name for p in (coco_root / "val2017").iterdir()}
    file_of = {img["id"]: img["file_name"] for img in coco["images"]}
    local_captions = {
        " ".join(a["caption"].split()) for a in coco["annotations"] if file_of[a["image_id"]] in present
    }
    assert len(set(first) - local_captions) > 150
    with pytest.raises(DataError, match="25014"):
        coco_prompt_subset(coco_root, 30_000, seed=0)
