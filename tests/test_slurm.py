"""The HPC route against a real single-node Slurm (tests/conftest_slurm.py): `surfdiff run --executor slurm`,
a relaxation job cancelled with scancel, a job past its time limit, `surfdiff sample --executor slurm` as a
(CPU-only) GPU-kind job, done and failed, and `surfdiff evaluate|baseline --executor slurm` and active learning's
labels on the Slurm executor against the local numbers."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import TINY_CONFIG
from conftest_slurm import SlurmCluster, slurm_cluster  # noqa: F401 - the session fixture

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parent.parent


def write_settings(path: Path, **overrides) -> Path:
    """Fast polling for the tests; no GPU here, so train/sample jobs ask for CPUs."""
    data = {"folder": str(path.parent / "jobs"), "batch_size": 2, "poll_s": 0.5, "state_poll_s": 2,
            "signal_delay_s": 10, "gres": None, "gpu_cpus": 1, **overrides}
    path.write_text(yaml.safe_dump(data))
    return path


def by_name(cluster: SlurmCluster, name: str, at_least: int = 0) -> list[dict[str, str]]:
    """Finished jobs of that name; slurmctld writes the record just after the job's result is there."""
    deadline = time.monotonic() + 30
    while True:
        jobs = [j for j in cluster.completed_jobs() if j.get("Name") == name]
        if len(jobs) >= at_least or time.monotonic() > deadline:
            return jobs
        time.sleep(0.5)


def job_states(cluster: SlurmCluster, job_id: str) -> set[str]:
    deadline = time.monotonic() + 30
    while not (states := {j["JobState"] for j in cluster.completed_jobs() if j["JobId"] == job_id}):
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return states


def watch_queue(cluster: SlurmCluster, stop: threading.Event, seen: dict[str, str]) -> None:
    """What squeue and scontrol say while the jobs run: {job id: 'name state'}."""
    while not stop.is_set():
        out = cluster.run("squeue", "-h", "-o", "%i %j %T", check=False)
        for line in out.splitlines():
            job_id, name, state = line.split()
            if job_id not in seen and "JobState=" in cluster.run("scontrol", "show", "job", job_id, check=False):
                seen[job_id] = f"{name} {state}"
        stop.wait(0.3)


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, tmp_path_factory):  # noqa: F811 - pytest fixture argument
    """`surfdiff run CONFIG --executor slurm` once for the module: RSS and relaxations as Slurm jobs."""
    tmp = tmp_path_factory.mktemp("slurm-run")
    config = tmp / "tiny.yaml"
    # one active-learning round: its label goes to Slurm too
    config.write_text(TINY_CONFIG.replace("STORE", str(tmp / "data" / "store"))
                      + "active_learning: {rounds: 1, relax_per_round: 1, epochs: 1}\n")
    settings = write_settings(tmp / "slurm.yaml")
    seen: dict[str, str] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=watch_queue, args=(slurm_cluster, stop, seen), daemon=True)
    watcher.start()
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(config), "--executor", "slurm",
                           "--hpc-settings", str(settings)], cwd=ROOT, capture_output=True, text=True,
                          timeout=480, env={**os.environ, "SURFDIFF_PROGRESS": "0"})
    stop.set()
    watcher.join()
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{slurm_cluster.logs()}"
    return {"config": config, "settings": settings, "seen": seen, "stdout": proc.stdout, "tmp": tmp,
            "seconds": time.monotonic() - start}


def study(config: Path):
    from surfdiff_core.config import load_config

    return load_config(config)


