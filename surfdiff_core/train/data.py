"""Training data from the results store: dataset selection as in the paper, and periodic-repetition augmentation.

Selection: documents of one study and system (the training cell) computed with the study's energy model,
valid and inside the box, within an energy window above the per-(energy model, composition) minimum
(D: 2 eV, D_lowE: 0.5 eV), optionally restricted to compositions or to the oxidised / reduced side of an
element ratio (D_lowE^ox / D_lowE^red). Augmentation: r×r×1 periodic repetition of each structure
(energies × r²) so the denoiser sees many more atoms at no DFT cost.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from ase import Atoms

from surfdiff_core.composition import parse_composition
from surfdiff_core.config import TrainConfig
from surfdiff_core.errors import SurfdiffError
from surfdiff_core.geometry.batch import SlabBatch, collate
from surfdiff_core.store import ResultsStore, StructureDoc


@dataclass
class Sample:
    """One structure for the denoiser (relaxed geometry) with MLFF frames (positions, energy, forces)."""

    atoms: Atoms
    movable: np.ndarray
    z_box: tuple[float, float]
    energy: float
    forces: np.ndarray
    frames: list[tuple[np.ndarray, float, np.ndarray]]
    doc_id: str
    composition: str
    group: str  # structures of one group (tiles, relaxations of one candidate) stay on one side of the split
    # energy above the lowest structure of the same composition and cell, per movable atom (eV): the
    # condition of energy-conditioned models; intensive, so tiles keep it
    e_diff: float = 0.0
    denoise: bool = True  # False: an oracle single point, not a minimum; MLFF frames only


@dataclass(frozen=True)
class DataScope:
    """Which documents may train a model: one study's structures of one system, computed with the listed
    energy models (the first sets the energy scale)."""

    study: str | None
    system_id: str
    energy_models: tuple[str, ...]
    # Active learning: oracle relaxations of samples in these (target) systems join the training set, but
    # never other documents of those cells (the RSS baseline of the evaluation stays unseen), and only the
    # labels passed on by this chain's rounds (`learned_labels`, document ids), never another chain's.
    learned_systems: tuple[str, ...] = ()
    learned_labels: tuple[str, ...] = ()
    # the training cell's documents by id (the RSS stage's result, or an active-learning chain's data): when
    # given, no other document of the cell joins, whatever else the study holds there
    data_ids: tuple[str, ...] = ()

    def _training_cell(self) -> dict:
        crit: dict = {"system_id": self.system_id, "source": {"$in": ["rss", "relaxed", "dft"]}}
        if self.data_ids:
            crit["doc_id"] = {"$in": list(self.data_ids)}
        return crit

    def cost_criteria(self) -> dict:
        """Every oracle relaxation of the training cell the data is chosen from, before the quality filters and the
        energy window (failed and dropped ones cost calls too); active-learning labels are charged by id."""
        crit: dict = {**self._training_cell(), "energy_model": {"$in": list(self.energy_models)}}
        if self.study is not None:
            crit["study"] = self.study
        return crit

    def criteria(self) -> dict:
        crit: dict = {"valid": True, "in_box": True, "energy": {"$ne": None},
                      "energy_model": {"$in": list(self.energy_models)}}
        training = self._training_cell()
        if self.learned_systems and self.learned_labels:
            learned = {"system_id": {"$in": list(self.learned_systems)},
                       "source": {"$in": ["relaxed", "dft", "single_point"]},
                       "meta.active_learning": True, "doc_id": {"$in": list(self.learned_labels)}}
            crit["$or"] = [training, learned]
        else:
            crit.update(training)
        if self.study is not None:
            crit["study"] = self.study
        return crit


def select_documents(store: ResultsStore, scope: DataScope, cfg: TrainConfig) -> list[StructureDoc]:
    """The training set of `scope`: windows and references are per energy model, never across them."""
    crit = scope.criteria()
    if cfg.compositions:
        crit["composition"] = {"$in": list(cfg.compositions)}
    docs = list(store.find(crit, with_frames=True))
    if cfg.oxygen_ratio is not None and cfg.ratio_side != "any":
        num, den, ratio = cfg.oxygen_ratio
        keep = []
        for d in docs:
            c = parse_composition(d.composition)
            r = c.get(num, 0) / max(c.get(den, 0), 1)
            if (cfg.ratio_side == "above" and r > ratio) or (cfg.ratio_side == "below" and r < ratio):
                keep.append(d)
        docs = keep
    if cfg.energy_window is not None:  # over minima; single points are MLFF data wherever the MLFF went
        emin: dict[tuple[str | None, str], float] = {}
        for d in docs:
            key = (d.energy_model, d.composition)
            if d.source != "single_point":
                emin[key] = min(emin.get(key, np.inf), d.energy)
        docs = [d for d in docs if d.source == "single_point"
                or d.energy <= emin[(d.energy_model, d.composition)] + cfg.energy_window]
    docs.sort(key=lambda d: d.doc_id)
    return docs


def reference_shifts(docs: Sequence[StructureDoc], energy_models: Sequence[str]) -> dict[str, dict[int, float]]:
    """Per energy model, per-element energies Δμ_Z that move its energies onto the first model's scale
    (E' = E − Σ n_Z Δμ_Z), from least-squares element references fitted to each model's own data."""
    elements = sorted({int(z) for d in docs for z in d.to_atoms().numbers})
    index = {z: k for k, z in enumerate(elements)}

    def fit(model: str) -> np.ndarray:
        rows, y = [], []
        for d in docs:
            if d.energy_model == model:
                counts = np.zeros(len(elements))
                for z in d.to_atoms().numbers:
                    counts[index[int(z)]] += 1
                rows.append(counts)
                y.append(d.energy)
        if not rows:
            raise SurfdiffError(f"no training data for energy model {model!r}")
        return np.linalg.lstsq(np.asarray(rows), np.asarray(y), rcond=None)[0]

    ref = fit(energy_models[0])
    return {m: dict(zip(elements, (fit(m) - ref).tolist(), strict=True)) for m in energy_models[1:]}


def doc_to_sample(doc: StructureDoc, max_frames: int, shift: dict[int, float] | None = None) -> Sample:
    """A document as training sample; `shift` (per-element eV) moves its energies onto another model's scale."""
    atoms = doc.to_atoms()
    frames = [(np.asarray(f.positions), f.energy, np.asarray(f.forces)) for f in doc.trajectory]
    if len(frames) > max_frames:  # keep the last frame (relaxed) and evenly spaced earlier ones
        idx = np.unique(np.linspace(0, len(frames) - 1, max_frames).round().astype(int))
        frames = [frames[i] for i in idx]
    forces = np.asarray(doc.forces) if doc.forces is not None else np.zeros((len(atoms), 3))
    if not frames:
        frames = [(atoms.positions.copy(), float(doc.energy), forces)]
    offset = sum(shift.get(int(z), 0.0) for z in atoms.numbers) if shift else 0.0
    frames = [(p, e - offset, f) for p, e, f in frames]
    # A label (relaxation, single point) groups with its generated parent: near-identical geometries of one candidate.
    group = doc.parent_id if doc.source in ("relaxed", "dft", "single_point") and doc.parent_id else doc.doc_id
    return Sample(atoms=atoms, movable=np.asarray(doc.movable, bool), z_box=(doc.z_box[0], doc.z_box[1]),
                  energy=float(doc.energy) - offset, forces=forces, frames=frames, doc_id=doc.doc_id,
                  composition=doc.composition, group=group, denoise=doc.source != "single_point")


def repeat_sample(s: Sample, r: int) -> Sample:
    """Periodic r×r×1 repetition: atoms, masks and forces tiled, energies × r²."""
    if r == 1:
        return s
    n = len(s.atoms)
    big = s.atoms.repeat((r, r, 1))
    tile = r * r

    def rep_pos(pos: np.ndarray) -> np.ndarray:
        a = s.atoms.copy()
        a.positions = pos
        return a.repeat((r, r, 1)).positions

    frames = [(rep_pos(p), e * tile, np.tile(f, (tile, 1))) for p, e, f in s.frames]
    assert len(big) == n * tile
    return Sample(atoms=big, movable=np.tile(s.movable, tile), z_box=s.z_box, energy=s.energy * tile,
                  forces=np.tile(s.forces, (tile, 1)), frames=frames, doc_id=f"{s.doc_id}x{r}",
                  composition=s.composition, group=s.group, e_diff=s.e_diff, denoise=s.denoise)


def load_samples(store: ResultsStore, scope: DataScope, cfg: TrainConfig) -> tuple[list[Sample], list[str]]:
    docs = select_documents(store, scope, cfg)
    if len(docs) < 2:
        raise SurfdiffError(
            f"only {len(docs)} usable training structures for study {scope.study!r}, system {scope.system_id}, "
            f"energy model {', '.join(scope.energy_models)}: run `surfdiff rss` first"
        )
    shifts = reference_shifts(docs, scope.energy_models) if len(scope.energy_models) > 1 else {}
    samples = [doc_to_sample(d, cfg.max_frames_per_structure, shifts.get(d.energy_model)) for d in docs]
    set_energy_differences(samples, [d.system_id for d in docs])
    if cfg.repeat > 1:
        samples = samples + [repeat_sample(s, cfg.repeat) for s in samples]
    return samples, [d.doc_id for d in docs]


def set_energy_differences(samples: Sequence[Sample], system_ids: Sequence[str]) -> None:
    """E_diff of every sample: its energy above the lowest of the same system (cell) and composition, per
    movable atom (energies already on one scale)."""
    lowest: dict[tuple[str, str], float] = {}
    for s, sid in zip(samples, system_ids, strict=True):
        key = (sid, s.composition)
        lowest[key] = min(lowest.get(key, np.inf), s.energy if s.denoise else np.inf)
    for s, sid in zip(samples, system_ids, strict=True):
        if not s.denoise or not np.isfinite(lowest[(sid, s.composition)]):
            continue  # no condition: never in the denoiser's loss
        s.e_diff = (s.energy - lowest[(sid, s.composition)]) / max(int(np.sum(s.movable)), 1)


def data_fingerprint(doc_ids: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(sorted(doc_ids)).encode()).hexdigest()[:12]


def structure_batch(samples: Sequence[Sample], device: torch.device | str, dtype=torch.float32) -> SlabBatch:
    """Relaxed geometries for the denoising score-matching loss."""
    return collate([s.atoms for s in samples], [s.movable for s in samples], [s.z_box for s in samples],
                   device=device, dtype=dtype)


def frame_batch(
    samples: Sequence[Sample], rng: np.random.Generator, device: torch.device | str, dtype=torch.float32
) -> tuple[SlabBatch, torch.Tensor, torch.Tensor]:
    """One random relaxation frame per sample, with reference energies [B] and forces [N, 3]."""
    atoms, energies, forces = [], [], []
    for s in samples:
        pos, e, f = s.frames[int(rng.integers(len(s.frames)))]
        a = s.atoms.copy()
        a.positions = pos
        atoms.append(a)
        energies.append(e)
        forces.append(f)
    batch = collate(atoms, [s.movable for s in samples], [s.z_box for s in samples], device=device, dtype=dtype)
    return (batch, torch.as_tensor(np.asarray(energies), dtype=dtype, device=device),
            torch.as_tensor(np.concatenate(forces), dtype=dtype, device=device))


def element_reference_energies(samples: Sequence[Sample], elements: Sequence[int]) -> tuple[np.ndarray, float]:
    """Least-squares per-element energies μ_Z (E ≈ Σ n_Z μ_Z) and the residual std per atom: the MLFF's
    normalisation statistics, stored in the checkpoint."""
    index = {z: k for k, z in enumerate(elements)}
    rows, targets, natoms = [], [], []
    for s in samples:
        for _, e, _ in s.frames:
            counts = np.zeros(len(elements))
            for z in s.atoms.numbers:
                counts[index[int(z)]] += 1
            rows.append(counts)
            targets.append(e)
            natoms.append(len(s.atoms))
    a, y = np.asarray(rows), np.asarray(targets)
    mu, *_ = np.linalg.lstsq(a, y, rcond=None)
    resid = (y - a @ mu) / np.asarray(natoms)
    std = float(resid.std()) if len(resid) > 1 else 1.0
    return mu, max(std, 1e-3)
