"""Block pruning of a Stable Diffusion UNet: BK-SDM (Kim et al. 2023, "BK-SDM: A Lightweight, Fast, and Cheap
Version of Stable Diffusion") and Segmind's distill-sd ``sd_small`` / ``sd_tiny``.

The student is a *standard* ``UNet2DConditionModel`` whose config is the teacher's config with a few fields
edited (diffusers supports a per-down-block ``layers_per_block`` list, builds ``layers + 1`` ResNets per up
block, and ``mid_block_type=None`` removes the mid block), so ``save_pretrained`` writes a config that matches
the weights and ``from_pretrained`` / ``StableDiffusionPipeline`` load it unchanged. Its layers inherit the
teacher's weights through an explicit module name map (student ``up_blocks.0.resnets.1`` <- teacher
``up_blocks.0.resnets.2``):

- ``sd_small`` (~ BK-SDM-Base, 0.58B for SD 1.5): keep the first ResNet (and attention) of every down block,
  and the first and last ResNet (and attention) of every up block, so each up block loses its middle layer;
  keep the mid block. For SD 1.5 the UNet goes from 859,520,964 to 579,384,964 parameters.
- ``bk_small`` (BK-SDM-Small, 0.49B): ``sd_small`` without the mid block.
- ``sd_tiny`` (~ BK-SDM-Tiny, 323,384,964 parameters): ``bk_small`` and also drop the innermost down block
  (SD's fourth, attention-free one; the third then loses its downsampler) and the innermost up block (the
  first).
- ``none``: the teacher's block structure (combine with ``width < 1`` for a channel-reduced student).
- ``narrow``: the width-pruned plan: the teacher's blocks at a fraction of its channels (default 0.5), every
  tensor sliced or projected from the teacher's (``channel_init``; the seed's V2.1 slicing / V1 projection).

**Any SD-family UNet.** The plans are applied to the teacher's *config*, never to SD 1.5's numbers: a UNet with
``layers_per_block`` L keeps one layer per down block and two per up block (first and last), for any L >= 1.
When every block already holds a single layer (L = 1, as in the reference text-to-image model of
``distill_common.reference_sd``) there is no repeated layer to remove, and diffusers ties an up block's ResNets
to the skips of its down block (L + 1), so no up-block layer can go either. ``sd_small`` then falls back to the
one removal BK-SDM found nearly free, the mid block (Kim et al. 2023, Sec. 3.1: BK-SDM-Small = Base without
it), and says so in :func:`plan_notes`; ``bk_small`` coincides with it there, and ``sd_tiny`` removes the mid
block and the innermost stage as at any L.

Keeping the *last* ResNet of an up block (not the second) matters: it is the one whose skip input comes from
the next-outer down block, so its input width is the one the student needs.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from distill_common.errors import ConfigError, unknown_choice

# Config fields of UNet2DConditionModel that may hold one value per down block.
PER_BLOCK_KEYS = (
    "attention_head_dim",
    "num_attention_heads",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "only_cross_attention",
)
LAYER_CONTAINERS = ("resnets", "attentions", "downsamplers", "upsamplers")
# UNet2DConditionModel's norm_num_groups when a config leaves it out (SD 1.x/2.x configs state 32).
DIFFUSERS_NORM_GROUPS = 32


@dataclass(frozen=True)
class PrunePlan:
    """Which blocks a student keeps. ``prune_layers``: one layer per down block, two per up block."""

    name: str
    description: str
    prune_layers: bool
    drop_mid_block: bool
    drop_innermost: bool
    default_width: float = 1.0  # the width a plan builds when none is given (``narrow``: 0.5)


PRUNE_PLANS: dict[str, PrunePlan] = {
    "none": PrunePlan(
        "none", "the teacher's blocks (combine with --width for a narrower student)", False, False, False
    ),
    "sd_small": PrunePlan(
        "sd_small",
        "one layer per down block, middle layer of each up block removed, mid block kept "
        "(~BK-SDM-Base, 579M for SD 1.5)",
        True,
        False,
        False,
    ),
    "bk_small": PrunePlan(
        "bk_small", "sd_small without the mid block (BK-SDM-Small, 0.49B)", True, True, False
    ),
    "sd_tiny": PrunePlan(
        "sd_tiny",
        "bk_small without the innermost down and up blocks (~BK-SDM-Tiny, 323M for SD 1.5)",
        True,
        True,
        True,
    ),
    "narrow": PrunePlan(
        "narrow",
        "the teacher's blocks at a fraction of its channels (default 0.5, --width sets it); weights sliced or "
        "projected from the teacher",
        False,
        False,
        False,
        0.5,
    ),
}


def get_plan(name: str | PrunePlan) -> PrunePlan:
    if isinstance(name, PrunePlan):
        return name
    if name not in PRUNE_PLANS:
        raise unknown_choice("prune plan", name, PRUNE_PLANS)
    return PRUNE_PLANS[name]


def plain_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A mutable copy of a diffusers config without its bookkeeping keys (``_class_name``,
    ``_diffusers_version``)."""
    return {k: copy.deepcopy(v) for k, v in dict(config).items() if not k.startswith("_")}


