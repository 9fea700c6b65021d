"""A registry with nothing registered (or no store at all): the page still offers the shipped generators, the
CIFAR-10 ``reference`` teacher first, instead of an empty choice."""

from __future__ import annotations

from pathlib import Path

import pytest

import distill_common.ui
from distill_common import tracking
from distill_common.generator import named_generators
from distill_common.ui.catalog import build_catalog

PAGE = Path(distill_common.ui.__file__).parent / "page.py"


def _empty_store() -> None:
    with tracking.start_run("ui-test", "nothing-registered"):
        pass  # the store exists, with a run and no registered model


def test_an_empty_registry_offers_the_shipped_generators(mlflow_uri: str) -> None:
    _empty_store()
    assert tracking.list_models() == []
    cat = build_catalog()
    assert cat.shipped_only and cat.families[0] == "rf_cifar"  # the CIFAR-10 main job's family first
    teacher, *earlier = cat.of_role("rf_cifar", "teacher")  # the current reference first: the page preselects it
    assert (teacher.uri, teacher.label) == ("reference", "reference (shipped)")
    assert [t.uri for t in earlier] == ["reference-v1"]  # its first version, from which the published students came
    assert named_generators()[teacher.uri] == named_generators()["rf_cifar:reference"]  # loads by that name
    offered = {c.uri for cs in cat.choices.values() for c in cs}
    assert offered == {name for name in named_generators() if ":" not in name}  # each shipped folder once
    assert cat.versions == {}  # nothing measured: the metrics tab says so


def test_a_registry_with_versions_offers_only_those(mlflow_uri: str) -> None:
    reference = named_generators()["reference"]
    with tracking.start_run("ui-test", "teacher") as run:
        version = tracking.register_model(tracking.log_generator_model(run, reference), "rf_cifar-teacher")
    cat = build_catalog()
    assert not cat.shipped_only
    assert [c.label for c in cat.of_role("rf_cifar", "teacher")] == [f"rf_cifar-teacher v{version}"]


@pytest.mark.slow
def test_the_page_preselects_the_reference_teacher_when_nothing_is_registered(mlflow_uri: str) -> None:
    """The page itself (Streamlit's AppTest, in process): no error, the shipped teacher preselected and loaded."""
    from streamlit.testing.v1 import AppTest

    _empty_store()
    at = AppTest.from_file(str(PAGE), default_timeout=300).run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.sidebar.selectbox(key="family").value == "rf_cifar"
    assert at.sidebar.selectbox(key="teacher::rf_cifar").value == "reference"
    notes = " ".join(str(e.value) for e in at.info)
    assert "Nothing registered in this registry yet" in notes and "No registered rf_cifar versions" in notes
    assert not at.error  # the reference teacher loaded (a failure would show 'Could not load')


@pytest.mark.slow
def test_the_page_without_a_store_says_so_and_still_offers_the_reference(tmp_path: Path, monkeypatch) -> None:
    from streamlit.testing.v1 import AppTest

    missing = tmp_path / "nowhere" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{missing}")
    at = AppTest.from_file(str(PAGE), default_timeout=300).run()
    assert not at.exception, [e.value for e in at.exception]
    assert "no MLflow store" in " ".join(str(w.value) for w in at.warning)
    assert at.sidebar.selectbox(key="teacher::rf_cifar").value == "reference"
    assert not missing.parent.exists()  # reading created no store
