"""What `generate` samples with beyond the model: the configured sampler (corrector settings bound) and the
structure-aware conditioning of `sample.inpaint` (fixed atoms, RePaint), `sample.seed_structure` (a structure
noised to t0 and denoised) and `sample.novelty` (a push away from the study's known minima), resolved once per
target before anything is sampled."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from surfdiff_core.config import SampleConfig
from surfdiff_core.diffusion.flow import SurfaceFlow
from surfdiff_core.diffusion.guidance import Guidance
from surfdiff_core.diffusion.inpaint import Known, repaint
from surfdiff_core.diffusion.novelty import NoveltyGuidance, PairDescriptor, SumGuidance
from surfdiff_core.diffusion.samplers import SAMPLERS, Sampler
from surfdiff_core.diffusion.seeded import noise_to, seeded_steps, start_at
from surfdiff_core.errors import ConfigError
from surfdiff_core.geometry.batch import SlabBatch, collate
from surfdiff_core.sample.known import FixedAtoms, resolve_fixed, resolve_seed, source_digest

if TYPE_CHECKING:
    from ase import Atoms

    from surfdiff_core.store import ResultsStore
    from surfdiff_core.system import SurfaceSystem


def make_sampler(scfg: SampleConfig) -> Sampler:
    """SAMPLERS[scfg.sampler] with the corrector samplers' settings bound."""
    sampler = SAMPLERS[scfg.sampler]
    if scfg.sampler == "pc":
        return functools.partial(sampler, corrector_steps=scfg.corrector_steps, snr=scfg.snr)
    if scfg.sampler == "ffc":
        return functools.partial(sampler, corrector_steps=scfg.corrector_steps, t_max=scfg.corrector_t_max,
                                 step=scfg.corrector_step)
    return sampler


def id_parts(scfg: SampleConfig) -> tuple:
    """What the sampler settings and the conditioning add to a sample's id; empty when unused, so samples drawn
    without them keep the ids they had before these settings existed."""
    parts: tuple = ()
    if scfg.sampler == "pc":
        parts += ("corrector", scfg.corrector_steps, scfg.snr)
    elif scfg.sampler == "ffc":
        parts += ("corrector", scfg.corrector_steps, scfg.corrector_step, scfg.corrector_t_max)
    if scfg.inpaint is not None:
        ip = scfg.inpaint
        parts += ("inpaint", source_digest(ip.source), ip.elements, ip.z_range, ip.indices, ip.resample)
    if scfg.seed_structure is not None:
        parts += ("seeded", source_digest(scfg.seed_structure), scfg.t0)
    if scfg.novelty > 0:
        parts += ("novelty", scfg.novelty)
    if scfg.share_batches:  # other batch companions and random streams: other samples
        parts += ("shared-batches",)
    return parts


