"""The sample section of the study config: what is generated (targets, sweep) and how (sampler, guidance,
inpainting, seeded exploration, novelty)."""

from __future__ import annotations

from typing import Literal

from ase.data import atomic_numbers
from pydantic import Field, field_validator, model_validator

from surfdiff_core.composition import normalise_composition
from surfdiff_core.config_base import MAX_SAMPLES, MAX_STEPS, CellSpec, Seed, _Strict
from surfdiff_core.sweep import SweepConfig


class SampleTarget(_Strict):
    cell: CellSpec
    composition: str

    @field_validator("composition")
    @classmethod
    def _composition(cls, v: str) -> str:
        return normalise_composition(v)


class InpaintConfig(_Strict):
    """Inpainting (RePaint): overlayer atoms of `source` held fixed while the rest of the target is generated.
    The fixed atoms are the source's overlayer atoms that pass every selection given (none: all of them)."""

    source: str = Field(min_length=1)  # ASE-readable structure file, or a store document id
    elements: list[str] | None = None  # e.g. ["O"]
    z_range: tuple[float, float] | None = None  # Å above the top substrate layer, like the confinement box
    indices: list[int] | None = None  # overlayer atoms of the source, 0-based, counted after the substrate
    resample: int = Field(3, ge=1, le=50)  # RePaint repeats per step (model evaluations per step)

    @field_validator("elements")
    @classmethod
    def _elements(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if not v:
                raise ValueError("give at least one element, or leave elements out")
            bad = [s for s in v if s not in atomic_numbers or s == "X"]
            if bad:
                raise ValueError(f"unknown element {bad[0]!r}")
        return v

    @field_validator("indices")
    @classmethod
    def _indices(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or min(v) < 0 or len(set(v)) != len(v)):
            raise ValueError("indices must be distinct overlayer indices >= 0 (at least one)")
        return v

    @field_validator("z_range")
    @classmethod
    def _z_range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not v[0] < v[1]:
            raise ValueError(f"z_range {list(v)} must be increasing")
        return v


class SampleConfig(_Strict):
    # what is sampled: these targets, then the sweep's (cells × compositions, see surfdiff_core/sweep.py), each
    # once; stages read them through surfdiff_core.stages.common.sample_targets
    targets: list[SampleTarget] = Field(default_factory=list)
    sweep: SweepConfig | None = None
    n: int = Field(16, ge=1, le=MAX_SAMPLES)
    steps: int = Field(500, ge=1, le=MAX_STEPS)
    # pc: Euler–Maruyama + Langevin corrector steps; ffc: Euler–Maruyama + MLFF force steps near t = 0
    sampler: Literal["em", "ode", "ddim", "flow", "pc", "ffc"] = "em"
    guidance: bool = True
    eta_dt: float = Field(0.001, ge=0)  # the paper's η·Δt in Å/(eV/Å)
    relax: bool = True  # MLFF relaxation after sampling (each structure stops at 0.05 eV/Å)
    # to the MLFF's minima, not a few steps toward them: only there does the MLFF rank the samples as the oracle
    # would (sweep benchmark: Spearman 0.14-0.40 at 30 steps, 0.96-0.98 relaxed to the minima, which most reach
    # in 50-150 steps)
    relax_steps: int = Field(300, ge=0, le=MAX_STEPS)
    # pairs closer than this fraction of their covalent radii sum are pushed apart in the guidance and the
    # MLFF relaxation (diffusion/repulsion.py); 0 = off, the MLFF alone
    repulsion: float = Field(0.75, ge=0, le=1.5)
    batch_size: int = Field(64, ge=1, le=MAX_SAMPLES)
    # one stream of batches over every target (different cells and sizes in one batch; surfdiff_core/sample/
    # shared.py) instead of batches per target: fuller batches for sweeps of many small targets
    share_batches: bool = False
    seed: Seed = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # energy-conditioned models (model.energy_features > 0): E_diff to sample at, in eV per movable atom above
    # the lowest training structure of the composition (0 = as low as the data goes; None = unconditional),
    # and the classifier-free guidance scale w: eps = eps_null + w·(eps_cond − eps_null), 1 = conditional only
    energy_target: float | None = Field(None, ge=0)
    cfg_scale: float = Field(2.0, ge=0, le=100)
    # corrector samplers (pc, ffc): corrector steps after each predictor step (one model evaluation each);
    # pc's Langevin signal-to-noise ratio; ffc's force steps (Å per eV/Å, capped at 0.1 Å) once t <= corrector_t_max
    corrector_steps: int = Field(1, ge=0, le=100)
    snr: float = Field(0.16, gt=0, le=10)
    corrector_step: float = Field(0.01, ge=0, le=1)
    corrector_t_max: float = Field(0.1, ge=0, le=1)
    # structure-aware generation: keep some atoms of a structure and generate the rest (inpaint); or start from a
    # structure (file or document id) noised to time t0 and denoise it (seed_structure: local exploration)
    inpaint: InpaintConfig | None = None
    seed_structure: str | None = Field(None, min_length=1)
    t0: float = Field(0.3, gt=0, le=1)
    # novelty guidance: strength (Å², like eta_dt) of a push away from the minima this study already found for the
    # target (relaxed and RSS documents), in a symmetry-aware pair-distance descriptor; 0 = off
    novelty: float = Field(0.0, ge=0, le=10)

    @model_validator(mode="after")
    def _inpaint_sampler(self) -> SampleConfig:
        if self.inpaint is not None and self.sampler != "em":
            raise ValueError(f"sample.inpaint samples with Euler–Maruyama steps: set sampler em, not {self.sampler!r}")
        return self

    @model_validator(mode="after")
    def _shared_unconditioned(self) -> SampleConfig:
        if self.share_batches and (self.inpaint is not None or self.seed_structure is not None or self.novelty > 0):
            raise ValueError("sample.share_batches samples every target in one stream of batches: inpainting, seed "
                             "structures and novelty guidance are per target, turn them off (or share_batches)")
        return self
