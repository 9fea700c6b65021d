"""``distill env``: one line per thing to check, OK or what to fix; it creates nothing."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from distill_common import cli


def _env(monkeypatch: pytest.MonkeyPatch, cwd: Path, **env: str) -> tuple[int, str]:
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("COLUMNS", "80")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.build().main(["env"], prog_name="distill", standalone_mode=False)
    return code, out.getvalue()


def test_env_reports_every_part_and_creates_nothing(tmp_path, monkeypatch, data_root):
    code, out = _env(monkeypatch, tmp_path, DISTILL_DATA_ROOT=str(data_root), DISTILL_CACHE_DIR=str(tmp_path / "c"))
    assert code == 0, out
    for topic in ("python", "libraries", "device", "bf16", "data root", "tracking store", "distill cache",
                  "working folder"):
        assert topic in out, topic
    assert "torch 2." in out and str(data_root) in out and "mlflow.db" in out
    assert max(map(len, out.splitlines())) <= 80
    assert list(tmp_path.iterdir()) == []  # no store, no cache folder, no runs/


def test_env_names_what_to_fix(tmp_path, monkeypatch):
    code, out = _env(monkeypatch, tmp_path, DISTILL_DATA_ROOT=str(tmp_path / "missing"))
    assert code == 1
    fix = out[out.index("FIX"):]
    assert "data root" in fix and "DISTILL_DATA_ROOT" in " ".join(fix.split()) and "thing(s) to fix" in out
    code, out = _env(monkeypatch, tmp_path, MLFLOW_TRACKING_URI="http://127.0.0.1:9")  # nothing listens there
    assert code == 1 and "unreachable" in " ".join(out.split())
