"""Surface free energy γ(Δμ) across stoichiometries and the surface phase diagram it implies.

For a slab with an overlayer on one face, in the same cell and with the same substrate layers as the clean
slab, all energies from one energy model:

    γ(Δμ) = [E_slab+overlayer − E_clean − Σ_M n_M·μ_M^bulk − n_X·(E_ref,X + Δμ)] / A

- n_M: overlayer atoms of every element M other than the adsorbate X, taken from (and returned to) the bulk
  reservoir at μ_M^bulk, the energy per atom of the bulk crystal (for Ag–O: the overlayer Ag atoms);
- n_X: adsorbate atoms, from a gas reservoir whose chemical potential is E_ref,X + Δμ, with E_ref,X the
  energy per atom of the reference molecule (½·E_O2 for oxygen), so Δμ = Δμ_O of the surface literature;
- A: the area of the covered face (|a × b| of the cell), so γ is in eV/Å² and the clean slab has γ = 0.

γ is linear in Δμ with slope −n_X/A: the phase diagram is the lower envelope of straight lines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from ase import Atoms
from ase.build import bulk, molecule
from ase.data import atomic_numbers, reference_states
from ase.eos import EquationOfState

from surfdiff_core.composition import parse_composition
from surfdiff_core.relax.ase_relax import relax_atoms
from surfdiff_core.store.documents import StructureDoc

if TYPE_CHECKING:
    from ase.calculators.calculator import Calculator

    from surfdiff_core.system import SurfaceSystem


@dataclass(frozen=True)
class PhaseLine:
    """γ(Δμ) = intercept + slope·Δμ of one phase (eV/Å²)."""

    label: str
    intercept: float  # γ at Δμ = 0
    slope: float  # −n_X / A
    composition: str = ""
    cell: str = ""

    def gamma(self, dmu: float | np.ndarray) -> float | np.ndarray:
        return self.intercept + self.slope * np.asarray(dmu, float)


@dataclass(frozen=True)
class PhaseSegment:
    """The Δμ range [dmu_min, dmu_max] over which `line` is the most stable phase."""

    label: str
    dmu_min: float
    dmu_max: float
    line: PhaseLine


def window_text(dmu_min: float, dmu_max: float, sep: str = ", ") -> str:
    """A Δμ window in eV as '-0.42, +0.50': two decimals, more (up to four) where a narrow window's ends would
    print alike ('-0.4213, -0.4207', not '-0.42, -0.42')."""
    for digits in (2, 3, 4):
        lo, hi = f"{dmu_min:+.{digits}f}", f"{dmu_max:+.{digits}f}"
        if lo != hi:
            break
    return f"{lo}{sep}{hi}"


def surface_area(atoms: Atoms) -> float:
    """|a × b| of the slab's in-plane cell, Å²."""
    cell = np.asarray(atoms.cell)
    return float(np.linalg.norm(np.cross(cell[0], cell[1])))


def phase_line(
    energy: float,
    clean_energy: float,
    area: float,
    overlayer: Mapping[str, int] | str,
    *,
    adsorbate: str,
    adsorbate_reference: float,
    bulk_references: Mapping[str, float],
    label: str = "",
    cell: str = "",
) -> PhaseLine:
    """The γ(Δμ) line of one structure (formula in the module docstring).

    `adsorbate_reference`: energy per adsorbate atom of the reference molecule (½·E_O2 for 'O');
    `bulk_references`: energy per atom of the bulk crystal of every other overlayer element.
    """
    counts = parse_composition(overlayer) if isinstance(overlayer, str) else dict(overlayer)
    missing = sorted(el for el in counts if el != adsorbate and el not in bulk_references)
    if missing:
        raise ValueError(f"no bulk reference energy for {', '.join(missing)} (needed for {counts})")
    if area <= 0:
        raise ValueError(f"surface area must be positive, got {area}")
    n_ads = counts.get(adsorbate, 0)
    reservoir = sum(n * bulk_references[el] for el, n in counts.items() if el != adsorbate)
    intercept = (energy - clean_energy - reservoir - n_ads * adsorbate_reference) / area
    composition = "".join(f"{el}{n}" for el, n in counts.items())
    return PhaseLine(label or f"{composition} {cell}".strip(), intercept, -n_ads / area, composition, cell)


def surface_free_energy(
    energy: float, clean_energy: float, area: float, overlayer: Mapping[str, int] | str,
    dmu: float | np.ndarray, **references,
) -> float | np.ndarray:
    """γ(Δμ) in eV/Å² of one structure; keyword arguments as for `phase_line`."""
    return phase_line(energy, clean_energy, area, overlayer, **references).gamma(dmu)


def clean_line(label: str = "clean") -> PhaseLine:
    """The clean surface: γ = 0 by construction, always a candidate phase (it wins at low Δμ)."""
    return PhaseLine(label, 0.0, 0.0, "", "")


