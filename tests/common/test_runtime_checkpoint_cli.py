"""Runtime (device, precision, seeds, timer), atomic checkpoints, and the umbrella CLI."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distill_common import checkpoint as ckpt
from distill_common.errors import ConfigError, ModelLoadError
from distill_common.runtime import Timer, resolve_device, resolve_precision, seed_everything, timed

REPO = Path(__file__).resolve().parents[2]


def test_auto_precision_picks_bf16_only_on_cpus_with_native_bf16(tmp_path, monkeypatch, capsys):
    from distill_common import runtime

    with_bf16, without = tmp_path / "amx", tmp_path / "old"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile amx_bf16\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n")
    monkeypatch.delenv("DISTILL_CPU_BF16", raising=False)
    assert runtime.cpu_has_fast_bf16(str(with_bf16)) and not runtime.cpu_has_fast_bf16(str(without))
    assert not runtime.cpu_has_fast_bf16(str(tmp_path / "missing"))  # no /proc: no detection, fp32
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "_ANNOUNCED", set())
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)
    assert runtime.resolve_precision("auto", cpu) == "bf16"
    assert "bf16" in capsys.readouterr().err  # one line says so
    assert runtime.resolve_precision("auto", cpu, mixed=False) == "fp32"
    assert runtime.resolve_precision("auto", torch.device("cuda")) == "fp16"
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: False)
    assert runtime.resolve_precision("auto", cpu) == "fp32"


def test_device_and_precision_choice():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ConfigError, match="valid choices"):
        resolve_device("tpu")
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu, mixed=False) == "fp32"  # a weights dtype stays fp32 on the CPU
    assert resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ConfigError, match="fp16 is not supported on the CPU"):
        resolve_precision("fp16", cpu)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_seed_everything_repeats_all_generators():
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()

    seed_everything(7)
    a = draw()
    seed_everything(7)
    assert draw() == a
    seed_everything(8)
    assert draw() != a


def test_timer_sections_accumulate():
    t = Timer("cpu")
    for _ in range(3):
        with t.section("x"):
            sum(range(1000))
    assert t.counts["x"] == 3 and t.sections["x"] > 0
    with timed("cpu") as r:
        pass
    assert r["seconds"] >= 0


def test_atomic_dir_keeps_old_checkpoint_on_failure(tmp_path):
    target = tmp_path / "checkpoint-10"
    with ckpt.atomic_dir(target) as d:
        (d / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with ckpt.atomic_dir(target) as d:
            (d / "a.txt").write_text("new")
            raise RuntimeError("killed mid-write")
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-10"]  # no temporary left behind
    with ckpt.atomic_dir(target) as d:
        (d / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "new"


def test_weights_round_trip_and_architecture_mismatch(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    ckpt.save_weights(net.state_dict(), tmp_path / "m.safetensors")
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    ckpt.load_into(other, tmp_path / "m.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values(), strict=True))
    wider = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Linear(16, 2))
    with pytest.raises(ModelLoadError, match="another architecture"):
        ckpt.load_into(wider, tmp_path / "m.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="corrupt"):
        ckpt.load_weights(tmp_path / "bad.safetensors")
    with pytest.raises(ModelLoadError, match="does not exist"):
        ckpt.load_weights(tmp_path / "missing.safetensors")


def test_training_state_and_checkpoint_listing(tmp_path):
    for step in (5, 20, 10):
        with ckpt.atomic_dir(ckpt.checkpoint_dir(tmp_path, step)) as d:
            ckpt.save_training_state(d, {"step": step, "rng": ckpt.rng_state()})
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-20"  # diffusers' / Accelerate's name, no padding
    state = ckpt.load_training_state(ckpt.latest_checkpoint(tmp_path))
    assert state["step"] == 20
    # restoring the RNG state replays the same draws in every generator
    ckpt.set_rng_state(state["rng"])
    a = (random.random(), float(np.random.rand()), torch.rand(1).item())
    ckpt.set_rng_state(state["rng"])
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == a
    ckpt.prune_checkpoints(tmp_path, keep=1)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [20]


def test_old_zero_padded_checkpoints_are_still_found_and_pruned(tmp_path):
    """Folders written before the rename (checkpoint-0000500) still count, by their step, next to new ones."""
    for name in ("checkpoint-0000500", "checkpoint-0001000", "checkpoint-900"):
        (tmp_path / name).mkdir()
    assert [(s, p.name) for s, p in ckpt.list_checkpoints(tmp_path)] == [
        (500, "checkpoint-0000500"), (900, "checkpoint-900"), (1000, "checkpoint-0001000")]
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-0001000"  # by step, not by name
    (tmp_path / "checkpoint-1000").mkdir()  # both spellings of one step: the new name wins
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-1000"
    ckpt.prune_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-0001000", "checkpoint-1000"]


def test_distill_version_and_help():
    out = subprocess.run([sys.executable, "-m", "distill_common.cli", "--version"], capture_output=True, text=True,
                         timeout=120, check=True)
    lines = out.stdout.splitlines()
    for dist in ("distill-common", "distill-eval", "distill-lora-flash", "distill-rf-cifar", "distill-sd-prune"):
        assert f"{dist} 0.1.0" in lines
    helped = subprocess.run([sys.executable, "-m", "distill_common.cli", "--help"], capture_output=True, text=True,
                            timeout=120, check=True, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    for sub in ("registry", "eval", "rf", "flash", "prune"):
        assert sub in helped.stdout
    assert "warning" not in helped.stderr, helped.stderr


def test_user_errors_are_one_line_with_exit_code_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "distill_common.cli", "eval", "fid", str(tmp_path / "a"),
                          str(tmp_path / "b")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    err = out.stderr.strip()
    assert err.startswith("error:") and "does not exist" in err and "Traceback" not in err
