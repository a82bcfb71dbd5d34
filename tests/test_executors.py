"""One executor choice: the flows' and the CLI's strings become one ExecutorSpec at the edge, one factory
(deploy.slurm.open_executor) opens it, and the stages that fan out (RSS, relax, baseline) take the Executor."""

from __future__ import annotations

import dataclasses
from concurrent.futures import Executor, Future
from pathlib import Path

import pytest

from surfdiff_core.config import SampleTarget, config_from_dict
from surfdiff_core.errors import ConfigError
from surfdiff_core.executors import EXECUTOR_KINDS, ExecutorSpec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "deploy" / "hpc" / "slurm.yaml"


class _Here(Executor):
    """Runs every call here as it is submitted, and counts them."""

    def __init__(self) -> None:
        self.calls = 0

    def submit(self, fn, /, *args, **kwargs) -> Future:
        self.calls += 1
        fut: Future = Future()
        fut.set_result(fn(*args, **kwargs))
        return fut


def test_spec_is_one_typed_value_with_the_cli_and_flow_choices():
    assert EXECUTOR_KINDS == ("local", "slurm")
    assert ExecutorSpec() == ExecutorSpec("local", None)
    spec = ExecutorSpec("slurm", EXAMPLE)  # a Path is kept as the string a flow parameter would be
    assert spec.hpc_settings == str(EXAMPLE) and spec.on_slurm and not ExecutorSpec().on_slurm
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.kind = "local"  # type: ignore[misc]
    assert hash(spec) == hash(ExecutorSpec("slurm", str(EXAMPLE)))
    with pytest.raises(ConfigError, match="unknown executor 'dask': 'local' or 'slurm'"):
        ExecutorSpec("dask")


def test_the_factory_opens_local_as_the_stage_default_and_slurm_as_its_executor(monkeypatch):
    from deploy.hpc import HPCConfigError
    from deploy.slurm import SlurmExecutor, open_executor

    with open_executor(ExecutorSpec(), "rss") as ex:
        assert ex is None  # the stage's own local way
    monkeypatch.setattr("deploy.slurm._submitit_executor", lambda settings, kind: object())
    with open_executor(ExecutorSpec("slurm", EXAMPLE), "relax") as ex:
        assert isinstance(ex, SlurmExecutor) and ex.kind == "relax" and ex.settings.batch_size >= 1
    bad = EXAMPLE.parent / "missing-settings.yaml"
    with pytest.raises(HPCConfigError), open_executor(ExecutorSpec("slurm", bad), "rss"):
        pass


def test_flow_parameters_stay_strings():
    """The UI's forms and `-p executor=...` are unchanged: a choice of two strings and a settings path."""
    from flows.discovery import discovery_flow
    from flows.relax import relax_flow
    from flows.rss import rss_flow
    from flows.sample import sample_flow
    from flows.train import train_flow

    for fl in (rss_flow, train_flow, sample_flow, relax_flow, discovery_flow):
        props = fl.parameters.model_dump(mode="json")["properties"]
        assert props["executor"]["enum"] == ["local", "slurm"] and props["executor"]["default"] == "local", fl.name
        assert props["hpc_settings"]["default"] is None, fl.name
        assert {"type": "string"} in props["hpc_settings"]["anyOf"], fl.name


def test_flow_tasks_get_the_spec_resolved_at_the_flow(monkeypatch, tmp_path):
    """The flow turns its two strings into one spec and hands that on; the task opens it."""
    import flows.rss as rss_flow_module

    seen = {}

    def fake_task(cfg, n, seed, workers, run_id, spec):
        seen["spec"] = spec
        raise RuntimeError("stop here")

    monkeypatch.setattr(rss_flow_module, "rss_task", fake_task)
    cfg = config_from_dict({"store": {"backend": "sqlite", "path": str(tmp_path / "store")}})
    with pytest.raises(RuntimeError, match="stop here"):
        rss_flow_module.rss_flow.fn(study=cfg, executor="slurm", hpc_settings=str(EXAMPLE))
    assert seen["spec"] == ExecutorSpec("slurm", str(EXAMPLE))


@pytest.fixture
def arm_cfg(tmp_path):
    return config_from_dict({
        "name": "arm", "substrate": {"lattice_constant": 4.06, "layers": 2, "fixed_layers": 1, "vacuum": 7},
        "confinement": {"z_min": 0.5, "z_max": 4.0},
        "rss": {"cell": "p(2x2)", "compositions": ["Ag1O1"], "n": 2, "fmax": 0.3, "steps": 15},
        "sample": {"targets": [{"cell": "p(2x2)", "composition": "Ag1O1"}]},
        "evaluate": {"rss_budget": 3, "seed": 5},
        "store": {"backend": "sqlite", "path": str(tmp_path / "store")},
    })


def test_baseline_fans_out_on_a_passed_executor_with_the_same_documents(arm_cfg, tmp_path):
    from surfdiff_core.stages import baseline
    from surfdiff_core.store import open_store

    target = SampleTarget(cell="p(2x2)", composition="Ag1O1")
    with open_store(arm_cfg.store) as store:
        here = baseline.run(arm_cfg, store, [target], progress=False)
        here_docs = {d.doc_id: d.energy for d in store.find({})}
    other = arm_cfg.model_copy(update={"store": arm_cfg.store.model_copy(update={"path": str(tmp_path / "s2")})})
    ex = _Here()
    with open_store(other.store) as store:
        remote = baseline.run(other, store, [target], progress=False, executor=ex)
        remote_docs = {d.doc_id: d.energy for d in store.find({})}
    assert ex.calls == 3
    assert remote.config_hash == here.config_hash and remote.targets[0].doc_ids == here.targets[0].doc_ids
    assert remote_docs.keys() == here_docs.keys()
    assert remote_docs == pytest.approx(here_docs)
