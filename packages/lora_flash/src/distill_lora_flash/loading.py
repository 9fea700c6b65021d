"""Where the base model and the Flash LoRA come from, and how the LoRA is put into a pipeline.

The base model goes through ``distill_common.models.load_sd_pipeline`` (hub id or local folder, fast failure
offline). The LoRA is a local ``.safetensors`` file or folder (``--lora-path``) or a hub id (``--lora-id``),
resolved to a local file *before* the base model is loaded, so an unreachable adapter fails in seconds.
It is read by diffusers' ``load_lora_weights``, fused into the UNet (Hu et al. 2021: ``W += s * B A``) and
the adapter layers unloaded, so the fused UNet runs exactly as fast as the base one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distill_common.errors import ModelLoadError
from distill_common.models.lora import LORA_WEIGHT_NAME
from distill_common.models.sd_loading import SD15_MODEL_ID

DEFAULT_BASE_MODEL = SD15_MODEL_ID
DEFAULT_LORA_ID = "jasperai/flash-sd"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class LoraSource:
    """A LoRA file on local disk; ``label`` is what the user passed (hub id or path)."""

    file: Path
    label: str

    @property
    def folder(self) -> Path:
        return self.file.parent


def _lora_hint(lora_id: str) -> str:
    return (f"download it on a machine with internet access (`hf download {lora_id} --local-dir DIR`) "
            "and pass --lora-path DIR")


def resolve_lora_source(lora_path: str | os.PathLike | None, lora_id: str | None,
                        weight_name: str = LORA_WEIGHT_NAME, probe_timeout_s: float = 4.0) -> LoraSource:
    """``lora_path`` (a file, or a folder holding one ``.safetensors``) wins; else ``lora_id`` from the hub/cache.

    Raises ModelLoadError (one line, with the fix) for a missing path or an adapter that cannot be fetched.
    """
    if lora_path is not None and str(lora_path) != "":
        path = Path(lora_path).expanduser()
        if path.is_file():
            return LoraSource(path.resolve(), str(lora_path))
        if path.is_dir():
            if (path / weight_name).is_file():
                return LoraSource((path / weight_name).resolve(), str(lora_path))
            found = sorted(path.glob("*.safetensors"))
            if len(found) == 1:
                return LoraSource(found[0].resolve(), str(lora_path))
            raise ModelLoadError(
                f"LoRA folder {path} holds no {weight_name} (safetensors found: "
                f"{', '.join(p.name for p in found) or 'none'}); pass --lora-path with the adapter file itself"
            )
        raise ModelLoadError(f"LoRA path {path} does not exist; pass --lora-path with a .safetensors file or its folder")
    if not lora_id:
        raise ModelLoadError("no LoRA given; pass --lora-path FILE_OR_DIR or --lora-id OWNER/NAME")
    if not _HUB_ID.match(lora_id):
        raise ModelLoadError(f"LoRA id {lora_id!r} is not a hub id like 'owner/name'; pass --lora-path for a local file")
    return _hub_lora(lora_id, weight_name, probe_timeout_s)


def _hub_lora(lora_id: str, weight_name: str, probe_timeout_s: float) -> LoraSource:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    from distill_common.models.sd_loading import hub_offline, probe_hub

    cached = try_to_load_from_cache(lora_id, weight_name)
    if isinstance(cached, str) and os.path.isfile(cached):
        return LoraSource(Path(cached), lora_id)
    if hub_offline():
        reason = "the Hugging Face Hub is offline (HF_HUB_OFFLINE=1)"
    else:
        status = probe_hub(lora_id, probe_timeout_s)
        if status == "ok":
            try:
                return LoraSource(Path(hf_hub_download(lora_id, weight_name)), lora_id)
            except Exception as exc:  # noqa: BLE001 - missing file, gated repo, dropped connection
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                raise ModelLoadError(f"cannot download LoRA {lora_id!r} ({first}); {_lora_hint(lora_id)}") from None
        if status == "missing":
            raise ModelLoadError(f"LoRA {lora_id!r} does not exist on the Hugging Face Hub; check --lora-id "
                                 "or pass --lora-path with a local adapter")
        reason = f"the Hugging Face Hub did not answer a {probe_timeout_s:g} s probe"
    raise ModelLoadError(f"cannot load LoRA {lora_id!r}: {reason} and it is not in the local cache; "
                         f"{_lora_hint(lora_id)}")


def load_base_pipeline(base_model: str | os.PathLike, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32):
    """The base ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` (as the model's index names it; safety
    checker off, progress bar off) on ``device`` in ``dtype``; another pipeline class is refused in one line."""
    import diffusers

    from distill_common.models.sd_loading import load_sd_pipeline, pipeline_class_name
    from distill_lora_flash.conditioning import check_pipeline_class

    kind = check_pipeline_class(pipeline_class_name(base_model), os.fspath(base_model))
    return load_sd_pipeline(base_model, dtype=dtype, device=device, pipeline_cls=getattr(diffusers, kind))


def apply_lora(pipe: Any, lora: LoraSource, scale: float = 1.0, fuse: bool = True) -> Any:
    """Load ``lora`` with ``pipe.load_lora_weights``; with ``fuse`` merge it into the weights and drop the adapter."""
    from diffusers.utils import logging as diffusers_logging

    from distill_common.models.lora import fuse_lora, load_lora

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "no LoRA keys for the text encoder" is expected for UNet-only LoRAs
    try:
        load_lora(pipe, lora.file)
    finally:
        diffusers_logging.set_verbosity(level)
    if fuse:
        fuse_lora(pipe, scale=scale)
        pipe.unload_lora_weights()  # the merged weights stay; the per-layer adapter branches go
    elif scale != 1.0:
        pipe.set_adapters(pipe.get_active_adapters(), adapter_weights=[scale] * len(pipe.get_active_adapters()))
    return pipe


def image_resolution(pipe: Any) -> int:
    """Native image side of a pipeline: UNet sample size times the VAE's downsampling factor."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
