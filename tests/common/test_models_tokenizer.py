"""The offline CLIP tokenizer matches OpenAI CLIP's ids and Stable Diffusion 1.5's settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from distill_common.models.tokenizer import clip_tokenizer, clip_vocab_and_merges


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return clip_tokenizer(tmp_path_factory.mktemp("clip_tok"))


def test_known_prompt_encodes_to_openai_ids(tokenizer) -> None:
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.convert_ids_to_tokens([320, 2368]) == ["a</w>", "cat</w>"]
    assert tokenizer.decode([320, 1125, 539, 320, 2368]) == "a photo of a cat"


def test_vocabulary_layout_and_sd15_settings(tokenizer) -> None:
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (49406, 49407)
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 49407
    vocab, merges = clip_vocab_and_merges()
    assert len(merges) == 48894
    assert vocab["!"] == 0 and vocab["!</w>"] == 256  # 256 byte symbols, then the same with the word-end marker
    assert vocab["".join(merges[0].split())] == 512  # the first merge ("i n") is the first multi-byte token


def test_padding_and_truncation_to_77(tokenizer) -> None:
    batch = tokenizer(
        ["a cat", "word " * 200], padding="max_length", max_length=tokenizer.model_max_length, truncation=True
    ).input_ids
    assert [len(ids) for ids in batch] == [77, 77]
    assert batch[0][:4] == [49406, 320, 2368, 49407] and set(batch[0][4:]) == {49407}
    assert batch[1][0] == 49406 and batch[1][-1] == 49407


def test_text_normalisation_is_case_and_space_insensitive(tokenizer) -> None:
    assert tokenizer("A  Photo\tof a CAT").input_ids == tokenizer("a photo of a cat").input_ids


def test_files_are_written_once(tmp_path: Path) -> None:
    clip_tokenizer(tmp_path)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert set(stamps) == {"vocab.json", "merges.txt"}
    os.utime(tmp_path / "vocab.json", ns=(1, 1))
    second = clip_tokenizer(tmp_path)
    assert (tmp_path / "vocab.json").stat().st_mtime_ns == 1  # reused, not rewritten
    assert len(second) == 49408
