"""Tracking through a real MLflow server on loopback: runs, registry, concurrent registration, REST read-back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import urllib.request

import pytest

from distill_common import promotion, tracking

pytestmark = pytest.mark.slow

REGISTER_SCRIPT = textwrap.dedent('''
    import sys
    from pathlib import Path
    from distill_common import tracking
    from distill_common.generator import write_generator_manifest
    folder = Path(sys.argv[1])
    write_generator_manifest(folder, "test_noise", scale=float(sys.argv[2]))
    with tracking.start_run("concurrent", sys.argv[2]) as run:
        uri = tracking.log_generator_model(run, folder)
    version = tracking.register_model(uri, "shared-model", tags={"writer": sys.argv[2]})
    tracking.set_alias("shared-model", "writer-" + sys.argv[2].replace(".", "-"), version)
    print(version)
''')


def _rest(uri: str, path: str, params: str = "") -> dict:
    with urllib.request.urlopen(f"{uri}/api/2.0/mlflow/{path}?{params}", timeout=10) as resp:
        return json.loads(resp.read())


def test_server_runs_registry_and_concurrent_registration(mlflow_server, logged_generator, tmp_path):
    uri, pid, state = mlflow_server
    assert tracking.tracking_uri() == uri
    # a run with metrics and an artifact goes through the server
    with tracking.start_run("server-test", "r1", fallback_dir=tmp_path) as run:
        run.log_metrics({"loss": 0.5}, step=3)
        run.log_image(__import__("torch").rand(3, 8, 8), "samples/a.png")
    assert run.failed_calls == 0
    got = _rest(uri, "runs/get", f"run_id={run.run_id}")
    assert got["run"]["data"]["metrics"][0]["value"] == 0.5
    assert any(p.name == "a.png" for p in (state / "artifacts").rglob("*.png"))

    # register + promote through the server, read back over REST
    v1 = tracking.register_model(logged_generator(1.0), "rf-test")
    v2 = tracking.register_model(logged_generator(2.0), "rf-test")
    for v, fid in ((v1, 30.0), (v2, 20.0)):
        tracking.set_version_tags("rf-test", v, {"eval.s4.fid": fid, "eval.protocol": "{}"})
    promotion.apply(promotion.decide("rf-test", "fid", max_steps=4))
    model = _rest(uri, "registered-models/get", "name=rf-test")["registered_model"]
    assert {a["alias"]: a["version"] for a in model["aliases"]} == {"champion": v2}

    # two processes register versions of one model at the same time
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri)
    procs = [subprocess.Popen([sys.executable, "-c", REGISTER_SCRIPT, str(tmp_path / f"g{i}"), f"{i}.5"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (1, 2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    versions = sorted(o[0].strip().splitlines()[-1] for o in outs)
    assert versions == ["1", "2"]
    infos = {v.version: v for v in tracking.list_versions("shared-model")}
    assert sorted(infos) == ["1", "2"]
    aliases = _rest(uri, "registered-models/get", "name=shared-model")["registered_model"]["aliases"]
    by_alias = {a["alias"]: a["version"] for a in aliases}
    assert set(by_alias) == {"writer-1-5", "writer-2-5"}
    for alias, version in by_alias.items():  # each writer's alias points at the version that writer created
        assert infos[version].tags["writer"] == alias.removeprefix("writer-").replace("-", ".")
