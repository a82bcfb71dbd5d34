"""REPORT.md and figure of the structure-aware benchmark, regenerated from `<out>/runs.jsonl`.

The newest settings group (settings id: what was measured, apart from seeds and the arms selected) is the
subject. Its tables use `report` seeds never run as `dev` seeds (dev seeds only when no such seed ran, and then
said so); per seed and arm, the latest finished run that measured the arm. Spreads are median (min–max) over
seeds; "not reached" is the worst value (lowest for ratios, highest for relaxations to reach).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
from sweep_report import read_records

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ARMS = ("em", "pc", "ffc", "ode", "ddim", "em+novelty", "seeded", "inpaint")
# key, column, format, None (not reached) is the highest value
METRICS = [("unique_per_100", "unique minima / 100 relaxations", "{:.1f}", False),
           ("unique_per_1e4_calls", "unique minima / 10⁴ force calls", "{:.2f}", False),
           ("distinct_minima", "distinct minima", "{:.0f}", False),
           ("distinct_energies", "distinct energies", "{:.0f}", False),
           ("best_generative_eV", "best (eV)", "{:.3f}", True),
           ("generative_to_reach", "relaxations to reach", "{:.0f}", True),
           ("ratio_relaxations", "per-target ratio", "{:.3g}x", False),
           ("ratio_atom_weighted", "atom-weighted ratio", "{:.3g}x", False),
           ("one_target_all_in", "one-target all-in", "{:.3g}x", False),
           ("model_evaluations_per_sample", "model evals / sample", "{:.0f}", False)]


def spread(values: list, none_high: bool = False) -> tuple:
    """(median, min, max); None (not reached) sorts lowest, or highest with none_high."""
    if not values:
        return None, None, None
    order = sorted(values, key=lambda v: (math.inf if none_high else -math.inf) if v is None else v)
    mid = order[(len(order) - 1) // 2], order[len(order) // 2]
    return (None if None in mid else (mid[0] + mid[1]) / 2), order[0], order[-1]


def fmt(s: tuple, form: str) -> str:
    def one(v: float | None) -> str:
        return "not reached" if v is None else form.format(v)

    return one(s[0]) if s[1] == s[2] else f"{one(s[0])} ({one(s[1])}–{one(s[2])})"


def rows_by_arm(records: list[dict]) -> dict[str, dict[str, dict[int, dict]]]:
    """arm -> target -> seed -> the latest finished measurement (no error) of it."""
    out: dict[str, dict[str, dict[int, dict]]] = {}
    for r in sorted(records, key=lambda r: r["ended"]):
        for arm, a in r.get("arms", {}).items():
            for row in a["targets"]:
                if "error" not in row:
                    out.setdefault(arm, {}).setdefault(row["target"], {})[r["seed"]] = row
    return {arm: out[arm] for arm in ARMS if arm in out}


def target_table(by: dict, target: str) -> list[str]:
    head = ["arm", "seeds", "reached", *(m[1] for m in METRICS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, targets in by.items():
        rows = list(targets.get(target, {}).values())
        if rows:
            cells = [fmt(spread([r.get(k) for r in rows], hi), f) for k, _, f, hi in METRICS]
            lines.append(f"| {arm} | {len(rows)} | {sum(r['reached'] for r in rows)}/{len(rows)} | "
                         + " | ".join(cells) + " |")
    return lines


def all_in_table(records: list[dict]) -> list[str]:
    """Per arm over seeds: the all-in ratio over every target (atom-weighted) and the seeds reaching them all."""
    by: dict[str, dict[int, dict]] = {}
    for r in sorted(records, key=lambda r: r["ended"]):
        for arm, a in r.get("arms", {}).items():
            if a.get("all_in"):
                by.setdefault(arm, {})[r["seed"]] = a["all_in"]
    lines = ["| arm | seeds | all-in over the targets (atom-weighted) | force calls | every target reached |",
             "|---|---|---|---|---|"]
    for arm in (a for a in ARMS if a in by):
        v = list(by[arm].values())
        lines.append(f"| {arm} | {len(v)} | {fmt(spread([x['ratio']['atom_force_calls'] for x in v]), '{:.3g}x')}"
                     f" | {fmt(spread([x['ratio']['force_calls'] for x in v]), '{:.3g}x')} | "
                     f"{sum(x['reached'] == x['targets'] for x in v)}/{len(v)} |")
    return lines


def against_em(by: dict, targets: list[str]) -> list[str]:
    """Per target: the arms whose median beats em's on unique minima per 100 relaxations, and on reaching RSS's
    best (reached in more seeds, or as often with fewer median relaxations to reach)."""
    if "em" not in by:
        return ["The em arm has not run: no comparison.\n"]
    lines = []
    for target in targets:
        em = list(by["em"].get(target, {}).values())
        if not em:
            continue
        u_em = spread([r["unique_per_100"] for r in em])[0]
        reach_em = (sum(r["reached"] for r in em) / len(em), spread([r["generative_to_reach"] for r in em], True)[0])
        better_u, worse_u, better_r, worse_r = [], [], [], []
        for arm, t in by.items():
            rows = list(t.get(target, {}).values())
            if arm == "em" or not rows:
                continue
            u = spread([r["unique_per_100"] for r in rows])[0]
            (better_u if u is not None and u_em is not None and u > u_em else worse_u).append(arm)
            frac, n = sum(r["reached"] for r in rows) / len(rows), spread([r["generative_to_reach"] for r in rows],
                                                                          True)[0]
            wins = frac > reach_em[0] or (frac == reach_em[0] > 0 and n is not None
                                          and (reach_em[1] is None or n < reach_em[1]))
            (better_r if wins else worse_r).append(arm)
        lines += [f"- **{target}**: unique minima per 100 relaxations above em's median "
                  f"({'-' if u_em is None else f'{u_em:.1f}'}): {', '.join(better_u) or 'none'}; not above: "
                  f"{', '.join(worse_u) or 'none'}. Reaching RSS's best better than em: "
                  f"{', '.join(better_r) or 'none'}; not better: {', '.join(worse_r) or 'none'}."]
    return [*lines, ""]


def extra_tables(by: dict, targets: list[str]) -> list[str]:
    lines = []
    if "em+novelty" in by:
        lines += ["\n### em+novelty\n", "Sampled in the em arm's study after its evaluation: novelty guidance "
                  "pushes away from the minima the study holds for the target (its relaxed and RSS documents, the "
                  "em arm's relaxations here). New: its distinct minima that match none of em's. With em: both "
                  "arms' relaxations together.\n", "| target | seeds | known minima | new minima | unique / 100 "
                  "relaxations, with em |", "|---|---|---|---|---|"]
        for target in targets:
            rows = [r["novelty"] for r in by["em+novelty"].get(target, {}).values()]
            if rows:
                lines.append(f"| {target} | {len(rows)} | {fmt(spread([r['known_minima'] for r in rows]), '{:.0f}')}"
                             f" | {fmt(spread([r['new_vs_known'] for r in rows]), '{:.0f}')} | "
                             f"{fmt(spread([r['with_em']['unique_per_100'] for r in rows]), '{:.1f}')} |")
    if "inpaint" in by:
        lines += ["\n### Inpainting recovery\n", "Half of the overlayer of RSS's best structure held fixed (a random "
                  "half per seed), the rest regenerated; recovered: relaxations within 0.05 eV of it and "
                  "StructureMatcher-equal to it.\n", "| target | seeds | fixed / overlayer | recovered | fraction of "
                  "relaxations | relaxations |", "|---|---|---|---|---|---|"]
        for target in targets:
            rows = list(by["inpaint"].get(target, {}).values())
            if rows:
                p = [r["inpaint"] for r in rows]
                lines.append(f"| {target} | {len(rows)} | {len(p[0]['fixed_overlayer_indices'])} / "
                             f"{p[0]['overlayer_atoms']} | {fmt(spread([q['recovered'] for q in p]), '{:.0f}')} | "
                             f"{fmt(spread([q['recovered_fraction'] for q in p]), '{:.2f}')} | "
                             f"{fmt(spread([r['relaxations'] for r in rows]), '{:.0f}')} |")
    return lines


def figure(by: dict, path: Path) -> Path:
    """Unique minima per 100 relaxations per arm, one point per seed (a marker per target)."""
    fig, ax = plt.subplots(figsize=(7.5, 3.8), dpi=110)
    targets = list(dict.fromkeys(t for a in by.values() for t in a))
    for j, target in enumerate(targets):
        for i, arm in enumerate(by):
            values = [r["unique_per_100"] for r in by[arm].get(target, {}).values()]
            xs = [i + 0.25 * (j - (len(targets) - 1) / 2) + 0.04 * math.sin(k * 2.4) for k in range(len(values))]
            ax.scatter(xs, values, s=22, color=f"C{j}", marker="os^Dv"[j % 5], label=target if i == 0 else None)
    ax.set_xticks(range(len(by)), list(by), rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("unique relaxed minima / 100 relaxations")
    ax.set_title("distinct minima per oracle relaxation, one point per seed")
    ax.set_ylim(bottom=0)
    if targets:
        ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(out: Path) -> Path:
    records, bad = read_records(out / "runs.jsonl")
    done = [r for r in records if r.get("status") == "finished"]
    dev_seeds = sorted({r["seed"] for r in records if r["seed_role"] == "dev"})
    report_seeds = sorted({r["seed"] for r in records if r["seed_role"] == "report"})
    both = sorted(set(dev_seeds) & set(report_seeds))
    lines = ["# Structure-aware generation against the shipped arm (EMT, shipped model emt-ag111-o)\n",
             f"Hygiene: report seeds {', '.join(map(str, report_seeds)) or 'none'}; dev seeds (used while "
             f"developing, never in the headline) {', '.join(map(str, dev_seeds)) or 'none'}"
             + (f"; left out as run in both roles: {', '.join(map(str, both))}" if both else "") + ". History: "
             f"{len(records)} seed-runs in runs.jsonl ({len(done)} finished)"
             + (f"; {bad} unreadable lines skipped" if bad else "") + ".\n"]
    if not done:
        (out / "REPORT.md").write_text("\n".join([*lines, "No finished run yet.\n"]))
        return out / "REPORT.md"
    latest = max(done, key=lambda r: r["ended"])
    current = [r for r in done if r["settings_id"] == latest["settings_id"]]
    chosen = [r for r in current if r["seed_role"] == "report" and r["seed"] not in dev_seeds]
    role = "report seeds"
    if not chosen:
        chosen, role = [r for r in current if r["seed_role"] == "dev"], "dev seeds (no report seed ran: not a headline)"
    a, c = latest["args"], latest["study_config"]
    hosts = sorted({f"{h['cpu']}, {h['cores']} cores" for h in (r["host"] for r in current)})
    lines += [f"Settings `{latest['settings_id']}` (the latest; {len(current)} finished runs); commits "
              f"{', '.join(sorted({r['git'] for r in current}))}; machines "
              f"{'; '.join(hosts)}.\n",
              f"Setup: {c['substrate']['element']} {c['substrate']['facet']}, {c['substrate']['layers']} layers, "
              f"oracle {c['oracle']['name']}, model {latest['model']} (no training). Per target and arm "
              f"{a['samples']} samples of {c['sample']['steps']} steps, the best {a['budget']} distinct relaxed "
              f"with EMT to {c['rss']['fmax']} eV/Å (at most {c['rss']['steps']} steps); RSS arm {a['rss_budget']} "
              f"relaxations per target (seed {a['rss_arm_seed']}, shared by every arm and seed). em+novelty: "
              f"strength {a['novelty']}; seeded: t0 {a['t0']}. seeded and inpaint start from RSS's best "
              "structure: their ratios do not charge the RSS calls that found it, so they are no discovery "
              "measure; they say whether the arm keeps or recovers a known minimum.\n",
              "Unique minima: distinct structures (StructureMatcher on the slab, surfdiff_core.evaluate.matching) "
              "among the arm's finished relaxations, per 100 relaxations and per 10⁴ oracle force calls (steps + 1 "
              "per relaxation); distinct energies (more than 0.05 eV apart) beside it as a cross-check. Reached: "
              "within 0.05 eV of RSS's best. Ratios as the evaluation stage defines them (RSS expected / the arm's "
              "cost to reach RSS's best; one-target all-in charges the shipped model's training data).\n",
              f"## Results over {len(chosen)} runs of {role}\n"]
    by = rows_by_arm(chosen)
    targets = list(dict.fromkeys(t for arm in by.values() for t in arm))
    fig = figure(by, out / "figures" / "unique-minima.png")
    lines.append(f"![unique minima per 100 relaxations]({fig.relative_to(out)})\n")
    lines += ["\n### All targets: the discovery ratio\n", "All-in as the sweep benchmark defines it: Σ RSS "
              "expected / (the shipped model's training data + Σ the arm's relaxations until each target's hit); "
              "not reached unless every target was.\n", *all_in_table(chosen)]
    for target in targets:
        lines += [f"\n### {target}\n", *target_table(by, target)]
    lines += ["\n### Against em (the shipped arm)\n", *against_em(by, targets), *extra_tables(by, targets)]
    lines += ["\n## Every run\n", "| seed | role | arms | status | wall (min) | commit | run |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['seed_role']} | {', '.join(r.get('arms_run', []))} | {r['status']} | "
              f"{r.get('wall_total_s', 0) / 60:.1f} | {r['git'][:12]} | {r['run_id']} |"
              for r in sorted(records, key=lambda r: (r["seed"], r.get("ended", "")))]
    errors = [f"- seed {r['seed']}, {arm}, {row['target']}: {row['error']}" for r in done
              for arm, x in r.get("arms", {}).items() for row in x["targets"] if "error" in row]
    errors += [f"- seed {r['seed']} run {r['run_id']} {r['status']}: {r.get('error', '')}" for r in records
               if r.get("status") != "finished"]
    if errors:
        lines += ["\n## Errors and unfinished runs\n", *errors]
    (out / "REPORT.md").write_text("\n".join(lines) + "\n")
    return out / "REPORT.md"
