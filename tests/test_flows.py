"""Prefect flows: an end-to-end tiny discovery run, artifacts, and resumption after a killed run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from surfdiff_core.config import load_config
from surfdiff_core.stages.common import open_study_store
from tests.conftest import kill_when

pytestmark = pytest.mark.slow


def test_discovery_flow_end_to_end(prefect_harness, tiny_config):
    from prefect.client.orchestration import get_client

    from flows.discovery import discovery_flow

    result = discovery_flow(config_path=str(tiny_config))
    cfg = load_config(tiny_config)
    with open_study_store(cfg) as store:
        training = {"system_id": "Ag(fcc111)-p(2x2)-L2"}
        assert store.count({"source": "rss", **training}) == 8
        assert store.count({"source": "rss", "system_id": {"$ne": training["system_id"]}}) == 3  # RSS baseline
        assert store.count({"source": "generated"}) == 4
        relaxed = list(store.find({"source": "relaxed", "meta.purpose": None}))  # the relax stage's
        from surfdiff_core.query import lineage

        chain = lineage(store, relaxed[0].doc_id)
        assert [d.source for d in chain] == ["generated", "relaxed"]
    assert result["model"]["model_id"].startswith("model-")
    assert len(relaxed) == 1 and relaxed[0].parent_id.startswith("generated-")
    assert all(d.run_id for d in relaxed)
    figures = tiny_config.parent / "data" / "figures" / "tiny"
    assert any(figures.glob("*.png"))

    import anyio

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts()

    keys = {a.key for a in anyio.run(artifacts) if a.key}
    assert any(k.endswith("rss-training-data-best") for k in keys)
    assert any(k.endswith("relaxed-candidates-report") for k in keys)
    assert "tiny-evaluation" in keys and "tiny-evaluation-report" in keys
    assert result["evaluation"] and result["evaluation"][0]["target"] == "Ag2O1 p(3x3)"
    # the relax stage's result reached the evaluation: its relaxer (30 steps) is not the evaluation's (rss: 40)
    assert result["relax_reuse"] == {"reused": 0, "refused": "the relax stage's relaxations were not reused, "
                                     "their settings differ (relax steps 30 vs rss.steps 40)"}

    # a second run reuses everything: no new documents
    again = discovery_flow(config_path=str(tiny_config))
    assert again["rss"]["done"] == 0 and again["rss"]["skipped"] == 8
    with open_study_store(cfg) as store:
        # + the evaluation's RSS baseline and its relaxed samples
        assert store.count({}) == 8 + 4 + 1 + 3 + result["evaluation"][0]["generative_relaxations"]


def test_a_run_failing_mid_flow_says_so_in_one_line(tmp_path, tiny_config):
    """Bad input found inside the flow (a model id nobody trained, after RSS ran): the command's one line, exit 2,
    and none of Prefect's failure reports with their tracebacks; SURFDIFF_DEBUG=1 keeps every traceback."""
    tiny_config.write_text(tiny_config.read_text().replace("train: {", "train: {init_from: model-nobody-trained, "))
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("SURFDIFF_DEBUG", None)
    cmd = [sys.executable, "-m", "flows.cli", "run", str(tiny_config)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in r.stderr.replace("\r", "\n").splitlines() if ln.strip() and "struct/s" not in ln]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("surfdiff run: error: train.init_from 'model-nobody-trained' is "
                                                   "neither a shipped pretrained model"), r.stderr
    assert "Traceback" not in r.stderr and "ERROR" not in r.stderr
    debug = subprocess.run(cmd, env={**env, "SURFDIFF_DEBUG": "1"}, capture_output=True, text=True, timeout=600)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "Task run failed" in debug.stderr


