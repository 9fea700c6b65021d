"""Issue 24 on `distill rf`: stale caches (row 2), signals (6, 7), compare's lock (5), non-finite weights and
guidance (8), the shipped teacher (9), options validated before the folder is written (10), range checks (11),
corrupt stage files and huge seeds (13). Every test drives the real code path and checks what is (not) on disk."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rf_helpers import pairs_config, tiny_unet_config
from typer.testing import CliRunner

from distill_common.errors import (
    ConfigError,
    DataError,
    DistillError,
    ModelLoadError,
    NonFiniteImagesError,
    OutputDirError,
)

runner = CliRunner()


def _run_cli(args: list[str]) -> int:
    """The rf app through run_app (the console script's path: SIGTERM handling, one-line errors); its exit code."""
    from distill_common.cli import run_app
    from distill_rf_cifar.cli import app

    try:
        run_app(app, args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


# ------------------------------------------------------------------------------ row 2: rf evaluate's image cache


def _pngs(folder: Path) -> np.ndarray:
    return np.stack([np.array(Image.open(p)) for p in sorted(folder.glob("[0-9]*.png"))])


def test_rf_evaluate_rerun_with_another_student_regenerates_its_images(tmp_path, teacher_dir, other_teacher_dir):
    from rich.console import Console

    from distill_rf_cifar.config import EvalConfig
    from distill_rf_cifar.evaluation import run_sweep
    from distill_rf_cifar.generator import load_generator

    cfg = EvalConfig(teacher_steps=[1], teacher_rk45=False, student_steps=[1], num_images=4, batch_size=4,
                     sample_precision="fp32", reference="no-such-reference", bootstrap_resamples=0)
    teacher = ("teacher", load_generator(teacher_dir, device="cpu"))

    def sweep(student: Path, out: Path) -> str:
        console = Console(record=True, width=400, file=open(os.devnull, "w"))  # noqa: SIM115
        with pytest.raises(DistillError):  # images are made, then the unknown reference set stops the sweep
            run_sweep(teacher, [("s", load_generator(student, device="cpu"))], cfg, out, progress=False, console=console)
        return console.export_text()

    out = tmp_path / "eval"
    sweep(teacher_dir, out)
    first = _pngs(out / "images" / "s_s1")
    text = sweep(other_teacher_dir, out)  # --students s=B after s=A: B's images, not A's
    assert "regenerating" in text and "weights changed" in text
    second = _pngs(out / "images" / "s_s1")
    sweep(other_teacher_dir, tmp_path / "fresh")
    assert not np.array_equal(first, second) and np.array_equal(second, _pngs(tmp_path / "fresh" / "images" / "s_s1"))
    assert "reusing 4 cached image(s)" in sweep(other_teacher_dir, out)


# ------------------------------------------------------------------------------ row 5: one compare per folder


def test_second_compare_on_a_held_folder_is_refused_at_once(tmp_path):
    folder = tmp_path / "cmp"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from distill_common.output_dir import output_dir_lock
        with output_dir_lock({str(folder)!r}):
            print("held", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        from distill_rf_cifar.cli import app

        start = time.perf_counter()
        result = runner.invoke(app, ["compare", "--preset", "tiny", "--output-dir", str(folder), "--no-track"])
        assert isinstance(result.exception, OutputDirError), result.output
        assert f"PID {holder.pid}" in str(result.exception) and time.perf_counter() - start < 30
        assert sorted(p.name for p in folder.iterdir()) == [".distill.lock"]  # nothing trained, nothing written
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------------------ row 6: SIGTERM during distill


def test_sigterm_during_distill_marks_the_run_killed_releases_the_lock_and_resumes(
        tmp_path, teacher_dir, pairs_dir, mlflow_uri, monkeypatch):
    from mlflow import MlflowClient

    import distill_rf_cifar.stages as stages

    real = stages.run_recipe

    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` while training
        return real(*args, **kwargs)

    monkeypatch.setattr(stages, "run_recipe", killed)
    out = tmp_path / "student"
    args = ["distill", "--recipe", "one_step", "--teacher", str(teacher_dir), "--pairs", str(pairs_dir),
            "--output-dir", str(out), "--train-steps", "2", "--train-batch-size", "8", "--train-device", "cpu",
            "--train-precision", "fp32", "--no-train-log-checkpoints"]
    previous = signal.getsignal(signal.SIGTERM)
    assert _run_cli(args) == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == previous  # the handler is put back
    client = MlflowClient()
    (exp,) = [e for e in client.search_experiments() if e.name == "rf_cifar"]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "KILLED"
    assert not (out / ".distill.lock").exists()
    assert json.loads((out / "stage.json").read_text())["finished"] is False

    monkeypatch.setattr(stages, "run_recipe", real)
    assert _run_cli(args) == 0  # the rerun takes the folder and finishes
    assert json.loads((out / "stage.json").read_text())["finished"] is True


# ------------------------------------------------------------------------------ row 7: SIGTERM during make-pairs


def test_cut_off_make_pairs_leaves_a_manifest_of_what_exists_and_distill_refuses_it(
        tmp_path, teacher_dir, monkeypatch):
    import distill_rf_cifar.pairs as pairs

    real, calls = pairs.ckpt.write_json, []

    def write_then_die(path, data):
        real(path, data)
        calls.append(path)
        if len(calls) == 1:  # right after the first shard's manifest
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(pairs.ckpt, "write_json", write_then_die)
    out = tmp_path / "pairs"
    args = ["make-pairs", "--teacher", str(teacher_dir), "--output-dir", str(out), "--num-pairs", "24",
            "--shard-size", "8", "--steps", "2", "--batch-size", "8", "--device", "cpu", "--no-track"]
    assert _run_cli(args) == 128 + signal.SIGTERM
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_pairs"] == 8 and manifest["target_pairs"] == 24 and manifest["complete"] is False
    assert len(list(out.glob("pairs-*.safetensors"))) == len(manifest["shards"]) == 1

    with pytest.raises(DataError, match=r"unfinished \(8 of 24 made"):
        pairs.load_pairs(out, teacher_dir)
    student = tmp_path / "student"
    result = runner.invoke(_rf_app(), ["distill", "--recipe", "one_step", "--teacher", str(teacher_dir), "--pairs",
                                       str(out), "--output-dir", str(student), "--no-track", "--train-steps", "1",
                                       "--train-device", "cpu"])
    assert isinstance(result.exception, DataError) and "make-pairs" in str(result.exception)
    assert not student.exists()  # refused before the folder was written

    monkeypatch.setattr(pairs.ckpt, "write_json", real)
    assert _run_cli(args) == 0  # resumes the missing shards
    assert json.loads((out / "manifest.json").read_text())["complete"] is True
    assert len(pairs.load_pairs(out, teacher_dir).noise) == 24


def _rf_app():
    from distill_rf_cifar.cli import app

    return app


# ------------------------------------------------------------------------------ row 8: non-finite weights, guidance


def test_nan_weights_are_refused_at_load(tmp_path):
    from distill_rf_cifar.generator import load_generator, save_generator
    from distill_rf_cifar.models import build_unet

    model = build_unet(tiny_unet_config())
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    folder = save_generator(tmp_path / "gen", model, role="teacher", default_steps=2)
    with pytest.raises(ModelLoadError, match="NaN or infinite weights"):
        load_generator(folder, device="cpu")


def test_guidance_inf_is_refused_and_overflowing_guidance_writes_no_black_images(tmp_path, teacher_dir):
    from distill_rf_cifar.generator import load_generator

    gen = load_generator(teacher_dir, device="cpu")
    with pytest.raises(ConfigError, match="finite"):
        gen.generate([0, 1], 2, [0, 1], guidance=float("inf"))
    with pytest.raises(NonFiniteImagesError, match="NaN or infinite pixels"):
        gen.generate([0, 1], 2, [0, 1], guidance=1e38)
    for value in ("inf", "1e400", "nan"):
        out = tmp_path / f"s-{value}"
        result = runner.invoke(_rf_app(), ["sample", "--generator", str(teacher_dir), "--guidance", value,
                                           "--output-dir", str(out), "--device", "cpu"])
        assert isinstance(result.exception, ConfigError) and "--guidance" in str(result.exception)
        assert not out.exists()


def test_pairs_of_an_overflowing_teacher_are_refused_not_stored(tmp_path, teacher_dir):
    from distill_rf_cifar.pairs import make_pairs

    out = tmp_path / "pairs"
    with pytest.raises(NonFiniteImagesError, match="NaN or infinite pixels"):
        make_pairs(pairs_config(teacher_dir, out, guidance=1e38), progress=False)
    assert not list(out.glob("pairs-*.safetensors"))


# ------------------------------------------------------------------------------ row 9: the shipped teacher


@pytest.fixture
def shipped_copy(tmp_path, monkeypatch):
    """A copy of the shipped reference teacher standing in for the installed one."""
    import distill_rf_cifar.generator as generator

    copy = tmp_path / "site" / "reference_teacher"
    shutil.copytree(generator.REFERENCE_TEACHER, copy)
    monkeypatch.setattr(generator, "REFERENCE_TEACHER", copy)
    generator._verified.clear()
    return copy


def test_altered_shipped_teacher_weights_are_refused(shipped_copy):
    from distill_rf_cifar.generator import card_sha256, load_generator, weights_sha256

    assert card_sha256(shipped_copy) == weights_sha256(shipped_copy)  # the card names the shipped file
    load_generator("reference", device="cpu")  # intact: loads
    weights = shipped_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="do not match the sha256 in its model card"):
        load_generator("reference", device="cpu")


def test_a_local_folder_named_reference_does_not_replace_the_shipped_teacher(
        shipped_copy, tmp_path, other_teacher_dir, monkeypatch, capsys):
    from distill_common.generator import resolve_generator_folder

    work = tmp_path / "work"
    shutil.copytree(other_teacher_dir, work / "reference")
    monkeypatch.chdir(work)
    assert resolve_generator_folder("reference") == shipped_copy
    assert "the folder ./reference here is ignored (pass ./reference" in capsys.readouterr().err
    assert resolve_generator_folder("./reference").resolve() == (work / "reference").resolve()


# ------------------------------------------------------------------------------ rows 10, 11: validated before writing


@pytest.mark.parametrize("flags, names", [
    (["--options-adv-steps", "9"], "--options-adv-steps"),
    (["--options-cd-grid", "0"], "--options-cd-grid"),
    (["--options-adv-head-channels", "0"], "--options-adv-head-channels"),
    (["--options-adv-d-learning-rate", "nan"], "--options-adv-d-learning-rate"),
    (["--options-cd-target-decay", "1"], "--options-cd-target-decay"),
    (["--options-guidance-min", "5", "--options-guidance-max", "2"], "--options-guidance-min"),
    (["--train-learning-rate", "inf"], "--train-learning-rate"),
    (["--train-seed", "99999999999999999999"], "--train-seed"),
])
def test_distill_options_are_checked_before_the_folder_is_written(tmp_path, flags, names):
    out = tmp_path / "student"
    result = runner.invoke(_rf_app(), ["distill", "--recipe", "adversarial", "--output-dir", str(out), "--no-track",
                                       *flags])
    assert isinstance(result.exception, ConfigError), result.output
    assert names in str(result.exception)
    assert not out.exists()


def test_guided_recipe_on_a_guided_teacher_is_refused_before_the_folder_is_written(tmp_path, teacher_dir, data_root):
    from distill_rf_cifar.generator import load_model, save_generator
    from distill_rf_cifar.models import with_guidance_embedding

    guided = save_generator(tmp_path / "guided", with_guidance_embedding(load_model(teacher_dir)), role="guided",
                            default_steps=2)
    out = tmp_path / "student"
    args = ["distill", "--recipe", "guided", "--output-dir", str(out), "--no-track", "--train-steps", "1",
            "--train-batch-size", "8", "--train-device", "cpu", "--train-precision", "fp32",
            "--data-root", str(data_root), "--data-limit", "16", "--no-train-log-checkpoints"]
    result = runner.invoke(_rf_app(), [*args, "--teacher", str(guided)])
    assert isinstance(result.exception, ConfigError) and "already takes the guidance scale" in str(result.exception)
    assert not out.exists()
    result = runner.invoke(_rf_app(), [*args, "--teacher", str(teacher_dir)])  # the corrected rerun is not refused
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("flags", [["--learning-rate", "-1"], ["--guidance-scales", "nan"],
                                   ["--guidance-scales", "1,inf"], ["--iterations", "0"], ["--class-label", "10"],
                                   ["--t-min", "nan"]])
def test_sds_ranges(tmp_path, flags):
    out = tmp_path / "sds"
    result = runner.invoke(_rf_app(), ["sds", "--output-dir", str(out), "--no-track", *flags])
    assert isinstance(result.exception, ConfigError), result.output
    assert flags[0] in str(result.exception) and not out.exists()


# ------------------------------------------------------------------------------ row 13: corrupt stage file


def test_corrupt_stage_file_is_one_line_naming_it(tmp_path, teacher_dir, pairs_dir):
    out = tmp_path / "student"
    out.mkdir()
    (out / "stage.json").write_text('{"config_hash": "ab')
    result = runner.invoke(_rf_app(), ["distill", "--recipe", "one_step", "--teacher", str(teacher_dir), "--pairs",
                                       str(pairs_dir), "--output-dir", str(out), "--no-track", "--train-steps", "1",
                                       "--train-device", "cpu"])
    assert isinstance(result.exception, DataError), result.output
    assert str(out / "stage.json") in str(result.exception) and "delete it" in str(result.exception)


# ------------------------------------------------------------------------------ row 15: a bad download mirror


def test_mirror_serving_html_or_a_truncated_archive_is_one_line(tmp_path, monkeypatch):
    import hashlib
    import http.server
    import threading

    from test_bad_inputs_rf import _archive

    from distill_common.data import open_cifar10

    www = tmp_path / "www"
    www.mkdir()
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(www), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *a: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.delenv("DISTILL_DATA_ROOT", raising=False)
    monkeypatch.setenv("DISTILL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    try:
        page = b"<!doctype html><html><body>Please log in</body></html>"
        (www / "login.html").write_bytes(page)
        (www / "cifar-10-python.tar.gz").write_bytes(page)  # HTML under the archive's name, md5 pinned to it
        monkeypatch.setenv("DISTILL_CIFAR10_MD5", hashlib.md5(page).hexdigest())
        for url, expect in ((f"{base}/login.html", "served a web page"),
                            (f"{base}/cifar-10-python.tar.gz", "is not a .tar.gz archive")):
            monkeypatch.setenv("DISTILL_CIFAR10_URL", url)
            with pytest.raises(DataError, match=expect) as info:
                open_cifar10(None, "train", show_progress=False)
            assert "\n" not in str(info.value)
        path, _ = _archive(www)
        cut = path.read_bytes()[: path.stat().st_size // 2]
        path.write_bytes(cut)
        monkeypatch.setenv("DISTILL_CIFAR10_MD5", hashlib.md5(cut).hexdigest())  # the md5 matches the cut file
        with pytest.raises(DataError, match="truncated or damaged"):
            open_cifar10(None, "train", show_progress=False)
        cache = tmp_path / "cache" / "cifar10"
        assert not (cache / "cifar-10-batches-py").exists() and not list(cache.glob(".*"))
    finally:
        server.shutdown()
        server.server_close()
