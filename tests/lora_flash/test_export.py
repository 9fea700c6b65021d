"""``distill flash export``: diffusers / peft / kohya files of a LoRA, round-tripped on the tiny SD: diffusers' own
``load_lora_weights`` on the kohya file gives the project's images, the fused weights are equal, rank and alpha kept."""

from __future__ import annotations

import json

import pytest
import torch
from flash_helpers import run_cli
from safetensors import safe_open
from safetensors.torch import load_file

RANK, ALPHA = 4, 8.0  # scale alpha / rank = 2: an alpha lost on the way would show


@pytest.fixture(scope="module")
def trained_lora(tiny_sd_path, tmp_path_factory):
    from distill_common.models import add_lora, load_sd_components, save_lora

    unet = load_sd_components(tiny_sd_path, include=("unet",)).unet
    torch.manual_seed(1)
    add_lora(unet, rank=RANK, alpha=ALPHA, init_lora_weights=False)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.mul_(0.2)
    folder = tmp_path_factory.mktemp("run") / "lora" / "final"
    save_lora(unet, folder)
    return folder


def _pipe(tiny_sd_path):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe):
    return pipe(["a cat", "a red car"], num_inference_steps=2, guidance_scale=0, output_type="pt",
                generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images


def test_kohya_file_round_trips_through_diffusers(tiny_sd_path, trained_lora, tmp_path):
    from distill_lora_flash.export import export_lora
    from distill_lora_flash.loading import LoraSource, apply_lora

    kohya = export_lora(trained_lora, "kohya", tmp_path / "flash_kohya.safetensors")
    tensors = load_file(kohya)
    downs = [k for k in tensors if k.endswith(".lora_down.weight")]
    assert downs and all(k.startswith("lora_unet_") for k in tensors)
    assert all(k.count(".") == 2 or k.endswith(".alpha") for k in tensors)  # module name uses underscores only
    for down in downs:
        module = down.removesuffix(".lora_down.weight")
        assert tensors[down].shape[0] == RANK and tensors[f"{module}.lora_up.weight"].shape[1] == RANK
        assert tensors[f"{module}.alpha"].item() == ALPHA
    assert len([k for k in tensors if k.endswith(".alpha")]) == len(downs)
    with safe_open(str(kohya), "pt") as handle:
        meta = handle.metadata()
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == (str(RANK), f"{ALPHA:g}")

    ours = apply_lora(_pipe(tiny_sd_path), LoraSource(trained_lora / "pytorch_lora_weights.safetensors", "ours"))
    theirs = _pipe(tiny_sd_path)
    theirs.load_lora_weights(str(kohya.parent), weight_name=kohya.name)  # diffusers' kohya reader
    theirs.fuse_lora(components=["unet"])
    theirs.unload_lora_weights()
    base = _pipe(tiny_sd_path)
    mine, other, plain = _images(ours), _images(theirs), _images(base)
    assert (mine - plain).abs().max() > 1e-3  # the LoRA changes the images ...
    torch.testing.assert_close(other, mine, atol=1e-4, rtol=0)  # ... and both loaders change them the same way
    ours_sd, theirs_sd = ours.unet.state_dict(), theirs.unet.state_dict()
    assert ours_sd.keys() == theirs_sd.keys()
    for key in ours_sd:
        torch.testing.assert_close(theirs_sd[key], ours_sd[key], atol=1e-6, rtol=1e-5)


def test_peft_and_diffusers_formats_keep_rank_alpha_and_outputs(tiny_sd_path, trained_lora, tmp_path):
    from peft import PeftModel

    from distill_common.models import load_sd_components
    from distill_lora_flash.export import export_lora
    from distill_lora_flash.loading import LoraSource, apply_lora

    copy = export_lora(trained_lora, "diffusers", tmp_path / "d" / "pytorch_lora_weights.safetensors")
    assert load_file(copy).keys() == load_file(trained_lora / "pytorch_lora_weights.safetensors").keys()
    folder = export_lora(trained_lora, "peft")
    assert folder == trained_lora / "export" / "peft"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (RANK, ALPHA)

    unet = load_sd_components(tiny_sd_path, include=("unet",)).unet
    peft_unet = PeftModel.from_pretrained(unet, str(folder))  # PEFT's own reader
    fused = apply_lora(_pipe(tiny_sd_path), LoraSource(trained_lora / "pytorch_lora_weights.safetensors", "ours")).unet
    x, t, text = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, fused.config.cross_attention_dim)
    with torch.no_grad():
        torch.testing.assert_close(peft_unet(x, t, encoder_hidden_states=text).sample,
                                   fused(x, t, encoder_hidden_states=text).sample, atol=1e-4, rtol=0)


def test_export_cli_and_errors(trained_lora, tmp_path, capsys):
    code, out, err = run_cli(["export", "--lora-path", str(trained_lora), "--format", "kohya"], capsys)
    assert code == 0, err
    assert (trained_lora / "export" / "lora_kohya.safetensors").is_file() and "kohya LoRA:" in out
    code, _, err = run_cli(["export", "--lora-path", str(trained_lora), "--format", "ckpt"], capsys)
    assert code != 0 and "--format" in err
    code, _, err = run_cli(["export", "--lora-path", str(trained_lora), "--format", "kohya", "--output",
                            str(tmp_path / "x.bin")], capsys)
    assert code != 0 and ".safetensors" in err and len(err.strip().splitlines()) <= 3
    code, _, err = run_cli(["export", "--lora-path", str(tmp_path / "missing")], capsys)
    assert code != 0 and "does not exist" in err
