"""Periodic evaluation during training (the seed's V2.x): FID against a fixed COCO val subset and LPIPS to the
teacher's image at the same seed, every N steps.

The subset is the first ``num_images`` locally present COCO 2017 val images (sorted by id): their first
captions are the prompts and the images themselves the FID reference (``coco-val2017`` limited to n, at the
training resolution). Seeds are ``seed .. seed + n - 1``; the teacher's images are generated once. With a few
images FID is strongly biased upward: compare it across steps of one run (same protocol), not with published
numbers.

Drawing the images (prompts, seeds, the teacher's images once, the UNet's train/eval mode) is
:class:`~distill_sd_prune.evaluation.scoring.FixedPromptEvaluator`, shared with the CIFAR-10 periodic evaluation;
only the metrics differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from distill_sd_prune.evaluation.scoring import FixedPromptEvaluator, SamplingSetting

FID_RESIZE = "bicubic"  # antialiased resize to 299 of both sets (clean-fid style); COCO images are not square


def coco_val_subset(data_root: str | Path | None, num_images: int) -> list[str]:
    """First captions of the first ``num_images`` local COCO val images (by image id)."""
    from distill_sd_prune.data.training_data import load_coco_captions

    dataset = load_coco_captions(data_root, "val", 64, limit=num_images, show_progress=False)
    if len(dataset.records) < num_images:
        from distill_common.errors import DataError

        raise DataError(
            f"asked for {num_images} COCO val images but {len(dataset.records)} are present; "
            "pass a smaller --eval-num-images"
        )
    return [r.captions[0] for r in dataset.records[:num_images]]


class PeriodicEvaluator(FixedPromptEvaluator):
    """``evaluator(unet) -> (metrics, images)`` with the teacher's VAE / text encoder and a fixed prompt
    set."""

    def __init__(
        self,
        components: Any,
        *,
        data_root: str | Path | None,
        resolution: int,
        num_images: int,
        steps: int,
        guidance: float,
        scheduler: str,
        lpips_net: str = "alex",
        batch_size: int = 8,
        seed: int = 0,
        device: torch.device | str = "cpu",
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        from distill_eval.inception import InceptionFeatureExtractor
        from distill_eval.lpips_metric import LPIPSMetric
        from distill_eval.reference_stats import reference_stats

        self.device = torch.device(device)
        prompts = coco_val_subset(data_root, num_images)
        self.extractor = InceptionFeatureExtractor(resize=FID_RESIZE).to(self.device)
        self.reference = reference_stats(
            "coco-val2017",
            self.extractor,
            n=num_images,
            resolution=resolution,
            data_root=data_root,
            batch_size=batch_size,
            progress=False,
        )
        self.lpips = LPIPSMetric(lpips_net, value_range=(0.0, 1.0)).to(self.device)
        super().__init__(
            components,
            setting=SamplingSetting("periodic", steps, guidance, scheduler),
            prompts=prompts,
            seeds=[seed + i for i in range(num_images)],
            resolution=resolution,
            batch_size=batch_size,
            autocast_dtype=autocast_dtype,
        )

    def metrics(self, images: torch.Tensor) -> dict[str, float]:
        from distill_eval.fid import score_images

        fid = score_images(images, self.extractor, self.reference, batch_size=self.batch_size, progress=False)
        lpips = self.lpips(images.to(self.device), self.teacher_images.to(self.device)).mean()
        return {"eval/fid": fid.fid, "eval/kid": fid.kid_mean, "eval/lpips_to_teacher": float(lpips)}

    @property
    def protocol(self) -> dict[str, Any]:
        return {
            **self.reference.protocol(len(self.seeds)).as_dict(),
            "steps": self.setting.steps,
            "guidance": self.setting.guidance,
            "scheduler": self.setting.sampler,
        }
