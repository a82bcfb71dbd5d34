"""benchmarks/discovery/structure_aware.py: the arms' studies, the model-evaluation count against the samplers
themselves, and the script end to end at tiny sizes with the shipped EMT model (an append-only run history,
every metric in the record, a report naming the seed role, hygiene refusals)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "discovery"
TINY = ["--targets", "Ag2O1 p(2x2)", "--samples", "4", "--budget", "2", "--rss-budget", "3", "--steps", "5"]
METRICS = ("best_generative_eV", "best_rss_eV", "reached", "generative_to_reach", "ratio_relaxations",
           "ratio_atom_weighted", "one_target_all_in", "relaxations", "minima", "distinct_minima",
           "distinct_energies", "force_calls", "unique_per_100", "unique_per_1e4_calls",
           "model_evaluations_per_sample", "samples", "valid", "distinct_samples")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_structure_aware", BENCH / "structure_aware.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_missing_seed_role_is_refused(bench, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--seeds", "1", "--out", str(tmp_path / "out"), *TINY])
    assert exc.value.code == 2 and "--seed-role" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--seeds", "1", "--seed-role", "final"])
    assert not (tmp_path / "out").exists()


def test_arms_have_their_own_studies_and_share_one_rss_arm(bench, tmp_path):
    args = bench.parse_args(["--seeds", "3", "--seed-role", "dev", "--arms", "em+novelty", "inpaint", *TINY])
    assert bench.run_order(args.arms) == ["em", "em+novelty", "inpaint"]  # novelty needs em's minima first
    base = bench.load_config(bench.CONFIG).model_dump(mode="json")
    d = {arm: bench.study_config(args, base, 3, arm, tmp_path) for arm in bench.ARMS}
    assert len({c["name"] for c in d.values()}) == len(bench.ARMS) - 1
    assert d["em+novelty"]["name"] == d["em"]["name"]  # novelty reads the sampling study's minima
    assert all(c["evaluate"] == d["em"]["evaluate"] for c in d.values())
    assert d["em"]["evaluate"]["rss_study"] == "structure-aware-rss" and d["em"]["sample"]["seed"] == 3
    assert d["em"]["sample"]["targets"] == [{"cell": "p(2x2)", "composition": "Ag2O1"}]


def test_model_evaluations_match_the_samplers(bench, lattice_cache, single_thread):
    """The record's evaluations per sample are what the samplers really call (a counting denoiser)."""
    from surfdiff_core import pretrained
    from surfdiff_core.config import SampleConfig, config_from_dict
    from surfdiff_core.sample.conditioning import make_sampler
    from surfdiff_core.sample.generate import prior_batch
    from surfdiff_core.stages.common import target_system
    from surfdiff_core.train.checkpoint import load_checkpoint

    args = bench.parse_args(["--seeds", "1", "--seed-role", "dev", *TINY])
    cfg = config_from_dict(bench.study_config(args, bench.load_config(bench.CONFIG).model_dump(mode="json"), 1, "em",
                                              "unused"))
    card = pretrained.find_shipped(bench.MODEL)
    loaded = load_checkpoint(card.path(card.checkpoint), device="cpu")
    system = target_system(cfg, cfg.sample.targets[0])
    calls = []

    def counting(*a, **k):
        calls.append(1)
        return loaded.model.denoise(*a, **k)

    for sampler, extra in [("em", {}), ("ddim", {}), ("ode", {}), ("pc", {"corrector_steps": 2}),
                           ("ffc", {"corrector_t_max": 0.6})]:
        scfg = SampleConfig(steps=4, sampler=sampler, **extra)
        calls.clear()
        make_sampler(scfg)(counting, prior_batch(system, 1, "cpu"), loaded.process, steps=4)
        assert len(calls) == bench.model_evaluations(scfg, loaded.process), sampler
    assert bench.model_evaluations(SampleConfig(steps=4, sampler="ffc", corrector_t_max=0.6), loaded.process) == 7
    assert bench.model_evaluations(SampleConfig(steps=10, seed_structure="x.xyz", t0=0.3), loaded.process) == 3
    assert bench.model_evaluations(SampleConfig(steps=10, inpaint={"source": "x.xyz"}), loaded.process) == 30


