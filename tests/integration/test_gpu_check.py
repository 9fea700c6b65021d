"""tools/gpu_check.sh --cpu-smoke: the GPU check's code paths (rf paper-preset command, prune v3, flash LoRA,
sampling timing with NFE ratios) at tiny sizes on the CPU, so the script keeps working between GPU runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_cpu_smoke_prints_one_table_and_passes(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "COLUMNS": "250"}
    proc = subprocess.run([str(REPO / "tools" / "gpu_check.sh"), "--cpu-smoke", "--workdir", str(tmp_path / "w")],
                          capture_output=True, text=True, env=env, timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
    assert out.count("distill GPU check (smoke") == 1
    for check in ("rf train-teacher", "rf sampling", "prune train v3", "flash train", "SD sampling", "NCCL"):
        assert check in out, check
    assert "FAIL" not in out and "NFE ratio" in out and "UNet-evaluation" in out
    assert "skipped" in out  # no 2 CUDA GPUs here
    # a broken check fails the run: a CPU machine asked for the GPU run gets exit 2 and the reason
    no_gpu = subprocess.run([str(REPO / "tools" / "gpu_check.sh")], capture_output=True, text=True,
                            env={**env, "CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert no_gpu.returncode == 2 and "--cpu-smoke" in no_gpu.stderr


def test_a_failing_check_is_a_fail_row_and_the_others_still_run(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    import gpu_check

    check = gpu_check.Check()
    check.run("broken", lambda: 1 / 0)
    check.run("fine", lambda: {"size": "1", "precision": "fp32", "detail": "ok"})
    assert [(r["check"], r["result"]) for r in check.rows] == [("broken", "FAIL"), ("fine", "ok")]
    assert "ZeroDivisionError" in check.rows[0]["detail"] and check.failed
