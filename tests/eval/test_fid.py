"""FID/KID from features against independent numpy/scipy computations and torchmetrics; batched extraction."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from distill_common.errors import ConfigError
from distill_eval.fid import (
    extract_features,
    feature_statistics,
    fid_from_features,
    fid_from_stats,
    kid_from_features,
)


def gaussian_features(n: int, dim: int, shift: float, scale: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = np.eye(dim) + 0.3 * rng.normal(size=(dim, dim)) / np.sqrt(dim)
    return (rng.normal(size=(n, dim)) * scale) @ mixing + shift


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with a matrix square root: |mu1-mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def numpy_unbiased_kid(a: np.ndarray, b: np.ndarray, degree: int = 3) -> float:
    """Unbiased MMD^2 with the polynomial kernel (x.y / d + 1)^degree over the full sets."""
    d = a.shape[1]
    kxx, kyy, kxy = ((a @ a.T / d + 1) ** degree, (b @ b.T / d + 1) ** degree, (a @ b.T / d + 1) ** degree)
    m = a.shape[0]
    return float((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())


def test_fid_equals_scipy_sqrtm() -> None:
    a = gaussian_features(400, 48, 0.0, 1.0, seed=0)
    b = gaussian_features(400, 48, 0.3, 1.4, seed=1)
    expected = scipy_fid(a, b)
    assert expected > 1.0
    assert fid_from_features(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, rel=1e-3)
    mu1, s1 = feature_statistics(a)
    mu2, s2 = feature_statistics(b)
    assert fid_from_stats(torch.from_numpy(mu1), torch.from_numpy(s1), mu2, s2) == pytest.approx(expected, rel=1e-3)


def test_fid_of_a_set_with_itself_is_zero_and_symmetric() -> None:
    a = gaussian_features(300, 32, 0.0, 1.0, seed=2)
    b = gaussian_features(300, 32, 0.5, 1.0, seed=3)
    assert abs(fid_from_features(a, a)) < 1e-6
    assert fid_from_features(a, b) == pytest.approx(fid_from_features(b, a), rel=1e-6)
    # a shifted mean adds exactly |shift|^2 (the covariance term is unchanged)
    assert fid_from_features(a, a + 0.5) == pytest.approx(32 * 0.25, rel=1e-6)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance`")
def test_fid_agrees_with_torchmetrics_fed_by_a_feature_module() -> None:
    class Features(nn.Module):  # torchmetrics runs `feature(imgs)`; here the "images" already are features
        num_features = 24

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    a = torch.from_numpy(gaussian_features(200, 24, 0.0, 1.0, seed=4))
    b = torch.from_numpy(gaussian_features(200, 24, 0.2, 1.2, seed=5))
    metric = FrechetInceptionDistance(feature=Features())
    metric.set_dtype(torch.float64)
    metric.update(a, real=True)
    metric.update(b, real=False)
    assert fid_from_features(a, b) == pytest.approx(float(metric.compute()), rel=1e-4)

    kid = KernelInceptionDistance(feature=Features(), subsets=1, subset_size=200)
    kid.update(a, real=True)
    kid.update(b, real=False)
    ours, _ = kid_from_features(a, b, subsets=1, subset_size=200)
    assert ours == pytest.approx(float(kid.compute()[0]), rel=1e-4)


def test_kid_equals_independent_unbiased_mmd() -> None:
    a = gaussian_features(150, 16, 0.0, 1.0, seed=6)
    b = gaussian_features(150, 16, 0.4, 1.0, seed=7)
    # one subset of the full size is a permutation of the whole set: MMD is permutation invariant
    mean, std = kid_from_features(a, b, subsets=1, subset_size=150)
    assert mean == pytest.approx(numpy_unbiased_kid(a, b), rel=1e-3)
    assert std == 0.0
    # degree is honoured
    mean2, _ = kid_from_features(a, b, subsets=1, subset_size=150, degree=2)
    assert mean2 == pytest.approx(numpy_unbiased_kid(a, b, degree=2), rel=1e-3)


def test_kid_is_unbiased_across_subset_sizes() -> None:
    """The biased MMD^2 estimate grows like 1/m; the unbiased one must not depend on the subset size m."""
    a = gaussian_features(1500, 16, 0.0, 1.0, seed=8)
    b = gaussian_features(1500, 16, 0.15, 1.1, seed=9)
    subsets = 100
    small, small_std = kid_from_features(a, b, subsets=subsets, subset_size=40, seed=0)
    large, large_std = kid_from_features(a, b, subsets=subsets, subset_size=400, seed=1)
    standard_error = np.hypot(small_std, large_std) / np.sqrt(subsets)
    assert abs(small - large) < 4 * standard_error
    # the test has power: a biased (V-statistic) estimate at m=40 would sit far outside that band
    rng = np.random.RandomState(0)
    x, y = a[rng.choice(1500, 40, replace=False)], b[rng.choice(1500, 40, replace=False)]
    k = lambda p, q: (p @ q.T / 16 + 1) ** 3  # noqa: E731
    biased = k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()
    assert biased - large > 10 * standard_error


def test_kid_seed_is_reproducible_and_subset_size_checked() -> None:
    a = gaussian_features(120, 8, 0.0, 1.0, seed=10)
    b = gaussian_features(100, 8, 0.1, 1.0, seed=11)
    assert kid_from_features(a, b, 10, 50, seed=3) == kid_from_features(a, b, 10, 50, seed=3)
    assert kid_from_features(a, b, 10, 50, seed=3) != kid_from_features(a, b, 10, 50, seed=4)
    with pytest.raises(ConfigError, match="--kid-subset-size 100"):
        kid_from_features(a, b, subsets=10, subset_size=101)


def test_bad_feature_shapes_are_refused() -> None:
    with pytest.raises(ConfigError, match="at least 2"):
        fid_from_features(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ConfigError, match="same feature extractor"):
        fid_from_stats(np.zeros(4), np.eye(4), np.zeros(3), np.eye(3))


class CountingExtractor(nn.Module):
    """A cheap stand-in with a real convolution, recording the batch sizes it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3)
        self.batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(x.shape[0])
        return self.conv(x.float()).mean(dim=(2, 3))


