"""The loss terms of block-removed knowledge distillation (BK-SDM, Kim et al. 2023, Eq. 1-3), each in float32:

``task`` MSE(eps_student, eps) -- the ordinary denoising loss (Ho et al. 2020) ``output_kd`` MSE(eps_student,
eps_teacher) -- output-level distillation ``feature_kd`` sum over paired blocks MSE(h_s, h_t) -- feature-level
distillation (student features projected to the teacher's width by ConvProjection where they differ)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

TERMS = ("task", "output_kd", "feature_kd")


def noise_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE between the student's prediction and the diffusion target (the noise, or v for v-prediction)."""
    return F.mse_loss(prediction.float(), target.float())


def output_kd(student_prediction: torch.Tensor, teacher_prediction: torch.Tensor) -> torch.Tensor:
    """MSE between the student's and the (frozen) teacher's predictions."""
    return F.mse_loss(student_prediction.float(), teacher_prediction.detach().float())


def feature_kd(
    student_features: Mapping[str, torch.Tensor],
    teacher_features: Mapping[str, torch.Tensor],
    pairs: Mapping[str, str],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum over ``pairs`` (student block -> teacher block) of MSE(student feature, teacher feature); also per
    block."""
    per_block: dict[str, torch.Tensor] = {}
    for s_name, t_name in pairs.items():
        if s_name not in student_features or t_name not in teacher_features:
            raise RuntimeError(f"feature KD pair {s_name} -> {t_name} was not recorded in this forward pass")
        h_s, h_t = student_features[s_name], teacher_features[t_name]
        if h_s.shape != h_t.shape:
            raise RuntimeError(
                f"feature KD: student {s_name} {tuple(h_s.shape)} vs teacher {t_name} {tuple(h_t.shape)}; "
                "the shapes must agree (project the student's channels first)"
            )
        per_block[s_name] = F.mse_loss(h_s.float(), h_t.detach().float())
    if not per_block:
        raise RuntimeError(
            "feature KD has no block pairs; pass feature blocks or set the feature KD weight to 0"
        )
    return torch.stack(list(per_block.values())).sum(), per_block
