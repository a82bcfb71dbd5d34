"""Typed, validated configuration of one surfdiff study, loaded from YAML (see configs/).

Every model forbids unknown keys, so a typo fails before any work starts with one line naming it.
Distances are in Å, energies in eV. The confinement box is given *relative to the top substrate layer*.
The base model, size bounds and error messages every section shares live in config_base.py, the sections naming an
energy model (oracle, relax) in config_oracle.py, the sample section in config_sample.py; all are re-exported here,
so `from surfdiff_core.config import ...` reaches every section.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from ase.data import atomic_numbers, chemical_symbols
from pydantic import Field, ValidationError, field_validator, model_validator

from surfdiff_core.cells import cell_matrix, check_slab_size
from surfdiff_core.composition import normalise_composition
from surfdiff_core.config_base import MAX_SAMPLES as MAX_SAMPLES
from surfdiff_core.config_base import MAX_STEPS as MAX_STEPS
from surfdiff_core.config_base import MAX_STRUCTURES as MAX_STRUCTURES
from surfdiff_core.config_base import SEED_BOUND as SEED_BOUND
from surfdiff_core.config_base import CellSpec as CellSpec
from surfdiff_core.config_base import Seed as Seed
from surfdiff_core.config_base import _Strict
from surfdiff_core.config_base import format_validation_error as format_validation_error
from surfdiff_core.config_base import with_overrides as with_overrides
from surfdiff_core.config_oracle import OracleConfig as OracleConfig
from surfdiff_core.config_oracle import RelaxConfig as RelaxConfig
from surfdiff_core.config_oracle import energy_model_key as energy_model_key
from surfdiff_core.config_sample import InpaintConfig as InpaintConfig
from surfdiff_core.config_sample import SampleConfig as SampleConfig
from surfdiff_core.config_sample import SampleTarget as SampleTarget
from surfdiff_core.errors import ConfigError
from surfdiff_core.sweep import SweepConfig as SweepConfig
from surfdiff_core.sweep import plan_sweep
from surfdiff_core.yaml_limits import MAX_CONFIG_BYTES, bounded_load

# Offered as choices in typed forms (the Prefect UI); validated below with a one-line error.
_ELEMENT_CHOICES = {"enum": [s for s in chemical_symbols if s != "X"]}


class SubstrateConfig(_Strict):
    element: str = Field("Ag", json_schema_extra=_ELEMENT_CHOICES)
    facet: Literal["fcc111", "fcc100", "fcc110", "hcp0001"] = "fcc111"
    # A number (Å), or 'auto' = relaxed bulk lattice constant of the chosen oracle (cached on disk).
    lattice_constant: float | Literal["auto"] = "auto"
    c_over_a: float | None = Field(None, gt=0, le=10)  # hcp only; None = ideal (or relaxed with 'auto')
    layers: int = Field(3, ge=1)
    fixed_layers: int = Field(1, ge=0)  # bottom layers held fixed (FixAtoms) in every relaxation
    vacuum: float = Field(10.0, gt=0, le=1000)

    @field_validator("element")
    @classmethod
    def _known_element(cls, v: str) -> str:
        if v not in atomic_numbers or v == "X":
            raise ValueError(f"unknown element {v!r}")
        return v

    @field_validator("lattice_constant")
    @classmethod
    def _positive(cls, v: float | str) -> float | str:
        if not isinstance(v, str) and not 0 < v <= 50:
            raise ValueError(f"lattice_constant must be 'auto' or a positive number of Å up to 50, got {v}")
        return v

    @model_validator(mode="after")
    def _fixed_below_layers(self) -> SubstrateConfig:
        if self.fixed_layers >= self.layers:
            raise ValueError(f"fixed_layers ({self.fixed_layers}) must be smaller than layers ({self.layers})")
        return self


class ConfinementConfig(_Strict):
    # z range (Å) above the top substrate layer in which overlayer atoms are placed and diffused.
    # Default 0.5–5.5 Å: the paper authors used about 2.5–7.8 Å absolute on a 2-layer Ag slab, i.e. roughly
    # 0.1–5.4 Å above the top layer; 0.5 keeps atoms out of the top layer plane itself.
    z_min: float = Field(0.5, le=1000)
    z_max: float = Field(5.5, le=1000)

    @model_validator(mode="after")
    def _ordered(self) -> ConfinementConfig:
        if self.z_min < 0:
            raise ValueError(f"confinement z_min={self.z_min} lies below the surface (must be >= 0)")
        if self.z_max <= self.z_min:
            raise ValueError(f"confinement z_max={self.z_max} must be larger than z_min={self.z_min}")
        return self


class RSSConfig(_Strict):
    cell: CellSpec = "c(2x8)"
    compositions: list[str] = Field(default_factory=lambda: ["Ag4O2"])
    n: int = Field(50, ge=0, le=MAX_STRUCTURES)  # structures in total, round-robin over the compositions
    seed: Seed = 0
    fmax: float = Field(0.05, gt=0)
    steps: int = Field(300, ge=0, le=MAX_STEPS)
    optimizer: Literal["BFGS", "FIRE", "LBFGS"] = "BFGS"
    trajectory_every: int = Field(5, ge=1)  # subsample of relaxation frames kept as MLFF training data
    min_distance_scale: float = Field(0.75, gt=0, le=1.5)  # × sum of covalent radii
    workers: int = Field(1, ge=1, le=4096)
    # A failed relaxation is stored as an error document; later runs retry it until it has failed this often.
    max_attempts: int = Field(3, ge=1, le=100)

    @field_validator("compositions")
    @classmethod
    def _compositions(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one composition is needed")
        return [normalise_composition(c) for c in v]


class ModelConfig(_Strict):
    n_features: int = Field(64, ge=1)
    n_rbf: int = Field(30, ge=1)
    n_interactions: int = Field(4, ge=1)
    cutoff: float = Field(6.0, gt=0)
    shared: bool = True  # one PaiNN representation for score and energy (one pass per guided step)
    time_features: int = Field(32, ge=2)
    beta_min: float = Field(0.01, gt=0)
    beta_max: float = Field(3.0, gt=0)
    length_scale: float = Field(10.0, gt=0)  # Å; noise std at time t is sigma(t) * length_scale
    # > 0: the denoiser is also conditioned on E_diff, the energy above the lowest structure of the same
    # composition and cell per movable atom, for classifier-free guidance toward low energies (sample.energy_target)
    energy_features: int = Field(0, ge=0, le=1024)
    # the generative process the vector head learns: the VP diffusion's eps, or the velocity of flow matching
    # (straight paths from the uniform box prior; sampled with `sample.sampler: flow`)
    generative: Literal["diffusion", "flow"] = "diffusion"


class TrainConfig(_Strict):
    energy_window: float | None = Field(2.0, gt=0)  # eV above the per-composition minimum (D: 2, D_lowE: 0.5)
    compositions: list[str] | None = None  # None = every composition in the store for this system
    oxygen_ratio: tuple[str, str, float] | None = None  # e.g. ["O", "Ag", 0.5]: keep O/Ag ratio ...
    ratio_side: Literal["above", "below", "any"] = "any"  # ... above (oxidised) or below (reduced) it
    repeat: int = Field(1, ge=1, le=100)  # periodic repetition r: r×r×1 tiles, energies × r²
    epochs: int = Field(200, ge=1, le=MAX_STEPS)
    batch_size: int = Field(16, ge=1, le=MAX_SAMPLES)
    lr: float = Field(5e-4, gt=0)
    lr_min: float = Field(1e-5, gt=0)
    ema_decay: float = Field(0.99, ge=0, lt=1)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    patience: int = Field(50, ge=1)
    score_weight: float = 1.0
    energy_weight: float = 0.01
    forces_weight: float = 0.99
    seed: Seed = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_frames_per_structure: int = Field(4, ge=1)  # relaxation frames used for the MLFF loss
    # energy-conditioned models: the fraction of structures trained without their condition (the null score)
    condition_dropout: float = Field(0.2, ge=0, le=1)
    # MLFF committee: models trained besides this one (seeds seed+1.., the MLFF loss only, their own validation
    # split); the mean of all relaxes and ranks the samples and their spread is stored. 1 = one model.
    ensemble: int = Field(1, ge=1, le=16)
    # Energy models whose documents train the model (None = the study's oracle only). Several models need
    # `combine: reference_shift`: per-model element reference energies are fitted and removed, so energies
    # land on the first model's scale.
    energy_models: list[str] | None = None
    combine: Literal["none", "reference_shift"] = "none"
    # Fine-tune from a shipped pretrained model (its name, see `surfdiff models`) or a registered model id,
    # committee members included; the model section must be the one it was built with.
    init_from: str | None = Field(None, min_length=1, max_length=200)

    @model_validator(mode="after")
    def _combine_needed(self) -> TrainConfig:
        if self.energy_models is not None and not self.energy_models:
            raise ValueError("train.energy_models: give at least one energy model, or leave it out")
        if self.energy_models and len(set(self.energy_models)) > 1 and self.combine == "none":
            raise ValueError("train.energy_models names several energy models: set train.combine: "
                             "reference_shift to say how their energies are combined")
        return self


class ActiveLearningConfig(_Strict):
    """Rounds of: sample with the current model, relax the best distinct samples with the oracle, fine-tune
    on them (relaxed structures for the denoiser, their relaxation frames for the MLFF). 0 rounds = off.
    Single points: the next best distinct samples get one oracle energy+force call each, which teaches the
    MLFF where its own minima are wrong at a fraction of a relaxation's cost (MLFF data only)."""

    rounds: int = Field(0, ge=0)
    relax_per_round: int = Field(8, ge=0)  # oracle relaxations per target and round
    single_points_per_round: int = Field(0, ge=0)  # oracle single points per target and round, after those
    max_relaxations: int | None = Field(None, ge=1)  # budget over all rounds and targets (None: rounds decide)
    # how a round's labels are spread over the targets: `uniform` gives each target relax_per_round; `envelope`
    # gives the round's total (relax_per_round × targets) preferentially to the targets whose best candidate
    # lies on or near the lower envelope of γ(Δμ) (the ones that decide the phase diagram), at least one each
    allocation: Literal["uniform", "envelope"] = "uniform"
    samples: int | None = Field(None, ge=1)  # samples per target and round (None: sample.n)
    # seeded exploration: from round 2 on, this many more samples per target start from the target's best oracle
    # label so far, noised to sample.t0 and denoised (local search around it); they compete for the labels
    explore: int = Field(0, ge=0, le=MAX_SAMPLES)
    epochs: int = Field(20, ge=1)  # fine-tuning epochs per round

    @model_validator(mode="after")
    def _labels_per_round(self) -> ActiveLearningConfig:
        if self.rounds and not (self.relax_per_round or self.single_points_per_round):
            raise ValueError("active learning needs relax_per_round or single_points_per_round above 0")
        return self


