"""Champion promotion: gate, protocol refusal, min-improvement, decision record; and the registry CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from distill_common import promotion, tracking
from distill_common.errors import ConfigError
from distill_common.registry_cli import app

PROTO = json.dumps({"reference_set": "cifar10-test", "reference_n": 1000, "generated_n": 64}, sort_keys=True)


def _stamp(version: str, evals: dict[int, dict[str, float]], protocol: str = PROTO) -> None:
    tags = {f"eval.s{s}.{k}": v for s, m in evals.items() for k, v in m.items()}
    tags["eval.protocol"] = protocol
    tracking.set_version_tags("rf", version, tags)


@pytest.fixture
def three_versions(mlflow_uri, logged_generator):
    versions = [tracking.register_model(logged_generator(float(i)), "rf") for i in (1, 2, 3)]
    _stamp(versions[0], {32: {"fid": 10.0, "ms_per_image": 40.0}, 4: {"fid": 30.0, "ms_per_image": 5.0}})
    _stamp(versions[1], {1: {"fid": 25.0, "ms_per_image": 1.5}, 4: {"fid": 20.0, "ms_per_image": 5.5}})
    _stamp(versions[2], {1: {"fid": 22.0, "ms_per_image": 1.4}, 2: {"fid": 21.0, "ms_per_image": 2.6}})
    return versions


def test_gate_picks_best_within_max_steps(three_versions):
    d = promotion.decide("rf", "fid", max_steps=4)
    assert d.promote and d.chosen.version == "2" and d.chosen.steps == 4 and d.previous is None
    # the teacher's 32-step FID of 10 is outside the gate
    assert all(c.steps <= 4 for c in d.considered)
    d = promotion.decide("rf", "fid", max_steps=4, max_latency_ms=3.0)
    assert d.chosen.version == "3" and d.chosen.steps == 2


def test_apply_moves_alias_records_decision_and_respects_min_improvement(three_versions):
    promotion.apply(promotion.decide("rf", "fid", max_steps=2))  # v3 (21.0) first
    assert tracking.version_by_alias("rf", "champion").version == "3"
    d = promotion.decide("rf", "fid", max_steps=4, min_improvement=5.0)  # v2 is only 1.0 better
    assert not d.promote and "min-improvement" in d.reason
    d = promotion.decide("rf", "fid", max_steps=4, min_improvement=0.5)
    assert d.promote and d.previous.version == "3"
    promotion.apply(d)
    champ = tracking.version_by_alias("rf", "champion")
    assert champ.version == "2"
    assert tracking.version_by_alias("rf", "challenger").version == "3"
    assert champ.tags["promotion.previous_version"] == "3"
    assert float(champ.tags["promotion.new_value"]) == 20.0 and "promotion.by" in champ.tags
    assert "Promoted to champion" in champ.description
    assert not promotion.decide("rf", "fid", max_steps=4).promote  # already champion


def test_an_eligible_set_narrows_the_gate_and_replaces_a_champion_outside_it(three_versions):
    """A comparison promotes only the students that meet its goal: the best of them wins even when an ineligible
    version has a lower FID, and an ineligible champion gives way without an interval test."""
    promotion.apply(promotion.decide("rf", "fid", max_steps=4))  # v2 (20.0) is champion
    d = promotion.decide("rf", "fid", max_steps=4, eligible={"3"}, eligible_reason="the students meeting the goal")
    assert d.promote and d.chosen.version == "3" and d.previous.version == "2"
    assert "not among the students meeting the goal" in d.reason and {c.version for c in d.considered} == {"3"}
    promotion.apply(d)
    assert tracking.version_by_alias("rf", "champion").version == "3"
    # within the eligible set the usual rule holds: v1's 30.0 at 4 steps does not beat v3's 21.0
    assert not promotion.decide("rf", "fid", max_steps=4, eligible={"1", "3"}).promote
    with pytest.raises(ConfigError, match="no version of 'rf' is among"):
        promotion.decide("rf", "fid", max_steps=4, eligible=set())


def test_class_accuracy_is_higher_is_better(three_versions):
    for version, accuracy in zip(three_versions, (0.5, 0.7, 0.6), strict=True):
        _stamp(version, {4: {"class_accuracy": accuracy, "fid": 20.0}})
    assert promotion.decide("rf", "class_accuracy", max_steps=4).chosen.version == "2"


def test_different_protocols_are_refused(three_versions):
    other = json.dumps({"reference_set": "cifar10-train", "reference_n": 1000, "generated_n": 64}, sort_keys=True)
    _stamp(three_versions[2], {1: {"fid": 1.0}}, protocol=other)
    with pytest.raises(ConfigError, match="reference_set"):
        promotion.decide("rf", "fid", max_steps=4)


def test_nothing_evaluated_is_a_clear_error(mlflow_uri, logged_generator):
    tracking.register_model(logged_generator(1.0), "bare")
    with pytest.raises(ConfigError, match="distill eval benchmark"):
        promotion.decide("bare", "fid")


def test_registry_cli_list_compare_promote(three_versions):
    runner = CliRunner()
    env = {"COLUMNS": "200"}
    out = runner.invoke(app, ["promote", "rf", "--max-steps", "4", "--dry-run"], env=env)
    assert out.exit_code == 0, out.output
    assert "would promote v2" in out.output
    assert tracking.version_by_alias("rf", "champion") is None
    out = runner.invoke(app, ["promote", "rf", "--max-steps", "4"], env=env)
    assert "promoted v2" in out.output and tracking.version_by_alias("rf", "champion").version == "2"
    tracking.set_version_tags("rf", "2", {"recipe": "progressive", "steps": 4})
    out = runner.invoke(app, ["list"], env=env)
    assert out.exit_code == 0 and "champion" in out.output and "4 steps: 20" in out.output
    assert "progressive, 4 steps" in out.output  # which model a version is, not only its number
    assert "protocol 64 vs 1,000 cifar10-test" in out.output
    out = runner.invoke(app, ["compare", "rf", "1", "2"], env=env)
    assert out.exit_code == 0 and "cifar10-test" in out.output and "mlflow ui" in out.output
    assert "progressive, 4 steps" in out.output


def test_registry_reads_take_a_tracking_uri_and_never_create_a_store(three_versions, mlflow_uri, tmp_path,
                                                                      monkeypatch):
    runner = CliRunner()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for args in (["list"], ["compare", "rf"], ["promote", "rf", "--dry-run"]):
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # --tracking-uri below sets it for the process
        out = runner.invoke(app, args)
        assert out.exit_code != 0 and "no MLflow store" in str(out.exception), args
        assert not (elsewhere / "mlflow.db").exists() and list(elsewhere.iterdir()) == [], args
        out = runner.invoke(app, [*args, "--tracking-uri", mlflow_uri], env={"COLUMNS": "200"})
        assert out.exit_code == 0 and "rf" in out.output, (args, out.output)
    missing = f"sqlite:///{tmp_path / 'nope' / 'mlflow.db'}"
    out = runner.invoke(app, ["list"], env={"MLFLOW_TRACKING_URI": missing})
    assert out.exit_code != 0 and not (tmp_path / "nope").exists()
