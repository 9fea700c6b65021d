"""One scoring protocol for the reference text-to-image model and its students: the code behind both the
comparison table (``distill prune compare``, N in the thousands) and the periodic evaluation of training runs on
``--data-source cifar10`` (the same code at a smaller N, stamped ``purpose: periodic`` with its N).

A protocol fixes everything a number depends on besides the model:

- **prompts**: ``evaluation_prompts(N, "held_out")`` of :mod:`distill_common.reference_sd.captions`, CIFAR-10
  classes cycled with caption templates the teacher never saw in training (Radford et al. 2021's zero-shot
  wording), and the class label of each prompt; image ``i`` uses seed ``seed + i`` for every model, so LPIPS
  compares the teacher's and a student's image of the same prompt and noise;
- **FID** (Heusel et al. 2017) against the first ``reference_n`` CIFAR-10 train images (``cifar10-train``, 32 px,
  torch-fidelity's own resize: ``protocol_resize``), with its 95% bootstrap interval
  (``distill_eval.fid.score_images``), KID (Binkowski et al. 2018) beside it;
- **class accuracy**: the share of images the CIFAR-10 classifier assigns to the prompt's class, with its Wilson
  95% interval (``distill_eval.classifier.class_accuracy``);
- **LPIPS** (Zhang et al. 2018) to the teacher's image at the same seed and sampling setting;
- **sampling setting**: steps, sampler and CFG scale (Ho & Salimans 2022), named (``recipe``: the seed's 25 DDPM
  steps at CFG 5; ``teacher``: diffusers' StableDiffusionPipeline defaults, 50 steps of PNDM at CFG 7.5).

Images are quantised to 8 bits before scoring (what a PNG holds), so in-memory (periodic) and on-disk
(comparison, resumable) images score identically.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from distill_common.errors import ConfigError, unknown_choice

PURPOSES = ("comparison", "periodic")
TEMPLATE_SETS = ("held_out", "train")
NO_CLASSIFIER = "none"


@dataclass(frozen=True)
class SamplingSetting:
    """How images are drawn: ``steps`` of ``sampler`` at CFG ``guidance`` (<= 1: off)."""

    name: str
    steps: int
    guidance: float
    sampler: str

    def label(self) -> str:
        return f"{self.name}: {self.steps} {self.sampler.upper()} steps, CFG {self.guidance:g}"


@dataclass(frozen=True)
class ScoringProtocol:
    """What a comparison number depends on besides the model (see the module docstring)."""

    num_images: int
    reference: str = "cifar10-train"
    reference_n: int | None = 10_000
    templates: str = "held_out"
    seed: int = 0
    purpose: str = "comparison"
    feature_precision: str = "fp32"
    bootstrap_resamples: int = 200

    def __post_init__(self) -> None:
        if self.num_images < 2:
            raise ConfigError(f"the scoring protocol needs at least 2 images, got {self.num_images}")
        if self.purpose not in PURPOSES:
            raise unknown_choice("scoring purpose", self.purpose, PURPOSES)
        if self.templates not in TEMPLATE_SETS:
            raise unknown_choice("caption template set", self.templates, TEMPLATE_SETS)

    def prompts(self) -> tuple[list[str], list[int]]:
        """The prompts and the class index of each."""
        from distill_common.reference_sd.captions import evaluation_prompts

        return evaluation_prompts(self.num_images, self.templates)

    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.num_images)]

    def stamp(self, setting: SamplingSetting | None = None) -> dict[str, Any]:
        """The protocol's fields (and the setting's), as stored beside every number it produced."""
        out: dict[str, Any] = {f"scoring_{k}": v for k, v in asdict(self).items()}
        if setting is not None:
            out.update(sampling=setting.name, steps=setting.steps, guidance=setting.guidance, sampler=setting.sampler)
        return out


def quantise(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] rounded to 8 bits, as a PNG stores them."""
    return (images.float().clamp(0, 1) * 255).round() / 255


