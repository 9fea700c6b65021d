"""LoRA on the tiny SD UNet: only adapters train, the saved diffusers file reproduces the in-memory model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill_common.errors import ModelLoadError
from distill_common.models.lora import (
    LORA_WEIGHT_NAME,
    add_lora,
    fuse_lora,
    load_lora,
    lora_parameters,
    lora_state_dict,
    save_lora,
    unfuse_lora,
)
from distill_common.models.sd_loading import load_sd_pipeline


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread; on a shared, busy CPU extra OpenMP threads only spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def generate(pipe) -> torch.Tensor:
    return pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images  # (1, 3, 64, 64)


def perturb_(params: list[torch.nn.Parameter], seed: int = 1, scale: float = 0.05) -> None:
    """Stand in for training: move every LoRA matrix (lora_B starts at zero, so the adapter is a no-op until then)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def trained(tiny_sd_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """A pipeline with a perturbed LoRA, its images before/after, and the adapter saved to disk."""
    pipe = load_sd_pipeline(tiny_sd_path)
    base = generate(pipe)
    add_lora(pipe.unet, rank=4, alpha=32)
    untouched = generate(pipe)
    perturb_(lora_parameters(pipe.unet))
    adapted = generate(pipe)
    out_dir = tmp_path_factory.mktemp("lora")
    saved = save_lora(pipe.unet, out_dir)
    return {"pipe": pipe, "base": base, "untouched": untouched, "adapted": adapted, "dir": out_dir, "file": saved}


def test_only_lora_parameters_are_trainable(trained) -> None:
    unet = trained["pipe"].unet
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    targets = (".to_q.base_layer", ".to_k.base_layer", ".to_v.base_layer", ".to_out.0.base_layer")
    n_targets = sum(1 for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(targets))
    assert n_targets == 4 * 2 * 16  # q, k, v, out x (self + cross attention) x 16 transformer blocks
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(lora_parameters(unet)) == len(trainable) == 2 * n_targets
    ranks = {p.shape[0] for n, p in unet.named_parameters() if ".lora_A." in n}
    assert ranks == {4}


def test_fresh_adapter_is_a_no_op_and_trained_one_is_not(trained) -> None:
    assert torch.equal(trained["untouched"], trained["base"])
    assert (trained["adapted"] - trained["base"]).abs().max() > 1e-2


def test_saved_file_is_diffusers_format_with_its_config(trained) -> None:
    from safetensors import safe_open

    assert sorted(p.name for p in trained["dir"].iterdir()) == [LORA_WEIGHT_NAME]  # no temp leftovers
    with safe_open(str(trained["file"]), framework="pt") as handle:
        keys = list(handle.keys())
        meta = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert keys and all(k.startswith("unet.") for k in keys)
    assert len(keys) == len(lora_state_dict(trained["pipe"].unet)) == len(lora_parameters(trained["pipe"].unet))
    assert (meta["unet.r"], meta["unet.lora_alpha"]) == (4, 32)


def test_loaded_lora_reproduces_the_in_memory_model(trained, tiny_sd_path: Path) -> None:
    fresh = load_sd_pipeline(tiny_sd_path)
    load_lora(fresh, trained["dir"])
    loaded = generate(fresh)
    assert (loaded - trained["base"]).abs().max() > 1e-2
    torch.testing.assert_close(loaded, trained["adapted"], atol=1e-5, rtol=0)

    fuse_lora(fresh, scale=1.0)
    torch.testing.assert_close(generate(fresh), trained["adapted"], atol=1e-4, rtol=0)
    unfuse_lora(fresh)
    torch.testing.assert_close(generate(fresh), trained["adapted"], atol=1e-4, rtol=0)


def test_load_by_file_path_with_adapter_name(trained, tiny_sd_path: Path) -> None:
    fresh = load_sd_pipeline(tiny_sd_path)
    load_lora(fresh, trained["file"], adapter_name="student")
    assert "student" in fresh.get_active_adapters()
    torch.testing.assert_close(generate(fresh), trained["adapted"], atol=1e-5, rtol=0)


def test_missing_adapter_errors(tiny_sd_path: Path, tmp_path: Path) -> None:
    pipe = load_sd_pipeline(tiny_sd_path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_lora(pipe, tmp_path / "absent")
    with pytest.raises(ModelLoadError, match=f"holds no {LORA_WEIGHT_NAME}"):
        load_lora(pipe, tmp_path)
    with pytest.raises(ModelLoadError, match="call add_lora"):
        save_lora(pipe.unet, tmp_path / "out")
