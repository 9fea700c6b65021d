"""``RFGenerator``: a trained flow as a distill_common Generator (family ``rf_cifar``), and its folder format.

A generator folder holds ``generator.json`` (family, role, default steps / guidance / sampler; ``guidance_conditioned``
and ``guidance_range`` for a student that takes w as an input; ``time_grid`` for a sampler grid that is not uniform,
e.g. a progressive round from an odd step count), ``model_config.json`` (the UNetConfig) and ``model.safetensors``
(the EMA weights). :func:`load_generator` is registered under the
``distill.generators`` entry point, so ``distill_common.generator.load_generator`` (and the MLflow pyfunc model)
find it from a folder, ``runs:/`` or ``models:/`` URI.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from distill_common import checkpoint as ckpt
from distill_common.config import from_dict, to_dict
from distill_common.data.transforms import to_unit_range
from distill_common.errors import ConfigError, ModelLoadError, check_finite_images
from distill_common.generator import (
    read_generator_manifest,
    resolve_generator_folder,
    write_generator_manifest,
)
from distill_common.runtime import resolve_device, resolve_precision, torch_dtype
from distill_rf_cifar.config import UNetConfig
from distill_rf_cifar.flow import model_fn, nfe_per_call, noise_for_seeds
from distill_rf_cifar.models.unet import ClassConditionalUNet, count_parameters
from distill_rf_cifar.samplers import CountingModelFn, get_sampler, time_grid

FAMILY = "rf_cifar"
MODEL_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "model_config.json"
REFERENCE_TEACHER = Path(__file__).parent / "reference_teacher"  # shipped package data (see its MODEL_CARD.md)
# The first shipped teacher (288,000 training images), kept when a longer-trained one replaced it: the published
# student tables were distilled from it, so they stay reproducible.
REFERENCE_TEACHER_V1 = Path(__file__).parent / "reference_teacher_v1"
# Few-step students of ``reference`` shipped as named generators, one folder each (``reference-four-step``, ...),
# written by tools/reference_students.py with a model card naming their sha256.
REFERENCE_STUDENTS = Path(__file__).parent / "reference_students"


def _shipped_folders() -> dict[str, Path]:
    shipped = {"reference": REFERENCE_TEACHER, "reference-v1": REFERENCE_TEACHER_V1}  # read at call time (tests patch)
    if REFERENCE_STUDENTS.is_dir():
        shipped.update({f.name: f for f in sorted(REFERENCE_STUDENTS.iterdir()) if f.is_dir() and f.name not in shipped
                        and not f.name.startswith(".") and (f / "generator.json").is_file()})  # never a teacher's name
    return shipped


def named_generators() -> dict[str, Path]:
    """Generators shipped with this package: ``reference``, the CIFAR-10 teacher this project trained,
    ``reference-v1``, its first version, and the students of ``reference`` under ``reference_students/``."""
    return {name: folder for name, folder in _shipped_folders().items() if (folder / MODEL_FILE).is_file()}


def card_sha256(folder: Path = REFERENCE_TEACHER) -> str | None:
    """The weights' sha256 written in a shipped generator's MODEL_CARD.md (``- sha256: `HEX` ``), or None."""
    card = folder / "MODEL_CARD.md"
    match = re.search(r"sha256:\s*`([0-9a-f]{64})`", card.read_text()) if card.is_file() else None
    return match.group(1) if match else None


_verified: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) of a checked shipped file -> its sha256


def verify_shipped_weights(folder: str | Path) -> None:
    """A shipped generator's weights must match the sha256 in its model card (3 MB: milliseconds); an altered or
    truncated file is refused in one line. Other folders pass unchecked."""
    folder = Path(folder)
    if folder.resolve() not in {shipped.resolve() for shipped in _shipped_folders().values()}:
        return
    path = folder / MODEL_FILE
    want = card_sha256(folder)
    if want is None:
        raise ModelLoadError(f"the shipped generator's MODEL_CARD.md ({folder}) names no sha256; "
                             "reinstall distill-rf-cifar")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    got = _verified.get(key) or ckpt.file_sha256(path)
    if got != want:
        raise ModelLoadError(f"the shipped generator's weights {path} do not match the sha256 in its model "
                             f"card ({got[:12]} != {want[:12]}): the file was altered; reinstall distill-rf-cifar")
    _verified[key] = got


class RFGenerator:
    """Class-conditional CIFAR-10 images from a rectified flow: noise per seed, an ODE solve t: 0 -> 1."""

    family = FAMILY
    condition_kind = "class"
    resolution = 32

    def __init__(self, model: ClassConditionalUNet, *, role: str = "teacher", default_steps: int = 32,
                 default_guidance: float = 1.0, sampler: str = "euler", rtol: float = 1e-3, atol: float = 1e-3,
                 batch_size: int = 500, info: dict[str, Any] | None = None,
                 time_grid: Sequence[float] | None = None, precision: str = "fp32") -> None:
        get_sampler(sampler)
        self.model = model.eval()
        self.role = role
        self.default_steps = int(default_steps)
        self.default_guidance = float(default_guidance)
        self.sampler = sampler
        self.rtol, self.atol = rtol, atol
        self.batch_size = batch_size
        self.num_classes = model.num_classes
        self.info = dict(info or {})
        self.last_nfe = 0  # network evaluations per image of the last sample() (a CFG step counts 2)
        self.grid = None if time_grid is None else [float(t) for t in time_grid]  # the non-uniform grid it was distilled on
        if self.grid is not None and not (self.grid[0] == 0.0 and self.grid[-1] == 1.0
                                          and all(a < b for a, b in zip(self.grid[:-1], self.grid[1:], strict=True))):
            raise ConfigError(f"time_grid must increase from 0 to 1, got {self.grid[:4]}...; re-export the generator")
        self.guidance_range = tuple(self.info.get("guidance_range") or ()) or None  # (w_min, w_max) it learned
        # network forwards under autocast (the ODE state stays fp32): 'auto' is bf16 on CPUs with bf16 units
        # (measured here: 3.5x the fp32 images/s, mean |diff| 0.002 on [-1, 1] after 8 guided steps), fp16 on CUDA
        self.use_precision(precision)

    def use_precision(self, precision: str) -> RFGenerator:
        """Set the precision of the forwards ('auto', 'fp32', 'bf16', 'fp16'; see ``__init__``); returns self."""
        self.precision = resolve_precision(precision, self.device, mixed=True)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def labels(self, conditions: Sequence[Any]) -> torch.Tensor:
        if self.num_classes == 0:
            return torch.zeros(len(conditions), dtype=torch.long)  # unconditional: the null class
        labels = torch.tensor([int(c) for c in conditions], dtype=torch.long)
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ConfigError(f"class labels must lie in 0..{self.num_classes - 1}, got {labels.tolist()[:10]}; "
                              "pass CIFAR-10 class indices (0 airplane ... 9 truck)")
        return labels

    @torch.no_grad()
    def sample(self, x0: torch.Tensor, labels: torch.Tensor, num_steps: int | None = None,
               guidance: float | None = None, sampler: str | None = None) -> torch.Tensor:
        """Integrate from noise x0 (B, 3, 32, 32); returns the raw endpoint x1 on the CPU (float32, ~[-1, 1])."""
        name = sampler or self.sampler
        solve = get_sampler(name)
        steps = int(num_steps or self.default_steps)
        w = self.default_guidance if guidance is None else float(guidance)
        if not math.isfinite(w):
            raise ConfigError(f"--guidance must be a finite number, got {w}; pass e.g. --guidance 2")
        if self.guidance_range and not self.guidance_range[0] - 1e-6 <= w <= self.guidance_range[1] + 1e-6:
            raise ConfigError(f"this guidance-conditioned generator learned w in [{self.guidance_range[0]:g}, "
                              f"{self.guidance_range[1]:g}], got --guidance {w:g}; pass a scale inside that range")
        fn = CountingModelFn(model_fn(self.model, labels.to(self.device), w))
        grid = self.grid if self.grid is not None and steps == len(self.grid) - 1 else None
        ts = time_grid(steps, device=self.device) if grid is None else torch.tensor(grid, device=self.device)
        kwargs = {"rtol": self.rtol, "atol": self.atol} if name == "rk45" else {}
        with torch.autocast(self.device.type, dtype=torch_dtype(self.precision), enabled=self.precision != "fp32"):
            x = solve(fn, x0.to(self.device, self.dtype), ts, **kwargs)
        self.last_nfe = fn.calls * nfe_per_call(self.model, w)
        check_finite_images(x, f"sampling ({name}, {steps} steps, guidance {w:g})")
        return x.float().cpu()

    def generate(self, conditions: Sequence[Any], num_steps: int | None = None, seeds: Sequence[int] | None = None,
                 guidance: float | None = None, sampler: str | None = None) -> torch.Tensor:
        """(N, 3, 32, 32) in [0, 1] on the CPU; image i from noise seeded by seeds[i] (default 0..N-1)."""
        seeds = list(range(len(conditions))) if seeds is None else [int(s) for s in seeds]
        if len(seeds) != len(conditions):
            raise ConfigError(f"{len(conditions)} conditions but {len(seeds)} seeds; pass one seed per condition")
        labels = self.labels(conditions)
        out = []
        for i in range(0, len(seeds), self.batch_size):
            x0 = noise_for_seeds(seeds[i : i + self.batch_size])
            out.append(to_unit_range(self.sample(x0, labels[i : i + self.batch_size], num_steps, guidance, sampler)))
        return torch.cat(out) if out else torch.empty(0, 3, 32, 32)

    def save(self, folder: str | Path, **info: Any) -> Path:
        grid = {"time_grid": self.grid} if self.grid is not None else {}
        return save_generator(folder, self.model, role=self.role, default_steps=self.default_steps,
                              default_guidance=self.default_guidance, sampler=self.sampler, rtol=self.rtol,
                              atol=self.atol, **{**self.info, **grid, **info})


def save_generator(folder: str | Path, model: ClassConditionalUNet, *, role: str, default_steps: int,
                   default_guidance: float = 1.0, sampler: str = "euler", rtol: float = 1e-3, atol: float = 1e-3,
                   **info: Any) -> Path:
    """Write a generator folder atomically (weights: ``model``'s current state, i.e. pass it with EMA swapped in)."""
    folder = Path(folder)
    with ckpt.atomic_dir(folder) as tmp:
        ckpt.save_weights(model.state_dict(), tmp / MODEL_FILE)
        (tmp / MODEL_CONFIG_FILE).write_text(json.dumps(to_dict(model.config), indent=2))
        facts = dict(resolution=32, num_classes=model.num_classes, parameters=count_parameters(model),
                     guidance_conditioned=bool(getattr(model, "guidance_conditioned", False)),
                     convention="x_t = t*x1 + (1-t)*x0, x0 noise, x1 data, integrate t: 0 -> 1")
        write_generator_manifest(tmp, FAMILY, role=role, default_steps=int(default_steps),
                                 default_guidance=float(default_guidance), sampler=sampler, rtol=rtol, atol=atol,
                                 **{**info, **facts})  # facts of the weights win over stale copies in ``info``
    return folder


def weights_sha256(folder: str | Path) -> str:
    """sha256 of a generator's (or checkpoint's) ``model.safetensors``: the identity pairs and students refer to."""
    path = resolve_generator_folder(folder) / MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"{folder} holds no {MODEL_FILE}; pass a generator folder written by 'distill rf'")
    return ckpt.file_sha256(path)


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> ClassConditionalUNet:
    """The UNet of a generator folder (config from model_config.json, weights checked against it; a w-embedding
    when generator.json says ``guidance_conditioned``)."""
    folder = resolve_generator_folder(folder)
    cfg_path = folder / MODEL_CONFIG_FILE
    if not cfg_path.is_file():
        raise ModelLoadError(f"{folder} holds no {MODEL_CONFIG_FILE}; pass a generator folder written by 'distill rf'")
    verify_shipped_weights(folder)
    conditioned = (folder / "generator.json").is_file() and bool(read_generator_manifest(folder).get("guidance_conditioned"))
    model = ClassConditionalUNet(from_dict(UNetConfig, json.loads(cfg_path.read_text())), guidance_embedding=conditioned)
    ckpt.load_into(model, folder / MODEL_FILE, "rf_cifar UNet")
    return model.to(device).eval()


def load_generator(folder: str | Path, device: str = "auto", **overrides: Any) -> RFGenerator:
    """Entry point ``distill.generators:rf_cifar``: a generator folder (or shipped name) -> ready :class:`RFGenerator`.
    ``overrides``: manifest defaults (steps, guidance, sampler, ...), ``batch_size`` and the sampling ``precision``
    (fp32 unless given; 'auto' = bf16 autocast on CPUs with bf16 units, fp16 on CUDA)."""
    folder = resolve_generator_folder(folder)
    manifest = read_generator_manifest(folder)
    if manifest.get("family") != FAMILY:
        raise ModelLoadError(f"{folder} holds a {manifest.get('family')!r} generator, not {FAMILY!r}; "
                             "load it with its own family's loader")
    model = load_model(folder, resolve_device(device))
    keys = ("role", "default_steps", "default_guidance", "sampler", "rtol", "atol", "time_grid")
    kwargs = {k: manifest[k] for k in keys if k in manifest}
    kwargs.update({k: v for k, v in overrides.items() if k in (*keys, "batch_size", "precision")})
    info = {k: v for k, v in manifest.items() if k not in (*keys, "family")}
    return RFGenerator(model, info=info, **kwargs)
