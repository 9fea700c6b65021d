"""Bad inputs and faults against the registry (issue 13, rows 1, 2, 12, 13, 14, 15, 17; issue 11 promotion by
95% intervals): each ends in one clear line or a safe decision, never in foreign code running, a NaN champion or
a silently lost record."""

from __future__ import annotations

import json
import math
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from hostile_models import register_pickled_pyfunc

from distill_common import generator as generator_mod
from distill_common import promotion, tracking
from distill_common.cli import run_app
from distill_common.errors import ConfigError, ModelLoadError, TrackingError
from distill_common.registry_cli import app as registry_app

PROTO = {"reference_set": "cifar10-test", "reference_n": 1000, "generated_n": 64}


def run_registry(args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """``distill registry ARGS`` in-process as the console script runs it: (exit code, stdout, stderr)."""
    monkeypatch.setenv("COLUMNS", "250")
    code = 0
    try:
        run_app(registry_app, args)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def raw_tags(name: str, version: str, tags: dict[str, str]) -> None:
    """Write tags the way an older or foreign writer would: no filtering."""
    from mlflow import MlflowClient

    tracking.configure()
    for k, v in tags.items():
        MlflowClient().set_model_version_tag(name, version, k, v)


def stamp(version: str, fid: float, protocol: dict | str = PROTO, steps: int = 4, ci: tuple | None = None,
          name: str = "rf") -> None:
    tags = {f"eval.s{steps}.fid": fid, "eval.protocol": protocol if isinstance(protocol, str) else json.dumps(protocol)}
    if ci:
        tags[f"eval.s{steps}.fid_ci95_low"], tags[f"eval.s{steps}.fid_ci95_high"] = ci
    tracking.set_version_tags(name, version, tags)


@pytest.fixture
def versions(mlflow_uri, logged_generator):
    """Four registered versions of 'rf' (one logged model, registered four times), not yet evaluated."""
    uri = logged_generator(1.0)
    return [tracking.register_model(uri, "rf") for _ in range(4)]


# -- row 1: only generators this project logged from code are loaded or served --------------------------------

def test_pickled_pyfunc_is_refused_before_it_loads(mlflow_uri, tmp_path, noise_family):
    marker = tmp_path / "marker"
    version = register_pickled_pyfunc(tmp_path, marker)
    for load in (lambda: generator_mod.load_generator(f"models:/evil/{version}"),
                 lambda: tracking.fetch_servable_model(f"models:/evil/{version}", tmp_path / "serve")):
        with pytest.raises(ModelLoadError, match="refusing models:/evil/1: its pyfunc is loaded by 'mlflow.pyfunc.model'"):
            load()
    assert not marker.exists()


def _tamper(good: Path, dst: Path, edit) -> Path:
    shutil.copytree(good, dst)
    edit(dst)
    return dst


def test_only_our_own_code_model_passes_verification(mlflow_uri, logged_generator, tmp_path):
    import yaml
    from mlflow.artifacts import download_artifacts

    version = tracking.register_model(logged_generator(1.0), "noise")
    good = Path(download_artifacts(artifact_uri=f"models:/noise/{version}", dst_path=str(tmp_path / "good")))
    gen_folder = tracking.verify_logged_generator(good)
    assert (gen_folder / "generator.json").is_file()

    def mlmodel(edit):
        def apply(d: Path) -> None:
            spec = yaml.safe_load((d / "MLmodel").read_text())
            edit(spec["flavors"])
            (d / "MLmodel").write_text(yaml.safe_dump(spec))
        return apply

    cases = {
        "its pyfunc_entry.py differs": lambda d: (d / "pyfunc_entry.py").write_text("import os\nos.system('true')\n"),
        "adds code paths": mlmodel(lambda f: f["python_function"].update(code="code")),
        "not only python_function": mlmodel(lambda f: f.update(sklearn={"pickled_model": "model.pkl"})),
        "not from code": mlmodel(lambda f: f["python_function"].update(loader_module="evil_loader")),
        "its model code is": mlmodel(lambda f: f["python_function"].update(model_code_path="/x/other.py")),
        "not only 'generator'": mlmodel(lambda f: f["python_function"]["artifacts"].update(extra={"path": "x"})),
        "holds no generator.json": lambda d: next(d.rglob("generator.json")).unlink(),
        "not an MLflow model": lambda d: (d / "MLmodel").unlink(),
        "MLmodel file is unreadable": lambda d: (d / "MLmodel").write_text("flavors: [unclosed"),
    }
    for i, (needle, edit) in enumerate(cases.items()):
        bad = _tamper(good, tmp_path / f"bad{i}", edit)
        with pytest.raises(ModelLoadError, match="refusing") as exc:
            tracking.verify_logged_generator(bad, "models:/noise/1")
        assert needle in str(exc.value) and "\n" not in str(exc.value)
    outside = f"../{gen_folder.relative_to(tmp_path)}"  # a generator folder outside the model
    escape = _tamper(good, tmp_path / "escape", mlmodel(lambda f: f["python_function"]["artifacts"]["generator"]
                                                                .update(path=outside)))
    with pytest.raises(ModelLoadError, match="holds no generator.json"):
        tracking.verify_logged_generator(escape)


# -- row 2: NaN never written, ranked or promoted ------------------------------------------------------------

def test_non_finite_metrics_are_never_tags_ranked_or_promoted(versions, capsys, monkeypatch):
    with pytest.warns(UserWarning, match="non-finite"):
        dropped = tracking.set_version_tags("rf", versions[1], {"eval.s4.fid": float("nan"),
                                                                "eval.s4.ms_per_image": np.float32("inf"),
                                                                "eval.protocol": json.dumps(PROTO)})
    assert dropped == ["eval.s4.fid", "eval.s4.ms_per_image"]
    tags = next(v for v in tracking.list_versions("rf") if v.version == versions[1]).tags
    assert "eval.s4.fid" not in tags and "eval.s4.ms_per_image" not in tags and "eval.protocol" in tags
    stamp(versions[0], 30.0)
    stamp(versions[2], 25.0)
    # tags written by an older or foreign writer: read, but never scores
    raw_tags("rf", versions[3], {"eval.s4.fid": "-inf", "eval.s2.fid": "NaN", "eval.protocol": json.dumps(PROTO)})
    d = promotion.decide("rf", "fid", max_steps=4)
    assert d.promote and d.chosen.version == versions[2] and d.chosen.value == 25.0
    assert all(math.isfinite(c.value) for c in d.considered)
    assert versions[3] not in {c.version for c in d.considered} and versions[1] not in {c.version for c in d.considered}
    # a champion whose only score is NaN/inf is beaten by any finite score, and its value is not recorded as one
    tracking.set_alias("rf", tracking.CHAMPION, versions[3])
    code, out, err = run_registry(["promote", "rf", "--max-steps", "4"], capsys, monkeypatch)
    assert code == 0, err
    assert f"promoted v{versions[2]}" in out and "no finite fid" in " ".join(out.split())
    champ = tracking.version_by_alias("rf", tracking.CHAMPION)
    assert champ.version == versions[2] and champ.tags["promotion.previous_value"] == "none"
    code, out, _ = run_registry(["list"], capsys, monkeypatch)
    assert code == 0 and "-inf" not in out.lower() and "nan" not in out.lower()


# -- rows 12 and 13: protocols compared parsed; unreadable ones are one line -------------------------------------

def test_protocol_key_order_does_not_matter_and_refusals_name_fields(versions):
    stamp(versions[0], 30.0, protocol=json.dumps(PROTO, sort_keys=True))
    stamp(versions[1], 20.0, protocol=json.dumps(dict(reversed(list(PROTO.items())))))
    stamp(versions[2], 25.0, protocol=json.dumps({**PROTO, "reference_n": 1000.0}))  # same number
    d = promotion.decide("rf", "fid", max_steps=4)
    assert d.promote and d.chosen.version == versions[1]
    stamp(versions[3], 10.0, protocol=json.dumps({**PROTO, "reference_n": 500, "resize": "bicubic"}))
    with pytest.raises(ConfigError) as exc:
        promotion.decide("rf", "fid", max_steps=4)
    msg = str(exc.value)
    assert "reference_n: 1000 vs 500" in msg and "resize: '(absent)' vs 'bicubic'" in msg and "()" not in msg
    assert "generated_n" not in msg and "reference_set" not in msg


def test_malformed_protocol_tag_is_one_line(versions, capsys, monkeypatch):
    stamp(versions[0], 30.0)
    for bad in ("{not json", "[1, 2]", "", "null"):
        stamp(versions[1], 20.0, protocol=bad)
        code, out, err = run_registry(["compare", "rf"], capsys, monkeypatch)
        assert code == 0 and "Traceback" not in out + err, err
        assert f"rf v{versions[1]}: protocol unreadable" in out and "cifar10-test" in out
        code, out, err = run_registry(["promote", "rf", "--dry-run"], capsys, monkeypatch)
        assert code == 2
        assert_one_line_error(err, f"rf v{versions[1]} has an unreadable eval.protocol tag", "re-evaluate")


# -- row 17: registry read errors are raised, never read as "no champion" ---------------------------------------

def test_broken_registry_is_an_error_not_no_champion(versions, mlflow_uri, capsys, monkeypatch):
    stamp(versions[0], 30.0)
    stamp(versions[1], 20.0)
    tracking.set_alias("rf", tracking.CHAMPION, versions[0])
    assert tracking.version_by_alias("rf", "nope") is None and tracking.version_by_alias("absent", "champion") is None
    assert tracking.list_versions("absent") == []
    con = sqlite3.connect(mlflow_uri.removeprefix("sqlite:///"))  # the store loses its alias table
    con.execute("DROP TABLE registered_model_aliases")
    con.commit()
    con.close()
    with pytest.raises(TrackingError, match="cannot read the aliases of 'rf'"):
        tracking.version_by_alias("rf", tracking.CHAMPION)
    with pytest.raises(TrackingError, match="cannot read the aliases of 'rf'"):
        tracking.list_versions("rf")
    code, out, err = run_registry(["promote", "rf", "--dry-run"], capsys, monkeypatch)
    assert code == 2 and "no champion" not in out + err
    assert_one_line_error(err, "cannot read", "MLFLOW_TRACKING_URI")


# -- issue 11: promotion needs non-overlapping 95% intervals ------------------------------------------------------

def test_promotion_requires_non_overlapping_intervals(versions, capsys, monkeypatch):
    stamp(versions[0], 30.0, ci=(28.0, 32.0))
    tracking.set_alias("rf", tracking.CHAMPION, versions[0])
    stamp(versions[1], 29.0, ci=(27.0, 31.0))  # better, but inside the champion's interval
    d = promotion.decide("rf", "fid")
    assert not d.promote and d.rule == promotion.RULE_CI and "overlap" in d.reason
    code, out, _ = run_registry(["promote", "rf"], capsys, monkeypatch)
    assert code == 0 and "champion unchanged" in out
    assert tracking.version_by_alias("rf", tracking.CHAMPION).version == versions[0]

    stamp(versions[2], 24.0, ci=(22.5, 27.5))  # 27.5 < 28.0: clear of the champion's interval
    d = promotion.decide("rf", "fid")
    assert d.promote and d.chosen.version == versions[2] and d.rule == promotion.RULE_CI and "do not overlap" in d.reason
    assert not promotion.decide("rf", "fid", min_improvement=10.0).promote  # both rules must hold when given
    code, out, _ = run_registry(["promote", "rf"], capsys, monkeypatch)
    assert code == 0 and f"promoted v{versions[2]}" in out
    champ = tracking.version_by_alias("rf", tracking.CHAMPION)
    assert champ.version == versions[2] and champ.tags["promotion.rule"] == "ci95"
    assert champ.tags["promotion.new_ci95"] == "[22.5, 27.5]" and champ.tags["promotion.previous_ci95"] == "[28, 32]"

    # the challenger lacks intervals: the --min-improvement rule decides, and the record says so
    stamp(versions[3], 23.0)
    d = promotion.decide("rf", "fid", min_improvement=2.0)
    assert not d.promote and d.rule == promotion.RULE_MIN
    assert f"no 95% interval on v{versions[3]}" in d.reason and "--min-improvement" in d.reason
    d = promotion.decide("rf", "fid", min_improvement=0.5)
    assert d.promote and d.rule == promotion.RULE_MIN and "--min-improvement rule decided" in d.reason
    promotion.apply(d)
    champ = tracking.version_by_alias("rf", tracking.CHAMPION)
    assert champ.tags["promotion.rule"] == "min_improvement" and "no 95% interval" in champ.tags["promotion.reason"]


# -- row 14: relog says what it could not send; artifacts are kept in the output dir until relogged -------------

def test_relog_lists_what_it_dropped_and_keeps_artifacts(mlflow_uri, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    store = tmp_path / "mlartifacts"
    with tracking.start_run("unit", "outage", fallback_dir=out) as run:
        shutil.rmtree(store, ignore_errors=True)
        store.write_text("the artifact store is gone")  # every artifact upload now fails for real
        with pytest.warns(UserWarning, match="logging failed"):
            run.log_image(np.full((8, 8, 3), 200, np.uint8), "samples/step_0000001.png")  # a temp file
        ckpt = out / "checkpoint-0000001"
        ckpt.mkdir(parents=True)
        (ckpt / "model.safetensors").write_bytes(b"weights")
        run.log_artifact(ckpt, "checkpoints")
        shutil.rmtree(ckpt)  # pruned by the checkpoint rotation
        generator_mod.write_generator_manifest(out / "generator", "test_noise", scale=1.0)
        assert tracking.log_generator_model(run, out / "generator") is None
        run.log_metrics({"loss": 0.5}, step=3)
        run.log_text("lr: 0.1\n", "notes.txt")
    unlogged = run.unlogged_path
    kept = out / "unlogged_artifacts"
    assert len(list(kept.iterdir())) == 3
    assert all(not p.startswith("/tmp/tmp") for p in (json.loads(x).get("path", "") for x in unlogged.read_text().splitlines()))
    with unlogged.open("a") as f:  # what cannot be sent: a garbled line, a file deleted before it was kept
        f.write("{garbled\n")
        f.write(json.dumps({"run_id": run.run_id, "kind": "artifact", "time": 0, "path": str(tmp_path / "gone.png"),
                            "artifact_path": "samples"}) + "\n")
    store.unlink()
    store.mkdir()  # the store is back
    code, stdout, err = run_registry(["relog", str(unlogged)], capsys, monkeypatch)
    assert code == 1, err
    assert "2 record(s) NOT sent" in stdout and "not a relog record" in stdout and "gone.png is gone" in stdout
    files = tracking.list_run_artifacts(run.run_id)
    assert "samples/step_0000001.png" in files and "checkpoints/model.safetensors" in files
    assert "notes.txt" in files
    model = tracking.download_generator(f"runs:/{run.run_id}/generator", tmp_path / "relogged-model")
    assert json.loads((model / "generator.json").read_text())["scale"] == 1.0
    left = unlogged.read_text().splitlines()
    assert len(left) == 2 and left[0] == "{garbled"  # only what was not sent stays, for another try
    assert not kept.exists() or not any(kept.iterdir())  # sent: the kept copies are gone
    code, stdout, _ = run_registry(["relog", str(unlogged)], capsys, monkeypatch)
    assert code == 1 and "re-logged 0 record(s)" in stdout


# -- row 15: bad requests get a one-line reason, no traceback ------------------------------------------------------

def test_bad_requests_get_a_one_line_reason(mlflow_uri, logged_generator):
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    model = mlflow.pyfunc.load_model(f"models:/noise/{tracking.register_model(logged_generator(1.0), 'noise')}")

    def post(columns, rows):
        body = json.dumps({"dataframe_split": {"columns": columns, "data": rows}})
        try:
            res = scoring_server.invocations(body, "application/json", model, None)
            return res.status, res.response
        except MlflowException as exc:  # what the server's handler turns into the HTTP response
            return exc.get_http_status_code(), exc.serialize_as_json()

    status, body = post(["condition", "seed", "steps"], [[3, 0, 2]])
    assert status == 200 and "image" in json.loads(body)["predictions"][0]
    bad = {
        "steps must be at least 1, got -1": (["condition", "seed", "steps"], [[3, 0, -1]]),
        "steps must be at least 1, got 0": (["condition", "steps"], [[3, 0]]),
        "steps must be an integer": (["condition", "steps"], [[3, 2.5]]),
        "class condition must be at least 0": (["condition"], [[-4]]),
        "class condition must be an integer": (["condition"], [["cat"]]),
        "seed must be at least 0": (["condition", "seed"], [[1, -3]]),
        "guidance must be a finite number": (["condition", "guidance"], [[1, "nan"]]),
        "all rows must share one steps": (["condition", "steps"], [[1, 2], [2, 4]]),
        "input columns must be": (["condition", "colour"], [[1, "red"]]),
        "'condition' required": (["seed"], [[1]]),
    }
    for needle, (columns, rows) in bad.items():
        status, body = post(columns, rows)
        payload = json.loads(body)
        assert status == 400, (needle, body)
        assert needle in payload["message"], (needle, payload)
        assert set(payload) == {"error_code", "message"} and "\n" not in payload["message"]
        assert "Traceback" not in body and 'File "' not in body and ".py" not in body


# -- row 4 (fast form; tests/integration/test_bad_inputs_serve.py runs the real serve and ui) -----------------------

@pytest.mark.parametrize("ignores_term", [False, True], ids=["server-stops", "server-ignores-SIGTERM"])
def test_a_signal_to_the_parent_stops_the_whole_server_group(tmp_path, ignores_term):
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = f"{sys.executable} -m http.server {port} --bind 127.0.0.1"
    # the server is a grandchild (bash starts it in the background), as uvicorn is under `mlflow models serve`
    trap = "trap '' TERM; " if ignores_term else ""  # an ignored signal stays ignored in the server
    script = f"{trap}{server} & wait"
    parent = subprocess.Popen([sys.executable, "-c", "import sys; from distill_common.foreground import run_foreground; "
                               f"sys.exit(run_foreground(['bash', '-c', {script!r}], grace_s=2.0))"],
                              start_new_session=True)

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        deadline = time.time() + 60
        while not listening():
            assert parent.poll() is None and time.time() < deadline
            time.sleep(0.2)
        os.kill(parent.pid, signal.SIGTERM)  # the parent only, as `kill PID` does
        assert parent.wait(timeout=30) == 0
        assert not listening()
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
