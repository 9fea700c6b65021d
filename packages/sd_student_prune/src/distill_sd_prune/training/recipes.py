"""The seed project's four pipelines as named compositions of components over one training loop.

- ``v1``: half-width student, projection init, progressive DDPM chain, task + output KD + feature KD
  (ConvProjection adapters), EMA, constant LR.
- ``v2.1``: half-width student, teacher-to-student slicing init, task noise MSE only, OneCycleLR, periodic
  FID / LPIPS on a fixed COCO val subset.
- ``v2.2``: v2.1 + output KD with alpha(t) decaying 1 -> 0.5 + caption dropout growing 0 -> 0.1.
- ``v3``: sd_small (or ``--student-plan sd_tiny``) at full width, BK-SDM loss (task + output KD + feature KD),
  Accelerate mixed precision (fp16 on CUDA), gradient accumulation 4, constant LR 5e-5, 512 px.

Only fields left unset (None) take the recipe's value, so ``--recipe v2.2 --loss-output-kd-weight 0.5`` keeps
everything of v2.2 but that weight.
"""

from __future__ import annotations

from typing import Any

from distill_common.errors import unknown_choice

_V2_1: dict[str, dict[str, Any]] = {
    "student": {"plan": "none", "width": 0.5, "init": "slice"},
    "loss": {
        "task_weight": 1.0,
        "output_kd_weight": 0.0,
        "feature_kd_weight": 0.0,
        "kd_alpha": "constant",
        "balance": False,
    },
    "schedule": {
        "timesteps": "uniform",
        "caption_dropout_start": 0.0,
        "caption_dropout_end": 0.0,
        "lr": "onecycle",
        "ema": False,
    },
    "data": {"resolution": 64},
    "eval": {"every": 500},
    "": {"gradient_accumulation": 1, "learning_rate": 1e-4, "precision": "fp32"},
}

RECIPE_VALUES: dict[str, dict[str, dict[str, Any]]] = {
    "v1": {
        "student": {"plan": "none", "width": 0.5, "init": "project"},
        "loss": {
            "task_weight": 1.0,
            "output_kd_weight": 1.0,
            "feature_kd_weight": 1.0,
            "kd_alpha": "constant",
            "balance": False,
        },
        "schedule": {
            "timesteps": "progressive",
            "caption_dropout_start": 0.0,
            "caption_dropout_end": 0.0,
            "lr": "constant",
            "ema": True,
        },
        "data": {"resolution": 64},
        "eval": {"every": 0},
        "": {"gradient_accumulation": 1, "learning_rate": 1e-4, "precision": "fp32"},
    },
    "v2.1": _V2_1,
    "v2.2": {
        **_V2_1,
        "loss": {**_V2_1["loss"], "output_kd_weight": 1.0, "kd_alpha": "linear"},
        "schedule": {**_V2_1["schedule"], "caption_dropout_start": 0.0, "caption_dropout_end": 0.1},
    },
    "v3": {
        "student": {"plan": "sd_small", "width": 1.0, "init": "slice"},
        "loss": {
            "task_weight": 1.0,
            "output_kd_weight": 1.0,
            "feature_kd_weight": 1.0,
            "kd_alpha": "constant",
            "balance": False,
        },
        "schedule": {
            "timesteps": "uniform",
            "caption_dropout_start": 0.0,
            "caption_dropout_end": 0.0,
            "lr": "constant",
            "ema": False,
        },
        "data": {"resolution": 512},
        "eval": {"every": 0},
        "": {"gradient_accumulation": 4, "learning_rate": 5e-5, "precision": "auto"},
    },
}


def recipe_values(name: str) -> dict[str, dict[str, Any]]:
    if name not in RECIPE_VALUES:
        raise unknown_choice("recipe", name, RECIPE_VALUES)
    return RECIPE_VALUES[name]


def apply_recipe(cfg: Any) -> Any:
    """Fill every None field of ``cfg`` (a TrainConfig) from its recipe, in place; explicit values win."""
    for section, values in recipe_values(cfg.recipe).items():
        target = getattr(cfg, section) if section else cfg
        for field_name, value in values.items():
            if getattr(target, field_name) is None:
                setattr(target, field_name, value)
    return cfg
