"""Bad inputs and faults around a run (issue 13 rows 3, 5, 6, 10, 11, 16): the output-folder lock, OS errors
at the CLI boundary, the writability checks that run before any data loading, and option validation."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distill_common.cli import run_app
from distill_common.config import cli_flag
from distill_common.errors import ConfigError, OutputDirError, TrackingError
from distill_common.output_dir import LOCK_FILE, output_dir_lock

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()
TINY = ["--model-base-channels", "8", "--model-channel-mults", "1", "2", "--model-norm-groups", "4",
        "--model-attention-resolutions", "", "--no-model-mid-attention", "--model-dropout", "0",
        "--data-limit", "16", "--train-batch-size", "8", "--train-steps", "1", "--train-device", "cpu",
        "--sampling-steps", "1", "--no-track"]


def _env() -> dict[str, str]:
    paths = [str(REPO / "packages" / p / "src") for p in ("common", "eval", "rf_cifar", "lora_flash", "sd_student_prune")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")])}


def _holder(folder: Path) -> subprocess.Popen:
    """A real process that takes the lock of ``folder`` through the library and sleeps; 'locked' on stdout once held."""
    code = textwrap.dedent(f"""
        import sys, time
        from distill_common.output_dir import output_dir_lock
        with output_dir_lock({str(folder)!r}):
            print("locked", flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], env=_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _rf(args: list[str], cwd: Path | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill_rf_cifar.cli", *args], env=_env(), capture_output=True,
                          text=True, timeout=600, cwd=cwd, **kw)


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return " ".join(lines[lines.index(errors[0]):])  # rich may wrap the one line on a narrow terminal


# ------------------------------------------------------------------------------------------ row 3: the lock


def test_second_run_on_a_held_folder_exits_2_naming_folder_and_pid(tmp_path):
    out = tmp_path / "teacher"
    holder = _holder(out)
    try:
        started = time.perf_counter()
        result = _rf(["train-teacher", *TINY, "--output-dir", str(out)])
        assert result.returncode == 2, result.stderr
        line = _one_error_line(result.stderr)
        assert str(out) in line and f"PID {holder.pid}" in line and "--output-dir" in line
        assert not (out / "stage.json").exists()  # nothing of the refused run was written
        assert time.perf_counter() - started < 300  # CLI start-up only (slow on a loaded machine), no training
        started = time.perf_counter()
        with pytest.raises(OutputDirError, match=f"PID {holder.pid}"):
            with output_dir_lock(out):
                pass
        assert time.perf_counter() - started < 0.5  # the refusal itself is immediate
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_a_killed_process_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    holder = _holder(out)
    dead = holder.pid
    os.kill(dead, signal.SIGKILL)
    holder.wait()
    assert (out / LOCK_FILE).read_text().split()[0] == str(dead)  # the dead owner's PID is still in the file
    notes: list[str] = []
    with output_dir_lock(out, notice=notes.append):
        assert (out / LOCK_FILE).read_text().split()[0] == str(os.getpid())
        with output_dir_lock(out):  # re-entrant within one process (a stage inside a pipeline)
            pass
        with pytest.raises(OutputDirError, match=f"PID {os.getpid()}"):
            _check_held_from_another_process(out)
    assert notes and f"PID {dead}" in notes[0] and "no longer running" in notes[0]
    assert not (out / LOCK_FILE).exists()  # a run that ends removes its lock file
    with output_dir_lock(out, notice=notes.append):  # released cleanly: no stale notice the second time
        pass
    assert len(notes) == 1


