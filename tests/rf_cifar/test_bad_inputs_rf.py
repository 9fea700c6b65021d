"""Bad data (issue 13 rows 7, 8, 9) and CIFAR-10 on a machine without a data root (issue 11, part 4)."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import pickle
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from distill_common.errors import DataError

runner = CliRunner()
GARBAGE = b"\x89PNG\r\n\x1a\n this is not an image \x00\x01\x02" * 8


# ------------------------------------------------------------------------------ row 7: corrupt images


def _class_folder(root: Path, images: np.ndarray) -> Path:
    for i, array in enumerate(images):
        folder = root / ("cat" if i % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(folder / f"{i:03d}.png")
    (root / "cat" / "broken.png").write_bytes(GARBAGE)
    (root / "dog" / "broken.jpg").write_bytes(GARBAGE[:40])
    return root


def _pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_rf_folder_source_skips_and_counts_or_refuses_corrupt_images(tmp_path, capsys):
    from distill_rf_cifar.cli import app
    from distill_rf_cifar.training.data import load_cifar_training_data

    root = _class_folder(tmp_path / "imgs", _pixels(8))
    data = load_cifar_training_data(root, "folder", random_flip=False)
    assert len(data) == 8 and data.num_corrupt == 2
    assert "skipped 2 unreadable image(s)" in capsys.readouterr().err
    args = ["train-teacher", "--data-source", "folder", "--data-root", str(root), "--data-strict", "--no-track",
            "--output-dir", str(tmp_path / "out"), "--train-device", "cpu", "--train-steps", "1"]
    result = runner.invoke(app, args)
    assert isinstance(result.exception, DataError), result.output
    assert "broken" in str(result.exception) and "--data-strict" in str(result.exception)


def test_eval_fid_folders_skip_and_count_or_refuse_corrupt_images(tmp_path, capsys):
    from distill_eval.cli import _folder_images, app

    folder = tmp_path / "gen"
    folder.mkdir()
    for i, array in enumerate(_pixels(5)):
        Image.fromarray(array).save(folder / f"{i}.png")
    (folder / "x.png").write_bytes(GARBAGE)
    (folder / "y.jpg").write_bytes(b"\xff\xd8\xff\xe0" + GARBAGE)
    images = _folder_images(folder, strict=False, strict_flag="--strict")
    assert images.shape == (5, 3, 32, 32)
    assert "skipped 2 unreadable image(s)" in capsys.readouterr().err
    result = runner.invoke(app, ["fid", str(folder), str(folder), "--strict"])
    assert isinstance(result.exception, DataError) and str(folder / "x.png") in str(result.exception)


def test_captioned_folder_skips_and_counts_or_refuses_corrupt_images(tmp_path):
    from distill_common.data import load_captioned

    for i, array in enumerate(_pixels(3)):
        Image.fromarray(array).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"caption {i}")
    (tmp_path / "bad.jpg").write_bytes(GARBAGE)
    (tmp_path / "bad.txt").write_text("a caption for garbage")
    ds = load_captioned("folder", tmp_path, split=None, resolution=32, show_progress=False)
    assert len(ds) == 3 and ds.stats()["num_corrupt"] == 1
    with pytest.raises(DataError, match="bad.jpg"):
        load_captioned("folder", tmp_path, split=None, resolution=32, strict=True, show_progress=False)


# ------------------------------------------------------------------------------- row 8: truncated shard


def _samples(cifar_root: Path, n: int) -> list[tuple[str, bytes, bytes]]:
    """The first n (key, jpg, cls) samples of the real test shards."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(sorted(cifar_root.glob("test-*.tar"))[0]) as tar:
        for member in tar:
            key, _, ext = member.name.rsplit("/", 1)[-1].partition(".")
            out.setdefault(key, {})[ext] = tar.extractfile(member).read()
            if len(out) > n:
                break
    return [(k, v["jpg"], v["cls"]) for k, v in list(out.items())[:n]]