def test_surfdiff_run_fans_out_over_slurm(slurm_run, slurm_cluster):  # noqa: F811
    from surfdiff_core.stages.common import open_study_store

    cfg = study(slurm_run["config"])
    with open_study_store(cfg) as store:
        # the training data (the evaluation stage adds its own RSS baseline on the target cells)
        rss_docs = list(store.find({"source": "rss", "study": cfg.name, "cell": cfg.rss.cell}))
        arm = store.count({"source": "rss", "study": cfg.name, "cell": {"$ne": cfg.rss.cell}})
        relaxed = [d for d in store.find({"source": "relaxed", "study": cfg.name})
                   if "jobflow_uuid" in d.meta]  # the relax stage's (the evaluation relaxes its own)
        judged = store.count({"source": "relaxed", "study": cfg.name, "meta.purpose": "evaluate"})
        labels = store.count({"source": "relaxed", "study": cfg.name, "meta.active_learning": True})
    assert arm == cfg.evaluate.rss_budget * len(cfg.sample.targets) and judged
    assert labels == cfg.active_learning.relax_per_round * len(cfg.sample.targets)
    assert len(rss_docs) == cfg.rss.n and all(d.energy is not None for d in rss_docs)
    assert relaxed and all(d.parent_id for d in relaxed)
    # Slurm's own record: one RSS job per batch of 2 structures, one relaxation job per batch of candidates; the
    # evaluation's relaxations are "rss" jobs too (one target: its samples' batch, then its RSS arm's batches),
    # and so are the active-learning labels (one batch per target and round).
    rss_jobs, relax_jobs = by_name(slurm_cluster, "surfdiff-rss"), by_name(slurm_cluster, "surfdiff-relax")
    evaluation_jobs = -(-judged // 2) + -(-cfg.evaluate.rss_budget // 2) + -(-labels // 2)
    assert len(rss_jobs) == cfg.rss.n // 2 + evaluation_jobs and {j["JobState"] for j in rss_jobs} == {"COMPLETED"}
    assert len(relax_jobs) == -(-len(relaxed) // 2) and {j["JobState"] for j in relax_jobs} == {"COMPLETED"}
    # training and sampling each ran as one job of the GPU kind (CPUs here: the settings name no GRES)
    train_jobs, sample_jobs = by_name(slurm_cluster, "surfdiff-train", 1), by_name(slurm_cluster, "surfdiff-sample", 1)
    assert len(train_jobs) == 1 and len(sample_jobs) == len(cfg.sample.targets)
    assert {j["JobState"] for j in train_jobs + sample_jobs} == {"COMPLETED"}
    # squeue/scontrol saw them while they ran
    seen_ids = set(slurm_run["seen"])
    assert {j["JobId"] for j in rss_jobs + relax_jobs} <= seen_ids, (slurm_run["seen"], rss_jobs, relax_jobs)
    print(f"surfdiff run on Slurm: {slurm_run['seconds']:.0f} s; jobs seen: {slurm_run['seen']}")


def rss_candidates(config: Path, k: int, skip: int = 0):
    from surfdiff_core.stages.common import open_study_store

    cfg = study(config)
    with open_study_store(cfg) as store:
        docs = sorted((d for d in store.find({"source": "rss", "study": cfg.name, "cell": cfg.rss.cell})
                       if d.valid and d.in_box),
                      key=lambda d: d.doc_id)
    assert len(docs) >= skip + k
    return cfg, docs[skip:skip + k]


def relax_on_slurm(cfg, candidates, settings: Path):
    from deploy.slurm import open_executor
    from surfdiff_core.executors import ExecutorSpec
    from surfdiff_core.stages import relax
    from surfdiff_core.stages.common import open_study_store

    with open_executor(ExecutorSpec("slurm", settings), "relax") as ex, open_study_store(cfg) as store:
        return relax.run(cfg, store, candidates=candidates, run_id="slurm-test", executor=ex)


def relaxed_children(cfg, candidates) -> list:
    from surfdiff_core.stages.common import open_study_store

    with open_study_store(cfg) as store:
        return list(store.find({"parent_id": {"$in": [c.doc_id for c in candidates]}, "source": "relaxed"}))


def test_scancelled_relaxation_is_recorded_and_redone(slurm_run, slurm_cluster):  # noqa: F811
    cfg, candidates = rss_candidates(slurm_run["config"], 4)
    settings = write_settings(slurm_run["tmp"] / "one-per-job.yaml", batch_size=1)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(first=relax_on_slurm(cfg, candidates, settings)))
    runner.start()
    victim = None
    deadline = time.monotonic() + 120
    while victim is None and time.monotonic() < deadline:
        for line in slurm_cluster.run("squeue", "-h", "-n", "surfdiff-relax", "-t", "RUNNING", "-o", "%i",
                                      check=False).split():
            victim = line
            slurm_cluster.run("scancel", victim)
            break
        time.sleep(0.2)
    runner.join(timeout=300)
    assert victim, "no relaxation job was seen running"
    first = result["first"]
    assert len(first.lost) == 1 and first.failed == 1 and first.relaxed == 3, first
    assert f"Slurm job {victim} ended CANCELLED" in next(iter(first.lost.values()))
    assert job_states(slurm_cluster, victim) == {"CANCELLED"}
    assert len(relaxed_children(cfg, candidates)) == 3  # the lost one left nothing half-written

    second = relax_on_slurm(cfg, candidates, settings)  # the rerun: only the lost candidate
    assert second.skipped == 3 and second.relaxed == 1 and not second.lost, second
    children = relaxed_children(cfg, candidates)
    assert len(children) == 4 and len({d.doc_id for d in children}) == 4
    assert {d.parent_id for d in children} == {c.doc_id for c in candidates}


def test_job_past_its_time_limit_is_recorded(slurm_run, slurm_cluster):  # noqa: F811
    cfg, candidates = rss_candidates(slurm_run["config"], 1, skip=4)
    # The job sleeps before Python starts: Slurm ends it at its 1-minute limit (OverTimeLimit=0).
    slow = write_settings(slurm_run["tmp"] / "too-slow.yaml", relax_time=1, setup=["sleep 600"])
    start = time.monotonic()
    first = relax_on_slurm(cfg, candidates, slow)
    assert first.relaxed == 0 and first.failed == 1 and len(first.lost) == 1, first
    why = next(iter(first.lost.values()))
    assert "TIMEOUT" in why, why
    job_id = why.split("Slurm job ")[1].split()[0]
    assert job_states(slurm_cluster, job_id) == {"TIMEOUT"}
    assert not relaxed_children(cfg, candidates)
    print(f"time-limit job {job_id} recorded after {time.monotonic() - start:.0f} s: {why}")

    again = relax_on_slurm(cfg, candidates, write_settings(slurm_run["tmp"] / "ok.yaml"))
    assert again.relaxed == 1 and not again.lost


def surfdiff(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "SURFDIFF_PROGRESS": "0"})


