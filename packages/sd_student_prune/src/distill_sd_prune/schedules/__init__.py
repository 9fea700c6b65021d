"""Schedules over training progress: KD weight alpha(t), caption dropout, the progressive DDPM chain, learning
rate."""

from distill_sd_prune.schedules.caption_dropout import CaptionDropoutSchedule
from distill_sd_prune.schedules.kd_alpha import KDAlphaSchedule
from distill_sd_prune.schedules.learning_rate import LR_SCHEDULES, build_lr_scheduler
from distill_sd_prune.schedules.progress import linear, training_progress
from distill_sd_prune.schedules.timesteps import TIMESTEP_SAMPLERS, ProgressiveChain, UniformTimesteps

__all__ = [
    "LR_SCHEDULES",
    "TIMESTEP_SAMPLERS",
    "CaptionDropoutSchedule",
    "KDAlphaSchedule",
    "ProgressiveChain",
    "UniformTimesteps",
    "build_lr_scheduler",
    "linear",
    "training_progress",
]
