"""``distill flash export``: a trained LoRA (Hu et al. 2021) in the file formats other tools load.

- ``diffusers`` (default): ``pytorch_lora_weights.safetensors`` with ``unet.<module>.lora.down/up.weight`` keys and the
  peft config (rank, alpha, targets) in the safetensors metadata; ``pipe.load_lora_weights`` reads it.
- ``peft``: PEFT's ``save_pretrained`` layout, ``adapter_model.safetensors`` (``base_model.model.<module>.lora_A/B
  .weight``) + ``adapter_config.json``; ``peft.PeftModel.from_pretrained(unet, folder)`` reads it.
- ``kohya``: one ``.safetensors`` with kohya-ss names (``lora_unet_<module_with_underscores>.lora_down.weight``,
  ``.lora_up.weight``, ``.alpha``), the format ComfyUI, AUTOMATIC1111, SD.Next and InvokeAI load; converted with
  diffusers' ``convert_state_dict_to_kohya``. That converter writes ``alpha = rank`` (scale 1); the adapter's real
  ``lora_alpha`` (and any per-module ``alpha_pattern``) is written instead, so the loaded scale ``alpha / rank`` is the
  trained one. ``ss_network_dim`` / ``ss_network_alpha`` metadata are set as kohya's trainer does. A text encoder
  LoRA is named as in the CLIP checkpoint (``..._text_model_encoder_layers_<n>_...``, also where transformers >= 5
  names the layers without ``text_model.``) under kohya's SD 1.x prefix ``lora_te_`` (the one AUTOMATIC1111 maps
  first); the converter's ``lora_te1_`` / ``lora_te2_`` stay for SDXL's two text encoders.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distill_common.errors import ModelLoadError
from distill_common.models.lora import LORA_WEIGHT_NAME

EXPORT_FORMATS = ("diffusers", "peft", "kohya")
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
_COMPONENT_PREFIXES = ("unet", "text_encoder_2", "text_encoder")


@dataclass
class LoraFile:
    """A diffusers-format LoRA read back: peft-keyed tensors per component and each component's peft config."""

    path: Path
    layers: dict[str, dict[str, torch.Tensor]]  # component -> {"<module>.lora_A.weight": tensor}
    configs: dict[str, dict[str, Any]]  # component -> peft LoraConfig dict (r, lora_alpha, ...)

    def rank(self, component: str = "unet") -> int:
        return int(self.configs[component]["r"])

    def alpha(self, component: str = "unet") -> float:
        return float(self.configs[component]["lora_alpha"])


