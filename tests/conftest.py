"""Shared fixtures: the offline data root, an isolated MLflow store, and CPU-friendly torch settings."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from stand_in_generators import NoiseGenerator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]


def _default_data_root() -> Path:
    env = os.environ.get("DISTILL_DATA_ROOT")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = _default_data_root()
    if not (root / "cifar10").is_dir():
        pytest.fail(f"shared data not found at {root}; set DISTILL_DATA_ROOT to the folder holding cifar10/ and coco2017/")
    return root


@pytest.fixture(scope="session")
def cifar_root(data_root: Path) -> Path:
    return data_root / "cifar10"


@pytest.fixture(scope="session")
def coco_root(data_root: Path) -> Path:
    return data_root / "coco2017"


@pytest.fixture
def mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An isolated embedded MLflow store (sqlite + local artifacts) for one test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DISTILL_ARTIFACT_ROOT", str(tmp_path / "mlartifacts"))
    return uri


@pytest.fixture(autouse=True, scope="session")
def _torch_threads() -> None:
    import torch

    # One intra-op thread: tiny models gain nothing from more, and spare threads spin when cores are shared.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD 1.5-architecture diffusers folder (latent 16 -> 64x64 images), built once per session."""
    from distill_common.models.tiny_sd import tiny_sd_folder

    return tiny_sd_folder(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture
def noise_family(monkeypatch):
    from distill_common import generator_folder

    monkeypatch.setattr(generator_folder, "generator_loaders",
                        lambda: {"test_noise": SimpleNamespace(load=lambda: NoiseGenerator)})


@pytest.fixture
def logged_generator(tmp_path: Path, noise_family):
    """Returns ``make(scale) -> model URI``: a NoiseGenerator folder logged as a pyfunc model."""

    def make(scale: float) -> str:
        return _log(tmp_path, scale)

    return make


def _log(tmp_path: Path, scale: float) -> str:
    from distill_common import generator as generator_mod
    from distill_common import tracking

    folder = tmp_path / f"gen-{scale}"
    generator_mod.write_generator_manifest(folder, "test_noise", scale=scale)
    with tracking.start_run("unit", f"gen-{scale}") as run:
        return tracking.log_generator_model(run, folder)


