"""`surfdiff serve` end to end: local Prefect server + process pool + deployments + worker, driven from a
headless Chromium that logs in with the API password: Quick run of the rss deployment (on a tiny temporary
config and store), then the finished run and its artifacts on the flow-run and artifacts pages; a Custom run
edited in the typed study form. Also: the API refuses requests without the password, and a serve killed with
SIGKILL leaves no server, worker or busy port behind."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

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
FLOWS = ("active-learning/demo", "baseline/demo", "discovery/demo", "evaluate/demo", "relax/demo", "rss/demo",
         "sample/demo", "train/demo")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("serve")
    (d / "run").mkdir()
    (d / "tiny.yaml").write_text(TINY_CONFIG.replace("STORE", str(d / "run" / "store")))
    return d


@pytest.fixture(scope="module")
def stack(workdir):
    from deploy.processes import free_port
    from deploy.serve import start_serve

    handles = start_serve(
        port=free_port(), prefect_home=workdir / "prefect", poll_seconds=2, health_timeout=240,
        extra_env={"SURFDIFF_CACHE_DIR": str(workdir / "cache"), "OMP_NUM_THREADS": "1"}, log=lambda _m: None)
    pids = [p.pid for p in handles.processes] + [handles.guard.pid]
    try:
        yield handles
    finally:
        handles.stop()
        for pid in pids:  # nothing of the stack outlives it
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert not (handles.home / "serve.pids").exists()


def _client(handles):
    return handles.client()


def _tiny_study(workdir: Path, store: Path) -> dict:
    from surfdiff_core.config import config_from_dict

    return config_from_dict(yaml.safe_load(TINY_CONFIG.replace("STORE", str(store)))).model_dump(mode="json")


def _api_status(url: str, auth: str | None, method: str = "POST") -> int:
    """HTTP status of one API call, with the password given as basic auth (or none)."""
    req = urllib.request.Request(url, data=b"{}" if method == "POST" else None, method=method,
                                 headers={"Content-Type": "application/json"})
    if auth is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_api_password_is_generated_once_0600_and_the_environment_wins(tmp_path, monkeypatch):
    from deploy.auth import AUTH_ENV, resolve_auth

    monkeypatch.delenv(AUTH_ENV, raising=False)
    first = resolve_auth(tmp_path)
    assert first.startswith("surfdiff:") and len(first) > 40
    assert (tmp_path / "api-auth").stat().st_mode & 0o777 == 0o600
    assert resolve_auth(tmp_path) == first  # stable across restarts
    monkeypatch.setenv(AUTH_ENV, "alice:from-the-environment")
    assert resolve_auth(tmp_path) == "alice:from-the-environment"


def test_stale_children_of_an_earlier_serve_are_stopped(tmp_path):
    """serve.pids of a hard-killed serve: its children are stopped, a reused pid (other start time) is not."""
    from deploy.processes import PIDS_FILE, _start_time, clean_stale
    from surfdiff_core.errors import ConfigError
    from surfdiff_core.lifetime import pid_alive as _alive

    stale = subprocess.Popen(["sleep", "60"], start_new_session=True)
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        pids = {"serve": {"pid": 999_999_999, "start": 1},  # long gone
                "server": {"pid": stale.pid, "start": _start_time(stale.pid)},
                "worker": {"pid": bystander.pid, "start": (_start_time(bystander.pid) or 0) + 1}}
        (tmp_path / PIDS_FILE).write_text(json.dumps(pids))
        assert clean_stale(tmp_path, log=lambda _m: None) == 1
        stale.wait(timeout=10)
        assert not _alive(stale.pid) and _alive(bystander.pid)
        assert not (tmp_path / PIDS_FILE).exists()
        # A serve that still runs on this home is not touched: the second one refuses to start.
        pids["serve"] = {"pid": bystander.pid, "start": _start_time(bystander.pid)}
        (tmp_path / PIDS_FILE).write_text(json.dumps(pids))
        with pytest.raises(ConfigError, match=f"another surfdiff serve \\(pid {bystander.pid}\\)"):
            clean_stale(tmp_path, log=lambda _m: None)
        assert _alive(bystander.pid)
    finally:
        for p in (stale, bystander):
            p.kill()
            p.wait()


def test_an_explicit_config_path_wins_over_the_default_study(workdir):
    from flows.common import resolve_study
    from surfdiff_core.config import load_config

    demo = load_config(ROOT / "configs" / "demo.yaml")
    assert resolve_study(demo, str(workdir / "tiny.yaml")).name == "serve-test"
    assert resolve_study(demo.model_dump(mode="json"), None).name == demo.name  # the form's JSON value


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

    assert set(FLOWS) <= set(list_deployments(stack.api_url, stack.auth))
    with _client(stack) as c:
        pool = c.read_work_pool(stack.pool)
        assert pool.type == "process"
        dep = c.read_deployment_by_name("rss/demo")
    assert dep.work_pool_name == stack.pool
    # The UI's run form is the typed study of configs/demo.yaml (expanded at deploy time) ...
    from surfdiff_core.config import load_config

    assert dep.parameters == {"study": load_config(ROOT / "configs" / "demo.yaml").model_dump(mode="json")}
    schema = dep.parameter_openapi_schema
    defs = schema["definitions"]
    assert {"$ref": "#/definitions/SurfdiffConfig"} in schema["properties"]["study"]["anyOf"]
    assert {"substrate", "oracle", "rss", "sample", "train", "relax", "store"} <= set(
        defs["SurfdiffConfig"]["properties"])
    assert {"Ag", "Cu", "O", "Pt"} <= set(defs["SubstrateConfig"]["properties"]["element"]["enum"])
    assert defs["SubstrateConfig"]["properties"]["facet"]["enum"] == ["fcc111", "fcc100", "fcc110", "hcp0001"]
    assert "emt" in defs["OracleConfig"]["properties"]["name"]["enum"]
    assert {"cell", "compositions", "n"} <= set(defs["RSSConfig"]["properties"])
    assert {"targets", "n", "guidance", "eta_dt"} <= set(defs["SampleConfig"]["properties"])
    # ... and a config path is still accepted.
    assert "config_path" in schema["properties"]
    # flow runs start in the checkout, so configs/ and flows/ resolve
    assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(stack.root)}}]
    assert stack.worker is not None and stack.failed() is None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_sweep_study_runs_from_the_discovery_deployment(stack, workdir):
    """The run form submits the edited study as JSON: a sweep (one cell given as a matrix, two compositions)
    passes the server's check against the typed schema, and the worker runs the whole discovery flow on it."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from surfdiff_core.config import config_from_dict
    from surfdiff_core.stages.common import open_study_store
    from tests.conftest import TINY_CONFIG as STUDY

    store = workdir / "sweep" / "store"
    text = STUDY.replace("STORE", str(store)).replace("name: tiny", "name: serve-sweep").replace(
        'targets: [{cell: "p(3x3)", composition: Ag2O1}]',
        'sweep: {cells: ["p(2x2)", [[2, 1], [0, 2]]], compositions: [Ag1O1, Ag2O1]}\n  share_batches: true')
    study = config_from_dict(yaml.safe_load(text))
    assert study.sample.sweep is not None and not study.sample.targets
    with _client(stack) as c:
        dep = c.read_deployment_by_name("discovery/demo")
        run = c.create_flow_run_from_deployment(dep.id, parameters={"study": study.model_dump(mode="json")})
        deadline = time.monotonic() + 800
        while time.monotonic() < deadline:
            (run,) = c.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
            if run.state is not None and run.state.is_final():
                break
            time.sleep(2)
    worker_log = (stack.home / "logs" / "worker.log").read_text()[-3000:]
    assert run.state is not None and run.state.is_completed(), f"{run.state}; worker log:\n{worker_log}"
    with open_study_store(study) as results:
        generated = results.find_raw({"study": "serve-sweep", "source": "generated"},
                                     properties=["composition", "cell"])
        evaluated = results.count({"study": "serve-sweep", "source": "relaxed", "meta.purpose": "evaluate"})
    assert {(g["composition"], g["cell"]) for g in generated} == {
        (comp, cell) for comp in ("Ag1O1", "Ag2O1") for cell in ("p(2x2)", "[[2,1],[0,2]]")}
    assert evaluated >= 4  # at least one oracle relaxation per target


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_api_refuses_requests_without_the_password(stack):
    from deploy.auth import AUTH_FILE

    url = f"{stack.api_url}/deployments/filter"
    assert _api_status(url, None) == 401
    assert _api_status(url, "surfdiff:wrong") == 401
    assert _api_status(url, stack.auth) == 200
    assert _api_status(f"{stack.api_url}/health", None, method="GET") == 200  # liveness probes stay open
    if not os.environ.get("SURFDIFF_PREFECT_AUTH"):
        assert (stack.home / AUTH_FILE).stat().st_mode & 0o777 == 0o600
    for log in (stack.home / "logs").glob("*.log"):  # the password is never logged
        assert stack.auth.split(":", 1)[1] not in log.read_text(errors="replace"), log
    assert stack.auth not in repr(stack)


