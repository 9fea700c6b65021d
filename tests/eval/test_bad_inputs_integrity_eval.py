"""Issue 24 on `distill eval`: a rerun into an existing folder never reports one model's images as another's (row 1),
non-finite images are never written (row 8), and a label cannot write outside the output folder (row 16)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from stand_in_generators import NoiseGenerator
from typer.testing import CliRunner

from distill_common.errors import ConfigError, NonFiniteImagesError
from distill_eval.benchmark import BenchmarkConfig, run_benchmark


def _noise_folder(path: Path, scale: float) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "generator.json").write_text(json.dumps({"family": "test_noise", "scale": scale}))
    return path


def _pixels(folder: Path) -> np.ndarray:
    return np.stack([np.array(Image.open(p)) for p in sorted(folder.glob("[0-9]*.png"))])


def _bench(out: Path, folder: Path, **kw) -> tuple[BenchmarkConfig, list[str]]:
    from rich.console import Console

    cfg = BenchmarkConfig(teacher=None, generators=[f"s={folder}"], steps=[1], num_images=4, reference="none", batch_size=4,
                          timing_repeats=1, output_dir=out, track=False, device="cpu", **kw)
    console = Console(record=True, width=400, file=open(os.devnull, "w"))  # noqa: SIM115
    run_benchmark(cfg, loader=lambda uri: NoiseGenerator(Path(uri)), console=console)
    return cfg, console.export_text().splitlines()


# ------------------------------------------------------------------------------ row 1: keyed image caches


def test_benchmark_rerun_with_new_seed_or_new_weights_regenerates_and_says_so(tmp_path):
    gen = _noise_folder(tmp_path / "gen", 1.0)
    out = tmp_path / "out"
    _bench(out, gen)
    first = _pixels(out / "images" / "s_s1")
    _, notes = _bench(out, gen, seed=7)  # same folder, another seed: the seed-0 images must not be reused
    after_seed = _pixels(out / "images" / "s_s1")
    _bench(tmp_path / "fresh", gen, seed=7)
    assert not np.array_equal(first, after_seed)
    assert np.array_equal(after_seed, _pixels(tmp_path / "fresh" / "images" / "s_s1"))
    assert any("regenerating" in n and "seed changed" in n for n in notes), notes

    _noise_folder(gen, 3.0)  # the same path now holds other weights (as an alias moved to another version)
    _, notes = _bench(out, gen, seed=7)
    assert any("weights changed" in n for n in notes), notes
    assert not np.array_equal(after_seed, _pixels(out / "images" / "s_s1"))

    _, notes = _bench(out, gen, seed=7)  # nothing changed: reused, and it says so
    assert any("reusing 4 cached image(s)" in n for n in notes), notes


def test_benchmark_changed_guidance_regenerates_and_png_without_key_is_not_trusted(tmp_path):
    gen = _noise_folder(tmp_path / "gen", 1.0)
    out = tmp_path / "out"
    _bench(out, gen)
    _, notes = _bench(out, gen, guidance=3.0)
    assert any("guidance changed" in n for n in notes), notes
    (out / "images" / "s_s1" / "cache_key.json").unlink()  # images of an older distill: no key, not trusted
    _, notes = _bench(out, gen, guidance=3.0)
    assert any("carry no cache key" in n for n in notes), notes


def test_registry_tags_go_only_to_the_version_that_made_the_images(mlflow_uri, logged_generator, tmp_path,
                                                                   monkeypatch, noise_family):
    from distill_common import tracking
    from distill_common.generator import write_generator_manifest

    monkeypatch.setattr("distill_eval.benchmark._lpips", lambda net: lambda a, b: (a - b).abs().mean((1, 2, 3)))
    v1 = tracking.register_model(logged_generator(1.0), "noise")
    v2 = tracking.register_model(logged_generator(4.0), "noise")
    teacher = tmp_path / "teacher"
    write_generator_manifest(teacher, "test_noise", scale=2.0)
    out = tmp_path / "bench"

    def bench(folder: Path) -> float:
        cfg = BenchmarkConfig(teacher=f"t={teacher}", generators=["s=models:/noise@champion"], steps=[1],
                              num_images=4, reference="none", batch_size=4, timing_repeats=1, output_dir=folder,
                              track=True, device="cpu")
        with tracking.start_run("eval", "bench") as run:
            result = run_benchmark(cfg, tracking_run=run)
        return result.rows[1]["lpips_to_teacher"]

    tracking.set_alias("noise", "champion", v1)
    lpips_v1 = bench(out)
    tracking.set_alias("noise", "champion", v2)
    lpips_v2 = bench(out)  # same output folder: v1's images must not be scored as v2's
    assert lpips_v2 == pytest.approx(bench(tmp_path / "fresh"), rel=1e-6) and lpips_v2 != pytest.approx(lpips_v1)
    tags = {v.version: v.tags for v in tracking.list_versions("noise")}
    assert float(tags[v1]["eval.s1.lpips_to_teacher"]) == pytest.approx(lpips_v1, rel=1e-6)
    assert float(tags[v2]["eval.s1.lpips_to_teacher"]) == pytest.approx(lpips_v2, rel=1e-6)


# ------------------------------------------------------------------------------ row 8: non-finite images


class _NaNGenerator(NoiseGenerator):
    def generate(self, conditions, num_steps, seeds, guidance=None):
        images = super().generate(conditions, num_steps, seeds, guidance)
        images[1] = float("nan")
        return images


def test_benchmark_refuses_nan_images_instead_of_writing_black_pngs(tmp_path):
    gen = _noise_folder(tmp_path / "gen", 1.0)
    cfg = BenchmarkConfig(teacher=None, generators=[f"s={gen}"], steps=[1], num_images=4, reference="none", batch_size=4,
                          timing_repeats=1, output_dir=tmp_path / "out", track=False, device="cpu")
    with pytest.raises(NonFiniteImagesError, match="NaN or infinite pixels in 1 of 4"):
        run_benchmark(cfg, loader=lambda uri: _NaNGenerator(Path(uri)))
    assert not list((tmp_path / "out" / "images" / "s_s1").glob("*.png"))


def test_benchmark_guidance_inf_or_nan_is_refused_before_anything_is_written(tmp_path):
    from distill_eval.cli import app

    for value in ("inf", "nan", "1e400"):
        out = tmp_path / f"out-{value}"
        result = CliRunner().invoke(app, ["benchmark", "--generators", "s=x", "--guidance", value,
                                          "--output-dir", str(out), "--no-track"])
        assert isinstance(result.exception, ConfigError), result.output
        assert "--guidance" in str(result.exception) and "finite" in str(result.exception)
        assert not out.exists()


# ------------------------------------------------------------------------------ row 16: labels stay inside


@pytest.mark.parametrize("label", ["../escape", "a/b", "..", ".hidden"])
def test_benchmark_label_with_a_path_is_refused(tmp_path, label):
    from distill_eval.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["benchmark", "--generators", f"{label}=somewhere", "--output-dir", str(out),
                                      "--no-track"])
    assert isinstance(result.exception, ConfigError) and "not a plain name" in str(result.exception)
    assert not out.exists() and not (tmp_path / "escape_s1").exists()


def test_fingerprint_tells_weights_apart_and_is_stable():
    from distill_eval.benchmark import generator_fingerprint

    class Gen:
        def __init__(self, seed):
            torch.manual_seed(seed)
            self.model = torch.nn.Linear(3, 3)
            self.default_guidance = 1.0

    a, b = Gen(0), Gen(1)
    assert generator_fingerprint(a) == generator_fingerprint(Gen(0)) != generator_fingerprint(b)
    a.default_guidance = 2.0
    assert generator_fingerprint(a) != generator_fingerprint(Gen(0))


# ------------------------------------------------------------------------------ row 13: corrupt reference-stats cache


@pytest.mark.parametrize("garbage", [b"\x00" * 7, b"{not safetensors at all", b"\xff" * 64])
def test_corrupt_reference_stats_cache_is_recomputed_with_a_note(data_root, tmp_path, capsys, garbage):
    from test_fid_reference_stats import PooledProjection

    from distill_eval.reference_stats import reference_stats

    first = reference_stats("cifar10-test", PooledProjection(), cache_dir=tmp_path, n=8, data_root=data_root,
                            progress=False)
    first.path.write_bytes(garbage)
    again = reference_stats("cifar10-test", PooledProjection(), cache_dir=tmp_path, n=8, data_root=data_root,
                            progress=False)
    assert "is corrupt; recomputing it" in capsys.readouterr().err
    torch.testing.assert_close(again.mu, first.mu)
    assert again.path.stat().st_size > 100  # the cache was written again


# ------------------------------------------------------------------------------ row 16: a FIFO named like an image


def test_eval_fid_skips_a_fifo_named_like_an_image(tmp_path):
    from distill_eval.cli import _folder_images

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    os.mkfifo(folder / "x.png")  # opening it for reading would block forever
    assert _folder_images(folder, strict=True).shape == (2, 3, 8, 8)