class EvaluateConfig(_Strict):
    """Discovery power against RSS in each target cell, with the same energy model and relaxer."""

    # oracle relaxations of the generative arm per target: the best distinct samples in MLFF rank order
    budget: int = Field(16, ge=1, le=MAX_STRUCTURES)
    # RSS relaxations directly in each target cell: the baseline (0 = none)
    rss_budget: int = Field(32, ge=0, le=MAX_STRUCTURES)
    tol: float = Field(0.05, gt=0)  # eV: an arm has "reached" an energy within this
    seed: Seed = 1_000_003  # the baseline RSS seed, apart from the training RSS seeds
    # the study whose RSS arm is the baseline (same system, oracle and RSS settings; None = this study): runs of
    # one system with other seeds or settings share one RSS arm instead of each paying for its own
    rss_study: str | None = None
    # known minima to look for: "Ag12O6 p(4x4)" -> structure file (extxyz, cif, POSCAR, ...)
    references: dict[str, str] = Field(default_factory=dict)
    adsorbate: str = "O"  # gas-phase element of the γ(Δμ) phase diagram (skipped when no target holds it)
    molecule: str = "O2"  # its reference molecule (ASE g2 name)
    dmu_range: tuple[float, float] = (-2.0, 0.5)  # eV, Δμ of the adsorbate

    @model_validator(mode="after")
    def _range(self) -> EvaluateConfig:
        if not self.dmu_range[0] < self.dmu_range[1]:
            raise ValueError(f"evaluate.dmu_range {list(self.dmu_range)} must be increasing")
        return self


