"""The ``distill ui`` Streamlit page: a teacher and its students side by side, and their registry metrics.

Run through ``distill ui`` (which calls ``streamlit run`` on this file). Models are read from the
registry that ``MLFLOW_TRACKING_URI`` (default ``./mlflow.db``) points at and loaded with
:func:`distill_common.generator.load_generator`, cached per URI across interactions and sessions.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import streamlit as st

from distill_common import tracking
from distill_common.data.cifar10 import CIFAR10_CLASSES
from distill_common.errors import DistillError
from distill_common.generator import Generator, load_generator
from distill_common.runtime import timed
from distill_common.tracking import CHAMPION
from distill_common.ui.catalog import (
    CONDITION_KINDS,
    STUDENT,
    TEACHER,
    Catalog,
    ModelChoice,
    build_catalog,
    compare_rows,
    eval_plots,
    latest_eval_run,
    protocol_groups,
    shipped_catalog,
)
from distill_common.ui.sampling import Sample, generate_sample, warm_up

DEFAULT_PROMPT = "a photograph of an astronaut riding a horse"


@dataclass
class Loaded:
    """A cached load attempt: the generator, or the one-line error that stopped it."""

    generator: Generator | None
    error: str | None
    seconds: float


def _fmt(v: object) -> str:
    """As in ``distill registry compare``: 4 significant digits, n/a when missing."""
    if v is None:
        return "n/a"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _message(exc: BaseException) -> str:
    if isinstance(exc, DistillError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


@st.cache_resource(show_spinner=False, max_entries=16)
def load_cached(uri: str, device: str) -> Loaded:
    """Load and warm up once per (URI, device); failures are cached too, until 'Reload models' clears the cache."""
    try:
        with timed() as t:
            gen = load_generator(uri, device=device)
            warm_up(gen)
        return Loaded(gen, None, t["seconds"])
    except Exception as exc:  # shown in the page; the other models stay usable
        traceback.print_exc()
        return Loaded(None, _message(exc), 0.0)


@st.cache_data(show_spinner=False, ttl=30)
def catalog_cached(uri: str) -> Catalog:
    return build_catalog()


@st.cache_data(show_spinner=False)
def plots_cached(run_id: str) -> list[str]:
    return [str(p) for p in eval_plots(run_id)]


def sidebar(catalog: Catalog) -> tuple[str, list[ModelChoice], str]:
    """Family, teacher, students and device; returns (family, chosen models teacher first, device)."""
    sb = st.sidebar
    sb.header("Models")
    family = sb.selectbox("Model family", catalog.families, key="family")
    choices = {c.uri: c for c in catalog.choices[family]}
    teachers = [c.uri for c in catalog.of_role(family, TEACHER)]
    teacher_options = [None] + teachers + [u for u in choices if u not in teachers]
    teacher = sb.selectbox("Teacher", teacher_options, index=1 if teachers else 0, key=f"teacher::{family}",
                           format_func=lambda u: "(none)" if u is None else choices[u].label)
    student_choices = catalog.of_role(family, STUDENT)
    champions = [c.uri for c in student_choices if c.alias == CHAMPION]
    default = champions[:1] or [c.uri for c in student_choices[:1]]
    students = sb.multiselect("Students", [c.uri for c in student_choices] + teachers, default=default,
                              key=f"students::{family}", format_func=lambda u: choices[u].label)
    device = sb.selectbox("Device", ["auto", "cpu", "cuda", "mps"], key="device")
    if sb.button("Reload models", help="Forget loaded models and failed loads, and re-read the registry"):
        load_cached.clear()
        catalog_cached.clear()
        plots_cached.clear()
        st.rerun()
    chosen = [choices[u] for u in dict.fromkeys(([teacher] if teacher else []) + students)]
    return family, chosen, device


def load_models(chosen: list[ModelChoice], device: str) -> dict[str, Generator]:
    """Load (or fetch from the cache) every chosen model, with progress; report failures one per line."""
    loaded: dict[str, Generator] = {}
    failures: list[tuple[ModelChoice, str]] = []
    with st.status(f"Loading {len(chosen)} model(s)…", expanded=False) as status:
        for c in chosen:
            result = load_cached(c.uri, device)
            if result.generator is not None:
                loaded[c.uri] = result.generator
                st.write(f"{c.label} ← `{c.uri}` (loaded and warmed up in {result.seconds:.1f} s)")
            else:
                failures.append((c, result.error or "unknown error"))
                st.write(f"{c.label} ← `{c.uri}`: failed")
        label = f"Loaded {len(loaded)} of {len(chosen)} model(s)"
        status.update(label=label, state="error" if failures else "complete")
    for c, err in failures:
        st.error(f"Could not load {c.label}: {err}", icon="⚠️")
    return loaded


def condition_inputs(kind: str) -> tuple[list, list[str]]:
    """(conditions for the generator, their display names)."""
    if kind == "class":
        names = st.multiselect("Classes (one image each)", list(CIFAR10_CLASSES), default=["airplane", "cat"],
                               key="classes")
        return [CIFAR10_CLASSES.index(n) for n in names], names
    text = st.text_area("Prompts (one a line, one image each)", DEFAULT_PROMPT, key="prompts")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    return prompts, [p if len(p) <= 40 else p[:39] + "…" for p in prompts]


def generate_tab(family: str, chosen: list[ModelChoice], device: str) -> None:
    if not chosen:
        st.info("Choose a teacher and at least one student in the sidebar.")
        return
    loaded = load_models(chosen, device)
    usable = [c for c in chosen if c.uri in loaded]
    kinds = {loaded[c.uri].condition_kind for c in usable}
    kind = kinds.pop() if len(kinds) == 1 else CONDITION_KINDS.get(family, "class")
    conditions, names = condition_inputs(kind)
    left, right = st.columns(2)
    seed = int(left.number_input("Seed (image i uses seed + i)", min_value=0, value=0, step=1, key="seed"))
    guidance = right.number_input("Guidance", min_value=0.0, value=None, step=0.5, placeholder="model default",
                                  key="guidance")
    steps: dict[str, int] = {}
    if usable:
        st.caption("Steps per model")
        for col, c in zip(st.columns(len(usable)), usable, strict=True):
            steps[c.uri] = int(col.number_input(c.label, min_value=1, max_value=1000, step=1,
                                                value=int(getattr(loaded[c.uri], "default_steps", 1) or 1),
                                                key=f"steps::{c.uri}"))
    if st.button("Generate", type="primary", disabled=not usable or not conditions, key="generate"):
        results: list[Sample | tuple[str, str]] = []
        for c in usable:
            with st.spinner(f"Generating with {c.label} ({steps[c.uri]} steps)…"):
                try:
                    results.append(generate_sample(loaded[c.uri], c.label, c.uri, conditions, names, steps[c.uri],
                                                   seed, guidance))
                except Exception as exc:  # one model's failure leaves the others' images
                    traceback.print_exc()
                    results.append((c.label, _message(exc)))
        st.session_state["results"] = results
    show_results(st.session_state.get("results", []))


def show_results(results: list) -> None:
    """One column per model, one row per condition, so images of the same condition and seed line up."""
    if not results:
        return
    st.subheader("Results")
    for col, res in zip(st.columns(len(results)), results, strict=True):
        if isinstance(res, tuple):
            col.error(f"{res[0]} failed: {res[1]}")
        else:
            col.markdown(f"**{res.label}**  \n{res.summary}")
            col.caption(res.timing_note)
    rows = max((len(r.images) for r in results if isinstance(r, Sample)), default=0)
    for i in range(rows):
        for col, res in zip(st.columns(len(results)), results, strict=True):
            if isinstance(res, Sample) and i < len(res.images):
                col.image(res.images[i], caption=res.caption(i), width=res.images[i].width)


def metrics_tab(family: str, catalog: Catalog) -> None:
    infos = [i for name in catalog.models(family) for i in catalog.versions.get(name, [])]
    if not infos:
        st.info(f"No registered {family} versions, so no metrics yet: `distill rf pipeline` trains, evaluates and "
                "registers a teacher and its students.")
        return
    rows = [{k: _fmt(v) for k, v in r.items()} for r in compare_rows(infos)]
    st.subheader(f"Evaluated versions ({family})")
    st.table(pd.DataFrame(rows).set_index("model"))
    protos, unreadable = protocol_groups(infos)
    for p, members in protos.items():
        st.caption(f"protocol ({', '.join(members)}): {p}")
    for member in unreadable:
        st.caption(f"{member}: protocol unreadable (malformed eval.protocol tag; re-evaluate it)")
    if len(protos) > 1:
        st.warning("These versions were evaluated under different protocols: their FIDs are not comparable.")
    run_id = latest_eval_run(infos)
    if run_id is None:
        st.info("No evaluation run yet: `distill eval benchmark --teacher models:/NAME@champion "
                "--generators models:/NAME@champion` stamps metrics and plots on the versions.")
        return
    plots = plots_cached(run_id)
    st.subheader("Latest evaluation plots")
    st.caption(f"evaluation run {run_id}")
    if not plots:
        st.info(f"The evaluation run {run_id} logged no plots.")
        return
    for col, path in zip(st.columns(len(plots)), plots, strict=True):
        col.image(path, caption=Path(path).stem.replace("_", " "))


def main() -> None:
    st.set_page_config(page_title="distill ui", layout="wide")
    st.title("Teachers and students, side by side")
    uri = tracking.tracking_uri()
    st.caption(f"Registry: `{uri}`")
    try:
        catalog = catalog_cached(uri)
    except DistillError as exc:  # e.g. no store yet: the shipped generators still work
        st.warning(str(exc))
        catalog = shipped_catalog()
    if not catalog.families:
        st.info("No registered generators in this registry yet. Train and register some (e.g. `distill rf pipeline`), "
                "or point MLFLOW_TRACKING_URI at another store.")
        st.stop()
    if catalog.shipped_only:
        st.info("Nothing registered in this registry yet: showing the generators shipped with the installed "
                "packages (`reference` is the CIFAR-10 teacher). `distill rf pipeline` trains and registers students "
                "to compare with it.")
    family, chosen, device = sidebar(catalog)
    gen_tab, metrics = st.tabs(["Generate", "Metrics"])
    with gen_tab:
        generate_tab(family, chosen, device)
    with metrics:
        metrics_tab(family, catalog)


main()
