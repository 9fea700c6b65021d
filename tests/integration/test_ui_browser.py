"""`distill ui` end to end: a registry with rf_cifar teacher and students, the page as a subprocess, headless Chromium.

The generators are real rf_cifar folders (its UNet at a tiny width, written by its own ``save_generator``,
loaded in the page process through the ``distill.generators`` entry point); the challenger version's
folder lacks its weights, so the page must show that model's load error and keep the others usable.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from rf_fixtures import tiny_rf_generator

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
DISTILL = Path(sys.executable).with_name("distill")  # the console script of this environment
FAMILY = "rf_cifar"
TEACHER, STUDENT = "rf_cifar-teacher", "rf_cifar-student"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc: subprocess.Popen) -> None:
    """Stop the page server by its PID (its own process group, so streamlit's children go too)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def log_plots(run, folder: Path) -> None:
    """The two plots an evaluation run logs under ``plots/``, drawn by distill_eval from a few rows."""
    from distill_eval.plots import plot_quality_vs_latency, plot_quality_vs_steps

    rows = [{"model": "student", "steps": s, "fid": 80.0 / s, "ms_per_image": 2.0 * s} for s in (1, 2, 4)]
    for plot, fn in ((plot_quality_vs_steps, "fid_vs_steps.png"), (plot_quality_vs_latency, "fid_vs_latency.png")):
        run.log_artifact(plot(rows, "fid", folder / fn), "plots")
    (folder / "benchmark.md").write_text("| model | fid |\n")  # a report beside them: not a plot
    run.log_artifact(folder / "benchmark.md", "report")


@pytest.fixture
def ui_registry(tmp_path: Path, mlflow_uri: str) -> dict[str, str]:
    """Teacher v1 (champion); student v1 (champion, evaluated) and v2 (challenger, its weights missing)."""
    from distill_common import tracking

    def log(folder: Path) -> str:
        with tracking.start_run("ui-test", folder.name) as run:
            return tracking.log_generator_model(run, folder)

    gens = tmp_path / "generators"
    teacher = tiny_rf_generator(gens / "teacher", "teacher", default_steps=8, seed=0)
    student = tiny_rf_generator(gens / "student", "four_step", default_steps=4, seed=1)
    broken = gens / "broken"
    broken.mkdir(parents=True)
    manifest = json.loads((student / "generator.json").read_text())
    (broken / "generator.json").write_text(json.dumps(manifest))  # an rf_cifar manifest without its weights
    t = tracking.register_model(log(teacher), TEACHER, tags={"role": "teacher"})
    tracking.set_alias(TEACHER, "champion", t)
    s1 = tracking.register_model(log(student), STUDENT, tags={"role": "student"})
    s2 = tracking.register_model(log(broken), STUDENT, tags={"role": "student"})
    tracking.set_alias(STUDENT, "champion", s1)
    tracking.set_alias(STUDENT, "challenger", s2)
    with tracking.start_run("eval", "benchmark") as run:
        log_plots(run, tmp_path / "evalrun")
        eval_run = run.run_id
    tracking.set_version_tags(STUDENT, s1, {"eval.s1.fid": 80.0, "eval.s2.fid": 40.0, "eval.s1.ms_per_image": 2.0,
                                            "eval.s2.ms_per_image": 4.0, "eval.run_id": eval_run})
    return {"uri": mlflow_uri, "eval_run": eval_run}


@pytest.mark.slow
def test_catalog_groups_versions_by_family_and_role(ui_registry):
    from distill_common.ui.catalog import build_catalog, compare_rows, eval_plots, latest_eval_run

    cat = build_catalog()
    assert cat.families == [FAMILY]  # from the registered names' prefix: these versions carry no family tag
    teachers = [c.label for c in cat.of_role(FAMILY, "teacher")]
    students = [c.label for c in cat.of_role(FAMILY, "student")]
    assert teachers == [f"{TEACHER}@champion (v1)", f"{TEACHER} v1"]
    assert students == [f"{STUDENT}@challenger (v2)", f"{STUDENT}@champion (v1)", f"{STUDENT} v2", f"{STUDENT} v1"]
    assert cat.of_role(FAMILY, "student")[1].uri == f"models:/{STUDENT}@champion"
    rows = compare_rows(cat.versions[STUDENT])
    assert [(r["version"], r["steps"], r["FID"]) for r in rows] == [("1", 1, 80.0), ("1", 2, 40.0), ("2", None, None)]
    infos = cat.versions[STUDENT] + cat.versions[TEACHER]
    assert latest_eval_run(infos) == ui_registry["eval_run"]
    assert [p.name for p in eval_plots(ui_registry["eval_run"])] == ["fid_vs_latency.png", "fid_vs_steps.png"]


def test_family_from_name_prefix_and_role_from_suffix():
    from distill_common.ui.catalog import family_of, role_of

    fams = ["sd_student_prune", "lora_flash", "rf_cifar"]
    assert family_of("rf_cifar-student", {}, fams) == "rf_cifar"
    assert family_of("rf-cifar-teacher", {}, fams) == "rf_cifar"
    assert family_of("whatever", {"family": "lora_flash"}, fams) == "lora_flash"
    assert family_of("my-model", {}, fams) == "other"
    assert role_of("rf_cifar-teacher", {}) == "teacher"
    assert role_of("rf_cifar-teacher", {"role": "student"}) == "student"
    assert role_of("rf_cifar-onestep", {}) == "student"


def test_ui_command_rejects_a_bad_port():
    out = subprocess.run([str(DISTILL), "ui", "--port", "70000"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "--port 70000 is not a TCP port" in out.stderr


# ---------------------------------------------------------------- the browser test


def _chrome(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1400,1100"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the page server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"the page server did not answer in {timeout}s:\n{log.read_text()[-3000:]}")


def _choose(driver, wait, label: str, option: str) -> None:
    """Pick ``option`` in the select box or multiselect labelled ``label`` (a combobox input): type, then click."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC

    box = wait.until(EC.element_to_be_clickable((By.XPATH, f"//input[@role='combobox'][@aria-label='{label}']")))
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(option)
    wait.until(EC.element_to_be_clickable((By.XPATH, f"//*[@role='option'][normalize-space()='{option}']"))).click()
    if box.get_attribute("aria-expanded") == "true":  # a multiselect keeps its list open
        box.send_keys(Keys.ESCAPE)


def _set_number(driver, wait, label: str, value: int) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC

    xpath = f"//input[@type='number'][@aria-label='{label}']"
    field = wait.until(EC.element_to_be_clickable((By.XPATH, xpath)))
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(str(value), Keys.ENTER)
    wait.until(lambda d: d.find_element(By.XPATH, xpath).get_attribute("value") == str(value))


def _screenshot(driver, path: Path) -> None:
    """The whole page: grow the window to the main area's scroll height, then take the screenshot."""
    height = driver.execute_script(
        "return Math.max(...[...document.querySelectorAll('[data-testid=stMain], section, body')]"
        ".map(e => e.scrollHeight))")
    driver.set_window_size(1400, min(int(height) + 120, 4000))
    time.sleep(0.5)  # let the layout settle at the new size
    driver.save_screenshot(str(path))


def _settled(driver) -> bool:
    """No script run in progress (Streamlit shows its 'Running…' widget while the page re-runs)."""
    from selenium.webdriver.common.by import By

    return not driver.find_elements(By.CSS_SELECTOR, "[data-testid='stStatusWidget'] *")


@pytest.mark.slow
def test_page_generates_side_by_side_in_headless_chromium(ui_registry, tmp_path: Path):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI must run the browser test: install Debian's chromium and chromium-driver (.ci/run does)")
        pytest.skip("Debian chromium/chromium-driver not installed (apt-get install chromium chromium-driver)")
    pytest.importorskip("streamlit")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=ui_registry["uri"], HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1")
    log = tmp_path / "streamlit.log"
    with log.open("w") as fh:
        # `distill ui` runs streamlit as its child; both share a new process group, stopped together below.
        proc = subprocess.Popen([str(DISTILL), "ui", "--port", str(port), "--host", "127.0.0.1"], env=env, stdout=fh,
                                stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    driver = None
    shot = tmp_path / "ui.png"
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(url, proc, log)
        driver = _chrome(tmp_path / "chrome-profile")
        wait = WebDriverWait(driver, 60, poll_frequency=0.2)
        driver.get(url)
        # The first run of the page imports torch and mlflow: allow for it once.
        teacher = WebDriverWait(driver, 90, poll_frequency=0.3).until(
            EC.element_to_be_clickable((By.XPATH, "//input[@role='combobox'][@aria-label='Teacher']")))
        # Preselected: the teacher's and the student's champions. Add the student's v2 (it cannot load).
        assert teacher.get_attribute("value") == f"{TEACHER}@champion (v1)"
        assert driver.find_elements(By.XPATH, f"//span[@data-tag][@aria-label='{STUDENT}@champion (v1)']")
        _choose(driver, wait, "Students", f"{STUDENT} v2")
        # v2's folder has no weights: rf_cifar's loader error shows, the other models stay usable.
        err = wait.until(EC.presence_of_element_located(
            (By.XPATH, f"//*[@data-testid='stAlert'][contains(., 'Could not load {STUDENT} v2')]")))
        assert "model_config.json" in err.text
        _choose(driver, wait, "Classes (one image each)", "ship")
        _set_number(driver, wait, f"{TEACHER}@champion (v1)", 6)
        _set_number(driver, wait, f"{STUDENT}@champion (v1)", 1)
        wait.until(_settled)
        wait.until(EC.element_to_be_clickable((By.XPATH, "//button[.//*[normalize-space()='Generate']]"))).click()
        captions_xpath = "//*[@data-testid='stImageCaption'][contains(., 'ms/image')]"
        wait.until(lambda d: len(d.find_elements(By.XPATH, captions_xpath)) >= 6)
        wait.until(_settled)
        captions = [e.text for e in driver.find_elements(By.XPATH, captions_xpath)]
        assert len(captions) == 6, captions  # 2 loadable models x 3 classes; the broken one adds none
        for model, steps, n in ((f"{TEACHER}@champion (v1)", 6, 3), (f"{STUDENT}@champion (v1)", 1, 3)):
            mine = [c for c in captions if c.startswith(model)]
            assert len(mine) == n, captions
            assert all(f"· {steps} step{'s' if steps > 1 else ''} ·" in c for c in mine), mine
            assert [c.rsplit("· ", 1)[1] for c in mine] == ["airplane", "cat", "ship"]
            for c in mine:
                ms = float(c.split(" · ")[2].split(" ms/image")[0])
                assert ms > 0
        images = driver.find_elements(By.XPATH, "//*[@data-testid='stImage'][.//*[contains(., 'ms/image')]]//img")
        assert len(images) == 6
        # Every image decoded in the browser, enlarged from 32 px for display.
        wait.until(lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)
                                 for i in images))
        assert {driver.execute_script("return arguments[0].naturalWidth", i) for i in images} == {192}
        _screenshot(driver, shot)
        # The metrics tab: the registry compare table and the evaluation run's plots.
        driver.find_element(By.XPATH, "//*[@role='tab'][normalize-space()='Metrics']").click()
        table = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, "[data-testid='stTable'] table")))
        assert "80" in table.text and "40" in table.text and STUDENT in table.text
        plot_caps = wait.until(lambda d: [e.text for e in d.find_elements(
            By.XPATH, "//*[@data-testid='stImageCaption'][contains(., 'fid vs')]") if e.is_displayed()] or None)
        assert sorted(plot_caps) == ["fid vs latency", "fid vs steps"]
        _screenshot(driver, tmp_path / "ui-metrics.png")
    except Exception:
        if driver is not None:  # what the page showed when it went wrong, for the test artifacts
            _screenshot(driver, tmp_path / "ui-failure.png")
            _keep_artifacts(tmp_path / "ui-failure.png")
        raise
    finally:
        if driver is not None:
            driver.quit()
        stop_process_group(proc)
    assert proc.poll() is not None, "the page server is still running after being stopped by its PID"
    deadline = time.time() + 15  # streamlit, a child in the same group, may take a moment to close its socket
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                break
        assert time.time() < deadline, "streamlit still listens 15 s after its process group was stopped"
        time.sleep(0.5)
    assert shot.stat().st_size > 10_000
    _keep_artifacts(shot, tmp_path / "ui-metrics.png")


def _keep_artifacts(*paths: Path) -> None:
    """Copy screenshots to $DISTILL_TEST_ARTIFACTS (e.g. test-artifacts/ui.png) when it is set."""
    folder = os.environ.get("DISTILL_TEST_ARTIFACTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        for p in paths:
            shutil.copy(p, Path(folder) / p.name)
