"""benchmarks/discovery/sweep.py: an append-only run history, the report's aggregation (seeds by role, reruns),
one RSS arm per target shared by every seed (evaluate.rss_study; the sharing itself is tested in
tests/test_baseline_stage.py), and the script end to end on a tiny sweep."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from surfdiff_core.config import StoreConfig
from surfdiff_core.store import open_store
from tests.conftest import TINY_CONFIG

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "discovery"
# TINY_CONFIG as a sweep of two targets, with one active-learning round and a committee of two
TINY_SWEEP = (TINY_CONFIG.replace("n: 8, fmax", "n: 6, fmax")
              .replace('targets: [{cell: "p(3x3)", composition: Ag2O1}]',
                       'sweep: {cells: ["p(3x3)"], compositions: [Ag2O1, Ag1O1]}')
              .replace("train: {epochs: 3,", "train: {epochs: 2, ensemble: 2,")
              + "active_learning: {rounds: 1, relax_per_round: 1, epochs: 1}\n")


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sweep():
    return _load("bench_sweep", "sweep.py")


@pytest.fixture(scope="module")
def report():
    return _load("bench_sweep_report", "sweep_report.py")


@pytest.fixture
def tiny_sweep(tmp_path) -> Path:
    path = tmp_path / "tiny-sweep.yaml"
    path.write_text(TINY_SWEEP.replace("STORE", str(tmp_path / "unused")))
    return path


def test_study_config_shares_the_rss_arm_and_keeps_seeds_apart(sweep, tiny_sweep, tmp_path):
    args = sweep.parse_args(["--config", str(tiny_sweep), "--seeds", "1", "--seed-role", "dev", "--epochs", "5",
                             "--allocation", "envelope"])
    base = sweep.base_config(args)
    one, two = (sweep.study_config(args, base, s, tmp_path / "all") for s in (1, 2))
    assert one["name"] == "sweep-tiny-sweep-emt-s1" and two["name"] == "sweep-tiny-sweep-emt-s2"
    assert one["evaluate"] == two["evaluate"]  # one RSS arm per target: same seed, same baseline study
    assert one["evaluate"]["rss_study"] == "sweep-tiny-sweep-emt-rss" and one["evaluate"]["rss_budget"] == 256
    assert (one["rss"]["seed"], one["train"]["seed"], one["sample"]["seed"]) == (1, 1, 1)
    assert one["train"]["epochs"] == 5 and one["sample"]["n"] == 4  # an override, and the config's value
    assert one["active_learning"]["allocation"] == "envelope"
    assert sweep.settings_id(args, base) == sweep.settings_id(
        sweep.parse_args([*["--config", str(tiny_sweep), "--seeds", "7", "--seed-role", "report"],
                          "--epochs", "5", "--allocation", "envelope", "--rerun", "b"]), base)
    with pytest.raises(SystemExit):  # the seeds' role is required
        sweep.parse_args(["--config", str(tiny_sweep), "--seeds", "1"])


def test_history_is_append_only(sweep, report, tmp_path):
    runs = tmp_path / "runs.jsonl"
    sweep.append_record(runs, {"run_id": "a", "seed": 1, "note": "ü" * 3})
    before = runs.read_bytes()
    sweep.append_record(runs, {"run_id": "b", "seed": 1})  # the same seed again: a new line, never a replacement
    assert runs.read_bytes().startswith(before) and runs.read_bytes().count(b"\n") == 2
    with runs.open("a") as fh:
        fh.write('{"run_id": "torn"')  # a line cut short elsewhere hides none of the others
    records, bad = report.read_records(runs)
    assert [r["run_id"] for r in records] == ["a", "b"] and bad == 1


def _record(config: dict, seed: int, role: str, all_in: float | None, targets: dict[str, float | None], *,
            ended: str, rerun: str = "", settings: str = "now", status: str = "finished") -> dict:
    units = ("force_calls", "atom_force_calls", "atom3_force_calls")
    rows = [{"target": name, "ratio_relaxations": v and v / 2, "ratio_atom_weighted": v,
             "one_target_all_in": {"atom_force_calls": v and v / 10}, "reached": v is not None}
            for name, v in targets.items()]
    return {"run_id": f"{seed}-{ended}", "ended": ended, "status": status, "seed": seed, "seed_role": role,
            "rerun": rerun, "settings_id": settings, "benchmark": "tiny-sweep", "energy_model": "emt", "git": "abc",
            "host": {"cpu": "cpu", "cores": 2, "torch_threads": 1}, "args": {"epochs": 2 if settings == "now" else 9},
            "study_config": config, "targets": rows, "wall_total_s": 90.0, "error": "boom",
            "all_in": {"ratio": {"force_calls": all_in and all_in / 2, "atom_force_calls": all_in,
                                 "atom3_force_calls": all_in and all_in * 2},
                       "reached": sum(r["reached"] for r in rows), "targets": len(rows),
                       "training": dict.fromkeys(units, 100.0), "active_learning": dict.fromkeys(units, 10.0)}}


def test_report_aggregates_report_seeds_apart_from_dev_seeds_and_reruns(sweep, report, tiny_sweep, tmp_path):
    args = sweep.parse_args(["--config", str(tiny_sweep), "--seeds", "1", "--seed-role", "report"])
    config = sweep.study_config(args, sweep.base_config(args), 1, tmp_path / "all")
    records = [
        _record(config, 1, "report", 6.0, {"A": 4.0, "B": 1.0}, ended="2025-01-01T01"),
        _record(config, 2, "report", None, {"A": None, "B": 2.0}, ended="2025-01-01T02"),
        _record(config, 3, "report", 9.0, {"A": 8.0, "B": 3.0}, ended="2025-01-01T03"),
        _record(config, 1, "report", 3.0, {"A": 2.0, "B": 1.0}, ended="2025-01-01T04", rerun="b"),  # rerun noise
        _record(config, 4, "dev", 100.0, {"A": 50.0, "B": 70.0}, ended="2025-01-01T05"),
        _record(config, 5, "report", 77.0, {"A": 77.0, "B": 77.0}, ended="2025-01-01T06"),  # also a dev seed:
        _record(config, 5, "dev", 55.0, {"A": 55.0, "B": 55.0}, ended="2025-01-01T00"),  # never in the headline
        _record(config, 6, "report", 42.0, {"A": 42.0, "B": 42.0}, ended="2024-12-01", settings="older"),
        _record(config, 7, "report", None, {}, ended="2025-01-01T07", status="failed"),
    ]
    assert report.spread([1.0, 3.0]) == (2.0, 1.0, 3.0) and report.spread([None, 3.0]) == (None, None, 3.0)
    mine = [r for r in records if r["seed_role"] == "report" and r["seed"] in (1, 2, 3)]
    s = report.summarise(mine)
    assert s["seeds"] == [1, 2, 3] and s["n"] == 3  # one run per seed: seed 1's untagged run, not its rerun
    assert s["all_in"]["atom_force_calls"] == (6.0, None, 9.0) and s["all_in"]["force_calls"] == (3.0, None, 4.5)
    assert s["targets"]["A"]["atom_weighted"] == (4.0, None, 8.0) and s["targets"]["A"]["reached"] == 2
    assert s["targets"]["B"]["atom_weighted"] == (2.0, 1.0, 3.0) and s["targets"]["B"]["reached"] == 3
    assert s["targets"]["B"]["one_target"] == (0.2, 0.1, 0.3) and s["all_reached"] == 2
    assert [r["rerun"] for r in report.reruns(mine)[1]] == ["", "b"] and list(report.reruns(mine)) == [1]

    out = tmp_path / "bench"
    out.mkdir()
    for r in records:
        sweep.append_record(out / "runs.jsonl", r)
    text = report.write_report(out).read_text()
    head, dev = text.split("## Development seeds")
    assert "median 6.00x (not reached–9.00x)** over 3 report seeds (1, 2, 3)" in head
    assert "every target reached in 2 of 3 seeds" in head and "force calls 3.00x (not reached–4.50x)" in head
    assert ("| A | 2.00x (not reached–4.00x) | 4.00x (not reached–8.00x) | 0.40x (not reached–0.80x) "
            "| 2/3 seeds |") in head
    assert "Seeds used for development (never in the headline): 4, 5" in head
    assert "Left out of the headline: seeds 5 ran as report seeds" in head
    assert "- seed 1 (report): 6.00x (run 1-2025-01-01T01, untagged" in head
    assert "3.00x (run 1-2025-01-01T04, rerun 'b'" in head
    assert "100.0x" not in head.split("## Spread")[0].split("### Every run")[0]  # dev values only in their section
    assert "median 77.5x (55.0x–100.0x)** over 2 dev seeds (4, 5)" in dev
    assert "## Other settings" in dev and "`older`: 1 runs" in dev and "{'epochs': 9}" in dev
    assert "all-in per run: 6 (report): 42.0x (2/2)" in dev
    assert "42.0x" not in head and "seed 7 (report), run 7-2025-01-01T07, failed" in dev
    assert (out / "figures" / "ratios.png").stat().st_size > 5_000 and "![ratios](figures/ratios.png)" in head

    # a development run of other settings (say another allocation) ends last: the config's own settings keep
    # the headline, and the new run is listed apart
    sweep.append_record(out / "runs.jsonl", _record(config, 8, "dev", 12.0, {"A": 3.0, "B": 4.0},
                                                    ended="2025-01-02", settings="later"))
    again = report.write_report(out, "now").read_text()
    assert again.split("## Headline")[1].split("## Development seeds")[0] == head.split("## Headline")[1]
    assert "the config as shipped" in again
    assert "`later`: 1 runs" in again and "8 (dev): 12.0x (2/2)" in again
    # the config as shipped has not finished a run yet: the latest settings with report seeds keep the
    # headline, saying they are not the shipped ones; the newer dev-only settings are listed apart
    pending = report.write_report(out, "unrun").read_text()
    assert pending.split("## Headline")[1].split("## Development seeds")[0] == head.split("## Headline")[1]
    assert "Settings `now` " in pending and "**not the config as shipped**, whose settings `unrun`" in pending
    assert "`later`: 1 runs" in pending
    assert "Settings `now` " in report.write_report(out).read_text()  # no id: the same choice


def test_a_run_without_the_compiled_operator_is_refused_unless_allowed(sweep, tiny_sweep, tmp_path, monkeypatch,
                                                                     capsys):
    """A worktree without the build would record wall times several times the others: one line, nothing run."""
    monkeypatch.setenv("SURFDIFF_NO_KERNELS", "1")
    out = tmp_path / "bench"
    argv = ["--config", str(tiny_sweep), "--seeds", "1", "--seed-role", "dev", "--out", str(out)]
    with pytest.raises(SystemExit, match="compiled PaiNN operator is not available here .disabled by SURFDIFF"):
        sweep.main(argv)
    assert not out.exists()
    assert sweep.host()["painn_kernels"] == "disabled by SURFDIFF_NO_KERNELS"  # what a record would say


def test_keys_removed_from_the_config_leave_the_settings_id_alone(sweep, tiny_sweep):
    args = sweep.parse_args(["--config", str(tiny_sweep), "--seeds", "1", "--seed-role", "dev"])
    name, em, cfg = sweep.base_config(args)
    recorded = {**cfg, "evaluate": {**cfg["evaluate"], "guidance_samples": 0, "steps_sweep": []}}  # as runs had
    assert sweep.settings_id(args, (name, em, recorded)) == sweep.settings_id(args, (name, em, cfg))


def test_a_field_new_to_the_schema_splits_the_history_only_off_its_default(sweep, tiny_sweep):
    settings = _load("bench_sweep_settings", "sweep_settings.py")
    args = sweep.parse_args(["--config", str(tiny_sweep), "--seeds", "1", "--seed-role", "dev"])
    d = sweep.study_config(args, sweep.base_config(args), 0, "")
    d.pop("store")
    default = settings.SurfdiffConfig().sample.relax_steps
    before = {**d, "sample": {k: v for k, v in d["sample"].items() if k != "relax_steps"}}  # runs recorded without it
    at_default = {**d, "sample": {**d["sample"], "relax_steps": default}}
    off_default = {**d, "sample": {**d["sample"], "relax_steps": default + 1}}
    as_new = settings.recorded_fields() - {"sample.relax_steps"}  # as if the field had been added since
    assert settings.without_new_defaults(at_default, as_new) == before
    assert settings.without_new_defaults(off_default, as_new) == off_default
    assert settings.without_new_defaults(at_default) == at_default  # a recorded field always counts
    # and a whole new section (here: the sweep's, which defaults to none) counts once it is set
    assert settings.without_new_defaults(d, as_new - {p for p in as_new if p.startswith("sample.sweep.")}) == d
    assert settings.settings_hash(d) != settings.settings_hash(off_default)


def test_sweep_end_to_end_and_a_rerun_adds_a_record(sweep, tiny_sweep, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["--config", str(tiny_sweep), "--seeds", "3", "--seed-role", "report", "--rss-budget", "3",
            "--budget", "2", "--out", str(out)]
    text = sweep.main(argv).read_text()
    first = (out / "runs.jsonl").read_bytes()
    (rec,) = [json.loads(line) for line in first.splitlines()]
    assert rec["status"] == "finished" and rec["seed"] == 3 and rec["seed_role"] == "report"
    assert rec["argv"][2:] == argv and rec["args"]["rss_budget"] == 3 and rec["git"] and rec["host"]["cores"]
    assert [t["target"] for t in rec["targets"]] == ["Ag2O1 p(3x3)", "Ag1O1 p(3x3)"]
    assert set(rec["wall_s"]) == {"rss_train", "train", "active_learning", "sample", "evaluate"}
    assert rec["active_learning"]["relaxations"] == 2 and rec["all_in"]["targets"] == 2
    assert "over 1 report seeds (3)" in text and (out / "figures" / "ratios.png").is_file()
    # the sweep's science: the reference envelope's stable phases, and what each arm concludes, per seed-run
    pc = rec["phase_comparison"]
    assert pc["reference"] and set(pc["arms"]) == {"surfdiff", "rss"} and rec["phase_diagram"]
    assert {row["phase"] for row in pc["reference"]} <= {"clean", "Ag2O1 p(3x3)", "Ag1O1 p(3x3)"}
    assert "## The sweep's phase diagram" in text and "| 3 | report | " in text
    with open_store(StoreConfig(backend="sqlite", path=str(out / "stores" / "all"))) as store:
        assert store.count({"study": "sweep-tiny-sweep-emt-rss"}) == 6  # 3 RSS relaxations in each target cell
        n = store.count({})

    sweep.main(argv)  # the same seed again: it resumes (nothing new computed) and adds a record
    after = (out / "runs.jsonl").read_bytes()
    assert after.startswith(first) and after.count(b"\n") == 2
    again = json.loads(after.splitlines()[1])
    assert again["run_id"] != rec["run_id"] and again["all_in"] == rec["all_in"]
    with open_store(StoreConfig(backend="sqlite", path=str(out / "stores" / "all"))) as store:
        assert store.count({}) == n
    assert "- seed 3 (report): " in (out / "REPORT.md").read_text()  # listed under the spread between reruns
    assert len((out / "commands.txt").read_text().splitlines()) == 2


def test_ranking_diagnosis_relaxes_every_sample_on_a_copy(sweep, report, tiny_sweep, tmp_path, monkeypatch):
    """benchmarks/discovery/ranking_diagnosis.py on a finished seed-run: every distinct sample relaxed with the
    oracle per MLFF-relaxation variant, in a copy of the store (the benchmark's own store unchanged); the seed is
    a development seed from then on (a `diagnosed` record; the report leaves it out of the headline)."""
    out = tmp_path / "bench"
    sweep.main(["--config", str(tiny_sweep), "--seeds", "5", "--seed-role", "report", "--rss-budget", "3",
                "--budget", "1", "--out", str(out)])
    diagnosis = _load("bench_ranking_diagnosis", "ranking_diagnosis.py")

    class FrozenClock(dt.datetime):  # every diagnosis in one second: they must still keep apart
        @classmethod
        def now(cls, tz=None):
            return dt.datetime(2026, 12, 7, 17, 39, 1, tzinfo=tz)

    monkeypatch.setattr(diagnosis, "dt", SimpleNamespace(datetime=FrozenClock))
    with open_store(StoreConfig(backend="sqlite", path=str(out / "stores" / "all"))) as store:
        before = store.count({})
    with pytest.raises(SystemExit, match="no finished run of seed 6"):
        diagnosis.main(["--out", str(out), "--seed", "6", "--work", str(tmp_path / "work")])
    path = diagnosis.main(["--out", str(out), "--seed", "5", "--relax-steps", "0", "3", "--work",
                           str(tmp_path / "work")])
    rows = json.loads(path.with_suffix(".json").read_text())["rows"]
    assert [(r["target"], r["relax_steps"]) for r in rows] == [
        ("Ag2O1 p(3x3)", 0), ("Ag1O1 p(3x3)", 0), ("Ag2O1 p(3x3)", 3), ("Ag1O1 p(3x3)", 3)]
    for r in rows:
        assert 0 < r["relaxed"] <= r["distinct"] <= r["samples"]
        assert r["relaxed"] > 1  # every distinct sample, not the evaluation's budget of 1
        assert (r["first_hit"] is None) == (r["hits"] == 0) and (r["first_hit"] or 0) <= r["relaxed"]
        assert r["random_expected"] == round((r["relaxed"] + 1) / (r["hits"] + 1), 1)
    assert "development seed" in path.read_text()
    with open_store(StoreConfig(backend="sqlite", path=str(out / "stores" / "all"))) as store:
        assert store.count({}) == before
    last = json.loads((out / "runs.jsonl").read_text().splitlines()[-1])
    assert (last["seed"], last["seed_role"], last["status"]) == (5, "dev", "diagnosed")
    # the run's own samples, relaxed every one: no new draw in the copy, the rows say whose samples they were
    with open_store(StoreConfig(backend="sqlite", path=str(tmp_path / "work" / "all"))) as store:
        drawn = store.count({"source": "generated"})
    own = diagnosis.main(["--out", str(out), "--seed", "5", "--own-samples", "--work", str(tmp_path / "work")])
    with open_store(StoreConfig(backend="sqlite", path=str(tmp_path / "work" / "all"))) as store:
        assert store.count({"source": "generated"}) == drawn
    recorded = json.loads((out / "runs.jsonl").read_text().splitlines()[0])["study_config"]["sample"]
    for r in json.loads(own.with_suffix(".json").read_text())["rows"]:
        assert r["own_samples"] and r["samples"] == recorded["n"] and r["relax_steps"] == recorded["relax_steps"]
        assert 1 < r["relaxed"] <= r["distinct"] <= r["samples"]
    assert "(the run's own samples)" in own.read_text()
    # seeded exploration around the run's best 2 samples, 3 draws from each, every one relaxed
    seeded = diagnosis.main(["--out", str(out), "--seed", "5", "--seeded", "0.5", "--seeds-from", "2", "--per-seed",
                             "3", "--targets", "Ag2O1 p(3x3)", "--work", str(tmp_path / "work")])
    (row,) = json.loads(seeded.with_suffix(".json").read_text())["rows"]
    assert row["seeded"] == {"t0": 0.5, "seeds_from": 2, "per_seed": 3} and row["samples"] == 6
    with open_store(StoreConfig(backend="sqlite", path=str(tmp_path / "work" / "all"))) as store:
        new = list(store.find({"source": "generated", "meta.seed_structure.t0": 0.5}))
        assert len(new) == 6 and len({d.meta["seed_structure"]["source"] for d in new}) == 2
    assert "(seeded: best 2 at t0 0.5, 3 each)" in seeded.read_text()
    marks = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()[1:]]
    assert len(marks) == 3 and len({m["run_id"] for m in marks}) == 3  # each diagnosis its own record
    assert len({m["diagnosis"] for m in marks}) == 3 and all((out / m["diagnosis"]).exists() for m in marks)
    text = report.write_report(out).read_text()
    assert "Left out of the headline: seeds 5" in text and "## Diagnosed seed-runs" in text
    assert "No report seed has run with these settings yet." in text and "Runs that did not finish" not in text


def test_rss_arms_run_ahead_are_the_ones_the_seed_run_evaluates_against(sweep, tiny_sweep, tmp_path):
    out = tmp_path / "bench"
    common = ["--config", str(tiny_sweep), "--rss-budget", "3", "--out", str(out), "--workers", "1"]
    sweep.main(["--rss-arms-only", *common])
    assert not (out / "runs.jsonl").exists()  # not a seed-run: nothing in the history
    with open_store(StoreConfig(backend="sqlite", path=str(out / "stores" / "all"))) as store:
        arms = {d["doc_id"]: d["created_at"] for d in store.find_raw({"study": "sweep-tiny-sweep-emt-rss"},
                                                                     properties=["doc_id", "created_at"])}
    assert len(arms) == 6
    sweep.main(["--seeds", "4", "--seed-role", "dev", "--budget", "2", *common])
    (rec,) = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert rec["status"] == "finished" and all(t["rss_relaxations"] == 3 for t in rec["targets"])
    with open_store(StoreConfig(backend="sqlite", path=str(out / "stores" / "all"))) as store:
        after = {d["doc_id"]: d["created_at"] for d in store.find_raw({"study": "sweep-tiny-sweep-emt-rss"},
                                                                      properties=["doc_id", "created_at"])}
    assert after == arms  # the evaluation found every arm relaxation done: none redone, none added
    assert len((out / "commands.txt").read_text().splitlines()) == 2


def test_rss_arms_kept_beside_the_history_resume_on_a_new_machine(sweep, tiny_sweep, tmp_path):
    """A fresh checkout has the arms file but no store: the seed-run relaxes none of them again."""
    out = tmp_path / "bench"
    common = ["--config", str(tiny_sweep), "--rss-budget", "3", "--workers", "1"]
    sweep.main(["--rss-arms-only", *common, "--out", str(out)])
    kept = out / "rss-arms" / "sweep-tiny-sweep-emt-rss.jsonl.xz"
    first = kept.read_bytes()
    with open_store(StoreConfig(backend="sqlite", path=str(out / "stores" / "all"))) as store:
        arms = {d.doc_id: (d.energy, d.wall_time) for d in store.find({"study": "sweep-tiny-sweep-emt-rss"})}
    assert len(arms) == 6
    sweep.main(["--save-arms", *common, "--out", str(out)])
    assert kept.read_bytes() == first  # the same arms write the same file

    fresh = tmp_path / "fresh"  # a new machine: the history's folder without its store
    (fresh / "rss-arms").mkdir(parents=True)
    (fresh / "rss-arms" / kept.name).write_bytes(first)
    sweep.main(["--seeds", "4", "--seed-role", "dev", "--budget", "2", *common, "--out", str(fresh)])
    (rec,) = [json.loads(line) for line in (fresh / "runs.jsonl").read_text().splitlines()]
    assert rec["status"] == "finished" and all(t["rss_relaxations"] == 3 for t in rec["targets"])
    with open_store(StoreConfig(backend="sqlite", path=str(fresh / "stores" / "all"))) as store:
        docs = list(store.find({"study": "sweep-tiny-sweep-emt-rss"}))
    # loaded, not relaxed again: same ids, energies and wall times (a relaxation again would take its own time)
    assert {d.doc_id: (d.energy, d.wall_time) for d in docs} == arms
    best = {t["target"]: t["best_rss_eV"] for t in rec["targets"]}
    assert all(v is not None for v in best.values())


def test_an_arms_file_of_another_study_is_refused(sweep, tiny_sweep, tmp_path):
    from surfdiff_core.errors import SurfdiffError

    out = tmp_path / "bench"
    common = ["--config", str(tiny_sweep), "--rss-budget", "1", "--workers", "1", "--out", str(out)]
    sweep.main(["--rss-arms-only", *common])
    kept = out / "rss-arms" / "sweep-tiny-sweep-emt-rss.jsonl.xz"
    wrong = tmp_path / "wrong.jsonl.xz"
    kept.rename(wrong)
    with open_store(StoreConfig(backend="sqlite", path=str(tmp_path / "other"))) as store:
        with pytest.raises(SurfdiffError, match="not of the arms' study 'elsewhere'"):
            sweep.load_arms(store, wrong, "elsewhere")
        wrong.write_bytes(b"not xz")
        with pytest.raises(SurfdiffError, match="not a readable RSS-arm file"):
            sweep.load_arms(store, wrong, "sweep-tiny-sweep-emt-rss")


def test_a_benchmarks_own_outputs_do_not_mark_its_commit_dirty(sweep, tmp_path, monkeypatch):
    import subprocess

    repo = tmp_path / "repo"
    out = repo / "benchmarks" / "discovery" / "sweep-x-emt"
    out.mkdir(parents=True)
    (out / "runs.jsonl").write_text("")
    (repo / "code.py").write_text("a = 1\n")
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "x"]):
        subprocess.run(["git", *cmd], cwd=repo, check=True, env={**env, "PATH": "/usr/bin:/bin"})
    monkeypatch.setattr(sweep, "ROOT", repo)
    assert not sweep.git_commit().endswith("-dirty")
    (out / "runs.jsonl").write_text('{"seed": 1}\n')  # what a running benchmark writes
    assert not sweep.git_commit().endswith("-dirty")
    (repo / "code.py").write_text("a = 2\n")  # a change to what is measured
    assert sweep.git_commit().endswith("-dirty")
