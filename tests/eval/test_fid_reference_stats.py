"""Reference statistics: real CIFAR-10 / COCO sources, the protocol-keyed cache, and protocol-stamped FID results."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import distill_eval.reference_stats as reference_module
from distill_common.data.cifar10 import Cifar10Shards
from distill_common.errors import ConfigError
from distill_eval.fid import fid_from_features, fid_kid_result, score_images
from distill_eval.inception import InceptionFeatureExtractor
from distill_eval.reference_stats import ReferenceStats, reference_stats


class PooledProjection(nn.Module):
    """A cheap deterministic stand-in extractor (pooled pixels through a fixed random projection to 2048-d)."""

    def __init__(self, resize: str = "none", extractor_hash: str = "fake00000000", precision: str = "fp32") -> None:
        super().__init__()
        self.resize = resize
        self.precision = precision
        self.extractor_hash = extractor_hash
        self.projection = nn.Linear(3 * 4 * 4, 2048)
        torch.nn.init.normal_(self.projection.weight, generator=torch.Generator().manual_seed(0))
        torch.nn.init.zeros_(self.projection.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(images.float() / 255.0, 4).flatten(1)  # (B, 48)
        return self.projection(pooled)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count calls to the feature extraction used by reference_stats."""
    calls: list[int] = []
    original = reference_module.extract_features

    def counting(*args, **kwargs):
        features = original(*args, **kwargs)
        calls.append(features.shape[0])
        return features

    monkeypatch.setattr(reference_module, "extract_features", counting)
    return calls


def test_cache_hit_does_not_recompute(data_root: Path, tmp_path: Path, counted: list[int]) -> None:
    extractor = PooledProjection()
    first = reference_stats("cifar10-test", extractor, cache_dir=tmp_path, n=16, data_root=data_root, progress=False)
    assert counted == [16]
    assert first.path is not None and first.path.suffix == ".safetensors" and first.path.is_file()
    second = reference_stats("cifar10-test", extractor, cache_dir=tmp_path, n=16, data_root=data_root, progress=False)
    assert counted == [16]  # read back, not recomputed
    torch.testing.assert_close(second.sigma, first.sigma)
    torch.testing.assert_close(second.features, first.features)
    assert second.mu.dtype == torch.float64 and second.features.shape == (16, 2048)
    assert (second.reference_set, second.reference_n, second.resolution, second.resize) == ("cifar10-test", 16, 32, "none")


def test_every_protocol_field_is_part_of_the_cache_key(data_root: Path, tmp_path: Path, counted: list[int]) -> None:
    kwargs = dict(cache_dir=tmp_path, data_root=data_root, progress=False)
    reference_stats("cifar10-test", PooledProjection(), n=8, **kwargs)
    reference_stats("cifar10-test", PooledProjection(), n=6, **kwargs)  # another N
    reference_stats("cifar10-test", PooledProjection(extractor_hash="fake11111111"), n=8, **kwargs)  # other weights
    bicubic = reference_stats("cifar10-test", PooledProjection("bicubic"), n=8, resolution=64, **kwargs)
    bf16 = reference_stats("cifar10-test", PooledProjection(precision="bf16"), n=8, **kwargs)  # other precision
    compiled = reference_stats("cifar10-test", PooledProjection(precision="bf16+compile"), n=8, **kwargs)
    assert counted == [8, 6, 8, 8, 8, 8]
    assert bicubic.resolution == 64 and bicubic.resize == "bicubic"
    assert bf16.feature_precision == "bf16" and bf16.protocol(4).feature_precision == "bf16"
    assert compiled.protocol(4).feature_precision == "bf16+compile"  # the compiled path is its own protocol
    assert len(list((tmp_path / "reference_stats").glob("*.safetensors"))) == 6
    again = reference_stats("cifar10-test", PooledProjection(precision="bf16"), n=8, **kwargs)
    assert counted == [8, 6, 8, 8, 8, 8] and again.feature_precision == "bf16"  # read back with its precision


def test_the_resize_follows_the_protocol() -> None:
    from distill_eval.reference_stats import protocol_resize

    assert protocol_resize("cifar10-train") == protocol_resize("cifar10-test") == "none"
    assert protocol_resize("coco-val2017") == protocol_resize("folder:/x") == "bicubic"