def _check_held_from_another_process(folder: Path) -> None:
    code = textwrap.dedent(f"""
        import sys
        from distill_common.output_dir import output_dir_lock
        from distill_common.errors import OutputDirError
        try:
            with output_dir_lock({str(folder)!r}):
                sys.exit(0)
        except OutputDirError as exc:
            print(exc)
            sys.exit(3)
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60)
    if proc.returncode == 3:
        raise OutputDirError(proc.stdout.strip())
    assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------------------- rows 5 and 6: OS errors


def test_output_dir_that_is_a_file_is_one_line(tmp_path):
    from distill_rf_cifar.cli import app

    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    result = runner.invoke(app, ["train-teacher", *TINY, "--output-dir", str(blocker / "teacher")])
    assert isinstance(result.exception, OutputDirError)
    assert f"{blocker} is a file" in str(result.exception) and "--output-dir" in str(result.exception)


def test_disk_full_becomes_one_line_with_path_and_errno_text(tmp_path, monkeypatch, capsys, data_root):
    """ENOSPC while writing the run's first file: one line naming the file and 'No space left on device'."""
    from distill_common import checkpoint
    from distill_rf_cifar.cli import app

    out = tmp_path / "teacher"

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", full)
    with pytest.raises(SystemExit) as exit_info:
        run_app(app, ["train-teacher", *TINY, "--output-dir", str(out), "--data-root", str(data_root)])
    assert exit_info.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "No space left on device (ENOSPC)" in line and str(out / "stage.json") in line and "free disk" in line


def test_safetensors_disk_full_is_an_oserror(tmp_path, monkeypatch):
    """safetensors reports a full disk as its own error type; save_weights turns it back into the OSError."""
    import safetensors
    import torch

    from distill_common import checkpoint

    def full(tensors, filename, metadata=None):
        raise safetensors.SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(OSError) as info:
        checkpoint.save_weights({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    assert info.value.errno == errno.ENOSPC and str(tmp_path / "model.safetensors") == info.value.filename
    assert not list(tmp_path.iterdir())  # no temporary file left behind


def _read_only(folder: Path) -> list[str]:
    """Make ``folder`` read-only for the command that follows the returned prefix. Root ignores permissions, so
    as root the folder becomes a read-only tmpfs in a private mount namespace (nothing leaks out of it)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return ["sh", "-c", 'cd "$0" && exec "$@"', str(folder)]
    if shutil.which("unshare") is None:
        pytest.skip("running as root without unshare: cannot make a read-only folder")
    return ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o ro,size=1m tmpfs "$0" && cd "$0" && exec "$@"', str(folder)]


@pytest.mark.parametrize("what", ["output", "mlflow"])
def test_read_only_folders_fail_before_any_work(what, tmp_path, data_root):
    """Read-only output folder, and a read-only working directory for ./mlflow.db (was 110 s of SQLAlchemy
    retries): both end in one line, exit 2, long before any data is read."""
    ro = tmp_path / "ro"
    ro.mkdir()
    writable = tmp_path / "rw"
    writable.mkdir()
    out = ro / "teacher" if what == "output" else writable / "teacher"
    args = [a for a in TINY if a != "--no-track"] if what == "mlflow" else TINY
    env = {k: v for k, v in _env().items() if k not in ("MLFLOW_TRACKING_URI", "DISTILL_ARTIFACT_ROOT")}
    prefix = _read_only(ro)
    started = time.perf_counter()
    try:
        result = subprocess.run([*prefix, sys.executable, "-m", "distill_rf_cifar.cli", "train-teacher", *args,
                                 "--output-dir", str(out), "--data-root", str(data_root)], env=env,
                                capture_output=True, text=True, timeout=600)
    finally:
        ro.chmod(0o755)
    seconds = time.perf_counter() - started
    assert result.returncode == 2, result.stderr
    line = _one_error_line(result.stderr)
    assert "Permission denied (EACCES)" in line or "Read-only file system (EROFS)" in line, line
    if what == "output":
        assert f"output folder {out}" in line and "--output-dir" in line
    else:
        assert f"MLflow store {ro / 'mlflow.db'}" in line and "--no-track" in line
        assert not (writable / "teacher" / "stage.json").exists()
    assert seconds < 300, seconds  # CLI start-up only on a loaded machine; the check itself is timed below


def test_unwritable_store_and_folder_are_checked_in_under_a_second_before_data(tmp_path, monkeypatch):
    """In process: the checks come before data loading (a missing data root is not what fails) and take < 1 s."""
    from distill_rf_cifar.config import DataConfig, TeacherConfig
    from distill_rf_cifar.stages import train_teacher

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker / 'mlflow.db'}")
    cfg = TeacherConfig(output_dir=tmp_path / "teacher", data=DataConfig(data_root=tmp_path / "no-data"), track=True)
    started = time.perf_counter()
    with pytest.raises(TrackingError, match="Not a directory"):
        train_teacher(cfg, progress=False)
    assert time.perf_counter() - started < 1.0
    cfg = TeacherConfig(output_dir=blocker / "teacher", data=DataConfig(data_root=tmp_path / "no-data"), track=False)
    started = time.perf_counter()
    with pytest.raises(OutputDirError, match="is a file"):
        train_teacher(cfg, progress=False)
    assert time.perf_counter() - started < 1.0


# ------------------------------------------------------------------ rows 10, 11, 16: validation and hints


@pytest.mark.parametrize(("args", "flag", "rule"), [
    (["train-teacher", "--train-learning-rate", "-0.1"], "--train-learning-rate", "> 0"),
    (["train-teacher", "--train-steps", "0"], "--train-steps", ">= 1"),
    (["train-teacher", "--train-batch-size", "0"], "--train-batch-size", ">= 1"),
    (["train-teacher", "--flow-label-dropout", "1.5"], "--flow-label-dropout", "in [0, 1]"),
    (["train-teacher", "--train-precision", "fp16", "--train-device", "cpu"], "--train-precision", "bf16 or fp32"),
    (["pipeline", "--four-step-learning-rate", "0"], "--four-step-learning-rate", "> 0"),
    (["distill", "--options-reflow-fraction", "2"], "--options-reflow-fraction", "in [0, 1]"),
    (["make-pairs", "--num-pairs", "0"], "--num-pairs", ">= 1"),
    (["sample", "--steps", "0"], "--steps", ">= 1"),
    (["sample", "--steps", "-5"], "--steps", ">= 1"),
    (["evaluate", "--eval-student-steps", "1", "0"], "--eval-student-steps", ">= 1"),
])
def test_out_of_range_options_are_refused_naming_the_commands_flag(tmp_path, args, flag, rule):
    from distill_rf_cifar.cli import app

    out = tmp_path / "out"
    result = runner.invoke(app, [*args, "--output-dir", str(out)])
    assert isinstance(result.exception, ConfigError), result.output
    message = str(result.exception)
    assert flag in message and rule in message, message
    assert not out.exists()  # nothing written: no stale stage.json


def test_hints_come_from_the_cli_field_to_flag_rule():
    """The flags of rf's messages are those the command generates (and no bare --steps / --precision)."""
    from distill_common.config import FlagNamer, resolve_config
    from distill_rf_cifar.config import PipelineConfig, TeacherConfig, UNetConfig

    with pytest.raises(ConfigError) as info:
        resolve_config(TeacherConfig, overrides={("model", "norm_groups"): 7})
    assert cli_flag(("model", "norm_groups")) in str(info.value)
    with pytest.raises(ConfigError) as info:
        resolve_config(PipelineConfig, overrides={("teacher", "steps"): 0})
    assert cli_flag(("teacher", "steps")) in str(info.value) and "--steps " not in str(info.value)
    with pytest.raises(ConfigError, match="--student-model-norm-groups"):
        UNetConfig(norm_groups=7).validate(FlagNamer(("student", "model")))


def test_config_file_values_are_range_checked_too(tmp_path):
    from distill_rf_cifar.cli import app

    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"train": {"learning_rate": -1}}))
    result = runner.invoke(app, ["train-teacher", "--config", str(path), "--dry-run"])
    assert isinstance(result.exception, ConfigError) and "--train-learning-rate" in str(result.exception)
