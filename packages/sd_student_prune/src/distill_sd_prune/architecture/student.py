"""Build a student UNet from a loaded teacher: prune blocks, narrow channels, inherit the teacher's weights,
and save it as a standard diffusers UNet folder beside its explicit name map."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distill_common.checkpoint import atomic_dir, write_json
from distill_common.errors import ModelLoadError
from distill_sd_prune.architecture.channel_init import INIT_METHODS, TransferReport, transfer_teacher_weights
from distill_sd_prune.architecture.complexity import count_parameters
from distill_sd_prune.architecture.pruning import (
    PrunePlan,
    dropped_modules,
    get_plan,
    module_name_map,
    parameter_name_map,
    plain_config,
    student_unet_config,
    teacher_layers,
)

UNET_SUBFOLDER = "unet"
PRUNE_MAP_FILE = "prune_map.json"


def budget_label(plan: str, width: float) -> str:
    """The parameter-budget label of a student: its plan, plus ``-wNNN`` (width in percent) when narrowed."""
    return plan if abs(width - 1.0) < 1e-9 else f"{plan}-w{int(round(width * 100)):03d}"


@dataclass
class StudentBuild:
    """A freshly built student and how it was made from the teacher."""

    unet: Any  # diffusers.UNet2DConditionModel
    plan: PrunePlan
    width: float
    init: str
    module_map: dict[str, str]  # student layer -> teacher layer
    dropped: list[str]  # teacher layers without a student counterpart
    transfer: TransferReport
    teacher_params: int

    @property
    def budget(self) -> str:
        return budget_label(self.plan.name, self.width)

    def describe(self) -> dict[str, Any]:
        return {
            "plan": self.plan.name,
            "width": self.width,
            "init": self.init,
            "budget": self.budget,
            "student_params": count_parameters(self.unet),
            "teacher_params": self.teacher_params,
            "transfer": self.transfer.counts(),
            "module_map": self.module_map,
            "dropped_teacher_modules": self.dropped,
        }


def build_student(
    teacher_unet: Any,
    plan: str | PrunePlan = "sd_small",
    width: float | None = None,
    init: str = "slice",
    seed: int = 0,
) -> StudentBuild:
    """A student ``UNet2DConditionModel`` (float32, CPU) built from ``teacher_unet`` by ``plan`` and
    ``width`` (None: the plan's default width, 1.0 but for ``narrow``).

    ``init``: ``slice`` / ``project`` inherit the teacher's weights through the name map (identical copies
    where the widths agree), ``random`` keeps diffusers' random initialisation (seeded by ``seed``).
    """
    from diffusers import UNet2DConditionModel

    plan = get_plan(plan)
    width = plan.default_width if width is None else float(width)
    if init not in INIT_METHODS:
        from distill_common.errors import unknown_choice

        raise unknown_choice("student init", init, INIT_METHODS)
    config = student_unet_config(teacher_unet.config, plan, width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = UNet2DConditionModel.from_config(config)
    teacher_cpu = (
        teacher_unet if next(teacher_unet.parameters()).device.type == "cpu" else teacher_unet.to("cpu")
    )
    module_map = module_name_map(student, teacher_unet.config, plan)
    parameter_map = parameter_name_map(list(student.state_dict()), module_map)
    report = transfer_teacher_weights(student, teacher_cpu, parameter_map, init)
    if width == 1.0 and report.narrowed:
        raise ModelLoadError(
            f"an equal-width student should copy every tensor but {report.narrowed[0]} was reshaped; "
            "the teacher's architecture is not supported by this prune plan"
        )
    return StudentBuild(
        student,
        plan,
        float(width),
        init,
        module_map,
        dropped_modules(teacher_unet, module_map),
        report,
        count_parameters(teacher_unet),
    )


def feature_block_pairs(
    student_unet: Any, teacher_config: Mapping[str, Any], plan: str | PrunePlan
) -> dict[str, str]:
    """Student block -> teacher module whose outputs feature KD compares (BK-SDM: every down, mid and up
    block).

    A student down block that lost its downsampler (``sd_tiny``'s third) is paired with the teacher's last
    layer before the downsampler, so both features have the same resolution.
    """
    plan = get_plan(plan)
    t_cfg = plain_config(teacher_config)
    t_layers = teacher_layers(t_cfg)
    t_down = list(t_cfg["down_block_types"])
    pairs: dict[str, str] = {}
    for i, block in enumerate(student_unet.down_blocks):
        target = f"down_blocks.{i}"
        teacher_downsamples = i < len(t_down) - 1
        if getattr(block, "downsamplers", None) is None and teacher_downsamples:
            container = "attentions" if "CrossAttn" in t_down[i] else "resnets"
            target = f"down_blocks.{i}.{container}.{t_layers[i] - 1}"
        pairs[f"down_blocks.{i}"] = target
    if student_unet.mid_block is not None and t_cfg.get("mid_block_type") is not None:
        pairs["mid_block"] = "mid_block"
    offset = 1 if plan.drop_innermost else 0
    for i in range(len(student_unet.up_blocks)):
        pairs[f"up_blocks.{i}"] = f"up_blocks.{i + offset}"
    return pairs


def save_student(build: StudentBuild, folder: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``folder/unet`` (a diffusers UNet folder, safetensors) and ``folder/prune_map.json``,
    atomically."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        build.unet.save_pretrained(str(tmp / UNET_SUBFOLDER), safe_serialization=True)
        write_json(tmp / PRUNE_MAP_FILE, {**build.describe(), **dict(extra or {})})
    return folder


def read_prune_map(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / PRUNE_MAP_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"{folder} has no {PRUNE_MAP_FILE}; pass a folder written by 'distill prune prepare-unet'"
        )
    return json.loads(path.read_text())


def load_student_unet(folder: str | Path, dtype: torch.dtype = torch.float32) -> Any:
    """A student UNet from a prepared folder (``folder/unet``) or a diffusers UNet folder itself."""
    from diffusers import UNet2DConditionModel

    folder = Path(folder)
    unet_dir = folder / UNET_SUBFOLDER if (folder / UNET_SUBFOLDER / "config.json").is_file() else folder
    if not (unet_dir / "config.json").is_file():
        raise ModelLoadError(
            f"{folder} holds no diffusers UNet (config.json); pass a folder written by "
            "'distill prune prepare-unet' or a UNet saved with save_pretrained"
        )
    try:
        return UNet2DConditionModel.from_pretrained(str(unet_dir), torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(
            f"cannot load the student UNet in {unet_dir}: {str(exc).splitlines()[0][:200]}"
        ) from None