def test_statistics_are_those_of_the_features(data_root: Path, tmp_path: Path) -> None:
    stats = reference_stats("cifar10-test", PooledProjection(), cache_dir=tmp_path, n=12, data_root=data_root,
                            progress=False, kid_features=5)
    images = Cifar10Shards(data_root, "test", limit=12, show_progress=False).uint8_images()
    features = PooledProjection()(images).detach()
    torch.testing.assert_close(stats.mu, features.double().mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.sigma, torch.cov(features.double().T), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(stats.features, features[:5])  # only kid_features are kept


def test_coco_images_are_cropped_and_resized_with_the_protocol_method(data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--resize bicubic"):
        reference_stats("coco-val2017", PooledProjection("none"), cache_dir=tmp_path, n=2, data_root=data_root,
                        progress=False)
    stats = reference_stats("coco-val2017", PooledProjection("bicubic"), cache_dir=tmp_path, n=3, resolution=64,
                            data_root=data_root, progress=False)
    assert (stats.reference_set, stats.reference_n, stats.resolution, stats.resize) == ("coco-val2017", 3, 64, "bicubic")


def test_any_image_folder_is_a_reference_set(tmp_path: Path) -> None:
    folder = tmp_path / "refs"
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i, size in enumerate([(40, 30), (32, 32), (50, 64)]):
        pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    stats = reference_stats(f"folder:{folder}", PooledProjection("bilinear"), cache_dir=tmp_path / "c",
                            resolution=32, progress=False)
    assert stats.reference_n == 3 and stats.reference_set.startswith("folder:refs-")
    same = reference_stats(folder, PooledProjection("bilinear"), cache_dir=tmp_path / "c", resolution=32, progress=False)
    assert same.reference_set == stats.reference_set


def test_bad_specs_are_one_line_errors(data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="valid choices: .*'cifar10-train'.*'folder:PATH'"):
        reference_stats("imagenet", PooledProjection(), cache_dir=tmp_path, data_root=data_root)
    with pytest.raises(ConfigError, match="differs from the extractor"):
        reference_stats("cifar10-test", PooledProjection("none"), resize="bicubic", cache_dir=tmp_path,
                        data_root=data_root)
    with pytest.raises(ConfigError, match="--resolution 32 or --resize bicubic"):
        reference_stats("cifar10-test", PooledProjection("none"), n=4, resolution=64, cache_dir=tmp_path,
                        data_root=data_root, progress=False)


def fake_reference(extractor_hash: str = "fake00000000", resolution: int = 32) -> ReferenceStats:
    """64-d features keep the eigen-decomposition cheap (2048-d costs seconds on a CPU)."""
    features = torch.randn(20, 64, generator=torch.Generator().manual_seed(1))
    return ReferenceStats("cifar10-test", 20, resolution, "none", extractor_hash, features.double().mean(0),
                          torch.cov(features.double().T), features)


def test_results_refuse_mismatched_extractor_or_resolution() -> None:
    generated = torch.randn(10, 64)
    with pytest.raises(ConfigError, match="recompute the reference statistics"):
        fid_kid_result(generated, fake_reference(), "otherhash000", 32)
    with pytest.raises(ConfigError, match="--resolution 64"):
        score_images(torch.zeros(4, 3, 64, 64, dtype=torch.uint8), PooledProjection(), fake_reference(), progress=False)
    with pytest.raises(ConfigError, match="--feature-precision fp32"):
        fid_kid_result(generated, fake_reference(), "fake00000000", 32, feature_precision="bf16")
    result = fid_kid_result(generated, fake_reference(), "fake00000000", 32, kid_subset_size=1000)
    assert result.protocol.generated_n == 10 and result.protocol.reference_n == 20
    assert result.fid == pytest.approx(fid_from_features(generated, fake_reference().features), rel=1e-6)
    assert result.fid_interval is not None and result.fid_interval.estimate == pytest.approx(result.fid, rel=1e-6)
    assert result.kid_subset_size == 5 and result.kid_std > 0  # half of the 10 generated: subsets differ
    assert fid_kid_result(generated, fake_reference(), "fake00000000", 32, bootstrap_resamples=0).fid_interval is None


@pytest.mark.slow
def test_real_cifar_against_itself_scores_zero(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The real Inception extractor end to end: reference statistics, scoring, protocol stamp."""
    extractor = InceptionFeatureExtractor(cache_dir=tmp_path_factory.getbasetemp() / "distill_cache")
    reference = reference_stats("cifar10-test", extractor, cache_dir=tmp_path_factory.mktemp("refs"), n=8,
                                data_root=data_root, progress=False)
    images = Cifar10Shards(data_root, "test", limit=8, show_progress=False).uint8_images()
    result = score_images(images.float() / 255.0, extractor, reference, batch_size=4, progress=False)
    assert abs(result.fid) < 1e-2
    assert result.kid_mean <= 1e-6  # the unbiased estimate for identical sets is slightly negative
    assert result.protocol.as_dict() == {
        "extractor_hash": extractor.extractor_hash, "reference_set": "cifar10-test", "reference_n": 8,
        "generated_n": 8, "resolution": 32, "resize": "none", "feature_precision": "fp32",
    }