def lines_from_docs(
    docs: Sequence[StructureDoc],
    clean_energies: Mapping[str, float],
    *,
    adsorbate: str,
    adsorbate_reference: float,
    bulk_references: Mapping[str, float],
) -> list[PhaseLine]:
    """One line per (system_id, composition): its lowest-energy document. `clean_energies` by system_id;
    documents without an energy, with an error, or of a system without a clean energy are skipped.
    """
    best: dict[tuple[str, str], StructureDoc] = {}
    for d in docs:
        if d.energy is None or d.error or d.system_id not in clean_energies:
            continue
        key = (d.system_id, d.composition)
        if key not in best or d.energy < best[key].energy:  # type: ignore[operator]
            best[key] = d
    return [
        phase_line(d.energy, clean_energies[d.system_id], surface_area(d.to_atoms()), d.composition,  # type: ignore[arg-type]
                   adsorbate=adsorbate, adsorbate_reference=adsorbate_reference,
                   bulk_references=bulk_references, cell=d.cell)
        for d in best.values()
    ]


def phase_diagram(lines: Sequence[PhaseLine], dmu_range: tuple[float, float]) -> list[PhaseSegment]:
    """The lower envelope of the lines over `dmu_range`: consecutive segments, each with its winning phase.

    Exact: breakpoints are the pairwise crossings inside the range; the winner of each interval is the
    lowest line at its midpoint, and neighbouring intervals with the same winner are merged.
    """
    lo, hi = map(float, dmu_range)
    if not lines or hi <= lo:
        raise ValueError("need at least one line and dmu_range with min < max")
    a = np.array([ln.intercept for ln in lines])
    b = np.array([ln.slope for ln in lines])
    points = [lo, hi]
    for i in range(len(lines)):
        for j in range(i + 1, len(lines)):
            if b[i] != b[j]:
                x = (a[j] - a[i]) / (b[i] - b[j])
                if lo < x < hi:
                    points.append(float(x))
    edges = np.unique(points)
    segments: list[PhaseSegment] = []
    for left, right in zip(edges[:-1], edges[1:], strict=True):
        winner = int(np.argmin(a + b * (left + right) / 2))
        if segments and segments[-1].line is lines[winner]:
            segments[-1] = PhaseSegment(segments[-1].label, segments[-1].dmu_min, float(right), lines[winner])
        else:
            segments.append(PhaseSegment(lines[winner].label, float(left), float(right), lines[winner]))
    return segments


# ---- references with the same energy model -----------------------------------------------------------------
def bulk_energy_per_atom(
    element: str, calculator: Calculator, *, crystal: str | None = None, a: float | None = None,
    c: float | None = None,
) -> float:
    """Energy per atom of the bulk crystal. With `a` (and `c` for hcp) given: at that lattice (pass the
    slab's own lattice constant, so substrate and reservoir agree); without: minimum of an equation of
    state over isotropic strains around ASE's reference lattice.
    """
    crystal = crystal or (reference_states[atomic_numbers[element]] or {}).get("symmetry", "fcc")
    atoms = bulk(element, crystal, a=a, c=c) if a is not None else bulk(element, crystal)
    atoms.calc = calculator
    if a is not None:
        return float(atoms.get_potential_energy()) / len(atoms)
    cell0 = np.array(atoms.cell)
    volumes, energies = [], []
    for s in np.linspace(0.95, 1.05, 11):
        atoms.set_cell(cell0 * s, scale_atoms=True)
        volumes.append(atoms.get_volume())
        energies.append(atoms.get_potential_energy())
    _, e0, _ = EquationOfState(volumes, energies).fit()
    return float(e0) / len(atoms)


def molecule_energy(
    calculator: Calculator, name: str = "O2", *, box: float = 15.0, fmax: float = 0.01, steps: int = 200
) -> float:
    """Total energy of the relaxed molecule `name` (ASE's g2 set) in a periodic `box` Å cube, spin-unpolarised."""
    mol = molecule(name)
    mol.cell = [box, box, box]
    mol.pbc = True
    mol.center()
    return float(relax_atoms(mol, calculator, fmax=fmax, steps=steps).energy)


def clean_slab_energy(
    system_or_atoms: SurfaceSystem | Atoms, calculator: Calculator, *, relax: bool = True,
    fmax: float = 0.05, steps: int = 200, fixed: Sequence[int] | None = None,
) -> float:
    """Energy of the clean substrate slab, relaxed like the structures (fixed bottom layers) by default."""
    if isinstance(system_or_atoms, Atoms):
        atoms, held = system_or_atoms, list(fixed or [])
    else:
        atoms, held = system_or_atoms.template, system_or_atoms.fixed_indices.tolist()
    if not relax:
        work = atoms.copy()
        work.calc = calculator
        return float(work.get_potential_energy())
    return float(relax_atoms(atoms, calculator, fmax=fmax, steps=steps, fixed=held).energy)
