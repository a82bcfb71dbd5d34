"""Evaluation of discovery runs: validity, uniqueness/novelty, budget curves against RSS, surface phase diagrams.

Pure functions over StructureDoc lists, ASE Atoms and numbers; no store access. Plots live in
`surfdiff_core.evaluate.plots` (imported on demand: it pulls in matplotlib).
"""

from __future__ import annotations

from surfdiff_core.evaluate.budget import (
    Speedup,
    TrainingCost,
    bootstrap_band,
    expected_best_curve,
    expected_relaxations_to_reach,
    generative_ranked_energies,
    ranked_energies,
    relaxations_to_reach,
    running_best,
    speedup,
    steps_summary,
    training_cost,
)
from surfdiff_core.evaluate.matching import (
    comparable_references,
    deduplicate,
    find_reference,
    novel_mask,
    novelty,
    slab_fingerprint,
    slab_structure,
    slabs_match,
    unique_groups,
    uniqueness,
)
from surfdiff_core.evaluate.phase import (
    PhaseLine,
    PhaseSegment,
    bulk_energy_per_atom,
    clean_line,
    clean_slab_energy,
    lines_from_docs,
    molecule_energy,
    phase_diagram,
    phase_line,
    surface_area,
    surface_free_energy,
)
from surfdiff_core.evaluate.validity import (
    ValidityCounts,
    atoms_outside_box,
    doc_reasons,
    min_overlayer_distance,
    validity_counts,
)

__all__ = [
    "PhaseLine", "PhaseSegment", "Speedup", "TrainingCost", "ValidityCounts", "atoms_outside_box",
    "bootstrap_band", "bulk_energy_per_atom", "clean_line", "clean_slab_energy", "comparable_references",
    "deduplicate", "doc_reasons", "expected_best_curve", "expected_relaxations_to_reach", "find_reference",
    "generative_ranked_energies", "lines_from_docs", "min_overlayer_distance", "molecule_energy", "novel_mask",
    "novelty", "phase_diagram", "phase_line", "ranked_energies", "relaxations_to_reach", "running_best",
    "slab_fingerprint", "slab_structure", "slabs_match", "speedup", "steps_summary", "surface_area",
    "surface_free_energy", "training_cost", "unique_groups", "uniqueness", "validity_counts",
]
