from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(autouse=True)
def fresh_memory_stores():
    """The memory backend lives for one process; each test starts with none."""
    from surfdiff_core.store import results

    results._MEMORY_STORES.clear()
    yield
    results._MEMORY_STORES.clear()


@pytest.fixture(autouse=True)
def fresh_systems():
    """Systems are built once per process (surfdiff_core.system_build); each test builds its own, so a lattice
    cache or an oracle registered by one test is not carried into the next."""
    from surfdiff_core.system_build import clear_systems

    clear_systems()
    yield
    clear_systems()


@pytest.fixture
def lattice_cache(tmp_path_factory, monkeypatch):
    """Keep the relaxed-lattice cache out of the user's home directory."""
    d = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("SURFDIFF_CACHE_DIR", str(d))
    return d


TINY_CONFIG = """
name: tiny
substrate: {element: Ag, facet: fcc111, lattice_constant: 4.06, layers: 2, fixed_layers: 1, vacuum: 7}
confinement: {z_min: 0.5, z_max: 4.0}
oracle: {name: emt}
rss: {cell: p(2x2), compositions: [Ag1O1, Ag2O1], n: 8, fmax: 0.2, steps: 40, seed: 0}
model: {n_features: 8, n_rbf: 8, n_interactions: 1, cutoff: 4.0, time_features: 8}
train: {epochs: 3, batch_size: 4, repeat: 2, patience: 10, energy_window: 5.0}
sample:
  targets: [{cell: "p(3x3)", composition: Ag2O1}]
  n: 4
  steps: 10
  relax_steps: 5
  batch_size: 4
relax: {method: emt, top_k: 1, steps: 30, fmax: 0.2}
evaluate: {budget: 2, rss_budget: 3}
store: {backend: sqlite, path: STORE}
"""


@pytest.fixture
def single_thread():
    """One torch thread for the test (restored after): small seeded tensors, no thread-count noise."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_config(tmp_path):
    """A complete tiny study (EMT, 2-layer Ag(111), a PaiNN of 8 features) with its own on-disk store."""
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_CONFIG.replace("STORE", str(tmp_path / "data" / "store")))
    return path


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test harness (temporary database + API) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def train_and_sample(root, config_text: str, name: str = "study.yaml"):
    """A tiny study written under `root` (its store there), trained on its RSS data and sampled once:
    (its config, the sample result), for module fixtures whose tests each work on a copy of the store."""
    from surfdiff_core.config import load_config
    from surfdiff_core.stages import rss, sample, train
    from surfdiff_core.stages.common import open_study_store

    path = root / name
    path.write_text(config_text.replace("STORE", str(root / "store")))
    cfg = load_config(path)
    with open_study_store(cfg) as store:
        model = train.run(cfg, store, rss.run(cfg, store, progress=False), progress=False)
        samples = sample.run(cfg, store, model, progress=False)
    return cfg, samples


def kill_when(cmd: list[str], env: dict, ready, *, timeout: float, poll: float = 0.1) -> None:
    """Start `cmd` in its own session, SIGKILL its whole process group as soon as `ready()` is true (a crash in
    the middle of the work), and fail if it finished first."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if ready():
                break
            time.sleep(poll)
        assert proc.poll() is None, f"{' '.join(cmd[2:4])} finished before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