def _write_shard(path: Path, samples: list[tuple[str, bytes, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, jpg, cls in samples:
            for ext, payload in (("jpg", jpg), ("cls", cls)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_truncated_shard_is_refused_against_the_manifest(tmp_path, monkeypatch, cifar_root):
    from distill_common.data import Cifar10Shards
    from distill_rf_cifar.cli import app

    monkeypatch.setenv("DISTILL_CACHE_DIR", str(tmp_path / "cache"))
    shards = tmp_path / "data" / "cifar10"
    shards.mkdir(parents=True)
    samples = _samples(cifar_root, 12)
    _write_shard(shards / "train-0000.tar", samples[:6])
    _write_shard(shards / "train-0001.tar", samples[6:])
    assert len(Cifar10Shards(shards.parent, "train", show_progress=False)) == 12  # first read writes the manifest
    manifests = list((tmp_path / "cache").rglob("*.json"))
    assert len(manifests) == 1 and not (shards / "manifest.json").exists()  # next to the cache, not in the data
    recorded = json.loads(manifests[0].read_text())["shards"]
    assert recorded["train-0001.tar"]["count"] == 6

    with tarfile.open(shards / "train-0001.tar") as tar:
        cut = [m for m in tar.getmembers()][4].offset  # the header of the third sample: a member boundary
    data = (shards / "train-0001.tar").read_bytes()
    (shards / "train-0001.tar").write_bytes(data[:cut])
    with tarfile.open(shards / "train-0001.tar") as tar:
        assert len(tar.getmembers()) == 4  # still a readable tar: two whole samples
    with pytest.raises(DataError, match=r"train-0001.tar holds 2 samples .* says 6.*truncated"):
        Cifar10Shards(shards.parent, "train", show_progress=False)
    result = runner.invoke(app, ["train-teacher", "--data-root", str(shards.parent), "--no-track", "--train-device",
                                 "cpu", "--output-dir", str(tmp_path / "out")])
    assert isinstance(result.exception, DataError) and "\n" not in str(result.exception)

    (shards / "train-0001.tar").unlink()  # a whole shard gone is refused as well
    with pytest.raises(DataError, match="missing"):
        Cifar10Shards(shards.parent, "train", show_progress=False)


# ------------------------------------------------------------------- row 9: pairs of another teacher


def test_other_teachers_manifest_over_pair_shards_is_refused(tmp_path, pairs_dir, teacher_dir, other_teacher_dir):
    from rf_helpers import pairs_config

    from distill_rf_cifar.pairs import MANIFEST, check_teacher, load_pairs, make_pairs

    other = tmp_path / "pairs-b"
    make_pairs(pairs_config(other_teacher_dir, other, num_pairs=8), progress=False)
    mixed = tmp_path / "mixed"
    shutil.copytree(pairs_dir, mixed)
    manifest_b = json.loads((other / MANIFEST).read_text())
    manifest_a = json.loads((mixed / MANIFEST).read_text())
    (mixed / MANIFEST).write_text(json.dumps({**manifest_a, "teacher_sha256": manifest_b["teacher_sha256"]}))
    check_teacher(mixed, other_teacher_dir)  # the manifest alone agrees with teacher B ...
    with pytest.raises(DataError, match="made by teacher .* different teachers"):
        load_pairs(mixed, other_teacher_dir)  # ... but the shards were made by teacher A
    assert len(load_pairs(pairs_dir, teacher_dir)) == 24  # consistent pairs still load


# -------------------------------------------------------------- issue 11 part 4: CIFAR-10 download


def _batch(n: int, seed: int) -> tuple[bytes, np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, n)]
    payload = {b"batch_label": b"batch", b"labels": labels, b"data": data,
               b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    return pickle.dumps(payload, protocol=2), data, labels


def _archive(folder: Path, evil: bool = False) -> tuple[Path, dict[str, tuple[np.ndarray, list[int]]]]:
    """A tar.gz in the real format (cifar-10-batches-py/data_batch_1..5, test_batch), 4 images per batch."""
    path = folder / "cifar-10-python.tar.gz"
    content = {}
    with tarfile.open(path, "w:gz") as tar:
        for i, name in enumerate([*(f"data_batch_{j}" for j in range(1, 6)), "test_batch"]):
            raw, data, labels = _batch(4, i)
            if evil and name == "test_batch":
                raw = pickle.dumps(_Evil(folder / "pwned"), protocol=2)
            content[name] = (data, labels)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path, content


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A loopback HTTP server over tmp_path/www; no data root anywhere; an empty cache."""
    www = tmp_path / "www"
    www.mkdir()
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(www), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *a: None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.delenv("DISTILL_DATA_ROOT", raising=False)
    monkeypatch.setenv("DISTILL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DISTILL_CIFAR10_URL", f"http://127.0.0.1:{server.server_port}/cifar-10-python.tar.gz")
    monkeypatch.chdir(tmp_path)  # no ../shared/data next to the working directory
    yield www
    server.shutdown()
    server.server_close()


def test_cifar10_downloads_into_the_cache_checks_md5_and_is_read_from_there(mirror, tmp_path, monkeypatch):
    from distill_common.data import Cifar10Batches, open_cifar10
    from distill_rf_cifar.training.data import load_cifar_training_data

    path, content = _archive(mirror)
    monkeypatch.setenv("DISTILL_CIFAR10_MD5", hashlib.md5(path.read_bytes()).hexdigest())
    train = open_cifar10(None, "train", show_progress=False)
    assert isinstance(train, Cifar10Batches) and len(train) == 20
    assert (tmp_path / "cache" / "cifar10" / "cifar-10-batches-py" / "test_batch").is_file()
    expected = np.concatenate([content[f"data_batch_{j}"][0] for j in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert np.array_equal(train.uint8_images().numpy(), expected)
    assert train.labels == sum((content[f"data_batch_{j}"][1] for j in range(1, 6)), [])
    path.unlink()  # the second read comes from the cache, not the network
    test = open_cifar10(None, "test", show_progress=False)
    assert test.labels == content["test_batch"][1]
    data = load_cifar_training_data(None, "shards", limit=4, show_progress=False)  # what `rf train-teacher` reads
    assert len(data) == 4


def test_cifar10_download_refuses_a_checksum_mismatch(mirror, tmp_path, monkeypatch):
    from distill_common.data import open_cifar10

    _archive(mirror)
    monkeypatch.delenv("DISTILL_CIFAR10_MD5", raising=False)  # the official md5 does not match the small archive
    with pytest.raises(DataError, match="md5 .* not c58f30108f718f92721af3b95e74349a; it was not used"):
        open_cifar10(None, "train", show_progress=False)
    assert not (tmp_path / "cache" / "cifar10" / "cifar-10-batches-py").exists()
    assert not list((tmp_path / "cache" / "cifar10").glob("*.tar.gz"))


def test_cifar10_offline_is_one_line_naming_the_fixes(mirror, tmp_path, monkeypatch):
    from distill_common.data import open_cifar10

    monkeypatch.setenv("DISTILL_CIFAR10_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")  # nothing listens
    with pytest.raises(DataError) as info:
        open_cifar10(None, "train", show_progress=False)
    message = str(info.value)
    assert "\n" not in message and "DISTILL_DATA_ROOT" in message and "--data-root" in message
    assert "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz by hand" in message


def test_cifar10_batches_never_run_code(mirror, tmp_path, monkeypatch):
    from distill_common.data import open_cifar10

    path, _ = _archive(mirror, evil=True)
    monkeypatch.setenv("DISTILL_CIFAR10_MD5", hashlib.md5(path.read_bytes()).hexdigest())
    with pytest.raises(DataError, match="refused to load "):
        open_cifar10(None, "test", show_progress=False)
    assert not (mirror / "pwned").exists()