def _reader(stream) -> list[str]:
    """Lines of `stream`, collected by a thread (so waiting for one never blocks the test)."""
    lines: list[str] = []

    def pump() -> None:
        for line in stream:
            lines.append(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_serve_killed_hard_leaves_nothing_running(tmp_path):
    """SIGKILL of `surfdiff serve`: server, worker and guard are gone within seconds, the port is free, and
    the next serve on the same Prefect home starts."""
    from deploy.processes import PIDS_FILE, free_port
    from deploy.processes import port_free as _port_free
    from surfdiff_core.lifetime import pid_alive as _alive

    port, home = free_port(), tmp_path / "prefect"
    cmd = [sys.executable, "-m", "flows.cli", "serve", "--port", str(port), "--prefect-home", str(home)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SURFDIFF_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("SURFDIFF_PREFECT_AUTH", None)
    serve = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        out = _reader(serve.stdout)
        deadline = time.monotonic() + 300
        while not any("Ctrl-C stops" in line for line in out):
            assert serve.poll() is None and time.monotonic() < deadline, "".join(out)
            time.sleep(0.5)
        children = {name: e["pid"] for name, e in json.loads((home / PIDS_FILE).read_text()).items()
                    if name != "serve"}
        assert set(children) == {"guard", "server", "worker"}
        assert all(_alive(pid) for pid in children.values())
        assert not _port_free(port)

        os.kill(serve.pid, signal.SIGKILL)
        serve.wait(timeout=10)
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in children.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [name for name, pid in children.items() if _alive(pid)], children
        assert _port_free(port)
        secret = (home / "api-auth").read_text().strip()
        assert secret.split(":", 1)[1] not in "".join(out)  # never printed
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait()

    again = subprocess.run([*cmd, "--check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.strip().splitlines()[-1].startswith(f"ok: server http://127.0.0.1:{port}")


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


def _login(driver, handles, workdir: Path) -> None:
    """The UI asks for the API password on first contact; enter it (kept in the browser's localStorage)."""
    driver.get(f"{handles.url}/deployments")
    field = _wait(driver, lambda d: d.find_elements("css selector", "input[type=password]"), 90, "the login page")
    _screenshot(driver, workdir, "0-login")
    field[0].send_keys(handles.auth)
    _wait(driver, lambda d: [b for b in d.find_elements("tag name", "button") if b.text.strip() == "Login"], 10,
          "the Login button")[0].click()
    _wait(driver, lambda d: "/login" not in d.current_url, 60, "the UI after logging in")


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
    _login(d, stack, workdir)
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


def _form_property(scope, label: str):
    """One field of Prefect's schema form: the property block whose label reads `label` (e.g. 'N (Optional)'),
    searched below `scope` so that rss.n and sample.n are told apart."""
    return scope.find_element(
        "xpath", ".//div[contains(@class,'schema-form-property')][./div[contains(@class,'p-label__header')]"
                 f"//span[contains(@class,'schema-form-property__label') and normalize-space(.)='{label}']]")


def _type_into(driver, field, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", field)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(text)
    field.send_keys(Keys.TAB)  # leave the field, so the form commits its value before the submit


def _click_submit(driver) -> None:
    submit = [b for b in driver.find_elements("tag name", "button") if b.text.strip() == "Submit"][-1]
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'}); arguments[0].click();", submit)


def _form_errors(driver) -> list[str]:
    """Texts of the error messages and toasts on the page (what the UI said when a submit did nothing)."""
    found = driver.find_elements("xpath", "//*[contains(@class,'error') or contains(@class,'toast')]")
    return [t for t in (e.text.strip() for e in found) if t][:10]


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.timeout(900)
def test_custom_run_edits_the_typed_study_form(stack, browser, workdir):
    """Run -> Custom run: change rss.compositions[0] and rss.n in the typed form, submit; the run uses them."""
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from surfdiff_core.config import config_from_dict
    from surfdiff_core.stages.common import open_study_store

    store = workdir / "custom" / "store"
    with _client(stack) as c:  # defaults: the tiny study on a store of its own (the form is prefilled with it)
        dep = c.read_deployment_by_name("rss/demo")
        c.update_deployment(dep.id, DeploymentUpdate(parameters={"study": _tiny_study(workdir, store)}))
        only_rss = DeploymentFilter(id=DeploymentFilterId(any_=[dep.id]))
        earlier = {r.id for r in c.read_flow_runs(deployment_filter=only_rss)}

    d = browser
    _login(d, stack, workdir)
    d.get(f"{stack.url}/deployments/deployment/{dep.id}")
    _wait(d, lambda d: _by_text(d, "Run"), 60, "the Run button")[0].click()
    _wait(d, lambda d: _by_text(d, "Custom run"), 30, "the Custom run menu item")[0].click()
    rss = _wait(d, lambda d: _form_property(d, "Rss (Optional)"), 60, "the rss section of the study form")
    _screenshot(d, workdir, "6-custom-run-form")
    # The typed form: substrate element, facet and oracle name are choices, prefilled from the study.
    substrate = _form_property(d, "Substrate (Optional)")
    element = _form_property(substrate, "Element (Optional)").find_element("tag name", "select")
    assert element.get_attribute("value") == "Ag" and len(element.find_elements("tag name", "option")) > 90
    facets = _form_property(substrate, "Facet (Optional)").find_elements("tag name", "option")
    assert [o.text for o in facets] == ["fcc111", "fcc100", "fcc110", "hcp0001"]
    oracle = _form_property(_form_property(d, "Oracle (Optional)"), "Name (Optional)")
    assert oracle.find_element("tag name", "select").get_attribute("value") == "emt"

    compositions = _form_property(rss, "Compositions (Optional)").find_elements("tag name", "textarea")
    assert [t.get_attribute("value") for t in compositions] == ["Ag1O1"]
    size = _form_property(rss, "N (Optional)").find_element("tag name", "input")
    assert size.get_attribute("value") == "2"
    _type_into(d, compositions[0], "Ag1O2")
    _type_into(d, size, "3")
    _wait(d, lambda d: compositions[0].get_attribute("value") == "Ag1O2" and size.get_attribute("value") == "3",
          10, "the edited fields")
    _screenshot(d, workdir, "7-custom-run-edited")

    def new_run(_d):
        with _client(stack) as c:
            return [r for r in c.read_flow_runs(deployment_filter=only_rss) if r.id not in earlier]

    # On a loaded 2-core CI machine the first click can land while the form is still settling (its values are
    # validated on the server before the run is created): click again if no run appears, at most three times.
    for attempt in range(3):
        _click_submit(d)
        try:
            run = _wait(d, new_run, 40, "the custom run")[0]
            break
        except AssertionError:
            if attempt == 2:
                raise AssertionError(f"no run after 3 submits; form errors: {_form_errors(d)}") from None
    _screenshot(d, workdir, "8-custom-run-submitted")

    def finished(_d):
        with _client(stack) as c:
            r = c.read_flow_run(run.id)
        return r if r.state is not None and r.state.is_final() else None

    run = _wait(d, finished, 300, "the custom run to finish", poll=2.0)
    worker_log = (stack.home / "logs" / "worker.log").read_text()[-3000:]
    assert run.state.is_completed(), f"custom run ended {run.state.name}; worker log:\n{worker_log}"
    study = run.parameters["study"]
    assert study["rss"]["compositions"] == ["Ag1O2"] and study["rss"]["n"] == 3
    assert run.parameters.get("config_path") is None  # the form's study ran, not a config file
    with open_study_store(config_from_dict(study)) as results:
        docs = list(results.find({"study": "serve-test", "source": "rss"}))
    assert len(docs) == 3 and {doc.composition for doc in docs} == {"Ag1O2"}
