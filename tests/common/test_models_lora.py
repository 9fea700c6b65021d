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


WIDE_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "time_emb_proj")  # diffusers' LCM-LoRA targets: attention, ff, resnets


@pytest.fixture(scope="module")
def wide(tiny_sd_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """A LoRA on attention, feed-forward, resnet convs and time embeddings (LCM-LoRA's targets), saved."""
    pipe = load_sd_pipeline(tiny_sd_path)
    add_lora(pipe.unet, rank=2, alpha=8, target_modules=WIDE_TARGETS)
    perturb_(lora_parameters(pipe.unet), seed=3)
    out_dir = tmp_path_factory.mktemp("wide")
    return {"pipe": pipe, "adapted": generate(pipe), "file": save_lora(pipe.unet, out_dir), "dir": out_dir}


def _layers(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return {k.split(".lora")[0] for k in handle.keys()}


def test_a_lora_beyond_attention_saves_one_key_format_and_loads_every_layer(wide, tiny_sd_path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(wide["file"]), "pt") as handle:
        keys = list(handle.keys())
    kinds = {k.split(".lora")[1].split(".")[0] for k in keys}  # "_A"/"_B" (peft) or "" (lora.down / lora.up)
    assert kinds <= {"_A", "_B"} or kinds == {""}
    assert any(".conv1." in k for k in keys) and any(".to_q." in k for k in keys)
    fresh = load_sd_pipeline(tiny_sd_path)
    load_lora(fresh, wide["dir"])
    torch.testing.assert_close(generate(fresh), wide["adapted"], atol=1e-5, rtol=0)


def test_a_file_mixing_attention_and_peft_key_formats_loads_every_layer(wide, tiny_sd_path: Path, tmp_path) -> None:
    """Files written before the fix mix ``to_q.lora.down`` with ``conv1.lora_A`` (diffusers' converter renames only
    the attention projections); diffusers alone would drop the attention layers of such a file without a word."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(wide["file"]), "pt") as handle:
        metadata = handle.metadata()
    mixed = {f"unet.{k}": v.contiguous()
             for k, v in convert_state_dict_to_diffusers(get_peft_model_state_dict(wide["pipe"].unet)).items()}
    assert any(".lora.down." in k for k in mixed) and any(".lora_A." in k for k in mixed)
    save_file(mixed, str(tmp_path / LORA_WEIGHT_NAME), metadata=metadata)
    fresh = load_sd_pipeline(tiny_sd_path)
    load_lora(fresh, tmp_path)
    torch.testing.assert_close(generate(fresh), wide["adapted"], atol=1e-5, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LORA_WEIGHT_NAME]  # the file itself is left as it was


def test_a_lora_whose_layers_do_not_all_load_is_refused(wide, tiny_sd_path: Path, tmp_path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(wide["file"]), "pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    first = sorted(_layers(wide["file"]))[0]
    renamed = {k.replace(first + ".", first.replace("down_blocks", "no_such_blocks") + ".") if k.startswith(first + ".")
               else k: v for k, v in tensors.items()}
    save_file(renamed, str(tmp_path / LORA_WEIGHT_NAME), metadata=metadata)
    with pytest.raises(ModelLoadError, match=r"1 of the \d+ UNet layers .* did not load"):
        load_lora(load_sd_pipeline(tiny_sd_path), tmp_path)
