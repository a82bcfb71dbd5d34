"""Reference energies of the γ(Δμ) phase diagram, computed once with the study's energy model.

The bulk crystal of every overlayer element other than the adsorbate, the adsorbate's molecule and the clean
slab of every cell (relaxed like the structures). Evaluation and the active-learning allocation use the same
references, so their phase diagrams agree.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from surfdiff_core.composition import parse_composition
from surfdiff_core.errors import ConfigError

if TYPE_CHECKING:
    from ase.calculators.calculator import Calculator

    from surfdiff_core.config import SurfdiffConfig
    from surfdiff_core.evaluate.phase import PhaseLine
    from surfdiff_core.system import SurfaceSystem


@dataclass
class PhaseReferences:
    adsorbate: str
    adsorbate_energy: float  # per adsorbate atom of its molecule (½·E_O2 for O)
    bulk: dict[str, float]  # energy per atom of each other element's bulk crystal
    clean: dict[str, float] = field(default_factory=dict)  # system_id -> relaxed clean slab energy

    def line(self, energy: float, system: SurfaceSystem, label: str = "") -> PhaseLine:
        """The γ(Δμ) line of a structure of `system` with total energy `energy`."""
        from surfdiff_core.evaluate.phase import phase_line, surface_area

        return phase_line(energy, self.clean[system.system_id], surface_area(system.template), system.composition,
                          adsorbate=self.adsorbate, adsorbate_reference=self.adsorbate_energy,
                          bulk_references=self.bulk, label=label, cell=system.cell)


def holds_adsorbate(cfg: SurfdiffConfig, compositions: Iterable[str]) -> bool:
    return any(cfg.evaluate.adsorbate in parse_composition(c) for c in compositions)


def phase_references(cfg: SurfdiffConfig, calculator: Calculator, systems: Iterable[SurfaceSystem],
                     known: PhaseReferences | None = None) -> PhaseReferences:
    """References for every system (a `known` set is extended, never recomputed)."""
    from surfdiff_core.evaluate.phase import bulk_energy_per_atom, clean_slab_energy, molecule_energy
    from surfdiff_core.system_build import resolve_lattice

    ev = cfg.evaluate
    systems = list(systems)
    refs = known
    if refs is None:
        per_molecule = parse_composition(ev.molecule).get(ev.adsorbate, 0)
        if not per_molecule:
            raise ConfigError(f"evaluate.molecule {ev.molecule!r} holds no {ev.adsorbate}")
        lattice = resolve_lattice(cfg) or {"a": float(cfg.substrate.lattice_constant)}
        crystal = "hcp" if cfg.substrate.facet == "hcp0001" else "fcc"
        bulk = {cfg.substrate.element: bulk_energy_per_atom(cfg.substrate.element, calculator, crystal=crystal,
                                                             a=lattice["a"], c=lattice.get("c"))}
        refs = PhaseReferences(ev.adsorbate, molecule_energy(calculator, ev.molecule) / per_molecule, bulk)
    for system in systems:
        for el in parse_composition(system.composition):
            if el not in refs.bulk and el != refs.adsorbate:
                refs.bulk[el] = bulk_energy_per_atom(el, calculator)
        if system.system_id not in refs.clean:
            refs.clean[system.system_id] = clean_slab_energy(system, calculator, fmax=cfg.rss.fmax,
                                                             steps=cfg.rss.steps)
    return refs