def test_sampling_as_one_gpu_kind_job(slurm_run, slurm_cluster):  # noqa: F811
    from surfdiff_core.stages.common import open_study_store

    before = len(by_name(slurm_cluster, "surfdiff-sample"))
    proc = surfdiff("sample", str(slurm_run["config"]), "--executor", "slurm", "--hpc-settings",
                    str(slurm_run["settings"]), "--n", "2", "--steps", "4", "--run-id", "slurm-cli")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "submitted Slurm job" in proc.stdout and "(sample); log: " in proc.stdout and "finished" in proc.stdout
    jobs = by_name(slurm_cluster, "surfdiff-sample", at_least=before + 1)
    assert len(jobs) == before + 1 and jobs[-1]["JobState"] == "COMPLETED"
    cfg = study(slurm_run["config"])
    with open_study_store(cfg) as store:  # the job sampled into the study's store, with the command's options
        assert store.count({"source": "generated", "study": cfg.name, "run_id": "slurm-cli"}) == 2


def test_failed_sampling_job_is_one_line(slurm_run, slurm_cluster):  # noqa: F811
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU here: --device cuda would not fail in the job")
    # Valid where it is submitted (the login node needs no GPU); the CPU-only job fails on its own.
    proc = surfdiff("sample", str(slurm_run["config"]), "--executor", "slurm", "--hpc-settings",
                    str(slurm_run["settings"]), "--n", "2", "--steps", "4", "--device", "cuda")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "submitted Slurm job" in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Slurm job ") and " failed: " in lines[0], proc.stderr
    assert "surfdiff sample: error: device 'cuda' requested but no CUDA GPU is available" in lines[0], lines
    job_id = lines[0].split()[2]
    assert job_states(slurm_cluster, job_id) == {"FAILED"}  # Slurm's own record agrees


def test_evaluation_fans_out_over_slurm_with_the_local_numbers(slurm_cluster, tmp_path):  # noqa: F811
    """`surfdiff evaluate --executor slurm`: both arms' oracle relaxations as Slurm jobs ("rss" kind), the same
    documents and numbers as the local command on a copy of the same trained and sampled study."""
    import json
    import shutil

    from surfdiff_core.stages import rss, sample, train
    from surfdiff_core.stages.common import open_study_store

    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_CONFIG.replace("STORE", str(tmp_path / "sampled")))
    cfg = study(config)
    with open_study_store(cfg) as store:  # trained and sampled here: only the evaluation goes to Slurm
        sample.run(cfg, store, train.run(cfg, store, rss.run(cfg, store, progress=False), progress=False),
                   progress=False)
    settings = write_settings(tmp_path / "slurm.yaml")
    results = {}
    for name, extra in (("local", []), ("slurm", ["--executor", "slurm", "--hpc-settings", str(settings)])):
        shutil.copytree(tmp_path / "sampled", tmp_path / name)
        before = len(by_name(slurm_cluster, "surfdiff-rss"))
        proc = surfdiff("evaluate", str(config), "--store", str(tmp_path / name), "--json", *extra)
        assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{slurm_cluster.logs()}"
        out = proc.stdout
        results[name] = json.loads(out[out.index("\n{\n") + 1:out.rindex("\nreport: ")])
        jobs = by_name(slurm_cluster, "surfdiff-rss", at_least=before + (name == "slurm"))
        assert (len(jobs) > before) == (name == "slurm") and {j["JobState"] for j in jobs} <= {"COMPLETED"}

    def numbers(r: dict) -> str:  # as JSON text: NaN entries (spent, no hit) compare equal
        keys = ("relaxed_ids", "rss_ids", "rss_lost_ids", "generative_energies", "rss_energies", "speedup", "cost",
                "steps_generative", "steps_rss", "lost")
        return json.dumps([[t[k] for k in keys] for t in r["targets"]] + [r["all_in"]], sort_keys=True)

    (t,) = results["slurm"]["targets"]
    assert t["relaxed_ids"] and t["rss_ids"] and not t["lost"]
    assert numbers(results["slurm"]) == numbers(results["local"])


