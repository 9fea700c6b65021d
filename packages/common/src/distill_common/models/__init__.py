"""Model layer: the offline CLIP tokenizer, Stable Diffusion loading, a tiny SD factory, LoRA and EMA helpers.

Importing this package is cheap: diffusers, transformers and peft are imported inside the functions that use them.
"""

from distill_common.models.ema import EMA
from distill_common.models.lora import (
    DEFAULT_TARGET_MODULES,
    LORA_WEIGHT_NAME,
    add_lora,
    fuse_lora,
    load_lora,
    lora_parameters,
    lora_state_dict,
    save_lora,
    unfuse_lora,
)
from distill_common.models.sd_loading import (
    COMPONENTS,
    ModelSource,
    SDComponents,
    check_tokenizer,
    hub_offline,
    load_sd_components,
    load_sd_pipeline,
    probe_hub,
    resolve_model_source,
)
from distill_common.models.tiny_sd import (
    SD15_DOWN_BLOCKS,
    SD15_MID_BLOCK,
    SD15_SCHEDULER_CONFIG,
    SD15_UNET_CONFIG,
    SD15_UP_BLOCKS,
    TinySDSpec,
    build_tiny_sd,
    save_tiny_sd,
    tiny_sd_folder,
)
from distill_common.models.tokenizer import (
    CLIP_MAX_LENGTH,
    CLIP_VOCAB_SIZE,
    clip_tokenizer,
    clip_vocab_and_merges,
    distill_cache_dir,
)

__all__ = [
    "CLIP_MAX_LENGTH",
    "CLIP_VOCAB_SIZE",
    "COMPONENTS",
    "DEFAULT_TARGET_MODULES",
    "EMA",
    "LORA_WEIGHT_NAME",
    "ModelSource",
    "SD15_DOWN_BLOCKS",
    "SD15_MID_BLOCK",
    "SD15_SCHEDULER_CONFIG",
    "SD15_UNET_CONFIG",
    "SD15_UP_BLOCKS",
    "SDComponents",
    "TinySDSpec",
    "add_lora",
    "build_tiny_sd",
    "check_tokenizer",
    "clip_tokenizer",
    "clip_vocab_and_merges",
    "distill_cache_dir",
    "fuse_lora",
    "hub_offline",
    "load_lora",
    "load_sd_components",
    "load_sd_pipeline",
    "lora_parameters",
    "lora_state_dict",
    "probe_hub",
    "resolve_model_source",
    "save_lora",
    "save_tiny_sd",
    "tiny_sd_folder",
    "unfuse_lora",
]