@dataclass(frozen=True)
class Conditioning:
    """The resolved inpainting / seed of one target (either may be absent)."""

    fixed: FixedAtoms | None = None
    seed: np.ndarray | None = None  # overlayer positions [n_overlayer, 3]
    t0: float = 1.0
    resample: int = 1
    minima: tuple[Atoms, ...] = ()  # known minima of the target (novelty guidance)
    minima_ids: tuple[str, ...] = ()

    def check(self, process, scfg: SampleConfig) -> None:
        """Refuse combinations the model cannot sample (one line, before anything is written)."""
        if self.fixed is not None and (isinstance(process, SurfaceFlow) or scfg.sampler != "em"):
            raise ConfigError(f"sample.inpaint samples with Euler–Maruyama steps of a diffusion model: set "
                              f"sample.sampler: em (not {scfg.sampler!r})")
        if self.seed is not None and not process.t_min < self.t0:
            raise ConfigError(f"sample.t0 {self.t0} must be larger than the model's t_min {process.t_min}")

    def steps(self, process, steps: int) -> int:
        return steps if self.seed is None else seeded_steps(steps, self.t0, process.t_min)

    def start(self, process, template: SlabBatch, system: SurfaceSystem, generator: torch.Generator):
        """(initial state, the process to sample it with): a prior draw, or the seed noised to t0."""
        if self.seed is None:
            return process.sample_prior(template, generator=generator), process
        n = template.n_structures
        atoms = system.compose(self.seed)
        atoms.positions[system.n_substrate:] = self.seed  # unwrapped by compose: bit for bit
        seed = collate([atoms] * n, [system.movable] * n, [system.z_box] * n, device=template.device,
                       dtype=template.positions.dtype)
        return noise_to(process, seed, self.t0, generator), start_at(process, self.t0)

    def known(self, x: SlabBatch, system: SurfaceSystem) -> Known | None:
        if self.fixed is None:
            return None
        over = np.r_[np.zeros(system.n_substrate, bool), self.fixed.mask]
        pos = np.r_[np.zeros((system.n_substrate, 3)), self.fixed.positions]
        dt = x.positions.dtype
        return Known.tile(torch.as_tensor(pos, dtype=dt, device=x.device), torch.as_tensor(over, device=x.device),
                          x.n_structures)

    def sampler(self, base: Sampler, known: Known | None) -> Sampler:
        return base if known is None else functools.partial(repaint, known=known, resample=self.resample)

    def hold(self, x: SlabBatch, known: Known | None) -> SlabBatch:
        """The batch with the fixed atoms masked, so that the MLFF relaxation leaves them where they are."""
        return x if known is None else replace(x, movable=x.movable & ~known.mask)

    def restore(self, positions: np.ndarray, system: SurfaceSystem) -> np.ndarray:
        """One sample's positions (float64) with the fixed atoms exactly at their given coordinates."""
        if self.fixed is None:
            return positions
        out = positions.astype(float, copy=True)
        rows = system.n_substrate + np.flatnonzero(self.fixed.mask)
        out[rows] = self.fixed.positions[self.fixed.mask]
        return out

    def guidance(self, base: Guidance | None, scfg: SampleConfig, process, system: SurfaceSystem,
                 device) -> Guidance | None:
        """`base` (force-field guidance or None) plus novelty guidance away from the known minima when asked for."""
        if scfg.novelty <= 0 or not self.minima:
            return base
        numbers = [system.template.numbers, system.compose(np.zeros((len(system.overlayer), 3))).numbers,
                   *(a.numbers for a in self.minima)]
        species = tuple(sorted({int(z) for arr in numbers for z in arr}))
        desc = PairDescriptor(species=species)
        known = collate(list(self.minima), [a.get_array("movable") for a in self.minima],
                        [system.z_box] * len(self.minima), device=device)
        with torch.no_grad():
            novelty = NoveltyGuidance(desc, desc(known), process=process, strength=scfg.novelty)
        return novelty if base is None else SumGuidance((base, novelty))

    def meta(self, scfg: SampleConfig, system: SurfaceSystem) -> dict:
        out: dict = {}
        if scfg.novelty > 0:
            out["novelty"] = {"strength": scfg.novelty, "minima": len(self.minima),
                              "minima_digest": _digest(self.minima_ids)}
        if self.fixed is not None:
            out["inpaint"] = {**self.fixed.describe(system), "resample": self.resample}
        if self.seed is not None:
            out["seed_structure"] = {"source": scfg.seed_structure, "t0": self.t0}
        return out


def _digest(ids: tuple[str, ...]) -> str:
    import hashlib

    return hashlib.sha1(",".join(sorted(ids)).encode()).hexdigest()[:12]


MAX_MINIMA = 256  # the lowest in energy; the repulsion's cost grows with their number


def known_minima(store: ResultsStore | None, system: SurfaceSystem, study: str | None) -> list:
    """The study's minima of this target (relaxed and RSS documents, valid and in the box), lowest first."""
    if store is None or study is None:
        return []
    docs = store.find({"study": study, "system_id": system.system_id, "composition": system.composition,
                       "source": {"$in": ["rss", "relaxed"]}, "valid": True, "in_box": True})
    docs = sorted((d for d in docs if d.energy is not None and len(d.movable) == system.n_atoms),
                  key=lambda d: d.energy)
    return docs[:MAX_MINIMA]


def resolve_conditioning(scfg: SampleConfig, system: SurfaceSystem, store: ResultsStore | None,
                         study: str | None = None) -> Conditioning:
    """The target's fixed atoms and seed from the config (files, or documents of `store`), and for novelty
    guidance the minima `study` already found for it."""
    fixed = resolve_fixed(scfg.inpaint, system, store) if scfg.inpaint is not None else None
    seed = resolve_seed(scfg.seed_structure, system, store) if scfg.seed_structure is not None else None
    if fixed is not None and seed is not None:
        # the seed's fixed atoms would be replaced anyway: start from the seed with the fixed atoms' positions
        seed = np.where(fixed.mask[:, None], fixed.positions, seed)
    minima = known_minima(store, system, study) if scfg.novelty > 0 else []
    return Conditioning(fixed=fixed, seed=seed, t0=scfg.t0,
                        resample=scfg.inpaint.resample if scfg.inpaint is not None else 1,
                        minima=tuple(d.to_atoms() for d in minima), minima_ids=tuple(d.doc_id for d in minima))
