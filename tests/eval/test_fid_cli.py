"""``distill eval fid``: folders checked before Inception loads, readable output, --json, a saved report, and a
warning below 2,048 images; its defaults are the one default protocol that eval benchmark shares."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from typer.testing import CliRunner

import distill_eval.inception as inception
from distill_common.errors import DataError
from distill_eval.benchmark import BenchmarkConfig
from distill_eval.cli import app
from distill_eval.protocol import DEFAULT_PROTOCOL, protocol_differences

runner = CliRunner()


class Projection(nn.Module):
    """A cheap stand-in for Inception: 64-d features of 4×4-pooled pixels."""

    built = 0

    def __init__(self, resize="none", precision="fp32", **_):
        super().__init__()
        Projection.built += 1
        self.resize, self.precision, self.extractor_hash = resize, precision, "proj00000000"
        self.linear = nn.Linear(48, 64)
        torch.nn.init.normal_(self.linear.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, images):
        return self.linear(F.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1)).detach()


def _folder(path, n, seed):
    path.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path / f"{i:03d}.png")
    return path


@pytest.fixture
def stand_in(monkeypatch):
    Projection.built = 0
    monkeypatch.setattr(inception, "InceptionFeatureExtractor", Projection)


def test_a_missing_folder_is_refused_before_the_extractor_loads(tmp_path, stand_in):
    result = runner.invoke(app, ["fid", str(tmp_path / "nope"), str(tmp_path)])
    assert isinstance(result.exception, DataError) and "nope" in str(result.exception)
    assert Projection.built == 0


def test_fid_prints_readable_lines_saves_a_report_and_warns_below_2048(tmp_path, stand_in):
    a, b = _folder(tmp_path / "gen", 24, 0), _folder(tmp_path / "ref", 30, 1)
    result = runner.invoke(app, ["fid", str(a), str(b), "--bootstrap-resamples", "20"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "FID" in text and "KID" in text and "24 vs 30 images" in text and "kid_sub" not in text
    assert "below 2,048" in text and "generated_n 24 (default 360)" in text
    report = tmp_path / "fid_gen_vs_ref.json"
    saved = json.loads(report.read_text())
    assert saved["n_a"] == 24 and saved["fid_ci95_low"] <= saved["fid"] <= saved["fid_ci95_high"]
    assert saved["feature_precision"] == DEFAULT_PROTOCOL["feature_precision"]

    as_json = runner.invoke(app, ["fid", str(a), str(b), "--bootstrap-resamples", "0", "--json"])
    assert as_json.exit_code == 0
    row = json.loads(as_json.stdout.strip().splitlines()[-1])
    assert row["n_b"] == 30 and row["fid"] == pytest.approx(saved["fid"], rel=1e-6)


def test_eval_benchmark_defaults_are_the_default_protocol():
    cfg = BenchmarkConfig()
    assert protocol_differences(generated_n=cfg.num_images, reference_set=cfg.reference, reference_n=cfg.reference_n,
                                feature_precision=cfg.feature_precision) == []
    assert cfg.teacher == "reference"
