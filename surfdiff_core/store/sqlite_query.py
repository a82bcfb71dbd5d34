"""Mongo-style criteria as SQLite SQL over JSON documents (the JSON1 functions built into sqlite3).

Every translation is a *superset* condition: parts that SQL cannot express exactly (regex, $elemMatch, fields
that ever held arrays, ...) become TRUE and the result is marked inexact, so the caller filters the candidate
rows again in Python with mongomock's matcher. Exact translations keep Mongo's type brackets (1 never matches
true or "1") through json_type() guards, which cost nothing extra because the indexed json_extract() term
narrows the rows first.
"""

from __future__ import annotations

import math
from datetime import date, datetime
from typing import Any, NamedTuple

# Paths deeper than this are not tracked in the per-collection type census, so they are filtered in Python.
CENSUS_DEPTH = 4
Census = dict[str, set[str]]


class Translation(NamedTuple):
    sql: str
    params: list[Any]
    exact: bool


_TRUE = Translation("1", [], True)
_INEXACT = Translation("1", [], False)


def json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "other"


def add_to_census(census: Census, doc: dict, prefix: str = "", depth: int = 1) -> bool:
    """Record the JSON kind of every path of `doc` (objects descended, arrays not). True if `census` grew."""
    grew = False
    for k, v in doc.items():
        path = f"{prefix}{k}"
        kind = json_kind(v)
        seen = census.setdefault(path, set())
        if kind not in seen:
            seen.add(kind)
            grew = True
        if kind == "object" and depth < CENSUS_DEPTH:
            grew |= add_to_census(census, v, f"{path}.", depth + 1)
    return grew


def json_path(field: str) -> str | None:
    """SQL string literal of the JSON path of a dotted Mongo field; None for names SQL should not see."""
    parts = field.split(".")
    if any(not p or '"' in p or "\\" in p for p in parts):
        return None
    body = "$" + "".join(f'."{p}"' for p in parts)
    return "'" + body.replace("'", "''") + "'"


def path_is_scalar(field: str, census: Census) -> bool:
    """True when no document holds an array at `field` or above it (Mongo would then match elements)."""
    parts = field.split(".")
    if len(parts) > CENSUS_DEPTH:
        return False
    return all("array" not in census.get(".".join(parts[: i + 1]), ()) for i in range(len(parts)))


def extract(field: str) -> str:
    return f"json_extract(doc, {json_path(field)})"


def _normalise(value: Any) -> Any:
    return value.isoformat() if isinstance(value, date | datetime) else value


def _typed_values(values: list[Any]) -> dict[str, list[Any]] | None:
    """Values grouped by how SQL compares them; None when one of them has no exact SQL form."""
    groups: dict[str, list[Any]] = {"text": [], "number": [], "true": [], "false": [], "null": []}
    for v in map(_normalise, values):
        if v is None:
            groups["null"].append(v)
        elif isinstance(v, bool):
            groups["true" if v else "false"].append(v)
        elif isinstance(v, int | float) and math.isfinite(v):
            groups["number"].append(v)
        elif isinstance(v, str):
            groups["text"].append(v)
        else:
            return None
    return groups


def _membership(field: str, values: list[Any]) -> Translation:
    groups = _typed_values(values)
    if groups is None:
        return _INEXACT
    x, t = extract(field), f"json_type(doc, {json_path(field)})"
    terms: list[str] = []
    params: list[Any] = []
    if groups["text"]:
        terms.append(f"({x} IN ({','.join('?' * len(groups['text']))}) AND {t} = 'text')")
        params += groups["text"]
    if groups["number"]:
        terms.append(f"({x} IN ({','.join('?' * len(groups['number']))}) AND {t} IN ('integer','real'))")
        params += groups["number"]
    for kind, number in (("true", 1), ("false", 0)):
        if groups[kind]:
            terms.append(f"({x} = {number} AND {t} = '{kind}')")
    if groups["null"]:
        terms.append(f"{x} IS NULL")
    return Translation("(" + " OR ".join(terms) + ")" if terms else "0", params, True)


def _compare(field: str, op: str, value: Any) -> Translation:
    value = _normalise(value)
    x, t = extract(field), f"json_type(doc, {json_path(field)})"
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return Translation(f"({x} {op} ? AND {t} IN ('integer','real'))", [value], True)
    if isinstance(value, str):
        return Translation(f"({x} {op} ? AND {t} = 'text')", [value], True)
    return _INEXACT


def _negate(tr: Translation) -> Translation:
    # COALESCE: a missing field makes the positive test NULL, and Mongo's negations match missing fields.
    return Translation(f"NOT COALESCE({tr.sql}, 0)", tr.params, True) if tr.exact else _INEXACT


_COMPARISONS = {"$lt": "<", "$lte": "<=", "$gt": ">", "$gte": ">="}


def _operator(field: str, op: str, arg: Any) -> Translation:
    if op == "$eq":
        return _membership(field, [arg])
    if op == "$ne":
        return _negate(_membership(field, [arg]))
    if op in ("$in", "$nin") and isinstance(arg, list | tuple):
        tr = _membership(field, list(arg))
        return tr if op == "$in" else _negate(tr)
    if op in _COMPARISONS:
        return _compare(field, _COMPARISONS[op], arg)
    if op == "$exists":
        return Translation(f"json_type(doc, {json_path(field)}) IS {'NOT ' if arg else ''}NULL", [], True)
    return _INEXACT


def _field(field: str, condition: Any, census: Census) -> Translation:
    if json_path(field) is None or not path_is_scalar(field, census):
        return _INEXACT
    if isinstance(condition, dict) and condition and all(str(k).startswith("$") for k in condition):
        return _join([_operator(field, op, arg) for op, arg in condition.items()], "AND")
    if isinstance(condition, dict | list | tuple):
        return _INEXACT  # whole-subdocument / whole-array equality
    return _membership(field, [condition])


def _join(parts: list[Translation], glue: str) -> Translation:
    if not parts:
        return _TRUE
    if len(parts) == 1:
        return parts[0]
    sql = f" {glue} ".join(f"({p.sql})" for p in parts)
    return Translation(f"({sql})", [x for p in parts for x in p.params], all(p.exact for p in parts))


def translate(criteria: dict[str, Any] | None, census: Census) -> Translation:
    """SQL WHERE condition (superset of the matches) for Mongo-style `criteria`."""
    parts: list[Translation] = []
    for key, condition in (criteria or {}).items():
        if key in ("$and", "$or", "$nor"):
            if not isinstance(condition, list | tuple) or not condition:
                parts.append(_INEXACT)
                continue
            branches = [translate(c, census) for c in condition]
            if key == "$and":
                parts.append(_join(branches, "AND"))
            elif key == "$or":
                parts.append(_join(branches, "OR"))
            else:
                parts.append(_negate(_join(branches, "OR")))
        elif key.startswith("$"):
            parts.append(_INEXACT)  # $expr, $where, $text, ...
        else:
            parts.append(_field(key, condition, census))
    return _join(parts, "AND")


def order_by(sort: dict[str, Any] | list[tuple[str, Any]] | None) -> str:
    """ORDER BY clause for {field: 1|-1} (or Sort enums); empty when there is no sort."""
    if not sort:
        return ""
    items = sort.items() if isinstance(sort, dict) else sort
    terms = []
    for field, direction in items:
        if json_path(field) is None:
            raise ValueError(f"cannot sort on field {field!r}")
        value = getattr(direction, "value", direction)
        terms.append(f"{extract(field)} {'DESC' if int(value) < 0 else 'ASC'}")
    return " ORDER BY " + ", ".join(terms)
