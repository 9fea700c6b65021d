"""Plain helpers of the sd_student_prune tests (a module of its own: test modules import it by name)."""

from __future__ import annotations

import torch


def run_unet(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample
