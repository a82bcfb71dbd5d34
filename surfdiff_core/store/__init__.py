"""The results store: every structure surfdiff makes, as one validated document in a maggma Store."""

from surfdiff_core.store.documents import Frame, StructureDoc, make_doc_id
from surfdiff_core.store.results import ResultsStore, make_maggma_store, open_store

__all__ = ["Frame", "ResultsStore", "StructureDoc", "make_doc_id", "make_maggma_store", "open_store"]
