"""``distill flash export``: diffusers / peft / kohya files of a LoRA, round-tripped on the tiny SD: diffusers' own
``load_lora_weights`` on the kohya file gives the project's images, the fused weights are equal, rank and alpha kept;
every kohya key is one ComfyUI's and AUTOMATIC1111's LoRA loaders map onto the same SD 1.x layer."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

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


# ComfyUI's and AUTOMATIC1111's key rules for SD 1.x, restated (their code is GPL / AGPL and neither is a dependency).
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "time_emb_proj", "conv", "conv_in", "conv_out", "linear_1", "linear_2")
CLIP_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
PATTERN_ALPHA = {"unet": {"ff.net.2": 2.0}, "text_encoder": {"fc2": 1.0}}  # per-module alphas (peft alpha_pattern)
_RESNET_LDM = {"conv1": "in_layers.2", "norm1": "in_layers.0", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
               "norm2": "out_layers.0", "conv_shortcut": "skip_connection"}
_BLOCK_LAYERS = ("norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2") + tuple(
    f"{attn}.{layer}" for attn in ("attn1", "attn2") for layer in ("to_q", "to_k", "to_v", "to_out.0"))


def comfy_sd1_unet_modules(config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers module -> original (LDM) module of an SD 1.x UNet, by the rule of ComfyUI's ``comfy/utils.py``
    ``unet_to_diffusers``; ``model_lora_keys_unet`` in ``comfy/lora.py`` accepts ``lora_unet_<diffusers module with
    underscores>`` for each of them (and ``lora_unet_<LDM module with underscores>``).

    Built from the config, not the model: down level x with L resnets fills LDM input blocks n = 1 + (L + 1) x + i
    (resnet i at ``n.0``, its transformer at ``n.1``) and its downsampler the next one (``.0.op``); the middle block
    is resnet, transformer, resnet; up level x with L + 1 resnets fills output blocks (L + 1) x + i, its upsampler
    after the last one's resnet and transformer (``.1.conv``, or ``.2.conv`` in a cross-attention level)."""
    layers, depth = config["layers_per_block"], config.get("transformer_layers_per_block") or 1
    step = layers + 1
    out = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}

    def resnet(diffusers: str, ldm: str) -> None:
        out.update({f"{diffusers}.{name}": f"{ldm}.{ldm_name}" for name, ldm_name in _RESNET_LDM.items()})

    def transformer(diffusers: str, ldm: str) -> None:
        out.update({f"{diffusers}.{name}": f"{ldm}.{name}" for name in ("proj_in", "proj_out", "norm")})
        out.update({f"{diffusers}.transformer_blocks.{t}.{name}": f"{ldm}.transformer_blocks.{t}.{name}"
                    for t in range(depth) for name in _BLOCK_LAYERS})

    for x, kind in enumerate(config["down_block_types"]):
        for i in range(layers):
            resnet(f"down_blocks.{x}.resnets.{i}", f"input_blocks.{1 + step * x + i}.0")
            if kind.startswith("CrossAttn"):
                transformer(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{1 + step * x + i}.1")
        out[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{1 + step * x + layers}.0.op"
    resnet("mid_block.resnets.0", "middle_block.0")
    transformer("mid_block.attentions.0", "middle_block.1")
    resnet("mid_block.resnets.1", "middle_block.2")
    for x, kind in enumerate(config["up_block_types"]):
        attention = kind.startswith("CrossAttn")
        for i in range(step):
            resnet(f"up_blocks.{x}.resnets.{i}", f"output_blocks.{step * x + i}.0")
            if attention:
                transformer(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{step * x + i}.1")
        out[f"up_blocks.{x}.upsamplers.0.conv"] = f"output_blocks.{step * x + layers}.{2 if attention else 1}.conv"
    return out


def comfy_sd1_text_modules(num_layers: int) -> dict[str, str]:
    """kohya module -> CLIP-L module, by ``model_lora_keys_clip`` in ComfyUI's ``comfy/lora.py``: for each encoder
    layer, its six linear layers (``LORA_CLIP_MAP``) under ``lora_te_`` and, for CLIP-L, also ``lora_te1_``."""
    return {f"{prefix}text_model_encoder_layers_{b}_{layer.replace('.', '_')}": f"text_model.encoder.layers.{b}.{layer}"
            for b in range(num_layers) for layer in CLIP_LAYERS for prefix in ("lora_te_", "lora_te1_")}


def a1111_sd1_module(kohya: str) -> str | None:
    """The SD 1.x module (dots as underscores) AUTOMATIC1111's Lora extension patches for a kohya module name, by
    ``convert_diffusers_name_to_compvis`` in ``extensions-builtin/Lora/networks.py``: fixed SD 1.x layout, three LDM
    blocks per level, and the text encoder under ``transformer_`` (``lora_te1_`` is its fallback for SD 1.x)."""
    rename = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
              "conv_shortcut": "skip_connection"}
    rules = (
        (r"lora_unet_conv_in", lambda m: "input_blocks_0_0"),
        (r"lora_unet_conv_out", lambda m: "out_2"),
        (r"lora_unet_time_embedding_linear_(\d)", lambda m: f"time_embed_{2 * int(m[1]) - 2}"),
        (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", lambda m: f"input_blocks_{3 + 3 * int(m[1])}_0_op"),
        (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
         lambda m: f"output_blocks_{2 + 3 * int(m[1])}_{2 if int(m[1]) > 0 else 1}_conv"),
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"input_blocks_{1 + 3 * int(m[1]) + int(m[3])}_{int(m[2] == 'attentions')}_"
                   f"{rename.get(m[4], m[4]) if m[2] == 'resnets' else m[4]}"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"middle_block_{1 if m[1] == 'attentions' else 2 * int(m[2])}_"
                   f"{rename.get(m[3], m[3]) if m[1] == 'resnets' else m[3]}"),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"output_blocks_{3 * int(m[1]) + int(m[3])}_{int(m[2] == 'attentions')}_"
                   f"{rename.get(m[4], m[4]) if m[2] == 'resnets' else m[4]}"),
    )
    for pattern, target in rules:
        if m := re.fullmatch(pattern, kohya):
            return "diffusion_model_" + target(m)
    if m := re.fullmatch(r"lora_te1?_(text_model_encoder_layers_\d+_.+)", kohya):
        return "transformer_" + m[1]
    return None


@pytest.fixture(scope="module")
def full_lora(tiny_sd_path, tmp_path_factory):
    """(folder, UNet, text encoder): a LoRA on every layer kind ComfyUI maps (attention, feed-forward, proj_in/out,
    3x3 and 1x1 resnet convs, time projections, down/upsamplers, conv_in/out, time embedding; the text encoder's
    attention and MLP), with per-module alphas, saved in the project's diffusers format."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from distill_common.models import load_sd_components

    parts = load_sd_components(tiny_sd_path, include=("unet", "text_encoder", "tokenizer"))
    torch.manual_seed(2)
    saved = {}
    for name, model, targets in (("unet", parts.unet, UNET_TARGETS),
                                 ("text_encoder", parts.text_encoder, [t.split(".")[-1] for t in CLIP_LAYERS])):
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(targets), alpha_pattern=PATTERN_ALPHA[name],
                            init_lora_weights=False)
        model.add_adapter(config)
        saved[f"{name}_lora_layers"] = get_peft_model_state_dict(model)
        saved[f"{name}_lora_adapter_metadata"] = config.to_dict()
    folder = tmp_path_factory.mktemp("full") / "lora" / "final"
    StableDiffusionPipeline.save_lora_weights(str(folder), weight_name="pytorch_lora_weights.safetensors",
                                              safe_serialization=True, **saved)
    return folder, parts.unet, parts.text_encoder


def test_kohya_keys_are_the_ones_comfyui_and_a1111_load(full_lora, tmp_path):
    """Every module of the kohya file is one ComfyUI maps for this UNet / text encoder (``comfy/lora.py``
    ``model_lora_keys_unet`` / ``model_lora_keys_clip`` with ``comfy/utils.py`` ``unet_to_diffusers``) and the same
    layer AUTOMATIC1111 maps it to; ``load_lora`` there reads exactly ``.lora_down.weight``, ``.lora_up.weight`` and
    a scalar ``.alpha``, so no key is left unmapped, and its patch ``alpha / rank * up @ down`` is the trained delta."""
    from distill_lora_flash.export import export_lora

    folder, unet, text_encoder = full_lora
    tensors = load_file(export_lora(folder, "kohya", tmp_path / "lora_kohya.safetensors"))
    unet_map = comfy_sd1_unet_modules(unet.config)
    accepted = {"lora_unet_" + d.replace(".", "_"): ("unet", d, ldm) for d, ldm in unet_map.items()}
    accepted |= {k: ("text_encoder", m, m) for k, m in
                 comfy_sd1_text_modules(text_encoder.config.num_hidden_layers).items() if k.startswith("lora_te_")}
    modules = {k.split(".")[0] for k in tensors}
    assert {k for k in tensors if not k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))} == set()
    assert modules - accepted.keys() == set()  # nothing ComfyUI would log as "lora key not loaded"
    assert len(tensors) == 3 * len(modules)
    prefixes = {m.split("_")[1] for m in modules}
    assert prefixes == {"unet", "te"}  # SD 1.x text encoder: kohya's lora_te_, not SDXL's lora_te1_
    kinds = {tuple(tensors[f"{m}.lora_down.weight"].shape[2:]) for m in modules}
    assert kinds == {(), (1, 1), (3, 3)}  # linear, 1x1 and 3x3 convolutions all exported

    models = {"unet": unet, "text_encoder": text_encoder}
    for module in modules:
        part, name, ldm = accepted[module]
        down, up, alpha = (tensors[f"{module}.{k}"] for k in ("lora_down.weight", "lora_up.weight", "alpha"))
        expected = next((a for p, a in PATTERN_ALPHA[part].items() if name.endswith(p)), ALPHA)
        assert alpha.ndim == 0 and alpha.item() == expected, module
        flat = part == "text_encoder" and not hasattr(text_encoder, "text_model")  # transformers >= 5 layout
        layer = models[part].get_submodule(name.removeprefix("text_model.") if flat else name)
        weight = layer.base_layer.weight
        assert down.shape == (RANK, *weight.shape[1:]) and up.shape == (weight.shape[0], RANK, *[1] * (weight.ndim - 2))
        delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * alpha.item() / RANK  # ComfyUI's lora patch
        torch.testing.assert_close(delta, layer.get_delta_weight("default").detach(), atol=1e-6, rtol=1e-5)
        target = ("diffusion_model_" if part == "unet" else "transformer_") + ldm.replace(".", "_")
        assert a1111_sd1_module(module) == target, module  # AUTOMATIC1111 patches the same layer
    assert {n for n, _ in unet.named_modules() if n.endswith(".base_layer")} == {
        accepted[m][1] + ".base_layer" for m in modules if m.startswith("lora_unet_")}  # every adapted layer exported
    assert len([n for n, _ in text_encoder.named_modules() if n.endswith(".base_layer")]) == len(
        [m for m in modules if m.startswith("lora_te_")]) == text_encoder.config.num_hidden_layers * len(CLIP_LAYERS)
