"""The ``sd_student_prune`` generator: a student (or the teacher) UNet with the base model's VAE, text encoder
and tokenizer, behind the workspace's Generator protocol.

A generator folder holds ``generator.json`` (family ``sd_student_prune``, ``base_model``: hub id or folder for
the VAE / text encoder / tokenizer / scheduler, ``unet``: the student's subfolder or null for the teacher's
own UNet, resolution, default steps and guidance, scheduler, plan, width, budget, parameters, MACs) and the
student's diffusers ``unet/`` folder. With ``bundle_base`` the folder is also a complete diffusers Stable
Diffusion folder (``StableDiffusionPipeline.from_pretrained(folder)`` loads the student pipeline) and
``base_model`` is ``"."``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from distill_common.checkpoint import atomic_dir
from distill_common.errors import ConfigError, ModelLoadError
from distill_common.generator import read_generator_manifest, write_generator_manifest
from distill_sd_prune.sampling.pipeline import (
    HEADLINE_GUIDANCE,
    HEADLINE_STEPS,
    SAMPLERS,
    build_pipeline,
    generate_images,
    make_scheduler,
)

FAMILY = "sd_student_prune"
UNET_SUBFOLDER = "unet"


class SDStudentGenerator:
    """Prompts -> images with a Stable Diffusion pipeline (one seed per prompt)."""

    family = FAMILY
    condition_kind = "prompt"

    def __init__(
        self,
        pipe: Any,
        *,
        resolution: int,
        default_steps: int = HEADLINE_STEPS,
        default_guidance: float = HEADLINE_GUIDANCE,
        info: Mapping[str, Any] | None = None,
        batch_size: int = 8,
    ) -> None:
        self.pipe = pipe
        self.resolution = int(resolution)
        self.default_steps = int(default_steps)
        self.default_guidance = float(default_guidance)
        self.info = dict(info or {})
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    @property
    def unet(self) -> Any:
        return self.pipe.unet

    def set_scheduler(self, name: str) -> None:
        self.pipe.scheduler = make_scheduler(name, self.pipe.scheduler.config)
        self.info["scheduler"] = name

    def generate(
        self, conditions: Sequence[str], num_steps: int, seeds: Sequence[int], guidance: float | None = None
    ) -> torch.Tensor:
        return generate_images(
            self.pipe,
            [str(c) for c in conditions],
            list(seeds),
            num_steps,
            self.default_guidance if guidance is None else guidance,
            self.resolution,
            batch_size=self.batch_size,
        )


def _resolve_base(folder: Path, base_model: str) -> str:
    if base_model in (".", "./"):
        return str(folder)
    local = Path(base_model).expanduser()
    if not local.is_absolute() and (folder / base_model).exists():
        return str((folder / base_model).resolve())
    return base_model


def load_generator(
    folder: str | Path,
    device: str = "auto",
    *,
    scheduler: str | None = None,
    dtype: torch.dtype | str | None = None,
    base_model: str | None = None,
    batch_size: int = 8,
    **_: Any,
) -> SDStudentGenerator:
    """Load a generator folder (see the module docstring); the ``distill.generators`` entry point.

    ``base_model`` overrides where the VAE / text encoder / tokenizer come from (e.g. a local copy of the hub
    model); ``scheduler`` overrides the sampler (ddpm, pndm, ddim); ``dtype`` defaults to fp16 on CUDA, fp32
    elsewhere.
    """
    from distill_common.models import load_sd_components
    from distill_common.runtime import resolve_device
    from distill_sd_prune.architecture.student import load_student_unet

    folder = Path(folder)
    manifest = read_generator_manifest(folder)
    if manifest.get("family") != FAMILY:
        raise ModelLoadError(
            f"{folder} holds a {manifest.get('family')!r} generator, not {FAMILY!r}; "
            "load it with its own family's loader (distill_common.generator.load_generator)"
        )
    dev = resolve_device(device)
    if dtype is None:
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    base = _resolve_base(folder, base_model or manifest["base_model"])
    parts = ("vae", "text_encoder", "tokenizer", "scheduler") + (() if manifest.get("unet") else ("unet",))
    components = load_sd_components(base, include=parts, dtype=dtype, device=dev)
    unet = (
        components.unet
        if not manifest.get("unet")
        else load_student_unet(folder / manifest["unet"], dtype).to(dev)
    )
    sampler = scheduler or manifest.get("scheduler", "ddpm")
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}; valid choices: {', '.join(SAMPLERS)}")
    pipe = build_pipeline(
        unet.eval(),
        components.vae,
        components.text_encoder,
        components.tokenizer,
        make_scheduler(sampler, components.scheduler.config),
    )
    info = {**manifest, "scheduler": sampler, "base_model_resolved": base}
    return SDStudentGenerator(
        pipe,
        resolution=int(manifest["resolution"]),
        default_steps=int(manifest.get("default_steps", HEADLINE_STEPS)),
        default_guidance=float(manifest.get("guidance", HEADLINE_GUIDANCE)),
        info=info,
        batch_size=batch_size,
    )


def write_generator_folder(
    folder: str | Path,
    base_model: str,
    *,
    unet: Any = None,
    resolution: int,
    default_steps: int = HEADLINE_STEPS,
    guidance: float = HEADLINE_GUIDANCE,
    scheduler: str = "ddpm",
    bundle_base: bool = False,
    **info: Any,
) -> Path:
    """Write a generator folder atomically: ``generator.json`` and, for a student, ``unet/``.

    ``unet=None`` describes the teacher itself (its UNet comes from ``base_model``). ``bundle_base`` copies
    the base model's VAE, text encoder, tokenizer and scheduler in, making the folder a complete diffusers
    pipeline.
    """
    folder = Path(folder)
    base_ref = str(Path(base_model).resolve()) if Path(base_model).expanduser().exists() else str(base_model)
    with atomic_dir(folder) as tmp:
        if bundle_base:
            from distill_common.models import load_sd_components

            parts = ("vae", "text_encoder", "tokenizer", "scheduler") + (("unet",) if unet is None else ())
            comps = load_sd_components(base_model, include=parts, dtype=torch.float32, device="cpu")
            pipe = build_pipeline(
                unet if unet is not None else comps.unet,
                comps.vae,
                comps.text_encoder,
                comps.tokenizer,
                comps.scheduler,
            )
            pipe.save_pretrained(str(tmp), safe_serialization=True)
            base_ref = "."
        elif unet is not None:
            unet.save_pretrained(str(tmp / UNET_SUBFOLDER), safe_serialization=True)
        write_generator_manifest(
            tmp,
            FAMILY,
            base_model=base_ref,
            unet=UNET_SUBFOLDER if unet is not None else None,
            resolution=int(resolution),
            default_steps=int(default_steps),
            guidance=float(guidance),
            scheduler=scheduler,
            **info,
        )
    return folder


def write_teacher_folder(folder: str | Path, base_model: str, resolution: int, **info: Any) -> Path:
    """A generator folder for the teacher itself (same family, so students and teacher share one loader)."""
    return write_generator_folder(
        folder, base_model, unet=None, resolution=resolution, role="teacher", budget="teacher", **info
    )