def test_extract_features_batches_tensors_and_iterables_alike() -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (23, 3, 8, 8), dtype=torch.uint8)
    extractor = CountingExtractor()
    whole = extract_features(images, extractor, batch_size=8, progress=False)
    assert whole.shape == (23, 5) and whole.dtype == torch.float32 and not whole.requires_grad
    assert extractor.batch_sizes == [8, 8, 7]

    extractor.batch_sizes.clear()
    uneven = [images[:5], images[5:8], images[8:20], images[20], images[21:]]  # batches and one (3, H, W) image
    streamed = extract_features(iter(uneven), extractor, batch_size=8, progress=False)
    assert extractor.batch_sizes == [8, 8, 7]
    torch.testing.assert_close(streamed, whole)


def test_extract_features_refuses_empty_input_and_bad_batch_size() -> None:
    with pytest.raises(ConfigError, match="no images"):
        extract_features(iter([]), CountingExtractor(), progress=False)
    with pytest.raises(ConfigError, match="batch size"):
        extract_features(torch.zeros(2, 3, 8, 8), CountingExtractor(), batch_size=0, progress=False)


def test_low_rank_fid_equals_the_full_computation():
    """The nuclear-norm FID used for small sets agrees with the eigendecomposition route."""
    from distill_eval.fid import fid_from_features, fid_low_rank

    gen = torch.Generator().manual_seed(3)
    a = torch.randn(40, 64, generator=gen, dtype=torch.float64)
    b = 0.7 * torch.randn(90, 64, generator=gen, dtype=torch.float64) + 0.2
    assert fid_low_rank(a, b) == pytest.approx(fid_from_features(a, b), rel=1e-6, abs=1e-6)
    assert fid_low_rank(a, a) == pytest.approx(0.0, abs=1e-8)