def _per_block(value: Any, n: int) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def _heads(config: Mapping[str, Any]) -> list[int]:
    """Attention heads per down block (diffusers: ``num_attention_heads or attention_head_dim``)."""
    n = len(config["down_block_types"])
    heads = config.get("num_attention_heads") or config.get("attention_head_dim") or 1
    return [int(h) for h in _per_block(heads, n)]


def scale_channels(channels: int, width: float, norm_groups: int | None, heads: int) -> int:
    """``channels * width`` rounded to a multiple of lcm(norm groups, heads), at least one such multiple."""
    unit = math.lcm(int(norm_groups or 1), int(heads))
    return max(unit, int(round(channels * width / unit)) * unit)


def single_layer_teacher(teacher_config: Mapping[str, Any]) -> bool:
    """Every down block of the teacher holds one layer (``layers_per_block`` 1): layer pruning removes nothing."""
    return all(x == 1 for x in teacher_layers(teacher_config))


def drops_mid_block(teacher_config: Mapping[str, Any], plan: str | PrunePlan) -> bool:
    """Whether ``plan`` removes the mid block of this teacher (see the module docstring for L = 1)."""
    plan = get_plan(plan)
    return plan.drop_mid_block or (plan.prune_layers and single_layer_teacher(teacher_config))


def plan_notes(teacher_config: Mapping[str, Any], plan: str | PrunePlan) -> list[str]:
    """What ``plan`` does on this teacher beyond its description (the generalisations of the module docstring)."""
    plan = get_plan(plan)
    notes = []
    if plan.prune_layers and single_layer_teacher(teacher_config):
        notes.append(
            "the teacher has one layer per block (layers_per_block 1), so no layer is removed"
            + ("; the mid block is removed instead (BK-SDM-Small's removal)" if not plan.drop_mid_block else "")
        )
    return notes


def student_unet_config(
    teacher_config: Mapping[str, Any], plan: str | PrunePlan, width: float | None = None
) -> dict[str, Any]:
    """The student's UNet2DConditionModel config: the teacher's with the plan's blocks removed and widths
    scaled.

    Only standard config fields are edited (``layers_per_block`` becomes a per-down-block list,
    ``mid_block_type``
    None removes the mid block), so the saved config always matches the student's weights.
    """
    plan = get_plan(plan)
    width = plan.default_width if width is None else float(width)
    if not 0.0 < width <= 1.0:
        raise ConfigError(
            f"student width must lie in (0, 1], got {width}; use e.g. --width 0.5 for half the channels"
        )
    cfg = plain_config(teacher_config)
    if cfg.get("reverse_transformer_layers_per_block") is not None:
        raise ConfigError(
            "teachers with reverse_transformer_layers_per_block (asymmetric UNets) are not supported; "
            "use an SD 1.x/2.x UNet"
        )
    down = list(cfg["down_block_types"])
    up = list(cfg["up_block_types"])
    n = len(down)
    if len(up) != n:
        raise ConfigError(f"the teacher has {n} down but {len(up)} up blocks; pruning needs a symmetric UNet")
    channels = [int(c) for c in cfg["block_out_channels"]]
    layers = [int(x) for x in _per_block(cfg["layers_per_block"], n)]
    per_block = {k: list(cfg[k]) for k in PER_BLOCK_KEYS if isinstance(cfg.get(k), (list, tuple))}
    heads = _heads(cfg)
    if plan.prune_layers:
        if min(layers) < 1:
            raise ConfigError(f"the teacher has a down block without layers ({layers}); it cannot be pruned")
        layers = [1] * n
    if plan.drop_innermost:
        if n < 3:
            raise ConfigError(
                f"plan {plan.name!r} removes the innermost block but the teacher has only {n} down blocks"
            )
        down, up, channels, layers, heads = down[:-1], up[1:], channels[:-1], layers[:-1], heads[:-1]
        per_block = {k: v[:-1] for k, v in per_block.items()}
    if drops_mid_block(teacher_config, plan):
        cfg["mid_block_type"] = None
    if width != 1.0:
        channels = [
            scale_channels(c, width, cfg.get("norm_num_groups", DIFFUSERS_NORM_GROUPS), h)
            for c, h in zip(channels, heads, strict=True)
        ]
    cfg.update(per_block)
    cfg.update(down_block_types=down, up_block_types=up, block_out_channels=channels, layers_per_block=layers)
    return cfg