class ProtocolScorer:
    """Scores image sets under one :class:`ScoringProtocol`: FID (+ 95% interval, KID), class accuracy (+ Wilson
    interval) and LPIPS to the teacher's images. The reference statistics are computed once and cached."""

    def __init__(
        self,
        protocol: ScoringProtocol,
        *,
        resolution: int,
        classifier: Any = None,
        lpips_net: str = "alex",
        batch_size: int = 64,
        data_root: str | Path | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        from distill_eval.inception import InceptionFeatureExtractor
        from distill_eval.lpips_metric import LPIPSMetric
        from distill_eval.reference_stats import protocol_resize, reference_stats

        self.protocol = protocol
        self.resolution = int(resolution)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.prompts, self.labels = protocol.prompts()
        self.seeds = protocol.seeds()
        self.extractor = InceptionFeatureExtractor(
            resize=protocol_resize(protocol.reference), precision=protocol.feature_precision
        ).to(self.device)
        self.reference = reference_stats(
            protocol.reference,
            self.extractor,
            n=protocol.reference_n,
            resolution=self.resolution,
            data_root=data_root,
            batch_size=batch_size,
            progress=False,
        )
        self.lpips = LPIPSMetric(lpips_net, value_range=(0.0, 1.0)).to(self.device)
        self.classifier = load_scoring_classifier(classifier)

    def fid_protocol(self) -> dict[str, Any]:
        return self.reference.protocol(self.protocol.num_images).as_dict()

    def protocol_dict(self, setting: SamplingSetting | None = None) -> dict[str, Any]:
        """The full protocol (FID protocol + scoring fields + sampling setting) as one JSON-able dict."""
        return {**self.fid_protocol(), **self.protocol.stamp(setting)}

    @torch.no_grad()
    def lpips_to(self, images: torch.Tensor, teacher_images: torch.Tensor) -> float:
        values = []
        for i in range(0, images.shape[0], self.batch_size):
            a = images[i : i + self.batch_size].to(self.device)
            b = teacher_images[i : i + self.batch_size].to(self.device)
            values.append(self.lpips(a, b).reshape(-1).cpu())
        return float(torch.cat(values).mean())

    @torch.no_grad()
    def score(self, images: torch.Tensor, teacher_images: torch.Tensor | None = None) -> dict[str, Any]:
        """Metrics of ``images`` (N, 3, R, R) in [0, 1], image ``i`` drawn for prompt ``i`` with seed ``seed + i``."""
        from distill_eval.benchmark import fid_row
        from distill_eval.fid import score_images

        if images.shape[0] != self.protocol.num_images:
            raise ConfigError(
                f"the protocol scores {self.protocol.num_images} images, got {images.shape[0]}; "
                "generate one image per protocol prompt"
            )
        images = quantise(images)
        fid = score_images(
            images,
            self.extractor,
            self.reference,
            batch_size=self.batch_size,
            seed=self.protocol.seed,
            progress=False,
            bootstrap_resamples=self.protocol.bootstrap_resamples,
        )
        row: dict[str, Any] = {**fid_row(fid), "num_images": int(images.shape[0])}
        if self.classifier is not None:
            from distill_eval.classifier import class_accuracy

            acc = class_accuracy(images, self.labels, self.classifier)
            row.update(
                class_accuracy=acc.accuracy, class_accuracy_ci95_low=acc.low, class_accuracy_ci95_high=acc.high
            )
        if teacher_images is not None:
            row["lpips_to_teacher"] = self.lpips_to(images, quantise(teacher_images))
        return row


def load_scoring_classifier(classifier: Any) -> Any:
    """None or ``none`` (no class accuracy), a module, ``reference`` (the shipped classifier) or a folder from
    ``distill_eval.classifier.save_classifier``."""
    if classifier is None or str(classifier) == NO_CLASSIFIER:
        return None
    if isinstance(classifier, torch.nn.Module):
        return classifier
    from distill_eval.classifier import load_classifier

    return load_classifier(str(classifier))


class FixedPromptEvaluator:
    """``evaluator(unet) -> (metrics, images)`` over one fixed prompt set: :meth:`generate` draws ``prompts``
    (image ``i`` from seed ``seeds[i]``) under ``setting`` with the teacher's VAE, text encoder and noise schedule,
    the UNet in eval mode for the draw and back in its own mode after; the teacher's images at the same seeds are
    drawn once, here. Subclasses build their scorer first, then call this, and define :meth:`metrics`."""

    def __init__(
        self,
        components: Any,
        *,
        setting: SamplingSetting,
        prompts: list[str],
        seeds: list[int],
        resolution: int,
        batch_size: int,
        autocast_dtype: torch.dtype | None,
    ) -> None:
        self.components = components
        self.setting = setting
        self.prompts = prompts
        self.seeds = seeds
        self.resolution = resolution
        self.batch_size = batch_size
        self.autocast_dtype = autocast_dtype
        self.teacher_images = self.generate(components.unet)

    def generate(self, unet: Any) -> torch.Tensor:
        from distill_sd_prune.sampling.pipeline import build_pipeline, generate_images, make_scheduler

        c = self.components
        pipe = build_pipeline(
            unet, c.vae, c.text_encoder, c.tokenizer, make_scheduler(self.setting.sampler, c.scheduler.config)
        )
        was_training = unet.training
        unet.eval()
        try:
            return generate_images(
                pipe,
                self.prompts,
                self.seeds,
                self.setting.steps,
                self.setting.guidance,
                self.resolution,
                self.batch_size,
                self.autocast_dtype,
            )
        finally:
            unet.train(was_training)

    def metrics(self, images: torch.Tensor) -> dict[str, float]:
        """The logged metrics of ``images`` (N, 3, R, R) in [0, 1], image ``i`` for ``prompts[i]``."""
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, unet: Any) -> tuple[dict[str, float], torch.Tensor]:
        images = self.generate(unet)
        return self.metrics(images), images


