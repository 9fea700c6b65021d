"""MetricProtocol: tags for MLflow, and refusing to compare or rank results measured differently."""

from __future__ import annotations

import dataclasses

import pytest

from distill_common.errors import ConfigError
from distill_eval.protocol import FIDResult, MetricProtocol, check_comparable, rank_results

BASE = MetricProtocol(
    extractor_hash="9d7e5a4f85a9", reference_set="cifar10-train", reference_n=50000, generated_n=10000,
    resolution=32, resize="none",
)


def result(fid: float, kid: float = 0.01, **changes) -> FIDResult:
    return FIDResult(fid=fid, kid_mean=kid, kid_std=0.001, protocol=dataclasses.replace(BASE, **changes))


def test_tags_are_strings_one_per_field() -> None:
    tags = BASE.as_tags()
    assert tags == {
        "fid_protocol.extractor_hash": "9d7e5a4f85a9",
        "fid_protocol.reference_set": "cifar10-train",
        "fid_protocol.reference_n": "50000",
        "fid_protocol.generated_n": "10000",
        "fid_protocol.resolution": "32",
        "fid_protocol.resize": "none",
        "fid_protocol.feature_precision": "fp32",
    }
    assert result(3.0).as_metrics() == {"fid": 3.0, "kid_mean": 0.01, "kid_std": 0.001}


def test_metrics_carry_the_interval_and_never_non_finite_values() -> None:
    from distill_eval.intervals import Interval

    with_ci = dataclasses.replace(result(3.0), fid_interval=Interval(3.0, 2.5, 3.4))
    assert with_ci.as_metrics() == {"fid": 3.0, "kid_mean": 0.01, "kid_std": 0.001, "fid_ci95_low": 2.5,
                                    "fid_ci95_high": 3.4}
    broken = dataclasses.replace(result(float("nan")), fid_interval=Interval(float("nan"), float("-inf"), 3.4))
    assert broken.as_metrics() == {"kid_mean": 0.01, "kid_std": 0.001, "fid_ci95_high": 3.4}


def test_protocol_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        BASE.resize = "bicubic"  # type: ignore[misc]


def test_equal_protocols_are_comparable() -> None:
    check_comparable(result(1.0), result(2.0))
    check_comparable(BASE, result(2.0))


def test_different_protocols_are_refused_naming_each_field() -> None:
    with pytest.raises(ConfigError) as err:
        check_comparable(result(1.0), result(2.0, generated_n=5000, resize="bicubic"))
    message = str(err.value)
    assert "generated_n 10000 vs 5000" in message
    assert "resize 'none' vs 'bicubic'" in message
    assert "reference_set" not in message and "\n" not in message


@pytest.mark.parametrize("field,value", [("extractor_hash", "0123456789ab"), ("reference_set", "cifar10-test"),
                                          ("reference_n", 10000), ("resolution", 64),
                                          ("feature_precision", "bf16")])
def test_every_field_matters(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        check_comparable(result(1.0), result(1.0, **{field: value}))


def test_rank_sorts_best_first_and_keeps_labels() -> None:
    ranked = rank_results({"teacher": result(4.0, kid=0.02), "student-4": result(6.5, kid=0.01),
                           "student-8": result(5.0, kid=0.03)})
    assert [name for name, _ in ranked] == ["teacher", "student-8", "student-4"]
    by_kid = rank_results([result(4.0, kid=0.02), result(6.5, kid=0.01)], by="kid_mean")
    assert [index for index, _ in by_kid] == [1, 0]


def test_rank_refuses_mixed_protocols_and_unknown_keys() -> None:
    with pytest.raises(ConfigError, match="feature_precision 'fp32' vs 'bf16'"):
        rank_results({"fp32": result(4.0), "bf16": result(3.9, feature_precision="bf16")})
    with pytest.raises(ConfigError, match="reference_n"):
        rank_results({"a": result(4.0), "b": result(1.0, reference_n=1000)})
    with pytest.raises(ConfigError, match="valid choices"):
        rank_results([result(1.0)], by="lpips")
