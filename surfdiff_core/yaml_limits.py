"""Bounded YAML: a config is a few kB of nested sections, so its size, nesting depth and alias expansion are
limited before any value is built from it.

An alias "billion laughs" expands to 10^9 values from a few hundred bytes: PyYAML builds it cheaply (aliases
share one object) but everything that walks the values afterwards (validation, hashing) would not finish.
Deep nesting would end in a RecursionError inside PyYAML's composer, which recurses once per level.
"""

from __future__ import annotations

import yaml

from surfdiff_core.errors import ConfigError

MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 64
MAX_CONFIG_NODES = 100_000  # values (scalars, lists, mappings) once every alias is expanded


def _check_depth(text: str, loader: type[yaml.SafeLoader]) -> None:
    """On the event stream (PyYAML's parser does not recurse), before the composer would."""
    depth = 0
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_CONFIG_DEPTH:
                raise ConfigError(f"nested deeper than {MAX_CONFIG_DEPTH} levels (line {event.start_mark.line + 1})")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def expanded_size(node: yaml.Node, limit: int = MAX_CONFIG_NODES) -> int:
    """Values under `node` with every alias expanded, counted on the node graph (each shared node once, so a
    bomb is measured in microseconds); over `limit`, or recursive, it is refused."""
    sizes: dict[int, int] = {}

    def size(n: yaml.Node, path: frozenset[int]) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        if id(n) in path:
            raise ConfigError("an alias refers to a value that contains it (recursive YAML)")
        total = 1
        if isinstance(n, yaml.SequenceNode | yaml.MappingNode):
            inner = path | {id(n)}
            children = n.value if isinstance(n, yaml.SequenceNode) else [x for pair in n.value for x in pair]
            for child in children:
                total += size(child, inner)
                if total > limit:
                    raise ConfigError(f"more than {limit} values once its aliases are expanded (an alias bomb?)")
        sizes[id(n)] = total
        return total

    return size(node, frozenset())


def bounded_load(text: str, loader: type[yaml.SafeLoader]) -> object:
    """yaml.load(text, loader), after the depth and expanded-size checks (ConfigError, or yaml.YAMLError for
    text that is no YAML)."""
    _check_depth(text, loader)
    ld = loader(text)
    try:
        node = ld.get_single_node()
        if node is None:
            return None
        expanded_size(node)
        return ld.construct_document(node)
    finally:
        ld.dispose()
