"""The ``lora_flash`` Generator: SD 1.5 with a fused Flash LoRA sampled by LCM, or the base model's own sampler.

Each image's initial latent and LCM re-noising come from its own ``torch.Generator`` seeded with its seed
(on the CPU, so a seed gives the same noise on every device), so equal seeds mean equal noise across models.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from distill_common.errors import ConfigError, ModelLoadError, check_finite_images
from distill_common.generator import read_generator_manifest, write_generator_manifest
from distill_common.models.lora import LORA_WEIGHT_NAME
from distill_lora_flash.loading import LoraSource, apply_lora, image_resolution, load_base_pipeline
from distill_lora_flash.schedule import FlashSchedule

FAMILY = "lora_flash"


class FlashGenerator:
    """Prompts -> images (N, 3, H, W) in [0, 1] on the CPU, through a diffusers ``StableDiffusionPipeline``.

    With a :class:`FlashSchedule` it samples with LCM at guidance 0 (the distilled student); with
    ``schedule=None`` it uses the pipeline's own scheduler with classifier-free guidance (the baseline teacher).
    Several generators may share one pipeline: each sets its own scheduler before sampling. ``cache_info`` names
    what made the weights (base model, LoRA file digest and scale, dtype, device); the benchmark writes it into the
    key of each image folder, so a change regenerates that generator's images and says which item changed.
    """

    family = FAMILY
    condition_kind = "prompt"
    installs_own_scheduler = True  # generate() sets self.scheduler on the (maybe shared) pipeline: see the fingerprint

    def __init__(self, pipe: Any, schedule: FlashSchedule | None, *, default_steps: int = 4,
                 default_guidance: float = 0.0, label: str = "flash", cache_info: dict[str, Any] | None = None) -> None:
        self.pipe = pipe
        self.cache_info = dict(cache_info or {})  # what made the weights (base model, LoRA digest, ...): image cache key
        self.schedule = schedule
        self.scheduler = schedule.scheduler() if schedule is not None else pipe.scheduler
        self.default_steps = int(default_steps)
        self.default_guidance = float(default_guidance)
        self.label = label
        self.resolution = image_resolution(pipe)

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    def generate(self, conditions: Sequence[str], num_steps: int, seeds: Sequence[int],
                 guidance: float | None = None) -> torch.Tensor:
        """One image per (prompt, seed); ``guidance`` None means this generator's default."""
        if len(conditions) != len(seeds):
            raise ConfigError(f"got {len(conditions)} prompts but {len(seeds)} seeds; pass one seed per prompt")
        if not conditions:
            return torch.empty(0, 3, self.resolution, self.resolution)
        if num_steps < 1:
            raise ConfigError(f"the number of sampling steps must be positive, got {num_steps}")
        self.pipe.scheduler = self.scheduler
        scale = self.default_guidance if guidance is None else float(guidance)
        if not math.isfinite(scale):
            raise ConfigError(f"--guidance must be a finite number, got {scale}; pass e.g. --guidance 1")
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        with torch.inference_mode():
            out = self.pipe(
                prompt=[str(c) for c in conditions],
                num_inference_steps=int(num_steps),
                guidance_scale=scale,
                generator=generators,
                height=self.resolution,
                width=self.resolution,
                output_type="pt",
            )
        images = out.images.float()
        check_finite_images(images, f"LCM-LoRA sampling ({num_steps} steps, guidance {scale:g})")
        return images.clamp(0, 1).cpu()  # (N, 3, H, W)

    def unet_evaluations(self, num_steps: int, guidance: float | None = None) -> tuple[int, int]:
        """(UNet calls, UNet batch rows) per image: CFG (guidance > 1) doubles the rows, not the calls."""
        scale = self.default_guidance if guidance is None else float(guidance)
        return int(num_steps), int(num_steps) * (2 if scale > 1.0 else 1)