def test_killed_run_resumes_without_duplicates(tmp_path, tiny_config):
    text = tiny_config.read_text().replace("epochs: 3", "epochs: 40")
    tiny_config.write_text(text)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    cmd = [sys.executable, "-m", "flows.cli", "run", str(tiny_config)]
    ckdir = tmp_path / "data" / "checkpoints"
    kill_when(cmd, env, lambda: any(ckdir.glob("*-last.pt")), timeout=400, poll=0.2)
    cfg = load_config(tiny_config)
    with open_study_store(cfg) as store:
        assert store.count({"source": "rss", "system_id": "Ag(fcc111)-p(2x2)-L2"}) == 8  # finished before the kill
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "RSS: 0 new + 8 reused" in r.stdout
    assert "resumed training at epoch" in r.stdout
    # progress reaches a log file, not only a terminal: each bar's first and last state, not one line per epoch
    resumed_at = int(r.stdout.split("resumed training at epoch ")[1].split()[0])
    train_states = [s for s in r.stderr.split("\r") if "train model-" in s]
    assert train_states
    assert len(train_states) <= 3 < 40 - resumed_at, (resumed_at, train_states)
    with open_study_store(cfg) as store:
        ids = [d["doc_id"] for d in store.find_raw({}, properties=["doc_id"])]
        assert len(ids) == len(set(ids))
        assert store.count({"source": "generated"}) == 4
        assert store.count({"source": "relaxed", "meta.purpose": None}) == 1  # the relax stage's one


def test_a_sweep_run_killed_while_sampling_resumes_without_duplicates(tmp_path):
    """`surfdiff run` on a sweep with shared batches, SIGKILLed after its first batches were written: the rerun
    keeps them, generates only what is missing and ends with every target's samples once."""
    from tests.conftest import TINY_CONFIG

    config = tmp_path / "sweep.yaml"
    config.write_text(TINY_CONFIG.replace("STORE", str(tmp_path / "data" / "store"))
                      .replace('targets: [{cell: "p(3x3)", composition: Ag2O1}]',
                               'sweep: {cells: ["p(3x3)"], compositions: [Ag2O1, Ag1O1]}\n  share_batches: true')
                      .replace("  n: 4\n  steps: 10\n", "  n: 12\n  steps: 150\n")
                      .replace("  batch_size: 4\n", "  batch_size: 2\n"))
    cfg = load_config(config)
    assert cfg.sample.share_batches and cfg.sample.n == 12 and cfg.sample.batch_size == 2
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    cmd = [sys.executable, "-m", "flows.cli", "run", str(config)]
    before: dict[str, str] = {}

    def two_batches_written() -> bool:
        if (tmp_path / "data" / "store").exists():
            with open_study_store(cfg) as store:
                rows = store.find_raw({"source": "generated"}, properties=["doc_id", "created_at"])
                before.update({r["doc_id"]: r["created_at"] for r in rows})
        return len(before) >= 2

    kill_when(cmd, env, two_batches_written, timeout=600)
    assert 2 <= len(before) < 24
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "generated Ag2O1 p(3x3): " in r.stdout and "generated Ag1O1 p(3x3): " in r.stdout
    assert "study tiny: 2 targets: Ag2O1 p(3x3), Ag1O1 p(3x3)\n" in r.stdout  # the sweep's expansion, up front
    with open_study_store(cfg) as store:
        rows = store.find_raw({"source": "generated"}, properties=["doc_id", "created_at", "composition"])
    ids = [row["doc_id"] for row in rows]
    assert len(ids) == len(set(ids)) == 24
    assert sorted(row["composition"] for row in rows) == ["Ag1O1"] * 12 + ["Ag2O1"] * 12
    # every sample written before the kill is still there, untouched (not generated again)
    assert {row["doc_id"]: row["created_at"] for row in rows if row["doc_id"] in before} == before


def test_the_targets_line_names_the_first_ones_and_counts_the_rest():
    from flows.cli_stages import targets_line

    names = [f"Ag{n}O1 [[3,0],[0,3]]" for n in range(1, 15)]
    assert targets_line(names, shown=2) == "14 targets: Ag1O1 [[3,0],[0,3]], Ag2O1 [[3,0],[0,3]], … and 12 more"
    assert targets_line(names[:1]) == "1 target: Ag1O1 [[3,0],[0,3]]"
