"""Overlayer compositions such as 'Ag6O3': parsed, validated, and turned into the list of atoms to place."""

from __future__ import annotations

import re

from ase.data import atomic_numbers

from surfdiff_core.errors import ConfigError

_TOKEN = re.compile(r"([A-Z][a-z]?)(-?\d*)")
# Overlayer atoms one composition may ask for: each is placed and relaxed one by one, and the list of them is
# built up front, so an absurd count (Ag1000000000) is refused here instead of exhausting memory.
MAX_OVERLAYER_ATOMS = 10_000


def parse_composition(text: str) -> dict[str, int]:
    """'Ag6O3' -> {'Ag': 6, 'O': 3}; element order as written, repeated elements summed."""
    s = str(text).strip()
    if not s:
        raise ConfigError("empty composition")
    pos = 0
    counts: dict[str, int] = {}
    for m in _TOKEN.finditer(s):
        if m.start() != pos:
            break
        element, number = m.group(1), m.group(2)
        if element not in atomic_numbers:
            raise ConfigError(f"composition {s!r}: unknown element {element!r}")
        if len(number) > 9:  # more atoms than MAX_OVERLAYER_ATOMS by far (and no 4300-digit int parsing)
            raise ConfigError(f"composition {s[:40]!r}: too many {element} atoms (at most {MAX_OVERLAYER_ATOMS})")
        n = int(number) if number not in ("", "-") else (1 if number == "" else -1)
        if n < 0:
            raise ConfigError(f"composition {s!r}: negative count for {element}")
        counts[element] = counts.get(element, 0) + n
        pos = m.end()
    if pos != len(s):
        raise ConfigError(f"composition {s!r}: cannot parse near {s[pos:]!r} (expected e.g. 'Ag6O3')")
    counts = {el: n for el, n in counts.items() if n > 0}
    if not counts:
        raise ConfigError(f"composition {s!r} has no atoms")
    if sum(counts.values()) > MAX_OVERLAYER_ATOMS:
        raise ConfigError(f"composition {s!r} has {sum(counts.values())} atoms; at most {MAX_OVERLAYER_ATOMS} "
                          f"are supported")
    return counts


def format_composition(counts: dict[str, int]) -> str:
    return "".join(f"{el}{n}" for el, n in counts.items() if n > 0)


def composition_symbols(counts: dict[str, int]) -> list[str]:
    return [el for el, n in counts.items() for _ in range(n)]


def normalise_composition(text: str) -> str:
    return format_composition(parse_composition(text))
