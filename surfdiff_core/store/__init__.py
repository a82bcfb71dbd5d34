"""The results store: every structure surfdiff makes, as one validated document in a maggma Store."""

from surfdiff_core.store.documents import StructureDoc, make_doc_id
from surfdiff_core.store.results import ResultsStore, open_store

__all__ = ["ResultsStore", "StructureDoc", "make_doc_id", "open_store"]
