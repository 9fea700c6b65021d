"""Builders shared by the rf_cifar tests: tiny configs that run in seconds on a CPU."""

from __future__ import annotations

from pathlib import Path

from distill_rf_cifar.config import LoopConfig, PairsConfig, UNetConfig


def tiny_unet_config(**kw) -> UNetConfig:
    base = dict(base_channels=8, channel_mults=[1, 2], res_blocks=1, attention_resolutions=[], mid_attention=False,
                dropout=0.0, norm_groups=4, num_classes=10)
    return UNetConfig(**{**base, **kw})


def tiny_loop(**kw) -> LoopConfig:
    base = dict(steps=4, batch_size=8, learning_rate=1e-3, warmup_steps=1, checkpoint_every=2, log_every=2,
                sample_every=0, device="cpu", precision="fp32", log_checkpoints=False)
    return LoopConfig(**{**base, **kw})


def pairs_config(teacher: Path, out: Path, **kw) -> PairsConfig:
    base = dict(teacher=teacher, output_dir=out, num_pairs=24, shard_size=8, seed_start=100, steps=2, batch_size=8,
                device="cpu", track=False)
    return PairsConfig(**{**base, **kw})


def load_tool(name: str):
    """A script of the repository's tools/ folder, imported as a module (``load_tool("reference_teacher")``)."""
    import importlib.util

    path = Path(__file__).parents[2] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_tool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
