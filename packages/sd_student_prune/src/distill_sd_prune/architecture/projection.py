"""``ConvProjection``: a learned 1x1 convolution that maps a narrower student's feature map to the teacher's
width for feature distillation (the "regressor" of FitNets, Romero et al. 2015; the seed's V1
``ConvProjection``).

It is initialised with the transpose of the channel matrix the student was initialised with (``P^T``, see
:mod:`distill_sd_prune.architecture.channel_init`), so at the start it puts every student channel back where
its teacher channel came from; with equal widths it is the identity.
"""

from __future__ import annotations

import torch
from torch import nn

from distill_sd_prune.architecture.channel_init import channel_projection_matrix


class ConvProjection(nn.Module):
    """(B, C_student, H, W) -> (B, C_teacher, H, W) by a 1x1 convolution without bias."""

    def __init__(self, student_channels: int, teacher_channels: int, init: str = "slice") -> None:
        super().__init__()
        self.student_channels = int(student_channels)
        self.teacher_channels = int(teacher_channels)
        self.conv = nn.Conv2d(self.student_channels, self.teacher_channels, kernel_size=1, bias=False)
        matrix = channel_projection_matrix(self.teacher_channels, self.student_channels, init)  # (C_s, C_t)
        with torch.no_grad():
            self.conv.weight.copy_(matrix.T[:, :, None, None])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 4 or features.shape[1] != self.student_channels:
            raise ValueError(
                f"ConvProjection expects (B, {self.student_channels}, H, W), got {tuple(features.shape)}"
            )
        return self.conv(features)