class StoreConfig(_Strict):
    # 'sqlite' = embedded SQLite file '<path>/<database>.sqlite3' (default: WAL, indexed, several writers);
    # 'mongo' = MongoStore whose URI comes from the environment variable SURFDIFF_MONGO_URI (never from this
    # file); 'memory' for tests; 'json' for a file; 'monty' = the MontyStore of earlier versions (unindexed).
    backend: Literal["sqlite", "monty", "mongo", "memory", "json"] = "sqlite"
    path: str = "data/store"
    database: str = "surfdiff"
    collection: str = "structures"
    server_timeout_s: float = Field(5.0, gt=0)  # mongo: an unreachable server fails after this long
    busy_timeout_s: float = Field(60.0, gt=0)  # sqlite: how long a writer waits for another one
    # a command that writes refuses to start with less free space than this where the store and its files go
    min_free_mb: float = Field(64.0, ge=0)


class SurfdiffConfig(_Strict):
    name: str = "study"
    substrate: SubstrateConfig = Field(default_factory=SubstrateConfig)
    confinement: ConfinementConfig = Field(default_factory=ConfinementConfig)
    oracle: OracleConfig = Field(default_factory=OracleConfig)
    rss: RSSConfig = Field(default_factory=RSSConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    relax: RelaxConfig = Field(default_factory=RelaxConfig)
    active_learning: ActiveLearningConfig = Field(default_factory=ActiveLearningConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)

    @model_validator(mode="after")
    def _cells_valid(self) -> SurfdiffConfig:
        facet = self.substrate.facet
        sweep_cells = self.sample.sweep.cells if self.sample.sweep else []
        cells = [("rss.cell", self.rss.cell)] + [
            (f"sample.targets.{i}.cell", t.cell) for i, t in enumerate(self.sample.targets)
        ] + [(f"sample.sweep.cells.{i}", c) for i, c in enumerate(sweep_cells)]
        for where, cell in cells:
            try:
                check_slab_size(cell, cell_matrix(cell, facet), self.substrate.layers)
            except ConfigError as exc:
                raise ValueError(f"{where}: {exc}") from None
        if self.sample.sweep is not None:
            plan_sweep(self.sample.sweep, facet)  # its size is known without the lattice: refused now, not later
        if (self.model.generative == "flow") != (self.sample.sampler == "flow"):
            raise ValueError(f"sample.sampler {self.sample.sampler!r} does not fit model.generative "
                             f"{self.model.generative!r}: a flow-matching model samples with 'flow', a diffusion "
                             f"model with 'em', 'ode' or 'ddim'")
        if self.sample.energy_target is not None and self.model.energy_features == 0:
            raise ValueError("sample.energy_target needs an energy-conditioned model: set model.energy_features "
                             "(e.g. 16), or leave energy_target out")
        return self

    def section_hash(self, *sections: str) -> str:
        """Stable hash of the named sections: provenance that changes when the physics does."""
        payload = {s: getattr(self, s).model_dump(mode="json") for s in sections}
        return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def config_from_dict(data: dict[str, Any], source: str = "config") -> SurfdiffConfig:
    try:
        return SurfdiffConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key written twice in one mapping (at any depth) is an error instead
    of the second value silently replacing the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges may repeat keys by design
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in first_line:
                    raise ConfigError(f"key {key!r} is written twice (lines {first_line[key]} and {line}): keep one")
                first_line[key] = line
            except TypeError:  # an unhashable key: the base loader reports it
                continue
        return super().construct_mapping(node, deep=deep)


EMPTY_CONFIG_HELP = ("empty config: give at least a name and the substrate, rss and store sections, or start from "
                     "configs/demo.yaml")


def load_config(path: str | Path) -> SurfdiffConfig:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p} is a directory, not a config file")
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        if p.stat().st_size > MAX_CONFIG_BYTES:  # checked before reading it
            raise ConfigError(f"{p}: {p.stat().st_size} bytes; a config has at most {MAX_CONFIG_BYTES}")
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a text (UTF-8) YAML file") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the config: {exc.strerror or exc}") from None
    try:
        data = bounded_load(text, _UniqueKeyLoader)  # depth and alias expansion bounded before values are built
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}: invalid YAML{where}") from None
    if data is None or data == {}:
        raise ConfigError(f"{p}: {EMPTY_CONFIG_HELP}")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections")
    return config_from_dict(data, source=str(p))
