"""Student architectures: block pruning (sd_small, bk_small, sd_tiny), channel narrowing with teacher-weight
inheritance (slicing or projection), the ConvProjection feature adapter, and parameter / MAC counting."""

from distill_sd_prune.architecture.channel_init import INIT_METHODS, TransferReport, transfer_teacher_weights
from distill_sd_prune.architecture.complexity import MacsReport, count_parameters, layer_parameters, unet_macs
from distill_sd_prune.architecture.projection import ConvProjection
from distill_sd_prune.architecture.pruning import (
    PRUNE_PLANS,
    PrunePlan,
    get_plan,
    module_name_map,
    parameter_name_map,
    student_unet_config,
)
from distill_sd_prune.architecture.student import (
    StudentBuild,
    budget_label,
    build_student,
    feature_block_pairs,
    load_student_unet,
    read_prune_map,
    save_student,
)

__all__ = [
    "INIT_METHODS",
    "PRUNE_PLANS",
    "ConvProjection",
    "MacsReport",
    "PrunePlan",
    "StudentBuild",
    "TransferReport",
    "budget_label",
    "build_student",
    "count_parameters",
    "feature_block_pairs",
    "get_plan",
    "layer_parameters",
    "load_student_unet",
    "module_name_map",
    "parameter_name_map",
    "read_prune_map",
    "save_student",
    "student_unet_config",
    "transfer_teacher_weights",
    "unet_macs",
]
