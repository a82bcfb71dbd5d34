"""Pretrained models shipped inside the package: checkpoints with a model card each, checked by SHA-256.

Each model lives in `surfdiff_core/pretrained/<name>/`: `card.json` (what it was trained on and how well it
does, with the SHA-256 of every checkpoint), `card.md` (the same for people) and the checkpoints, named by
model id. A shipped model is registered in a study's model registry on first use, so sampling, fine-tuning
(`train.init_from`) and evaluation find it like a trained one; the checkpoints load with `weights_only=True`
and nothing reaches a network. A model trained for another substrate, box or energy model is refused with
one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from surfdiff_core.errors import SurfdiffError
from surfdiff_core.store.models import SHIPPED_ROOT, ModelRecord, file_sha256

if TYPE_CHECKING:
    from surfdiff_core.config import SurfdiffConfig

SHIPPED_DIR = SHIPPED_ROOT
LATTICE_TOLERANCE = 0.01  # relative: the same substrate relaxed by the same oracle agrees far closer


class ShippedCheckpoint(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str
    model_id: str
    sha256: str
    role: Literal["model", "member"] = "model"
    best_val: float | None = None


class CardSystem(BaseModel):
    """What the model saw: substrate, its resolved lattice constant, layers and the confinement box."""

    model_config = ConfigDict(extra="forbid")

    element: str
    facet: str
    layers: int
    lattice_constant: float
    z_min: float
    z_max: float
    training_system_id: str


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str
    energy_model: str
    elements: list[str]
    system: CardSystem
    model: dict[str, Any]  # the config's model section it was built with (fine-tuning needs the same)
    train: dict[str, Any]
    training_data: dict[str, Any]  # study, cell, compositions, structures, oracle force calls (all-in cost)
    epochs: int
    validation: dict[str, float]  # the best epoch's validation losses (score, forces, energy)
    checkpoint: ShippedCheckpoint
    committee: list[ShippedCheckpoint] = Field(default_factory=list)
    discovery: dict[str, Any] = Field(default_factory=dict)  # figures measured with it (build.py --measure)
    built: dict[str, Any] = Field(default_factory=dict)  # date, commit, machine, commands

    @property
    def folder(self) -> Path:
        return SHIPPED_DIR / self.name

    def path(self, entry: ShippedCheckpoint) -> Path:
        return self.folder / entry.file

    def describe(self) -> str:
        s, data = self.system, self.training_data
        return (f"{self.name}: {s.element}({s.facet}) {s.layers} layers, box {s.z_min:g}-{s.z_max:g} Å, "
                f"{self.energy_model}; {data.get('structures', '?')} RSS structures in {data.get('cell', '?')}, "
                f"{self.epochs} epochs, committee of {1 + len(self.committee)}")


def shipped_models() -> list[ModelCard]:
    cards = []
    for card_path in sorted(SHIPPED_DIR.glob("*/card.json")):
        cards.append(ModelCard.model_validate(json.loads(card_path.read_text())))
    return cards


def find_shipped(name_or_id: str | None) -> ModelCard | None:
    """The shipped model of this name (or whose main checkpoint has this model id), else None."""
    if not name_or_id:
        return None
    for card in shipped_models():
        if name_or_id in (card.name, card.checkpoint.model_id):
            return card
    return None


def shipped_ids() -> dict[str, str]:
    """Model id -> shipped name, members included."""
    return {e.model_id: c.name for c in shipped_models() for e in (c.checkpoint, *c.committee)}


def verify(card: ModelCard) -> None:
    """Every checkpoint of the card present and matching its SHA-256 (a damaged install is one line)."""
    for entry in (card.checkpoint, *card.committee):
        path = card.path(entry)
        if not path.is_file():
            raise SurfdiffError(f"pretrained model {card.name}: checkpoint {entry.file} is missing from {card.folder}")
        if file_sha256(path) != entry.sha256:
            raise SurfdiffError(f"pretrained model {card.name}: {entry.file} does not match its SHA-256 in "
                                f"card.json (a damaged or replaced file): reinstall surfdiff")


def lattice_of(cfg: SurfdiffConfig) -> float:
    from surfdiff_core.system_build import resolve_lattice

    if cfg.substrate.lattice_constant != "auto":
        return float(cfg.substrate.lattice_constant)
    return float((resolve_lattice(cfg) or {})["a"])


def misfits(card: ModelCard, cfg: SurfdiffConfig, *, for_training: bool = False) -> list[str]:
    """What differs between the card's system and the study's (empty: the model serves this study)."""
    from surfdiff_core.composition import parse_composition
    from surfdiff_core.sweep import sweep_compositions

    s, out = card.system, []
    sub, box = cfg.substrate, cfg.confinement
    if (sub.element, sub.facet) != (s.element, s.facet):
        out.append(f"substrate {sub.element}({sub.facet}), not {s.element}({s.facet})")
    if sub.layers != s.layers:
        out.append(f"{sub.layers} substrate layers, not {s.layers}")
    if (box.z_min, box.z_max) != (s.z_min, s.z_max):
        out.append(f"box {box.z_min:g}-{box.z_max:g} Å, not {s.z_min:g}-{s.z_max:g} Å")
    energy_model = (cfg.train.energy_models or [cfg.oracle.energy_model])[0]
    if energy_model != card.energy_model:
        out.append(f"energy model {energy_model}, not {card.energy_model}")
    compositions = [*cfg.rss.compositions, *(t.composition for t in cfg.sample.targets),
                    *sweep_compositions(cfg.sample.sweep)]
    unknown = sorted({e for c in compositions for e in parse_composition(c)} - set(card.elements))
    if unknown:
        out.append(f"element(s) {', '.join(unknown)} it never saw")
    if not out:  # same substrate and oracle: the lattice must agree too (an explicit number may not)
        a = lattice_of(cfg)
        if abs(a - s.lattice_constant) > LATTICE_TOLERANCE * s.lattice_constant:
            out.append(f"lattice constant {a:.3f} Å, not {s.lattice_constant:.3f} Å")
    if for_training:
        own = cfg.model.model_dump(mode="json")
        differs = sorted(k for k, v in card.model.items() if own.get(k) != v)
        if differs:
            out.append("model section differs in " + ", ".join(f"{k} ({own.get(k)} vs {card.model[k]})"
                                                               for k in differs[:4]))
    return out


def check_fits(card: ModelCard, cfg: SurfdiffConfig, *, for_training: bool = False) -> None:
    problems = misfits(card, cfg, for_training=for_training)
    if problems:
        raise SurfdiffError(f"pretrained model {card.name} does not fit study {cfg.name!r}: "
                            + "; ".join(problems))


def register(card: ModelCard, cfg: SurfdiffConfig, *, for_training: bool = False) -> ModelRecord:
    """Check, verify and record the shipped model (members first) in the study's registry; idempotent."""
    from surfdiff_core.store.models import ModelRegistry

    check_fits(card, cfg, for_training=for_training)
    verify(card)

    def record(entry: ShippedCheckpoint, **extra) -> ModelRecord:
        return ModelRecord(model_id=entry.model_id, checkpoint=str(card.path(entry)), sha256=entry.sha256,
                           study=None, system_id=card.system.training_system_id, energy_models=[card.energy_model],
                           epochs=card.epochs, best_val=entry.best_val,
                           n_train=int(card.training_data.get("n_train", 0)), model=card.model, train=card.train,
                           pretrained=card.name, **extra)

    main = record(card.checkpoint, committee=[m.model_id for m in card.committee])
    with ModelRegistry(cfg.store) as registry:
        for member in card.committee:
            registry.record(record(member, member_of=card.checkpoint.model_id))
        registry.record(main)
    return main


def training_cost(card: ModelCard) -> dict[str, float]:
    """The oracle cost of the card's training data, in the units of surfdiff_core.evaluate.cost.OracleCost."""
    data = card.training_data
    return {"force_calls": float(data["force_calls"]), "atom_force_calls": float(data["atom_force_calls"]),
            "atom3_force_calls": float(data["atom3_force_calls"])}
