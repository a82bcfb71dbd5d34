"""The model registry: trained-model records beside the structures (collection '<collection>_models').

`sample` resolves its model here (a model id, or the newest model trained for a study, system and energy
model), never from file times. Each record holds the checkpoint's SHA-256, so a checkpoint replaced or
corrupted after training is an error, not a silent switch of models. A shipped model's record names the
checkpoint where the install that registered it kept it; read back by another install (a new virtual
environment, another Python), it names this install's copy instead, still checked by its SHA-256.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from surfdiff_core.config import StoreConfig
from surfdiff_core.errors import SurfdiffError
from surfdiff_core.store.backends import check_reachable
from surfdiff_core.store.documents import now
from surfdiff_core.store.results import make_maggma_store

SHIPPED_ROOT = Path(__file__).resolve().parents[1] / "pretrained"  # surfdiff_core/pretrained/<name>/<checkpoint>


class ModelRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model_id: str
    checkpoint: str
    sha256: str
    study: str | None = None
    system_id: str
    energy_models: list[str] = Field(default_factory=list)
    epochs: int = 0
    best_val: float | None = None
    n_train: int = 0
    n_val: int = 0
    model: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    round: int | None = None  # active-learning round, None for a model trained on RSS data alone
    learned_labels: list[str] = Field(default_factory=list)  # ids of the active-learning labels it learned
    committee: list[str] = Field(default_factory=list)  # ids of the MLFF-only models ranked beside it
    member_of: str | None = None  # set on a committee member: the model it ranks beside (never sampled with)
    pretrained: str | None = None  # the shipped pretrained model it is, or was fine-tuned from (its name)
    # ids of the oracle documents whose cost its training data represents: every relaxation of the training cell
    # the data was chosen from, those the energy window or filters dropped and failed ones included (active-learning
    # labels are `learned_labels`). Empty in records made before it was kept: the evaluation then queries by scope
    data_cost_ids: list[str] = Field(default_factory=list)
    created_at: str = Field(default_factory=lambda: now().isoformat())


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ModelRegistry:
    """Records of trained models in the study's store (any maggma backend)."""

    def __init__(self, cfg: StoreConfig, path: str | Path | None = None) -> None:
        self._store = make_maggma_store(cfg.model_copy(update={"collection": f"{cfg.collection}_models"}),
                                        path=path)
        self._timeout_s = cfg.server_timeout_s

    def __enter__(self) -> ModelRegistry:
        try:  # an unreachable server or unreadable file: one line, as for the results store
            self._store.connect()
            check_reachable(self._store, self._timeout_s)
        except SurfdiffError:
            raise
        except Exception as exc:  # noqa: BLE001 - any backend failure is reported as one line
            first = str(exc).splitlines()[0][:200] if str(exc) else ""
            raise SurfdiffError(f"cannot open the model registry: {type(exc).__name__}: {first}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        self._store.close()

    def record(self, rec: ModelRecord) -> None:
        old = self._store.query_one({"model_id": rec.model_id}, properties=["created_at"])
        data = rec.model_dump(mode="json")
        if old and old.get("created_at"):  # retraining the same model id keeps its first date
            data["created_at"] = old["created_at"]
        self._store.update([{**data, "updated_at": now().isoformat()}], key="model_id")

    def get(self, model_id: str) -> ModelRecord | None:
        d = self._store.query_one({"model_id": model_id})
        return located(ModelRecord.model_validate(d)) if d else None

    def find(self, *, study: str | None = None, system_id: str | None = None,
             energy_model: str | None = None) -> list[ModelRecord]:
        crit: dict[str, Any] = {}
        if study is not None:
            crit["study"] = study
        if system_id is not None:
            crit["system_id"] = system_id
        recs = [located(ModelRecord.model_validate(d)) for d in self._store.query(crit)]
        if energy_model is not None:
            recs = [r for r in recs if r.energy_models and r.energy_models[0] == energy_model]
        return sorted(recs, key=lambda r: (r.created_at, r.model_id))

    def resolve(self, *, study: str | None, system_id: str, energy_model: str,
                model_id: str | None = None) -> ModelRecord:
        """The named model, or the newest one of this study, system and energy model; its checkpoint verified."""
        if model_id:
            rec = self.get(model_id)
            if rec is None:
                raise SurfdiffError(f"no model {model_id!r} in the model registry (see `surfdiff query --models`)")
            if study is not None and rec.study not in (None, study):
                raise SurfdiffError(f"model {model_id} belongs to study {rec.study!r}, not {study!r}")
            if rec.member_of:
                raise SurfdiffError(f"model {model_id} is an MLFF-only committee member of {rec.member_of}: "
                                    f"name that model instead")
        else:
            recs = [r for r in self.find(study=study, system_id=system_id, energy_model=energy_model)
                    if not r.member_of]
            if not recs:
                raise SurfdiffError(f"no trained model for study {study!r}, system {system_id}, energy model "
                                    f"{energy_model}: run `surfdiff train CONFIG` first")
            rec = recs[-1]
        verify_checkpoint(rec)
        return rec


def located(rec: ModelRecord) -> ModelRecord:
    """The record with its checkpoint where this install has it: a shipped model's file, registered by another
    install (whose path is gone), is this install's copy of it."""
    if rec.pretrained and not Path(rec.checkpoint).is_file():
        here = SHIPPED_ROOT / rec.pretrained / Path(rec.checkpoint).name
        if here.is_file():
            return rec.model_copy(update={"checkpoint": str(here)})
    return rec


def verify_checkpoint(rec: ModelRecord) -> None:
    path = Path(rec.checkpoint)
    if not path.is_file():
        raise SurfdiffError(f"checkpoint of model {rec.model_id} is missing: {path}")
    if file_sha256(path) != rec.sha256:
        raise SurfdiffError(f"checkpoint {path} does not match the record of model {rec.model_id} "
                            f"(SHA-256 differs): it was replaced after training; retrain or restore it")
