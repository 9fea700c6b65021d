"""Data root resolution: explicit > DISTILL_DATA_ROOT > <repo>/../shared/data > error naming both ways."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill_common.data import DATA_ROOT_ENV, find_dataset_dir, resolve_data_root
from distill_common.errors import DataError


@pytest.fixture
def no_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A CWD outside any repo with no ../shared/data beside it, and no env var."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    return cwd


def test_explicit_beats_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    explicit, env = tmp_path / "a", tmp_path / "b"
    explicit.mkdir()
    env.mkdir()
    monkeypatch.setenv(DATA_ROOT_ENV, str(env))
    assert resolve_data_root(explicit) == explicit.resolve()
    assert resolve_data_root(str(explicit)) == explicit.resolve()
    assert resolve_data_root(None) == env.resolve()


def test_missing_explicit_or_env_folder_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match="does not exist"):
        resolve_data_root(tmp_path / "nope")
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "gone"))
    with pytest.raises(DataError, match=DATA_ROOT_ENV):
        resolve_data_root(None)


def test_no_root_names_both_ways_to_set_it(no_default: Path) -> None:
    with pytest.raises(DataError) as err:
        resolve_data_root(None)
    assert "--data-root" in str(err.value) and DATA_ROOT_ENV in str(err.value)


def test_repo_layout_default_from_git_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "packages" / "x").mkdir(parents=True)
    shared = tmp_path / "shared" / "data"
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    monkeypatch.chdir(repo / "packages" / "x")
    with pytest.raises(DataError):  # not there yet
        resolve_data_root(None)
    shared.mkdir(parents=True)
    assert resolve_data_root(None) == shared.resolve()


def test_find_dataset_dir_accepts_data_root_or_dataset_folder(data_root: Path, cifar_root: Path) -> None:
    assert find_dataset_dir(data_root, "cifar10", "train-*.tar") == cifar_root.resolve()
    assert find_dataset_dir(cifar_root, "cifar10", "train-*.tar") == cifar_root.resolve()
    with pytest.raises(DataError, match="coco2017"):
        find_dataset_dir(cifar_root, "coco2017", "annotations/captions_*2017.json")