def test_baseline_command_fans_out_over_slurm_with_the_local_arm(slurm_cluster, tmp_path):  # noqa: F811
    """`surfdiff baseline --executor slurm`: the RSS arm as "rss" jobs, the same documents as the local command."""
    from surfdiff_core.stages.common import open_study_store

    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_CONFIG.replace("STORE", str(tmp_path / "unused")))
    cfg = study(config)
    settings = write_settings(tmp_path / "slurm.yaml")
    arms = {}
    for name, extra in (("local", []), ("slurm", ["--executor", "slurm", "--hpc-settings", str(settings)])):
        before = len(by_name(slurm_cluster, "surfdiff-rss"))
        proc = surfdiff("baseline", str(config), "--store", str(tmp_path / name), *extra)
        assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{slurm_cluster.logs()}"
        assert "Ag2O1 p(3x3): 3 relaxations (3 new, 0 already in the store, 0 failed), 0 lost" in proc.stdout
        jobs = by_name(slurm_cluster, "surfdiff-rss", at_least=before + (name == "slurm"))
        assert (len(jobs) > before) == (name == "slurm") and {j["JobState"] for j in jobs} <= {"COMPLETED"}
        store_cfg = cfg.model_copy(update={"store": cfg.store.model_copy(update={"path": str(tmp_path / name)})})
        with open_study_store(store_cfg) as store:
            arms[name] = {d.doc_id: (d.energy, d.steps) for d in store.find({"source": "rss"})}
    assert len(arms["slurm"]) == 3 and arms["slurm"] == arms["local"]


def test_active_learning_labels_as_slurm_jobs_equal_the_local_ones(slurm_cluster, tmp_path):  # noqa: F811
    """active.run(executor=) with the Slurm executor of deploy/: each label an "rss" job, the same label documents
    and the same fine-tuned model as the local round on a copy of the same trained study."""
    import shutil

    from deploy.slurm import open_executor
    from surfdiff_core.executors import ExecutorSpec
    from surfdiff_core.stages import active, rss, train
    from surfdiff_core.stages.common import open_study_store

    config = tmp_path / "al.yaml"
    config.write_text(TINY_CONFIG.replace("STORE", str(tmp_path / "trained" / "store"))
                      + "active_learning: {rounds: 1, relax_per_round: 1, single_points_per_round: 1, epochs: 2}\n")
    cfg = study(config)
    with open_study_store(cfg) as store:
        first = train.run(cfg, store, rss.run(cfg, store, progress=False), progress=False)
    settings = write_settings(tmp_path / "slurm.yaml")
    results, labels = {}, {}
    for name in ("local", "slurm"):
        shutil.copytree(tmp_path / "trained" / "store", tmp_path / name / "store")
        copy = cfg.model_copy(update={"store": cfg.store.model_copy(update={"path": str(tmp_path / name / "store")})})
        before = len(by_name(slurm_cluster, "surfdiff-rss"))
        spec = ExecutorSpec(name, str(settings))  # "local": open_executor gives None, the stage's own way
        with open_executor(spec, "rss") as ex, open_study_store(copy) as store:
            results[name] = active.run(copy, store, first, progress=False, executor=ex)
            labels[name] = {d.doc_id: (d.source, d.energy, d.steps) for d in store.find({"meta.active_learning": True})}
        jobs = by_name(slurm_cluster, "surfdiff-rss", at_least=before + (name == "slurm"))
        assert (len(jobs) > before) == (name == "slurm") and {j["JobState"] for j in jobs} <= {"COMPLETED"}
    assert sorted(s for s, _, _ in labels["slurm"].values()) == ["relaxed", "single_point"]
    assert labels["slurm"].keys() == labels["local"].keys() and not results["slurm"].lost
    for doc_id, (source, energy, steps) in labels["local"].items():
        assert labels["slurm"][doc_id][::2] == (source, steps)
        assert labels["slurm"][doc_id][1] == pytest.approx(energy, abs=1e-8)
    assert results["slurm"].model.model_id == results["local"].model.model_id
