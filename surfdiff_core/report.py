"""Pictures people would rather look at than read: energy histograms and top/side views of structures."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from ase.visualize.plot import plot_atoms  # noqa: E402

from surfdiff_core.store.documents import StructureDoc  # noqa: E402


def energy_histogram(groups: dict[str, Sequence[float]], title: str, path: str | Path) -> Path:
    """One histogram per group (e.g. source or composition) on shared axes."""
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for label, energies in groups.items():
        if len(energies):
            bins = min(30, max(5, len(energies) // 2))
            ax.hist(list(energies), bins=bins, alpha=0.6, label=f"{label} ({len(energies)})")
    ax.set_xlabel("energy (eV)")
    ax.set_ylabel("structures")
    ax.set_title(title)
    if groups:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def structure_views(docs: Sequence[StructureDoc], path: str | Path, *, max_structures: int = 6) -> Path:
    """Top and side views of the given structures (lowest energy first), energies in the titles."""
    docs = list(docs)[:max_structures]
    n = max(1, len(docs))
    fig, axes = plt.subplots(2, n, figsize=(3.0 * n, 5.5), dpi=100, squeeze=False)
    for k, d in enumerate(docs):
        atoms = d.to_atoms()
        plot_atoms(atoms, axes[0, k], radii=0.8, rotation="0x,0y,0z")
        plot_atoms(atoms, axes[1, k], radii=0.8, rotation="-90x,0y,0z")
        e = f"{d.energy:.3f} eV" if d.energy is not None else "no energy"
        axes[0, k].set_title(f"{d.composition} {d.cell}\n{d.source}: {e}", fontsize=8)
        for ax in axes[:, k]:
            ax.set_xticks([])
            ax.set_yticks([])
    for k in range(len(docs), n):
        axes[0, k].axis("off")
        axes[1, k].axis("off")
    axes[0, 0].set_ylabel("top")
    axes[1, 0].set_ylabel("side")
    fig.tight_layout()
    return _save(fig, path)


def loss_curves(history: Sequence[dict[str, float]], path: str | Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for key in ("train_loss", "val_loss", "val_score", "val_forces"):
        ys = [h[key] for h in history if key in h]
        if ys:
            ax.plot(range(1, len(ys) + 1), ys, label=key)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p)
    plt.close(fig)
    return p


def png_markdown(path: str | Path, caption: str = "") -> str:
    """Markdown with the PNG embedded as a data URI (a Prefect markdown artifact shows it inline)."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"![{caption}](data:image/png;base64,{data})"


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    buf.write("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n")
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            cells.append(f"{v:.4f}" if isinstance(v, float) else str(v if v is not None else "-"))
        buf.write("| " + " | ".join(cells) + " |\n")
    return buf.getvalue()