def read_diffusers_lora(path: str | os.PathLike) -> LoraFile:
    """Read a ``save_lora`` file (or its folder); rank and alpha come from its metadata, else from the shapes."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors import safe_open

    from distill_lora_flash.loading import resolve_lora_source

    file = resolve_lora_source(path, None).file
    try:
        with safe_open(str(file), "pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
            metadata = handle.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ModelLoadError(f"cannot read the LoRA {file}: {str(exc).splitlines()[0][:200]}; pass a .safetensors "
                             "file written by distill flash train") from None
    flat = json.loads(metadata.get("lora_adapter_metadata", "{}") or "{}")
    layers: dict[str, dict[str, torch.Tensor]] = {}
    configs: dict[str, dict[str, Any]] = {}
    for component in _COMPONENT_PREFIXES:
        own = {k.removeprefix(component + "."): v for k, v in tensors.items() if k.startswith(component + ".")}
        if not own:
            continue
        tensors = {k: v for k, v in tensors.items() if not k.startswith(component + ".")}
        peft_keys = convert_unet_state_dict_to_peft(own)
        layers[component] = peft_keys
        config = {k.removeprefix(component + "."): v for k, v in flat.items() if k.startswith(component + ".")}
        if "r" not in config:  # no metadata: rank from the shapes, alpha = rank (scale 1, diffusers' default)
            rank = next(v.shape[0] for k, v in peft_keys.items() if "lora_A" in k)
            config = {"r": rank, "lora_alpha": rank, "target_modules": sorted({k.split(".lora_")[0].split(".")[-1]
                                                                                for k in peft_keys})}
        configs[component] = config
    if tensors or not layers:
        raise ModelLoadError(f"{file} is not a diffusers-format LoRA (keys like unet.<module>.lora.down.weight; "
                             f"{len(tensors)} other keys); pass RUN/lora/final or a checkpoint-N folder")
    return LoraFile(file, layers, configs)


def _module_alpha(config: dict[str, Any], module: str) -> float:
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if module.endswith(pattern) or module == pattern:
            return float(alpha)
    return float(config["lora_alpha"])


def to_kohya(lora: LoraFile) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(kohya state dict, metadata): diffusers' converter, with the adapter's own alpha in every ``.alpha``."""
    from diffusers.utils import convert_state_dict_to_kohya

    out: dict[str, torch.Tensor] = {}
    for component, layers in lora.layers.items():
        if component.startswith("text_encoder"):  # transformers >= 5 drops CLIPTextModel's text_model. level
            layers = {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
                      for k, v in layers.items()}
        prefixed = {f"{component}.{k}": v for k, v in layers.items()}
        converted = convert_state_dict_to_kohya(prefixed)
        modules = {k.removesuffix(".lora_A.weight"): k for k in layers if k.endswith(".lora_A.weight")}
        kohya_names = {}
        for module in modules:
            probe = convert_state_dict_to_kohya({f"{component}.{module}.lora_A.weight": torch.zeros(1, 1)})
            kohya_names[next(k for k in probe if k.endswith(".lora_down.weight")).removesuffix(".lora_down.weight")] = module
        for key, value in converted.items():
            if key.endswith(".alpha"):
                value = torch.tensor(_module_alpha(lora.configs[component], kohya_names[key.removesuffix(".alpha")]))
            if component == "text_encoder" and "text_encoder_2" not in lora.layers:
                key = "lora_te_" + key.removeprefix("lora_te1_")  # kohya's SD 1.x/2.x prefix; te1/te2 are SDXL's
            out[key] = value.contiguous()
    unet = lora.configs.get("unet") or next(iter(lora.configs.values()))
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(int(unet["r"])),
                "ss_network_alpha": f"{float(unet['lora_alpha']):g}", "format": "pt"}
    return out, metadata


def export_lora(source: str | os.PathLike, fmt: str, output: str | os.PathLike | None = None) -> Path:
    """Write the LoRA at ``source`` in ``fmt``; returns the written file (diffusers, kohya) or folder (peft).

    Default ``output``: ``<source folder>/export/<format>/`` (peft) or ``.../lora_<format>.safetensors``.
    """
    from safetensors.torch import save_file

    if fmt not in EXPORT_FORMATS:
        raise ModelLoadError(f"unknown LoRA format {fmt!r}; valid choices: {', '.join(EXPORT_FORMATS)}")
    lora = read_diffusers_lora(source)
    default_dir = lora.path.parent / "export"
    if fmt == "peft":
        folder = Path(output) if output is not None else default_dir / "peft"
        if len(lora.layers) != 1:
            raise ModelLoadError(f"{lora.path} holds LoRAs for {', '.join(lora.layers)}; the peft format holds one "
                                 "model's adapter: export it as diffusers or kohya")
        (component, layers), = lora.layers.items()
        folder.mkdir(parents=True, exist_ok=True)
        save_file({f"base_model.model.{k}": v.contiguous() for k, v in layers.items()}, str(folder / PEFT_WEIGHT_NAME),
                  metadata={"format": "pt"})
        config = {**lora.configs[component], "peft_type": "LORA"}
        (folder / PEFT_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        return folder
    file = Path(output) if output is not None else default_dir / (
        LORA_WEIGHT_NAME if fmt == "diffusers" else f"lora_{fmt}.safetensors")
    if file.suffix != ".safetensors":
        raise ModelLoadError(f"--output {file} must end in .safetensors for the {fmt} format")
    file.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=file.parent, prefix=".export-"))
    try:
        if fmt == "diffusers":
            shutil.copyfile(lora.path, staging / file.name)
        else:
            tensors, metadata = to_kohya(lora)
            save_file(tensors, str(staging / file.name), metadata=metadata)
        os.replace(staging / file.name, file)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return file