def write_generator_folder(folder: str | Path, *, base_model: str, lora_file: str | Path | None,
                           schedule: FlashSchedule, discrete_steps: Sequence[int] | None = None,
                           default_steps: int = 4, guidance: float = 0.0, **info: Any) -> Path:
    """A generator folder: ``generator.json`` + the LoRA file (copied), readable by :func:`load_generator`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lora_name = None
    if lora_file is not None:
        lora_name = LORA_WEIGHT_NAME
        if Path(lora_file).resolve() != (folder / lora_name).resolve():
            shutil.copyfile(lora_file, folder / lora_name)
    write_generator_manifest(folder, FAMILY, base_model=str(base_model), lora=lora_name,
                             default_steps=int(default_steps), guidance=float(guidance),
                             **schedule.manifest(discrete_steps), **info)
    return folder


REFERENCE_GENERATOR = Path(__file__).parent / "reference_generator"
SHIPPED_LORAS = Path(__file__).parent / "shipped_loras"
SHIPPED_LORA_SUMS = "SHA256SUMS"


def named_generators() -> dict[str, Path]:
    """Generators shipped with this package: ``sd-reference``, the reference text-to-image model (distill-common's
    shipped CIFAR-sized Stable Diffusion) sampled with its own scheduler and CFG, as a teacher for benchmarks; and
    ``sd-reference-<name>`` for each few-step LoRA student of it in ``shipped_loras/<name>/`` (LCM sampling)."""
    named = {"sd-reference": REFERENCE_GENERATOR}
    if SHIPPED_LORAS.is_dir():
        for folder in sorted(SHIPPED_LORAS.iterdir()):
            if (folder / "generator.json").is_file():
                named[f"sd-reference-{folder.name}"] = folder
    return named


def verify_shipped_folder(folder: Path) -> None:
    """A folder with a ``SHA256SUMS`` (a shipped LoRA) loads only when every listed file matches its sha256."""
    from distill_common.reference_sd import verify_sha256sums

    if (folder / SHIPPED_LORA_SUMS).is_file():
        verify_sha256sums(folder, folder / SHIPPED_LORA_SUMS)


def _check_base_weights(folder: Path, manifest: dict[str, Any]) -> None:
    """A LoRA trained on the shipped reference model records the sha256 of that model's ``SHA256SUMS``; it is refused
    on other reference weights (a LoRA is a delta: on other base weights it is another, unmeasured model)."""
    recorded = manifest.get("base_model_sha256sums")
    if not recorded or manifest.get("base_model") != "reference":
        return
    from distill_common.checkpoint import file_sha256
    from distill_common.reference_sd import SHA256_FILE

    if file_sha256(SHA256_FILE) != recorded:
        raise ModelLoadError(f"{folder} was trained on other weights of the reference model than the ones installed; "
                             "install the distill-common version it shipped with, or retrain it (distill flash train "
                             "--base-model reference)")


def load_generator(folder: str | Path, device: str = "auto", precision: str = "auto", **_: Any) -> FlashGenerator:
    """Entry point ``distill.generators: lora_flash``: rebuild the generator a ``generator.json`` describes.

    The LCM grid recorded at training time must equal the one this installation samples with; a mismatch is refused.
    """
    from distill_common.runtime import resolve_device, resolve_precision, torch_dtype

    folder = Path(folder)
    manifest = read_generator_manifest(folder)
    verify_shipped_folder(folder)
    _check_base_weights(folder, manifest)
    if manifest.get("family") != FAMILY:
        raise ModelLoadError(f"{folder} holds a {manifest.get('family')!r} generator, not {FAMILY!r}")
    dev = resolve_device(device)
    dtype = torch_dtype(resolve_precision(precision, dev, mixed=False))
    pipe = load_base_pipeline(manifest["base_model"], dev, dtype)
    if manifest.get("lora"):
        apply_lora(pipe, LoraSource(folder / manifest["lora"], str(folder / manifest["lora"])))
    if manifest.get("sampler") == "pipeline":  # the base model's own sampler with CFG (a baseline teacher)
        return FlashGenerator(pipe, None, default_steps=int(manifest.get("default_steps", 30)),
                              default_guidance=float(manifest.get("guidance", 7.5)), label=folder.name)
    schedule = FlashSchedule.from_scheduler(pipe.scheduler, int(manifest.get("lcm_original_steps", 50)))
    recorded = manifest.get("discrete_timesteps") or {}
    for n, steps in recorded.items():
        if schedule.timesteps(int(n)) != [int(t) for t in steps]:
            raise ModelLoadError(
                f"{folder} was trained on the {n}-step LCM timesteps {steps} but this sampler gives "
                f"{schedule.timesteps(int(n))}; use the base model and diffusers version it was trained with"
            )
    return FlashGenerator(pipe, schedule, default_steps=int(manifest.get("default_steps", 4)),
                          default_guidance=float(manifest.get("guidance", 0.0)), label=folder.name)
