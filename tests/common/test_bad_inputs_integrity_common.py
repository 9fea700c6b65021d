"""Issue 24 on the shared layers: the lock file (rows 4, 13), SIGTERM at the CLI boundary (row 6), non-finite and
out-of-range options (row 11), one line for OS faults (row 12)."""

from __future__ import annotations

import errno
import os
import signal
from dataclasses import dataclass

import pytest
import typer

from distill_common.config import config_command, option
from distill_common.errors import ConfigError, OutputDirError
from distill_common.output_dir import LOCK_FILE, claim_output_dir

# ------------------------------------------------------------------------------ row 4: a symlinked lock file


def test_symlinked_lock_file_is_refused_and_its_target_untouched(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    (folder / LOCK_FILE).symlink_to(target)
    with pytest.raises(OutputDirError, match="is a symbolic link"), claim_output_dir(folder):
        pass
    assert target.read_text() == "keep me\n"
    dangling = tmp_path / "run2"
    dangling.mkdir()
    (dangling / LOCK_FILE).symlink_to(tmp_path / "would-be-created")
    with pytest.raises(OutputDirError, match="is a symbolic link"), claim_output_dir(dangling):
        pass
    assert not (tmp_path / "would-be-created").exists()


# ------------------------------------------------------------------------------ row 13: a garbled lock file


@pytest.mark.parametrize("content", ["999999999999999999999 distill rf distill\n", "-5\n", "abc\n", "\x00\xff\n"])
def test_lock_file_with_a_huge_or_garbled_pid_is_taken_over(tmp_path, content, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_FILE).write_text(content, errors="surrogateescape")
    with claim_output_dir(folder) as held:
        assert (held / LOCK_FILE).read_text().split()[0] == str(os.getpid())
    assert not (folder / LOCK_FILE).exists()


# ------------------------------------------------------------------------------ row 6: SIGTERM at the CLI boundary


def test_sigterm_unwinds_the_command_and_exits_143(tmp_path, capsys):
    from distill_common.cli import run_app

    app = typer.Typer()
    seen = []

    @app.command()
    def work() -> None:
        with claim_output_dir(tmp_path / "out"):
            (tmp_path / "out" / "partial").write_text("x")
            try:
                os.kill(os.getpid(), signal.SIGTERM)
            finally:
                seen.append("cleanup ran")

    @app.command()
    def other() -> None:
        pass

    with pytest.raises(SystemExit) as exc:
        run_app(app, ["work"])
    assert exc.value.code == 128 + signal.SIGTERM
    assert seen == ["cleanup ran"] and not (tmp_path / "out" / LOCK_FILE).exists()
    assert "terminated by SIGTERM" in capsys.readouterr().err


# ------------------------------------------------------------------------------ row 11: non-finite options


@dataclass
class _Cfg:
    rate: float = option(0.1, "A rate with a range.", gt=0)
    free: float = option(1.0, "A float without a range.")
    scales: list[float] = option([1.0], "A list of floats.")
    seed: int = option(0, "First seed.")


@pytest.mark.parametrize("flags, flag", [(["--rate", "nan"], "--rate"), (["--rate", "inf"], "--rate"),
                                         (["--free", "-inf"], "--free"), (["--free", "1e999"], "--free"),
                                         (["--scales", "1,nan"], "--scales"),
                                         (["--seed", "99999999999999999999"], "--seed"), (["--seed", "-1"], "--seed")])
def test_non_finite_and_out_of_range_values_are_one_line(flags, flag):
    from typer.testing import CliRunner

    app = typer.Typer()
    ran = []

    @config_command(app, "go", _Cfg)
    def go(cfg: _Cfg) -> None:
        ran.append(cfg)

    @app.command()
    def noop() -> None:
        pass

    result = CliRunner().invoke(app, ["go", *flags])
    assert isinstance(result.exception, ConfigError), result.output
    assert flag in str(result.exception) and "\n" not in str(result.exception) and not ran


# ------------------------------------------------------------------------------ row 12: disk full


def test_disk_full_while_saving_weights_is_an_oserror_naming_the_file(tmp_path, monkeypatch):
    import torch

    from distill_common import checkpoint
    from distill_common.errors import os_error_message

    def full(tensors, path, metadata=None):
        raise Exception(f"Error while serializing: IoError(Os {{ code: {errno.ENOSPC}, kind: StorageFull }})")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(OSError) as exc:
        checkpoint.save_weights({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    msg = os_error_message(exc.value)
    assert str(tmp_path / "model.safetensors") in msg and "ENOSPC" in msg and "free disk space" in msg
    assert not list(tmp_path.iterdir())  # no temporary file left behind


def test_disk_full_while_writing_a_png_names_the_png_and_leaves_no_partial_file(tmp_path):
    from distill_common.checkpoint import save_image
    from distill_common.errors import os_error_message

    class FullDisk:
        def save(self, path, **_):
            with open(path, "wb") as fh:
                fh.write(b"\x89PNG partial")
            raise OSError(errno.ENOSPC, "No space left on device")  # PIL's error carries no file name

    with pytest.raises(OSError) as exc:
        save_image(FullDisk(), tmp_path / "00007.png")
    msg = os_error_message(exc.value)
    assert str(tmp_path / "00007.png") in msg and "ENOSPC" in msg
    assert not list(tmp_path.iterdir())


def test_disk_full_while_writing_a_training_state_is_an_oserror_naming_it(tmp_path, monkeypatch):
    import torch

    from distill_common import checkpoint

    def failing_save(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr(os, "statvfs", lambda p: type("S", (), {"f_bavail": 10, "f_frsize": 4096})())
    with pytest.raises(OSError) as exc:
        checkpoint.save_training_state(tmp_path, {"step": 1})
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(tmp_path / checkpoint.STATE_FILE)


# ------------------------------------------------------------------------------ row 3: bounded serve requests


@pytest.fixture
def pyfunc_model():
    from stand_in_generators import NoiseGenerator

    from distill_common.tracking.pyfunc import GeneratorPyfunc

    model = GeneratorPyfunc()
    model.generator = NoiseGenerator.__new__(NoiseGenerator)
    model.generator.scale = 1.0
    model.generator.num_classes = 10
    return model


def test_serve_refuses_huge_steps_and_too_many_rows_at_once(pyfunc_model, monkeypatch):
    import time

    import pandas as pd

    from distill_common.tracking.pyfunc import RequestError

    start = time.perf_counter()
    with pytest.raises(RequestError, match=r"steps 1000000000 is over this server's limit of 200"):
        pyfunc_model.predict(None, pd.DataFrame({"condition": [0], "steps": [1e9]}))
    with pytest.raises(RequestError, match=r"50000 rows is over this server's limit of 64"):
        pyfunc_model.predict(None, pd.DataFrame({"condition": [0] * 50_000}))
    assert time.perf_counter() - start < 5  # refused before any generation
    monkeypatch.setenv("DISTILL_SERVE_MAX_ROWS", "2")
    monkeypatch.setenv("DISTILL_SERVE_MAX_STEPS", "3")
    with pytest.raises(RequestError, match="limit of 2 rows"):
        pyfunc_model.predict(None, pd.DataFrame({"condition": [0, 1, 2]}))
    with pytest.raises(RequestError, match="limit of 3"):
        pyfunc_model.predict(None, pd.DataFrame({"condition": [0], "steps": [4]}))
    assert len(pyfunc_model.predict(None, pd.DataFrame({"condition": [0, 1], "steps": [3, 3]}))) == 2


def test_a_refusal_never_echoes_a_large_body(pyfunc_model):
    import json

    import pandas as pd

    from distill_common.tracking.pyfunc import RequestError

    with pytest.raises(RequestError) as exc:
        pyfunc_model.predict(None, pd.DataFrame({"condition": ["x" * 200_000]}))
    assert len(json.loads(exc.value.serialize_as_json())["message"]) <= 300


# ------------------------------------------------------------------------------ row 14: a busy port


def test_serve_and_ui_on_a_busy_port_are_one_line_before_anything_starts(monkeypatch):
    import socket

    from typer.testing import CliRunner

    from distill_common import tracking
    from distill_common.foreground import check_port_free
    from distill_common.registry_cli import app

    monkeypatch.setattr(tracking, "fetch_servable_model", lambda *a: pytest.fail("fetched despite a busy port"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"port {port} on 127.0.0.1 is already in use"):
            check_port_free("127.0.0.1", port)
        result = CliRunner().invoke(app, ["serve", "noise@champion", "--port", str(port)])
        assert isinstance(result.exception, ConfigError) and "--port" in str(result.exception)
    for bad in (["--max-steps", "0"], ["--max-rows", "100000"], ["--request-timeout", "0"],
                ["--request-timeout", "nan"]):
        result = CliRunner().invoke(app, ["serve", "noise@champion", *bad])
        assert isinstance(result.exception, ConfigError) and bad[0] in str(result.exception)


# ------------------------------------------------------------------------------ row 13: a corrupt mlflow.db


@pytest.mark.parametrize("garbage", [b"\x13\x37" * 3000, b"<html>not a db</html>"])
def test_corrupt_mlflow_db_is_one_line_naming_it(tmp_path, monkeypatch, garbage):
    from typer.testing import CliRunner

    from distill_common.errors import TrackingError
    from distill_common.output_dir import claim_output_dir
    from distill_common.registry_cli import app

    db = tmp_path / "mlflow.db"
    db.write_bytes(garbage)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setenv("DISTILL_ARTIFACT_ROOT", str(tmp_path / "art"))
    result = CliRunner().invoke(app, ["list"])
    assert isinstance(result.exception, TrackingError), result.output
    assert str(db) in str(result.exception) and "not an SQLite database" in str(result.exception)
    with pytest.raises(TrackingError, match="not an SQLite database"), claim_output_dir(tmp_path / "run", track=True):
        pass
    assert not (tmp_path / "run").exists() and db.read_bytes() == garbage  # refused before any run; file kept


# ------------------------------------------------------------------------------ row 16: registry compare nosuch


def test_registry_compare_of_an_unknown_model_lists_the_valid_ones(mlflow_uri, logged_generator):
    from typer.testing import CliRunner

    from distill_common import tracking
    from distill_common.registry_cli import app

    tracking.register_model(logged_generator(1.0), "noise")
    result = CliRunner().invoke(app, ["compare", "nosuch"])
    assert isinstance(result.exception, ConfigError), result.output
    assert "'nosuch'" in str(result.exception) and "'noise'" in str(result.exception)
    result = CliRunner().invoke(app, ["compare", "noise", "7"])
    assert isinstance(result.exception, ConfigError) and "'1'" in str(result.exception)