def _check_row(row: dict, budget: int) -> None:
    assert "error" not in row, row.get("error")
    assert all(k in row for k in METRICS), sorted(set(METRICS) - set(row))
    assert 0 < row["relaxations"] <= budget and len(row["relaxed_ids"]) == row["relaxations"]
    assert 0 <= row["distinct_minima"] <= row["minima"] <= row["relaxations"]
    assert row["distinct_energies"] <= row["minima"]
    assert 0 <= row["unique_per_100"] <= 100 and row["unique_per_1e4_calls"] > 0
    assert row["force_calls"] >= row["relaxations"]
    assert row["valid"] <= row["samples"] == 4 and row["distinct_samples"] <= row["valid"]
    assert isinstance(row["reached"], bool) and row["reached"] == (row["generative_to_reach"] is not None)
    if row["reached"]:
        assert row["best_generative_eV"] <= row["best_rss_eV"] + 0.05 and row["ratio_relaxations"] > 0
        assert 1 <= row["generative_to_reach"] <= row["relaxations"]
    for k in ("best_generative_eV", "best_rss_eV"):
        assert row[k] is not None and math.isfinite(row[k])


def test_tiny_run_records_every_metric_and_appends(bench, tmp_path, lattice_cache, single_thread):
    out = tmp_path / "out"
    report = bench.main(["--seeds", "5", "--seed-role", "dev", "--arms", "em", "inpaint", "--out", str(out), *TINY])
    runs = out / "runs.jsonl"
    first = runs.read_text()
    (rec,) = [json.loads(line) for line in first.splitlines()]
    assert rec["status"] == "finished" and rec["seed"] == 5 and rec["seed_role"] == "dev"
    assert {"argv", "args", "git", "host", "settings_id", "study_config"} <= set(rec)
    assert list(rec["arms"]) == ["em", "inpaint"]
    em, inp = (rec["arms"][a]["targets"][0] for a in ("em", "inpaint"))
    for row in (em, inp):
        _check_row(row, budget=2)
    for arm, row in (("em", em), ("inpaint", inp)):  # the arm's all-in over its one target: the one-target ratio
        a = rec["arms"][arm]["all_in"]
        assert a["targets"] == 1 and a["reached"] == int(row["reached"]) and a["training"]["force_calls"] > 0
        if row["reached"]:
            assert a["ratio"]["atom_force_calls"] == pytest.approx(row["one_target_all_in"], abs=1e-4)
        else:
            assert a["ratio"]["atom_force_calls"] is None and row["one_target_all_in"] is None
    assert em["model_evaluations_per_sample"] == 5 and inp["model_evaluations_per_sample"] == 15  # resample 3
    p = inp["inpaint"]
    assert p["overlayer_atoms"] == 3 and len(p["fixed_overlayer_indices"]) == 1
    assert 0 <= p["recovered"] <= inp["relaxations"] and 0 <= p["recovered_fraction"] <= 1
    assert p["reference_eV"] == pytest.approx(em["best_rss_eV"], abs=1e-3)  # RSS's best, one shared RSS arm
    source = Path(inp["settings"]["inpaint"]["source"])
    assert source.is_file() and source.is_relative_to(out)
    text = report.read_text()
    assert "dev seeds" in text and "not a headline" in text and "Inpainting recovery" in text
    assert "discovery ratio" in text and "| em | 1 |" in text
    assert (out / "figures" / "unique-minima.png").stat().st_size > 0

    # a second invocation appends its record (resumed from the store: same numbers) and leaves the first alone
    bench.main(["--seeds", "5", "--seed-role", "report", "--arms", "em", "--out", str(out), *TINY])
    again = runs.read_text()
    assert again.startswith(first) and len(again.splitlines()) == 2
    rec2 = json.loads(again.splitlines()[1])
    assert rec2["seed_role"] == "report" and rec2["run_id"] != rec["run_id"]
    assert rec2["arms"]["em"]["targets"][0]["relaxed_ids"] == em["relaxed_ids"]
    assert rec2["arms"]["em"]["targets"][0]["distinct_minima"] == em["distinct_minima"]
    text = (out / "REPORT.md").read_text()
    assert "report seeds 5" in text and "dev seeds (used while developing, never in the headline) 5" in text
    assert bench.main(["--report-only", "--out", str(out)]).read_text() == text


def test_report_spread_counts_not_reached_as_worst():
    import sys

    sys.path.insert(0, str(BENCH))
    from structure_aware_report import spread

    assert spread([3, None, 1]) == (1, None, 3)  # ratio: not reached is the lowest
    assert spread([3, None, 1], none_high=True) == (3, 1, None)  # relaxations to reach: the highest
    assert spread([]) == (None, None, None)
