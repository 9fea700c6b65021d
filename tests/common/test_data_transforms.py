"""Image transform: resize shorter side, crop, optional flip, float (3, R, R) in [-1, 1]."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from distill_common.data import build_image_transform, to_unit_range
from distill_common.errors import ConfigError


def _gradient_image(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    rgb = np.concatenate(
        [
            np.broadcast_to(x, (height, width, 1)),
            np.broadcast_to(y, (height, width, 1)),
            np.full((height, width, 1), 40.0),
        ],
        axis=2,
    )
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def test_pil_input_is_resized_cropped_and_scaled() -> None:
    out = build_image_transform(16)(_gradient_image(64, 32))
    assert type(out) is torch.Tensor and out.shape == (3, 16, 16) and out.dtype == torch.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    # red rises left to right, green top to bottom: the gradient survived the crop
    assert out[0, :, -1].mean() > out[0, :, 0].mean() and out[1, -1, :].mean() > out[1, 0, :].mean()


def test_uint8_tensor_at_native_size_maps_exactly_to_minus_one_one() -> None:
    image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    out = build_image_transform(8)(image)
    torch.testing.assert_close(out, image.float() / 127.5 - 1.0)
    torch.testing.assert_close(to_unit_range(out), image.float() / 255.0)


def test_center_crop_is_deterministic_random_crop_is_not() -> None:
    image = _gradient_image(96, 32)
    center = build_image_transform(32, center_crop=True)
    assert torch.equal(center(image), center(image))
    random_crop = build_image_transform(16, center_crop=False)
    torch.manual_seed(0)
    outs = {tuple(random_crop(_gradient_image(96, 48)).flatten()[:4].tolist()) for _ in range(12)}
    assert len(outs) > 1


def test_random_flip_gives_both_orientations() -> None:
    image = torch.arange(3 * 4 * 4, dtype=torch.uint8).reshape(3, 4, 4)
    base = build_image_transform(4)(image)
    flip = build_image_transform(4, random_flip=True)
    torch.manual_seed(0)
    outs = [flip(image) for _ in range(20)]
    assert any(torch.equal(o, base) for o in outs)
    assert any(torch.equal(o, base.flip(-1)) for o in outs)


def test_grayscale_and_rgba_become_rgb() -> None:
    t = build_image_transform(8)
    assert t(Image.new("L", (8, 8), 128)).shape == (3, 8, 8)
    assert t(Image.new("RGBA", (10, 8), (255, 0, 0, 10))).shape == (3, 8, 8)


def test_bad_resolution_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="resolution"):
        build_image_transform(0)
