"""Shipped few-step LoRAs of the reference model: listed as ``sd-reference-<name>`` and sha256-checked on load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill_common.errors import ModelLoadError


@pytest.fixture()
def shipped_root(tmp_path: Path, tiny_sd_path: Path, tiny_lora: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ``shipped_loras`` root holding one LoRA generator for the tiny SD model, with its SHA256SUMS."""
    from distill_common.reference_sd import write_sha256sums
    from distill_lora_flash import generator as gen_mod
    from distill_lora_flash.loading import load_base_pipeline
    from distill_lora_flash.schedule import FlashSchedule

    root = tmp_path / "shipped_loras"
    folder = root / "tiny"
    pipe = load_base_pipeline(str(tiny_sd_path), torch.device("cpu"), torch.float32)
    gen_mod.write_generator_folder(folder, base_model=str(tiny_sd_path), lora_file=tiny_lora / "pytorch_lora_weights.safetensors",
                                   schedule=FlashSchedule.from_scheduler(pipe.scheduler, 50), default_steps=2)
    write_sha256sums(folder, folder / gen_mod.SHIPPED_LORA_SUMS)
    monkeypatch.setattr(gen_mod, "SHIPPED_LORAS", root)
    return root


def test_shipped_lora_is_a_named_generator_and_samples(shipped_root: Path) -> None:
    from distill_lora_flash.generator import load_generator, named_generators

    named = named_generators()
    assert named["sd-reference-tiny"] == shipped_root / "tiny"
    assert "sd-reference" in named
    gen = load_generator(named["sd-reference-tiny"], device="cpu", precision="fp32")
    images = gen.generate(["a photo of a cat", "a dog"], 2, [0, 1])
    assert images.shape[0] == 2 and torch.isfinite(images).all()


def test_altered_shipped_lora_is_refused(shipped_root: Path) -> None:
    from distill_lora_flash.generator import load_generator

    lora = shipped_root / "tiny" / "pytorch_lora_weights.safetensors"
    data = bytearray(lora.read_bytes())
    data[-1] ^= 0xFF
    lora.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="sha256"):
        load_generator(shipped_root / "tiny", device="cpu", precision="fp32")


def test_no_shipped_folder_means_only_the_teacher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from distill_lora_flash import generator as gen_mod

    monkeypatch.setattr(gen_mod, "SHIPPED_LORAS", tmp_path / "missing")
    assert list(gen_mod.named_generators()) == ["sd-reference"]


def test_lora_of_other_reference_weights_is_refused(tmp_path: Path) -> None:
    """A shipped LoRA records the reference model's SHA256SUMS digest; other installed weights refuse it."""
    import json

    from distill_common.checkpoint import file_sha256
    from distill_common.reference_sd import SHA256_FILE
    from distill_lora_flash.generator import _check_base_weights

    manifest = {"family": "lora_flash", "base_model": "reference", "base_model_sha256sums": "0" * 64}
    with pytest.raises(ModelLoadError, match="other weights of the reference model"):
        _check_base_weights(tmp_path, manifest)
    _check_base_weights(tmp_path, {**manifest, "base_model_sha256sums": file_sha256(SHA256_FILE)})
    _check_base_weights(tmp_path, {**manifest, "base_model": "some/other-model"})
    assert json.dumps(manifest)  # the manifest stays plain JSON
