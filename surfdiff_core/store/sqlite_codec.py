"""JSON encoding of documents for the SQLite store, and Mongo-style projections applied in Python."""

from __future__ import annotations

import base64
from datetime import date, datetime
from enum import Enum
from pathlib import PurePath
from typing import Any, NamedTuple

import numpy as np
import orjson

_MISSING = object()


def _default(obj: Any) -> Any:
    if isinstance(obj, date | datetime):
        return obj.isoformat()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, bytes):
        return base64.b64encode(obj).decode()
    if isinstance(obj, set | frozenset):
        return sorted(obj, key=repr)
    return str(obj)  # ObjectId, UUID, Decimal ... as Mongo drivers print them


class Encoded(NamedTuple):
    """A document already encoded as JSON `text`, with `head`: its top-level fields, where arrays and objects may
    be empty stand-ins of the right kind. SqliteStore.update stores the text as it is (no parse, no re-encode)."""

    text: str
    head: dict


def encode(doc: Any) -> str:
    """Compact JSON (orjson: fast on the float arrays of structures); non-finite floats become null, as in
    pydantic's model_dump_json, because SQLite's JSON functions reject NaN."""
    return orjson.dumps(doc, default=_default, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS).decode()


def decode(text: str | bytes) -> Any:
    return orjson.loads(text)


def plain_json(doc: Any) -> str | None:
    """`doc` encoded when it holds only JSON types already (no sanitising pass needed), else None."""
    try:
        return orjson.dumps(doc).decode()
    except TypeError:
        return None


def normalise(value: Any) -> Any:
    """`value` as it reads back from the store (datetimes as ISO strings, tuples as lists, ...)."""
    return orjson.loads(encode(value))


def parse_properties(properties: dict | list | None) -> tuple[list[str] | None, list[str]]:
    """(fields to include or None for all, fields to exclude) of a maggma/Mongo projection."""
    if properties is None:
        return None, []
    if isinstance(properties, dict):
        include = [k for k, v in properties.items() if v and k != "_id"]
        exclude = [k for k, v in properties.items() if not v and k != "_id"]
        if include:
            return include, []
        return None, exclude
    return [p for p in properties if p != "_id"] or None, []


def _projected(value: Any, parts: list[str]) -> Any:
    """The part of `value` that a projection on the dotted path `parts` keeps (_MISSING if none)."""
    if not parts:
        return value
    if isinstance(value, dict):
        if parts[0] not in value:
            return _MISSING
        below = _projected(value[parts[0]], parts[1:])
        return _MISSING if below is _MISSING else {parts[0]: below}
    if isinstance(value, list):  # Mongo projects into the subdocuments of an array
        kept = (_projected(v, parts) for v in value if isinstance(v, dict))
        return [v for v in kept if v is not _MISSING]
    return _MISSING


def _deep_merge(into: Any, extra: Any) -> Any:
    if isinstance(into, dict) and isinstance(extra, dict):
        for k, v in extra.items():
            into[k] = _deep_merge(into[k], v) if k in into else v
        return into
    if isinstance(into, list) and isinstance(extra, list) and len(into) == len(extra):
        return [_deep_merge(a, b) for a, b in zip(into, extra, strict=True)]
    return extra


def project(doc: dict, include: list[str] | None, exclude: list[str]) -> dict:
    if include is not None:
        out: dict = {}
        for field in include:
            kept = _projected(doc, field.split("."))
            if kept is not _MISSING:
                _deep_merge(out, kept)
        return out
    for field in exclude:
        *parents, last = field.split(".")
        node: Any = doc
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return doc


def matches(criteria: dict, doc: dict) -> bool:
    """Mongo's matching rules in Python (mongomock's, the one maggma's MemoryStore uses)."""
    try:
        from mongomock_ng.filtering import filter_applies
    except ImportError:  # older maggma releases depend on mongomock itself
        from mongomock.filtering import filter_applies
    return bool(filter_applies(criteria, doc))


def get_path(doc: Any, field: str) -> Any:
    """Value at a dotted path through subdocuments (None when absent), as maggma's groupby reads keys."""
    for part in field.split("."):
        if not isinstance(doc, dict) or part not in doc:
            return None
        doc = doc[part]
    return doc


def values_at(doc: Any, parts: list[str]) -> list[Any]:
    """Every value at a dotted path, arrays flattened, as Mongo's distinct() sees them."""
    if not parts:
        return list(doc) if isinstance(doc, list) else [doc]
    if isinstance(doc, dict):
        return values_at(doc[parts[0]], parts[1:]) if parts[0] in doc else []
    if isinstance(doc, list):
        return [v for item in doc if isinstance(item, dict) for v in values_at(item, parts)]
    return []