def teacher_layers(teacher_config: Mapping[str, Any]) -> list[int]:
    return [
        int(x)
        for x in _per_block(teacher_config["layers_per_block"], len(teacher_config["down_block_types"]))
    ]


def teacher_module_name(student_module: str, teacher_config: Mapping[str, Any], plan: str | PrunePlan) -> str:
    """The teacher module a student module inherits from (layer granularity, e.g. ``up_blocks.0.resnets.1`` ->
    ``up_blocks.0.resnets.2``). Names outside the down/up blocks map to themselves."""
    plan = get_plan(plan)
    layers = teacher_layers(teacher_config)
    n = len(layers)
    m = re.match(r"^(down_blocks|up_blocks)\.(\d+)\.(\w+)\.(\d+)(.*)$", student_module)
    if m is None:
        return student_module
    kind, block, container, index, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
    if kind == "down_blocks":
        t_block = block
        t_index = index  # prune_layers keeps index 0 of resnets/attentions; samplers are index 0 anyway
    else:
        t_block = block + (1 if plan.drop_innermost else 0)
        t_layers = layers[n - 1 - t_block] + 1  # ResNets in the teacher's up block
        if plan.prune_layers and container in ("resnets", "attentions"):
            t_index = (0, t_layers - 1)[index]  # first and last layer
        else:
            t_index = index
    return f"{kind}.{t_block}.{container}.{t_index}{rest}"


def layer_modules(unet: torch.nn.Module) -> list[str]:
    """Layer-granularity module names: ``conv_in``, ``time_embedding``, ``down_blocks.0.resnets.0``,
    ``mid_block`` … (only modules holding parameters)."""
    names: list[str] = []
    for child_name, child in unet.named_children():
        if child is None:
            continue
        if child_name in ("down_blocks", "up_blocks"):
            for b, block in enumerate(child):
                for container in LAYER_CONTAINERS:
                    layers = getattr(block, container, None)
                    for i, layer in enumerate(layers or []):
                        if any(True for _ in layer.parameters()):
                            names.append(f"{child_name}.{b}.{container}.{i}")
        elif any(True for _ in child.parameters()):
            names.append(child_name)
    return names


def module_name_map(
    student: torch.nn.Module, teacher_config: Mapping[str, Any], plan: str | PrunePlan
) -> dict[str, str]:
    """Student layer -> teacher layer for every parameter-holding layer of ``student``."""
    return {name: teacher_module_name(name, teacher_config, plan) for name in layer_modules(student)}


def parameter_name_map(state_keys: list[str] | Any, module_map: Mapping[str, str]) -> dict[str, str]:
    """Student parameter/buffer name -> teacher name, by the longest student layer prefix in
    ``module_map``."""
    prefixes = sorted(module_map, key=len, reverse=True)
    out: dict[str, str] = {}
    for key in state_keys:
        for prefix in prefixes:
            if key == prefix or key.startswith(prefix + "."):
                out[key] = module_map[prefix] + key[len(prefix) :]
                break
        else:
            out[key] = key
    return out


def dropped_modules(teacher: torch.nn.Module, module_map: Mapping[str, str]) -> list[str]:
    """Teacher layers that no student layer inherits from."""
    kept = set(module_map.values())
    return [name for name in layer_modules(teacher) if name not in kept]