class PeriodicProtocolEvaluator(FixedPromptEvaluator):
    """``evaluator(unet) -> (metrics, images)`` for training on ``--data-source cifar10``: the comparison's
    :class:`ProtocolScorer` at a smaller N, its metrics stamped with ``eval/num_images`` and its protocol (with
    ``purpose: periodic``) in :attr:`protocol`. The teacher's images at the same seeds are drawn once."""

    def __init__(
        self,
        components: Any,
        *,
        protocol: ScoringProtocol,
        setting: SamplingSetting,
        resolution: int,
        classifier: Any = None,
        lpips_net: str = "alex",
        batch_size: int = 8,
        data_root: str | Path | None = None,
        device: torch.device | str = "cpu",
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        self.scorer = ProtocolScorer(
            protocol,
            resolution=resolution,
            classifier=classifier,
            lpips_net=lpips_net,
            batch_size=batch_size,
            data_root=data_root,
            device=device,
        )
        super().__init__(
            components,
            setting=setting,
            prompts=self.scorer.prompts,
            seeds=self.scorer.seeds,
            resolution=resolution,
            batch_size=batch_size,
            autocast_dtype=autocast_dtype,
        )

    def metrics(self, images: torch.Tensor) -> dict[str, float]:
        row = self.scorer.score(images, self.teacher_images)
        keys = ("fid", "fid_ci95_low", "fid_ci95_high", "kid", "lpips_to_teacher", "class_accuracy", "num_images")
        return {f"eval/{k}": float(row[k]) for k in keys if row.get(k) is not None}

    @property
    def protocol(self) -> dict[str, Any]:
        return self.scorer.protocol_dict(self.setting)

    def protocol_json(self) -> str:
        return json.dumps(self.protocol, sort_keys=True, default=str)
