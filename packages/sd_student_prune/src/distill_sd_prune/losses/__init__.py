"""Loss terms (task noise MSE, output KD, feature KD), forward-hook feature recording, the magnitude balancer,
and the weighted objective."""

from distill_sd_prune.losses.balancer import MagnitudeBalancer
from distill_sd_prune.losses.feature_hooks import FeatureRecorder, recording, resolve_module, unwrap_model
from distill_sd_prune.losses.objective import DistillObjective, LossWeights
from distill_sd_prune.losses.terms import TERMS, feature_kd, noise_mse, output_kd

__all__ = [
    "TERMS",
    "DistillObjective",
    "FeatureRecorder",
    "LossWeights",
    "MagnitudeBalancer",
    "feature_kd",
    "noise_mse",
    "output_kd",
    "recording",
    "resolve_module",
    "unwrap_model",
]
