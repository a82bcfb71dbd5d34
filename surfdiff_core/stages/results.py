"""What the stages hand each other: plain values with explicit ids (run, config hash, model, documents)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from surfdiff_core.store.models import ModelRecord


@dataclass
class StageResult:
    study: str
    run_id: str
    config_hash: str

    def as_dict(self, *, ids: bool = True) -> dict[str, Any]:
        """JSON-ready; ids=False drops the long id lists and histories (for tables and logs)."""
        d = asdict(self)
        if not ids:
            for key in ("doc_ids", "history", "candidate_ids", "training_doc_ids", "data_cost_ids"):
                d.pop(key, None)
            for t in d.get("targets", []):
                t.pop("doc_ids", None)
        return d


@dataclass
class RSSResult(StageResult):
    system_id: str
    energy_model: str
    planned: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    retried: int = 0  # stored failures tried again (rss.max_attempts)
    given_up: int = 0  # stored failures left alone: they used up their attempts
    out_of_box: int = 0
    by_others: int = 0  # computed meanwhile by another process sharing the store (claimed by it)
    per_minute: float = 0.0
    wall_time: float = 0.0
    best: dict[str, float] = field(default_factory=dict)
    lost: dict[str, str] = field(default_factory=dict)
    doc_ids: list[str] = field(default_factory=list)


@dataclass
class TrainResult(StageResult):
    model_id: str
    checkpoint: str
    sha256: str
    system_id: str
    energy_models: list[str]
    epochs: int = 0
    best_val: float = 0.0
    n_train: int = 0
    n_val: int = 0
    samples_per_second: float = 0.0
    resumed_from: int = 0
    sample_validity: float | None = None  # valid fraction of a few test samples right after training
    warning: str | None = None  # set when that fraction is too low to trust the model
    learned_labels: list[str] = field(default_factory=list)  # ids of the active-learning labels it learned
    committee: list[str] = field(default_factory=list)  # MLFF-only models whose mean relaxes and ranks samples
    data_cost_ids: list[str] = field(default_factory=list)  # what its training data cost (ModelRecord)
    training_doc_ids: list[str] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def from_record(cls, rec: ModelRecord, *, run_id: str, config_hash: str, study: str | None = None,
                    **run: Any) -> TrainResult:
        """The model of a registry record as a training result: the fields both carry from the record (a value it
        lacks, None in an old record, leaves the result's default), the run's own (RUN_ONLY) from `run`."""
        shared = {}
        for name in MODEL_FIELDS:
            value = getattr(rec, name)
            if value is not None:
                shared[name] = list(value) if isinstance(value, list) else value  # the result's lists are its own
        return cls(study=study or rec.study, run_id=run_id, config_hash=config_hash, **shared, **run)

    def to_record(self, **registry: Any) -> ModelRecord:
        """The registry record of this result's model; the registry's own fields (REGISTRY_ONLY) from `registry`."""
        return ModelRecord(study=self.study, **{name: getattr(self, name) for name in MODEL_FIELDS}, **registry)


# TrainResult and ModelRecord describe one trained model. What both carry is handed across by name (MODEL_FIELDS);
# the rest is one side's own, named here, so a field added to either is shared or named (tests/test_model_record.py).
REGISTRY_ONLY = frozenset({"model", "train", "round", "member_of", "pretrained", "created_at"})  # registry's own
RUN_ONLY = frozenset({"samples_per_second", "resumed_from", "sample_validity", "warning", "training_doc_ids",
                      "history"})  # this training run's
MODEL_FIELDS: tuple[str, ...] = tuple(  # study aside: a result's study is the run's, a record's may be None
    name for name in ModelRecord.model_fields if name in {f.name for f in fields(TrainResult)} and name != "study")


@dataclass
class TargetSamples:
    cell: str
    composition: str
    system_id: str
    n: int
    n_valid: int
    rejection_rate: float
    best_energy: float | None
    wall_time: float
    structure_steps_per_second: float
    doc_ids: list[str] = field(default_factory=list)
    batches: int = 0  # sampling batches of this target
    reused_batches: int = 0  # of those, already in the store from an earlier run (not generated again)
    reused_runs: list[str] = field(default_factory=list)  # the run ids the reused documents carry


@dataclass
class SampleResult(StageResult):
    model_id: str
    checkpoint: str
    targets: list[TargetSamples] = field(default_factory=list)

    @property
    def doc_ids(self) -> list[str]:
        return [i for t in self.targets for i in t.doc_ids]


@dataclass
class RelaxResult(StageResult):
    method: str
    energy_model: str
    candidates: int = 0
    skipped: int = 0
    relaxed: int = 0
    failed: int = 0
    retried: int = 0  # stored failures tried again (relax.max_attempts)
    given_up: int = 0  # stored failures left alone: they used up their attempts
    by_others: int = 0  # relaxed meanwhile by another process sharing the store (claimed by it)
    best: dict[str, float] = field(default_factory=dict)  # "composition cell" -> lowest relaxed energy
    lost: dict[str, str] = field(default_factory=dict)  # doc_id -> why its job died (not stored; rerun redoes it)
    candidate_ids: list[str] = field(default_factory=list)
    doc_ids: list[str] = field(default_factory=list)
    # the relaxer the jobs ran with (relax.fmax/steps, or relax.settings where they override them; the optimiser
    # of an in-process oracle): what decides whether the evaluation may reuse a relaxation (None: not recorded)
    fmax: float | None = None
    steps: int | None = None
    optimizer: str | None = None
    target_keys: list[str] = field(default_factory=list)  # relax_target_key of each target its candidates came from


def relax_target_key(system_id: str, composition: str) -> str:
    """A target of the relax stage (RelaxResult.target_keys): its composition in its system."""
    return f"{composition} {system_id}"


@dataclass
class BaselineTarget:
    cell: str
    composition: str
    system_id: str
    # every planned relaxation of the arm, in plan order: finished, failed or out of the box; a job lost on an
    # executor has an id here but no document (a rerun of the stage redoes it)
    doc_ids: list[str] = field(default_factory=list)
    done: int = 0  # relaxed in this run
    skipped: int = 0  # already in the store (an earlier run, another study sharing the arm, a worker ahead)
    failed: int = 0
    lost: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.composition} {self.cell}"


@dataclass
class BaselineResult(StageResult):
    """The RSS arm of each target (surfdiff_core.stages.baseline); config_hash is the arm's own (arm_hash)."""

    energy_model: str
    rss_study: str  # the study the arm's documents belong to: evaluate.rss_study, or the study itself
    rss_budget: int
    seed: int
    targets: list[BaselineTarget] = field(default_factory=list)

    @property
    def doc_ids(self) -> list[str]:
        return [i for t in self.targets for i in t.doc_ids]
