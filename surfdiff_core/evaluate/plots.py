"""Evaluation figures as PNG files (matplotlib Agg, headless). Each function returns the path it wrote."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np

from surfdiff_core.evaluate.budget import bootstrap_band, expected_best_curve, running_best
from surfdiff_core.evaluate.phase import PhaseLine, PhaseSegment

matplotlib.use("Agg")  # headless: flows and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

_DPI = 110


def _save(fig, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p)
    plt.close(fig)
    return p


def energy_distributions(
    groups: Mapping[str, Sequence[float]], path: str | Path, *, title: str = "", reference: float | None = None,
    bins: int = 40,
) -> Path:
    """Density histograms on shared bins (the paper's Fig. 3: generated-and-relaxed against RSS)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=_DPI)
    finite = {k: np.asarray(v, float)[np.isfinite(np.asarray(v, float))] for k, v in groups.items()}
    values = np.concatenate([v for v in finite.values() if len(v)] or [np.zeros(1)])
    edges = np.histogram_bin_edges(values, bins=bins)
    for label, e in finite.items():
        if len(e):
            ax.hist(e, bins=edges, density=True, alpha=0.5, label=f"{label} (n={len(e)})")
    if reference is not None:
        ax.axvline(reference, color="k", ls="--", lw=1, label="reference")
    ax.set_xlabel("energy (eV)")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def best_energy_curves(
    rss_energies: Sequence[float], generative_ranked: Mapping[str, Sequence[float]] | Sequence[float],
    path: str | Path, *, title: str = "", target: float | None = None, tol: float = 0.05, n_boot: int = 200,
    seed: int = 0,
) -> Path:
    """Best energy against oracle relaxations: RSS expected curve with its bootstrap band, and each generative
    arm's running minimum in ranking order (one array or {label: array}).
    """
    arms = generative_ranked if isinstance(generative_ranked, Mapping) else {"generative": generative_ranked}
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=_DPI)
    rss = np.asarray(rss_energies, float)
    rss = rss[np.isfinite(rss)]
    if len(rss):
        k = np.arange(1, len(rss) + 1)
        low, high = bootstrap_band(rss, n_boot=n_boot, seed=seed)
        ax.fill_between(k, low, high, color="C0", alpha=0.25, lw=0, label="RSS 90% bootstrap band")
        ax.plot(k, expected_best_curve(rss), color="C0", label=f"RSS expected best (n={len(rss)})")
    for n, (label, energies) in enumerate(arms.items(), start=1):
        curve = running_best(energies)
        if len(curve):
            ax.step(np.arange(1, len(curve) + 1), curve, where="post", color=f"C{n}", label=label)
    if target is not None:
        ax.axhspan(target - tol, target + tol, color="0.8", alpha=0.6, label=f"target ± {tol} eV")
    ax.set_xscale("log")
    ax.set_xlabel("oracle relaxations")
    ax.set_ylabel("best energy (eV)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def energy_vs_diffusion_steps(
    before: Mapping[int, Sequence[float]], after: Mapping[int, Sequence[float]], path: str | Path, *,
    title: str = "",
) -> Path:
    """Energies of samples against the number of diffusion steps, before and after relaxation (Fig. 4b)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=_DPI)
    rng = np.random.default_rng(0)  # horizontal jitter only, so the points do not hide each other
    for offset, (label, data, colour) in zip((-0.12, 0.12), (("before relaxation", before, "C3"),
                                                            ("after relaxation", after, "C0")), strict=True):
        steps = sorted(data)
        for i, s in enumerate(steps):
            e = np.asarray(data[s], float)
            x = i + offset + rng.uniform(-0.05, 0.05, len(e))
            ax.scatter(x, e, s=8, alpha=0.5, color=colour, label=label if i == 0 else None)
            if len(e):
                ax.hlines(np.median(e), i + offset - 0.1, i + offset + 0.1, color="k", lw=1.5)
    all_steps = sorted(set(before) | set(after))
    ax.set_xticks(range(len(all_steps)), [str(s) for s in all_steps])
    ax.set_xlabel("diffusion steps")
    ax.set_ylabel("energy (eV)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def phase_diagram_plot(
    lines: Sequence[PhaseLine], segments: Sequence[PhaseSegment], path: str | Path, *,
    adsorbate: str = "O", title: str = "",
) -> Path:
    """γ(Δμ) of every phase, the lower envelope in bold and each stable region shaded and labelled."""
    lo, hi = segments[0].dmu_min, segments[-1].dmu_max
    x = np.linspace(lo, hi, 200)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=_DPI)
    for n, line in enumerate(lines):
        ax.plot(x, line.gamma(x), color=f"C{n % 10}", lw=1, alpha=0.7, label=line.label)
    envelope = [(s.dmu_min, s.dmu_max, s.line) for s in segments]
    ys = np.concatenate([ln.gamma(x) for ln in lines])
    y_top = float(ys.max())
    for n, (a, b, line) in enumerate(envelope):
        xs = np.array([a, b])
        ax.plot(xs, line.gamma(xs), color="k", lw=2.5)
        ax.axvspan(a, b, color="0.5" if n % 2 else "0.8", alpha=0.15, lw=0)
        ax.text((a + b) / 2, y_top, line.label, ha="center", va="top", fontsize=8, rotation=90)
    ax.set_xlabel(f"Δμ_{adsorbate} (eV)")
    ax.set_ylabel("γ (eV/Å²)")
    ax.set_xlim(lo, hi)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower left")
    return _save(fig, path)


def phase_envelopes_plot(
    envelopes: Mapping[str, Sequence[PhaseSegment]], path: str | Path, *, adsorbate: str = "O", title: str = "",
) -> Path:
    """Lower envelopes side by side (the first is the reference, drawn dashed behind the others): each stable
    phase in one colour in every panel, shaded and labelled, so a phase an arm misses stands out."""
    names = list(envelopes)
    reference = envelopes[names[0]]
    labels = list(dict.fromkeys(s.label for segs in envelopes.values() for s in segs))
    colour = {label: f"C{n % 10}" for n, label in enumerate(labels)}
    ys = [float(s.line.gamma(x)) for segs in envelopes.values() for s in segs for x in (s.dmu_min, s.dmu_max)]
    y_lo, y_hi = min(ys), max(ys)
    pad = 0.05 * (y_hi - y_lo or 1.0)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.2), dpi=_DPI, sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        if name != names[0]:
            for s in reference:
                xs = np.array([s.dmu_min, s.dmu_max])
                ax.plot(xs, s.line.gamma(xs), color="k", lw=1, ls="--", alpha=0.6)
        for s in envelopes[name]:
            xs = np.array([s.dmu_min, s.dmu_max])
            ax.plot(xs, s.line.gamma(xs), color=colour[s.label], lw=2.5)
            ax.axvspan(s.dmu_min, s.dmu_max, color=colour[s.label], alpha=0.12, lw=0)
            ax.text((s.dmu_min + s.dmu_max) / 2, y_hi + pad, s.label, ha="center", va="top", fontsize=7,
                    rotation=90)
        ax.set_xlim(reference[0].dmu_min, reference[-1].dmu_max)
        ax.set_xlabel(f"Δμ_{adsorbate} (eV)")
        ax.set_title(name, fontsize=9)
    axes[0][0].set_ylim(y_lo - pad, y_hi + pad)
    axes[0][0].set_ylabel("γ (eV/Å²)")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)
