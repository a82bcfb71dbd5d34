"""The sweep benchmark's REPORT.md and figure, regenerated from `<out>/runs.jsonl` (every seed-run recorded there).

Records are grouped by their settings id (what was measured, apart from the seed): the newest group is the
report's subject, older ones are listed at the end. Within it, the headline uses only `report` seeds that were
never run as `dev` seeds; one run per seed (its latest untagged run, else its latest rerun) counts towards
the spread over seeds, and every run of a seed that ran more than once is listed under the spread between reruns.
A value that was not reached counts as the lowest in a median, min or max.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib
import matplotlib.ticker

from surfdiff_core.evaluate.cost import HEADLINE, UNIT_WORDS, UNITS
from surfdiff_core.evaluate.phase import window_text

matplotlib.use("Agg")  # headless, as surfdiff_core.evaluate.plots
import matplotlib.pyplot as plt  # noqa: E402

Spread = tuple[float | None, float | None, float | None]
# Options that do not change what is measured (compared between settings groups without them).
NOT_SETTINGS = {"seeds", "seed_role", "out", "report_only", "workers", "rss_arm_ahead", "rerun"}


def read_records(path: Path) -> tuple[list[dict], int]:
    """Every record of runs.jsonl in written order, and how many lines could not be read."""
    records, bad = [], 0
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
    return records, bad


def spread(values: list[float | None]) -> Spread:
    """(median, min, max), None counting as the lowest; an even count's median is None if a middle one is."""
    if not values:
        return None, None, None
    low = sorted(values, key=lambda v: -math.inf if v is None else v)
    mid = low[(len(low) - 1) // 2], low[len(low) // 2]
    return (None if None in mid else (mid[0] + mid[1]) / 2), low[0], low[-1]


def x(v: float | None) -> str:
    return "not reached" if v is None else f"{v:.1f}x" if v >= 10 else f"{v:.2f}x"


def fmt(s: Spread) -> str:
    return f"{x(s[0])} ({x(s[1])}–{x(s[2])})" if s[1] != s[2] else x(s[0])


def per_seed(records: list[dict]) -> dict[int, dict]:
    """One run per seed: its latest run without a rerun tag, else its latest rerun."""
    out: dict[int, dict] = {}
    for r in sorted(records, key=lambda r: r["ended"]):
        cur = out.get(r["seed"])
        if cur is None or not r.get("rerun") or cur.get("rerun"):
            out[r["seed"]] = r
    return dict(sorted(out.items()))


def target_names(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(t["target"] for r in records for t in r["targets"]))


def summarise(records: list[dict]) -> dict:
    """Spreads over seeds (one run each) of the all-in ratios and of every target's ratios."""
    seeds = per_seed(records)
    runs = list(seeds.values())

    def of(r: dict, name: str) -> dict:
        return next((t for t in r["targets"] if t["target"] == name), {})

    targets = {}
    for name in target_names(runs):
        rows = [of(r, name) for r in runs]
        targets[name] = {"relaxations": spread([t.get("ratio_relaxations") for t in rows]),
                         "atom_weighted": spread([t.get("ratio_atom_weighted") for t in rows]),
                         "one_target": spread([(t.get("one_target_all_in") or {}).get(HEADLINE) for t in rows]),
                         "reached": sum(bool(t.get("reached")) for t in rows)}
    return {"seeds": list(seeds), "n": len(runs),
            "all_in": {u: spread([r["all_in"]["ratio"].get(u) for r in runs]) for u in UNITS},
            "all_reached": sum(r["all_in"]["reached"] == r["all_in"]["targets"] for r in runs),
            "targets": targets}


def reruns(records: list[dict]) -> dict[int, list[dict]]:
    """The seeds that ran more than once with these settings: every run, oldest first."""
    by: dict[int, list[dict]] = {}
    for r in sorted(records, key=lambda r: r["ended"]):
        by.setdefault(r["seed"], []).append(r)
    return {s: rs for s, rs in sorted(by.items()) if len(rs) > 1}


def setup_text(r: dict) -> str:
    c = r["study_config"]
    sub, rs, al, ev, tr = c["substrate"], c["rss"], c["active_learning"], c["evaluate"], c["train"]
    m = c["model"]
    return (f"Substrate {sub['element']} {sub['facet']}, {sub['layers']} layers; oracle {c['oracle']['name']}. "
            f"Training data: RSS in {rs['cell']} of {', '.join(rs['compositions'])}, {rs['n']} structures per "
            f"seed. Model: PaiNN {m['n_features']} features × {m['n_interactions']} interactions, "
            f"{tr['epochs']} epochs, MLFF committee of {tr['ensemble']}. Active learning: {al['rounds']} rounds "
            f"of {al['relax_per_round']} oracle relaxations per target (budget {al['max_relaxations'] or 'none'}, "
            f"allocation {al.get('allocation', 'uniform')}), {al['epochs']} fine-tuning epochs each. Sampling: "
            f"{c['sample']['n']} guided samples of {c['sample']['steps']} steps per target; evaluation: the best "
            f"{ev['budget']} distinct samples per target in MLFF rank order. RSS: {ev['rss_budget']} relaxations "
            f"in every target cell (seed {ev['seed']}, one arm per target shared by every seed, study "
            f"`{ev['rss_study']}`). Both arms relaxed with the oracle to {rs['fmax']} eV/Å, at most {rs['steps']} "
            f"steps. Targets ({len(r['targets'])}): {', '.join(t['target'] for t in r['targets'])}.")


def target_table(s: dict) -> list[str]:
    lines = ["| target | per-target (relaxations) | per-target (atom-weighted) | one-target all-in (atom-weighted) "
             "| reached |", "|---|---|---|---|---|"]
    for name, t in s["targets"].items():
        lines.append(f"| {name} | {fmt(t['relaxations'])} | {fmt(t['atom_weighted'])} | {fmt(t['one_target'])} "
                     f"| {t['reached']}/{s['n']} seeds |")
    return lines


def seed_table(records: list[dict]) -> list[str]:
    lines = ["| seed | role | rerun | all-in (atom-weighted) | force calls | atoms³ | reached | training | active "
             "learning | wall (min) | commit | run |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: (r["seed"], r["ended"])):
        a = r["all_in"]
        lines.append(f"| {r['seed']} | {r['seed_role']} | {r.get('rerun') or '-'} | {x(a['ratio'][HEADLINE])} | "
                     f"{x(a['ratio']['force_calls'])} | {x(a['ratio']['atom3_force_calls'])} | "
                     f"{a['reached']}/{a['targets']} | {a['training'][HEADLINE]:.4g} | "
                     f"{a['active_learning'][HEADLINE]:.4g} | {r['wall_total_s'] / 60:.1f} | {r['git'][:12]}"
                     f"{'-dirty' if r['git'].endswith('-dirty') else ''} | {r['run_id']} |")
    return lines


def headline(s: dict, seeds_word: str) -> list[str]:
    a = s["all_in"]
    return [f"**All-in, {UNIT_WORDS[HEADLINE]} to reach every target's RSS best, RSS expected / surfdiff: "
            f"median {fmt(a[HEADLINE])}** over {s['n']} {seeds_word} ({', '.join(map(str, s['seeds']))}); "
            f"every target reached in {s['all_reached']} of {s['n']} seeds. Beside it: force calls "
            f"{fmt(a['force_calls'])}, atoms³-weighted {fmt(a['atom3_force_calls'])}.\n"]


def ratios_figure(report: list[dict], dev: list[dict], path: Path) -> Path:
    """Per seed (one run each): the sweep's all-in ratio and every target's per-target ratio (atom-weighted);
    boxes over the report seeds, dev seeds in grey, not reached as triangles at the bottom edge."""
    report, dev = list(per_seed(report).values()), list(per_seed(dev).values())
    names = target_names(report + dev)
    cats = ["sweep all-in", *names]

    def values(r: dict) -> list[float | None]:
        per = {t["target"]: t.get("ratio_atom_weighted") for t in r["targets"]}
        return [r["all_in"]["ratio"].get(HEADLINE), *(per.get(n) for n in names)]

    rows = [(values(r), True) for r in report] + [(values(r), False) for r in dev]
    finite = [v for vs, _ in rows for v in vs if v]
    floor = min([*finite, 1.0]) / 2
    fig, ax = plt.subplots(figsize=(max(6.4, 1.2 + 0.8 * len(cats)), 3.8), dpi=110)
    boxes = [[vs[i] for vs, rep in rows if rep and vs[i]] for i in range(len(cats))]
    if any(boxes):
        ax.boxplot([b or [math.nan] for b in boxes], positions=range(len(cats)), widths=0.5, showfliers=False)
    labelled: set[str] = set()
    for k, (vs, rep) in enumerate(rows):
        for i, v in enumerate(vs):
            jitter = 0.15 * math.sin(k * 2.4)  # deterministic spread of the points
            label = f"{'report' if rep else 'dev'} seeds{', not reached' if v is None else ''}"
            style = {"marker": "v" if v is None else "o" if rep else "x", "color": "C0" if rep else "0.5"}
            ax.scatter(i + jitter, floor if v is None else v, s=22, zorder=3, **style,
                       label=None if label in labelled else label)
            labelled.add(label)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_yscale("log")
    ratio_ticks = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x")
    ax.yaxis.set_major_formatter(ratio_ticks)
    # minor labels only at 2x and 5x of each decade: every one of them overlaps on a few decades
    ax.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2.0, 5.0)))
    ax.yaxis.set_minor_formatter(ratio_ticks)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xticks(range(len(cats)), cats, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("RSS / surfdiff (atom-weighted)")
    ax.set_title("all-in ratio per seed, and per-target ratios (not reached: drawn at the bottom)")
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def phase_section(records: list[dict]) -> list[str]:
    """The sweep's science per seed-run: the γ(Δμ) lower envelope over every target's best structure (RSS's and
    surfdiff's together: the reference), and which of its stable phases each arm misses, RSS at surfdiff's
    all-in budget. Runs recorded before the comparison was kept are left out."""
    from surfdiff_core.evaluate.phase_compare import missed_sentence

    kept = [r for r in records if r.get("phase_comparison")]
    if not kept:
        return []
    ads = kept[0]["phase_comparison"].get("adsorbate", "O")
    out = ["\n## The sweep's phase diagram: what each arm concludes\n",
           f"Per seed-run of the table above: the stable phases of the lower envelope of γ(Δμ_{ads}) over the best "
           "structure either arm found in every target (the reference), and what surfdiff's sweep and RSS's "
           "sweep at the same all-in budget (atom-weighted, split over the targets) conclude.\n",
           f"| seed | role | stable phases (Δμ_{ads} windows, eV) | surfdiff | RSS at surfdiff's all-in budget |",
           "|---|---|---|---|---|"]
    for r in sorted(kept, key=lambda r: (r["seed"], r["ended"])):
        pc = r["phase_comparison"]
        phases = "; ".join(f"{row['phase']} [{window_text(row['dmu_min'], row['dmu_max'])}]" for row in pc["reference"])
        out.append(f"| {r['seed']} | {r['seed_role']} | {phases} | {missed_sentence(pc, 'surfdiff')} | "
                   f"{missed_sentence(pc, 'rss')} |")
    return out


def write_report(out: Path, headline_id: str | None = None) -> Path:
    """REPORT.md of `out` from its runs.jsonl: the headline over the runs with settings `headline_id` (the config
    as shipped) when any finished, else over the latest settings with report seeds (saying so), else the latest;
    every other settings group listed below."""
    records, bad = read_records(out / "runs.jsonl")
    done = [r for r in records if r.get("status") == "finished"]
    commands = (out / "commands.txt").read_text().splitlines() if (out / "commands.txt").is_file() else []
    dev_seeds = sorted({r["seed"] for r in records if r["seed_role"] == "dev"})
    lines = ["# Sweep benchmark: surfdiff against RSS, every oracle call counted\n",
             "Commands (every invocation into this folder; each resumes from the store):\n",
             *[f"    {c}" for c in commands], "",
             f"History: {len(records)} seed-runs in runs.jsonl ({len(done)} finished)"
             + (f"; {bad} unreadable lines skipped" if bad else "") + ". Seeds used for development (never in "
             f"the headline): {', '.join(map(str, dev_seeds)) or 'none'}.\n"]
    if not done:
        (out / "REPORT.md").write_text("\n".join([*lines, "No finished run yet.\n"]))
        return out / "REPORT.md"
    groups: dict[str, list[dict]] = {}
    for r in sorted(done, key=lambda r: r["ended"], reverse=True):
        groups.setdefault(r["settings_id"], []).append(r)
    shipped = headline_id in groups  # the config's own settings, else the latest with report seeds, else the latest
    with_report = [sid for sid, rs in groups.items()
                   if any(r["seed_role"] == "report" and r["seed"] not in dev_seeds for r in rs)]
    current_id = headline_id if shipped else (with_report or list(groups))[0]
    if shipped:
        which = "the config as shipped"
    elif headline_id is not None:
        which = (f"**not the config as shipped**, whose settings `{headline_id}` have no finished run yet: the "
                 f"latest settings {'with report seeds' if with_report else 'that finished'}")
    else:
        which = f"the latest {'with report seeds' if with_report else 'that finished'}"
    current = groups[current_id]
    latest = current[0]
    report = [r for r in current if r["seed_role"] == "report" and r["seed"] not in dev_seeds]
    excluded = sorted({r["seed"] for r in current if r["seed_role"] == "report" and r["seed"] in dev_seeds})
    dev = [r for r in current if r["seed_role"] == "dev"]
    hosts = sorted({f"{h['cpu']}, {h['cores']} cores, torch threads {h['torch_threads']}"
                    for h in (r["host"] for r in current)})
    lines += [f"Settings `{current_id}` ({latest['benchmark']}, {latest['energy_model']}), "
              f"{which}; "
              f"{len(current)} finished runs. Commits: {', '.join(sorted({r['git'] for r in current}))}. "
              f"Machines: {'; '.join(hosts)}.\n", setup_text(latest) + "\n",
              "Ratios are RSS's expected cost to reach its best in the target cell (random order) over surfdiff's. "
              "Per target: the target's own oracle calls (its active-learning labels, then its evaluation "
              "relaxations in MLFF rank order) until the first hit. One-target all-in: plus the training data and "
              "every active-learning call, as if it had been the only target. All-in over the sweep: Σ RSS "
              "expected over (training data + every active-learning call + Σ evaluation relaxations until each "
              "hit), defined only when every target was reached. Atom-weighted: force calls × atoms.\n"]
    figure = ratios_figure(report, dev, out / "figures" / "ratios.png")
    lines.append("## Headline (report seeds)\n")
    if report:
        s = summarise(report)
        lines += [*headline(s, "report seeds"), f"![ratios]({figure.relative_to(out)})\n", *target_table(s)]
    else:
        lines.append(f"No report seed has run with these settings yet.\n\n![ratios]({figure.relative_to(out)})\n")
    if excluded:
        lines.append(f"\nLeft out of the headline: seeds {', '.join(map(str, excluded))} ran as report seeds but "
                     "were also used for development (run as dev seeds, or diagnosed).\n")
    lines += ["\n### Every run with these settings\n", *seed_table(current)]
    lines.append("\n## Spread between reruns\n")
    again = reruns(current)
    if again:
        lines.append("Seeds run more than once with these settings, each run's all-in ratio (atom-weighted). A "
                     "resumed run repeats its stored numbers; a `--rerun TAG` run trains afresh on the same "
                     "shared RSS arms, so its difference is rerun noise, apart from the seed noise above.\n")
        for seed, rs in again.items():
            runs = ", ".join(f"{x(r['all_in']['ratio'][HEADLINE])} (run {r['run_id']}, "
                             f"{'rerun ' + repr(r['rerun']) if r.get('rerun') else 'untagged'}, {r['ended'][:16]})"
                             for r in rs)
            lines.append(f"- seed {seed} ({rs[-1]['seed_role']}): {runs}")
    else:
        lines.append("No seed has run twice with these settings: `--rerun TAG` runs seeds again from scratch.")
    lines += phase_section(report or dev)
    if dev:
        s = summarise(dev)
        lines += ["\n## Development seeds (not the headline)\n", *headline(s, "dev seeds"), *target_table(s)]
    others = [(sid, rs) for sid, rs in groups.items() if sid != current_id]
    if others:
        lines.append("\n## Other settings (not in the tables above)\n")
        now = {k: v for k, v in latest["args"].items() if k not in NOT_SETTINGS}
        for sid, rs in others:
            diff = {k: v for k, v in rs[0]["args"].items() if k not in NOT_SETTINGS and now.get(k) != v}
            rep = [r for r in rs if r["seed_role"] == "report" and r["seed"] not in dev_seeds]
            summary = f"all-in median {fmt(summarise(rep)['all_in'][HEADLINE])} over report seeds" if rep else \
                "no report seeds"
            runs = ", ".join(f"{r['seed']} ({r['seed_role']}{', rerun ' + r['rerun'] if r.get('rerun') else ''}): "
                             f"{x(r['all_in']['ratio'][HEADLINE])} ({r['all_in']['reached']}/{r['all_in']['targets']})"
                             for r in reversed(rs))
            lines.append(f"- `{sid}`: {len(rs)} runs, last {rs[0]['ended'][:16]}; {summary}; options that differ "
                         f"from the settings above: {diff or 'none'}; all-in per run: {runs}")
    diagnosed = [r for r in records if r.get("status") == "diagnosed"]
    if diagnosed:
        lines.append("\n## Diagnosed seed-runs (development seeds from then on)\n")
        lines += [f"- seed {r['seed']}, {r['ended'][:16]}: {r.get('diagnosis', '')}" for r in diagnosed]
    unfinished = [r for r in records if r.get("status") not in ("finished", "diagnosed")]
    if unfinished:
        lines.append("\n## Runs that did not finish\n")
        lines += [f"- seed {r['seed']} ({r['seed_role']}), run {r['run_id']}, {r.get('status')} at "
                  f"{r.get('ended', '?')[:16]}: {r.get('error', '')}" for r in unfinished]
    (out / "REPORT.md").write_text("\n".join(lines) + "\n")
    return out / "REPORT.md"
