"""Image preprocessing shared by every loader: resize, crop, optional flip, float tensor in [-1, 1]."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image
from torchvision.transforms import v2

from distill_common.errors import ConfigError


@dataclass(frozen=True)
class ImageTransform:
    """Shorter side resized to ``resolution`` (bilinear, antialiased), center or random square crop,
    optional horizontal flip, then scaled to [-1, 1] as diffusion models expect (Ho et al., 2020, DDPM §3.3).

    Takes a PIL image (any mode; converted to RGB) or a uint8 tensor (3, H, W); returns float32 (3, R, R).
    """

    resolution: int
    center_crop: bool = True
    random_flip: bool = False
    _pipeline: v2.Compose = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.resolution < 1:
            raise ConfigError(
                f"image resolution must be positive, got {self.resolution}; pass --resolution N"
            )
        steps: list[v2.Transform] = [
            v2.ToImage(),
            v2.Resize(self.resolution, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.CenterCrop(self.resolution) if self.center_crop else v2.RandomCrop(self.resolution),
        ]
        if self.random_flip:
            steps.append(v2.RandomHorizontalFlip(p=0.5))
        steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])]
        object.__setattr__(self, "_pipeline", v2.Compose(steps))

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(image, Image.Image) and image.mode != "RGB":
            image = image.convert("RGB")
        out = self._pipeline(image)  # (3, R, R) in [-1, 1]
        return out.as_subclass(torch.Tensor)


def build_image_transform(
    resolution: int, center_crop: bool = True, random_flip: bool = False
) -> ImageTransform:
    """The standard training/eval transform; see :class:`ImageTransform`."""
    return ImageTransform(resolution=resolution, center_crop=center_crop, random_flip=random_flip)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Map images from [-1, 1] to [0, 1] (clamped), the range the Generator protocol returns."""
    return ((images + 1.0) / 2.0).clamp(0.0, 1.0)
