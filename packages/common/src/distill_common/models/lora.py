"""Low-rank adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") on a diffusers UNet,
through peft, saved and loaded in the diffusers LoRA format (``pytorch_lora_weights.safetensors``).

The adapter's peft config (rank, alpha, targets) is stored in the safetensors metadata, so ``load_lora`` restores
the same ``alpha / rank`` scale that training used.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from distill_common.errors import ConfigError, ModelLoadError

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DEFAULT_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")
DEFAULT_ADAPTER = "default"


def add_lora(
    unet: torch.nn.Module,
    rank: int = 4,
    alpha: float = 32,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    dropout: float = 0.0,
    *,
    adapter_name: str = DEFAULT_ADAPTER,
    init_lora_weights: bool | str = "gaussian",
    freeze_base: bool = True,
) -> torch.nn.Module:
    """Inject a LoRA adapter into ``unet`` in place (``unet.add_adapter(LoraConfig(...))``, as in diffusers' training
    examples) and return it. With ``freeze_base`` only the LoRA matrices stay trainable. ``lora_B`` starts at zero,
    so the adapted UNet initially computes exactly what the base UNet computes."""
    from peft import LoraConfig

    if rank < 1:
        raise ConfigError(f"LoRA rank must be a positive integer, got {rank}; use --lora-rank 4 or larger")
    if freeze_base:
        unet.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        init_lora_weights=init_lora_weights,
        target_modules=list(target_modules),
    )
    unet.add_adapter(config, adapter_name=adapter_name)
    return unet


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable LoRA parameters of ``model`` (what the optimiser should see)."""
    return [p for name, p in model.named_parameters() if "lora_" in name and p.requires_grad]


def lora_state_dict(unet: torch.nn.Module, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
    """The adapter's weights in diffusers' key format (``...to_q.lora_A.weight``), detached, on the CPU."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    adapters = getattr(unet, "peft_config", None) or {}
    if adapter_name not in adapters:
        raise ModelLoadError(
            f"the UNet has no LoRA adapter named {adapter_name!r} (adapters: {', '.join(adapters) or 'none'}); "
            "call add_lora(unet) first"
        )
    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    converted = convert_state_dict_to_diffusers(state)
    if _mixed_key_formats(converted):  # diffusers renames only the attention projections: keep one format
        converted = state
    return {k: v.detach().to("cpu").contiguous() for k, v in converted.items()}


_OLD_KEY_PARTS = (".lora.down.", ".lora.up.")
_PEFT_KEY_PARTS = (".lora_A.", ".lora_B.")


def _mixed_key_formats(keys: Any) -> bool:
    """Whether LoRA keys mix diffusers' attention format (``to_q.lora.down``) with peft's (``conv1.lora_A``).

    ``convert_state_dict_to_diffusers`` writes exactly such a mix for a LoRA on more than the attention projections,
    and diffusers' ``load_lora_weights`` picks one format from the first key, dropping the other kind silently."""
    keys = list(keys)
    return (any(p in k for k in keys for p in _OLD_KEY_PARTS)
            and any(p in k for k in keys for p in _PEFT_KEY_PARTS))


def _one_key_format_copy(file: Path, folder: Path) -> Path:
    """A copy of the safetensors LoRA ``file`` in ``folder`` with every key in peft form, metadata kept."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(file), "pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {k.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B."): handle.get_tensor(k)
                   for k in handle.keys()}
    out = folder / LORA_WEIGHT_NAME
    save_file(tensors, str(out), metadata=metadata)
    return out


def _safetensors_keys(file: Path) -> list[str] | None:
    """The tensor names of a safetensors file (None when it is not one: load_lora_weights gives its own error)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as handle:
            return list(handle.keys())
    except Exception:  # noqa: BLE001 - safetensors raises its own error types
        return None


def _file_unet_modules(keys: list[str]) -> set[str] | None:
    """The UNet module names in a diffusers/peft-format LoRA's keys (None for other formats, e.g. kohya's)."""
    unet = [k.removeprefix("unet.") for k in keys if k.startswith("unet.")]
    parts = _OLD_KEY_PARTS + _PEFT_KEY_PARTS
    return {next(k.split(p)[0] for p in parts if p in k) for k in unet if any(p in k for p in parts)} or None


def save_lora(unet: torch.nn.Module, out_dir: str | os.PathLike, *, adapter_name: str = DEFAULT_ADAPTER) -> Path:
    """Write the UNet's LoRA as ``out_dir/pytorch_lora_weights.safetensors`` (diffusers format + peft config metadata).

    The file is written in a temporary folder next to ``out_dir`` and moved into place with one atomic rename, so a
    crash never leaves a half-written adapter. Returns the file's path.
    """
    from diffusers import StableDiffusionPipeline

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = lora_state_dict(unet, adapter_name)
    metadata = unet.peft_config[adapter_name].to_dict()
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".lora-"))
    try:
        StableDiffusionPipeline.save_lora_weights(
            str(staging),
            unet_lora_layers=layers,
            unet_lora_adapter_metadata=metadata,
            weight_name=LORA_WEIGHT_NAME,
            safe_serialization=True,
        )
        os.replace(staging / LORA_WEIGHT_NAME, out / LORA_WEIGHT_NAME)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / LORA_WEIGHT_NAME


