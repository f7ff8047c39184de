"""YAML read with bounds: the one reader of recipes and `--set` values (torch-free, like config.py).

`yaml.safe_load` runs no code, but it still lets a small file cost unbounded time or a crash:
- an alias bomb: ~300 bytes of `&a [*b, *b, ...]` levels expand to millions of nodes in anything that walks the
  result (validation, an error message, yaml.safe_dump of recipe.yaml);
- deep nesting: 50k `[` make the recursive composer raise RecursionError.
So a document is refused when it is over MAX_BYTES (256 KiB), nests deeper than MAX_DEPTH, refers to itself, or
expands (aliases counted at their full size) past MAX_NODES. A recipe is a few dozen keys: every bound is far above it.
"""

from __future__ import annotations

from typing import Any

import yaml

from .errors import ConfigError

MAX_BYTES = 1 << 18  # 256 KiB: PyYAML's pure-Python parser (needed for the composer hook) takes seconds per MiB
MAX_DEPTH = 32
MAX_NODES = 100_000


class _Refused(Exception):
    pass


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer counts nesting depth; the expanded size is checked on the composed node graph."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = self._nodes = 0

    def compose_node(self, parent, index):
        self._depth += 1
        self._nodes += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"it nests deeper than {MAX_DEPTH} levels")
            if self._nodes > MAX_NODES:  # stop composing early; aliases are counted in full below
                raise _Refused(f"it holds more than {MAX_NODES} values")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _expanded_size(node: yaml.Node) -> int:
    """Nodes of the document with every alias expanded, computed once per shared node (memo by id): linear in the
    file, however large the expansion. Stops as soon as the bound is passed."""
    done: dict[int, int] = {}
    busy: set[int] = set()

    def size(n: yaml.Node) -> int:
        key = id(n)
        if key in done:
            return done[key]
        if key in busy:
            raise _Refused("an alias refers to a node that contains it (a recursive structure)")
        busy.add(key)
        total = 1
        if isinstance(n, yaml.SequenceNode):
            total += sum(size(c) for c in n.value)
        elif isinstance(n, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in n.value)
        if total > MAX_NODES:
            raise _Refused(f"it expands to more than {MAX_NODES} values (aliases counted in full)")
        busy.discard(key)
        done[key] = total
        return total

    return size(node)


def load(text: str, what: str) -> Any:
    """Parse `text` (one YAML document) within the bounds; ConfigError naming `what` otherwise. yaml.YAMLError
    passes through for the caller's own message (line and column)."""
    if len(text) > MAX_BYTES:
        raise ConfigError(f"{what} is {len(text)} characters; a recipe is at most {MAX_BYTES} (a few dozen keys).")
    loader = _BoundedLoader(text)
    try:
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _expanded_size(node)
            return loader.construct_document(node)
        except _Refused as e:
            raise ConfigError(f"{what} is refused: {e}. A recipe is a few flat sections of keys; write the values "
                              "out plainly.") from None
        except RecursionError:
            raise ConfigError(f"{what} is refused: it nests too deeply.") from None
    finally:
        loader.dispose()
