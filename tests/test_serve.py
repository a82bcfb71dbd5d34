"""`surfdiff serve` end to end: local Prefect server + process pool + deployments + worker, driven from a
headless Chromium: Quick run of the rss deployment (on a tiny temporary config and store) from the UI,
then the finished run and its artifacts seen on the flow-run and artifacts pages."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TINY_CONFIG = """\
name: serve-test
substrate: {element: Ag, facet: fcc111, lattice_constant: 4.09, layers: 2, fixed_layers: 1, vacuum: 8.0}
oracle: {name: emt}
rss: {cell: "p(2x2)", compositions: [Ag1O1], n: 2, seed: 0, fmax: 0.2, steps: 30, workers: 1}
store: {backend: monty, path: STORE}
"""
FLOWS = ("discovery/demo", "relax/demo", "rss/demo", "sample/demo", "train/demo")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("serve")
    (d / "run").mkdir()
    (d / "tiny.yaml").write_text(TINY_CONFIG.replace("STORE", str(d / "run" / "store")))
    return d


@pytest.fixture(scope="module")
def stack(workdir):
    from deploy.serve import free_port, start_serve

    handles = start_serve(
        port=free_port(), prefect_home=workdir / "prefect", poll_seconds=2, health_timeout=240,
        extra_env={"SURFDIFF_CACHE_DIR": str(workdir / "cache"), "OMP_NUM_THREADS": "1"}, log=lambda _m: None)
    pids = [p.pid for p in handles.processes]
    try:
        yield handles
    finally:
        handles.stop()
        for pid in pids:  # nothing of the stack outlives it
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


def _client(handles):
    from deploy.serve import _client as client

    return client(handles.api_url)


def test_serve_refuses_a_busy_port(tmp_path):
    """A user error, one line, exit 2, before anything starts (run as the console script would)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "flows.cli", "serve", "--port", str(port), "--prefect-home",
                            str(tmp_path / "prefect")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"surfdiff serve: error: port {port} on 127.0.0.1 is in use (another Prefect server?): pass --port"]
    assert not (tmp_path / "prefect" / "prefect.db").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_deployments_registered(stack):
    from deploy.serve import list_deployments

    assert set(FLOWS) <= set(list_deployments(stack.api_url))
    with _client(stack) as c:
        pool = c.read_work_pool(stack.pool)
        assert pool.type == "process"
        dep = c.read_deployment_by_name("rss/demo")
    assert dep.work_pool_name == stack.pool
    assert dep.parameters == {"config_path": "configs/demo.yaml"}
    # flow runs start in the checkout, so configs/ and flows/ resolve
    assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(stack.root)}}]
    assert stack.worker is not None and stack.failed() is None


@pytest.fixture
def browser(workdir):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(f"needs Debian chromium + chromium-driver ({CHROMIUM}, {CHROMEDRIVER})")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (dev extra)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = workdir / "chromium-profile"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1400,1000", f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait(driver, predicate, timeout: float, what: str, poll: float = 0.5):
    from selenium.common.exceptions import WebDriverException

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if result := predicate(driver):
                return result
        except WebDriverException:
            pass  # the page is re-rendering
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; page text:\n"
                         f"{driver.find_element('tag name', 'body').text[:2000]}")


def _by_text(driver, text: str):
    """Innermost elements whose whole visible text is `text` (buttons, tabs, menu items)."""
    return driver.find_elements("xpath", f"//*[normalize-space(.)='{text}' and not(*[normalize-space(.)='{text}'])]")


def _screenshot(driver, workdir: Path, name: str) -> Path:
    path = workdir / f"{name}.png"
    driver.save_screenshot(str(path))
    if out := os.environ.get("SURFDIFF_TEST_SCREENSHOTS"):  # keep them for a human to look at
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(out) / path.name)
    return path


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.timeout(900)
def test_quick_run_from_the_ui(stack, browser, workdir):
    from prefect.client.schemas.actions import DeploymentUpdate

    # Quick run uses the deployment's defaults: point them at the tiny config and a temporary store.
    params = {"config_path": str(workdir / "tiny.yaml"), "n": 2, "store_path": str(workdir / "run" / "store")}
    with _client(stack) as c:
        dep = c.read_deployment_by_name("rss/demo")
        c.update_deployment(dep.id, DeploymentUpdate(parameters=params))

    d = browser
    d.get(f"{stack.url}/deployments")
    row = _wait(d, lambda d: [a for a in d.find_elements("tag name", "a")
                              if str(dep.id) in (a.get_attribute("href") or "")], 90, "the rss deployment")
    assert all(name in d.find_element("tag name", "body").text for name in ("rss", "train", "sample", "discovery"))
    _screenshot(d, workdir, "1-deployments")
    row[0].click()

    _wait(d, lambda d: _by_text(d, "Run"), 60, "the Run button")[0].click()
    _wait(d, lambda d: _by_text(d, "Quick run"), 30, "the Quick run menu item")[0].click()
    link = _wait(d, lambda d: [a.get_attribute("href") for a in d.find_elements("tag name", "a")
                               if "/runs/flow-run/" in (a.get_attribute("href") or "")], 60, "the new run's link")[0]
    run_id = link.rstrip("/").rsplit("/", 1)[-1]
    _screenshot(d, workdir, "2-quick-run")

    # The worker picks the run up (poll every 2 s) and runs the flow in the checkout; follow it in the UI.
    d.get(link)

    def final_state(d):
        text = d.find_element("tag name", "body").text
        for state in ("Completed", "Failed", "Crashed", "Cancelled"):
            if f"\n{state}\n" in f"\n{text}\n":
                return state
        if int(time.monotonic()) % 10 == 0:
            d.refresh()
        return None

    state = _wait(d, final_state, 300, "the flow run to finish", poll=1.0)
    _screenshot(d, workdir, "3-flow-run")
    worker_log = (stack.home / "logs" / "worker.log").read_text()[-3000:]
    assert state == "Completed", f"flow run ended {state}; worker log:\n{worker_log}"

    _wait(d, lambda d: _by_text(d, "Artifacts"), 30, "the Artifacts tab")[-1].click()
    keys = ("serve-test-rss-training-data-best", "serve-test-rss-training-data-report")
    _wait(d, lambda d: all(k in d.find_element("tag name", "body").text for k in keys), 60, "the run's artifacts")
    _screenshot(d, workdir, "4-run-artifacts")

    d.get(f"{stack.url}/artifacts")
    _wait(d, lambda d: all(k in d.find_element("tag name", "body").text for k in keys), 60, "the artifacts page")
    shot = _screenshot(d, workdir, "5-artifacts")
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank one

    # The same facts through the API: state, artifacts of this run, structures in the temporary store.
    with _client(stack) as c:
        run = c.read_flow_run(run_id)
        assert run.state is not None and run.state.is_completed()
        assert run.deployment_id == dep.id and run.parameters["n"] == 2
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        arts = c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    assert {a.key for a in arts} >= set(keys)
    assert {a.type for a in arts} >= {"table", "markdown"}
    assert (workdir / "run" / "store").exists() and (workdir / "run" / "figures").is_dir()