def load_lora(pipe: Any, path_or_dir: str | os.PathLike, adapter_name: str | None = None) -> Any:
    """Load a diffusers-format LoRA (a folder holding ``pytorch_lora_weights.safetensors``, or the file itself) into
    ``pipe`` with ``pipe.load_lora_weights``. Raises ModelLoadError for a missing or unreadable adapter."""
    path = Path(path_or_dir).expanduser()
    if path.is_dir():
        folder, weight_name = path, LORA_WEIGHT_NAME
        if not (folder / weight_name).is_file():
            candidates = sorted(p.name for p in folder.glob("*.safetensors"))
            if len(candidates) != 1:
                raise ModelLoadError(
                    f"{folder} holds no {LORA_WEIGHT_NAME} (safetensors found: {', '.join(candidates) or 'none'}); "
                    "pass the folder written by save_lora or the adapter file itself"
                )
            weight_name = candidates[0]
    elif path.is_file():
        folder, weight_name = path.parent, path.name
    else:
        raise ModelLoadError(f"LoRA {path} does not exist; pass a folder from save_lora or a .safetensors adapter")
    file = folder / weight_name
    keys = _safetensors_keys(file) if file.suffix == ".safetensors" else None
    expected = _file_unet_modules(keys) if keys is not None else None
    before = set(getattr(pipe.unet, "peft_config", None) or {})
    staging = None
    try:
        if expected is not None and _mixed_key_formats(keys):
            staging = Path(tempfile.mkdtemp(prefix="distill-lora-"))
            folder, weight_name = staging, _one_key_format_copy(file, staging).name
        pipe.load_lora_weights(str(folder), weight_name=weight_name, adapter_name=adapter_name, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ModelLoadError(
            f"cannot load the LoRA {file} into the pipeline: {first}; check it was trained for this base model"
        ) from exc
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    if expected is not None:
        _check_all_layers_loaded(pipe, file, expected, before)
    return pipe


def _check_all_layers_loaded(pipe: Any, file: Path, expected: set[str], before: set[str]) -> None:
    """Raise ModelLoadError when a UNet layer of the LoRA file did not become an adapter layer of ``pipe.unet``: a
    partly loaded LoRA is another, unmeasured model."""
    from peft.utils import get_peft_model_state_dict

    added = [name for name in (getattr(pipe.unet, "peft_config", None) or {}) if name not in before]
    loaded: set[str] = set()
    for name in added:
        for key in get_peft_model_state_dict(pipe.unet, adapter_name=name):
            loaded.add(next((key.split(p)[0] for p in _PEFT_KEY_PARTS + _OLD_KEY_PARTS if p in key), key))
    missing = sorted(expected - loaded)
    if added and missing:
        raise ModelLoadError(f"{len(missing)} of the {len(expected)} UNet layers of the LoRA {file} did not load "
                             f"(first: {missing[0]}); check it was trained for this base model")


def fuse_lora(pipe: Any, scale: float = 1.0, adapter_names: Sequence[str] | None = None) -> Any:
    """Merge the loaded LoRA into the base weights (``W += scale * B A * alpha / r``) for adapter-free inference speed."""
    pipe.fuse_lora(components=["unet"], lora_scale=scale, adapter_names=list(adapter_names) if adapter_names else None)
    return pipe


def unfuse_lora(pipe: Any) -> Any:
    """Undo :func:`fuse_lora`, restoring the base weights (the adapter stays loaded)."""
    pipe.unfuse_lora(components=["unet"])
    return pipe
