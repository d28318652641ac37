"""Reading a user's YAML safely and without surprises: the one loader for configs and ``--set`` values.

On top of ``yaml.SafeLoader`` (no Python objects, ever):

* **duplicate keys are an error** naming both lines (YAML leaves them undefined and PyYAML keeps the last one, so
  a repeated ``pipeline:`` silently changed the pipeline); keys brought in by a ``<<`` merge may still be
  overridden, as YAML's merge key intends;
* **YAML 1.2 numbers**: ``1e6``, ``5e-4`` and ``-2E+3`` are floats (YAML 1.1, PyYAML's default, reads a float only
  with a dot, so they were strings);
* **limits**: a document above :data:`MAX_BYTES` is refused before it is parsed; one whose aliases expand to more
  than :data:`MAX_VALUES` values (a "billion laughs" document: a few lines that become millions of values, e.g. of
  MLflow params) or that refers to itself is refused after composing, before anything is built from it; nesting
  deeper than :data:`MAX_DEPTH` is refused.

Every failure is a :class:`~hpmkd.registry.ConfigError` whose message names the source (file or ``--set``), the
line and what to change.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, SequenceNode

from hpmkd.registry import ConfigError

#: the largest document read (a config is a few kilobytes; a 10 MB one took 1.8 GB of memory before failing)
MAX_BYTES = 1 << 20
#: the most values (scalars, mappings, lists) a document may expand to through its aliases
MAX_VALUES = 10_000
#: the deepest nesting of mappings and lists
MAX_DEPTH = 64

MERGE_TAG = "tag:yaml.org,2002:merge"
#: YAML 1.2 core schema floats with an exponent and no dot, which YAML 1.1 reads as strings
FLOAT_12 = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class StrictLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses duplicate keys and reads YAML 1.2 exponent floats (see the module docstring)."""

    source = "<yaml>"

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict:
        first: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                seen = first.get(key)
            except TypeError:  # an unhashable key: SafeLoader reports it
                break
            if seen is not None:
                raise ConfigError(
                    f"{self.source}: line {key_node.start_mark.line + 1}: key {key!r} appears twice (first on line "
                    f"{seen.line + 1}); YAML keeps only one of them. Remove or rename one.")
            first[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


for first_char in "-+0123456789":
    StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", FLOAT_12, list(first_char))


def load_yaml(text: str, source: str) -> Any:
    """The data in the YAML document ``text`` (``None`` when empty); ``source`` names it in errors."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        raise ConfigError(f"{source}: {size} bytes, more than the {MAX_BYTES} a config may have; a config is a few "
                          f"kilobytes of YAML (data sets and weights are referred to by path, never embedded).")
    loader = StrictLoader(text)
    loader.source = source
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        check_expansion(node, source)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = "; ".join(p for p in (err.context, err.problem) if p)
        raise ConfigError(f"{source}: not valid YAML{where}: {what}.") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {' '.join(str(err).split())}.") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to read; a config nests a few levels.") from None
    finally:
        loader.dispose()


def check_expansion(root: Node, source: str) -> None:
    """Refuse documents that expand to more than :data:`MAX_VALUES` values, nest deeper than :data:`MAX_DEPTH` or
    refer to themselves. Sizes are memoised per node, so an alias costs one lookup, not a walk."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: Node, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise ConfigError(f"{source}: line {node.start_mark.line + 1}: an alias refers to a node that contains "
                              "it (a recursive document); a config is a tree.")
        if depth > MAX_DEPTH:
            raise ConfigError(f"{source}: line {node.start_mark.line + 1}: nested more than {MAX_DEPTH} levels deep.")
        open_nodes.add(key)
        total = 1
        if isinstance(node, SequenceNode):
            total += sum(size(child, depth + 1) for child in node.value)
        elif isinstance(node, MappingNode):
            total += sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        open_nodes.discard(key)
        if total > MAX_VALUES:
            raise ConfigError(f"{source}: line {node.start_mark.line + 1}: expands to more than {MAX_VALUES} values "
                              "through its aliases (*name); a config is far smaller. Write the values out, or use "
                              "fewer nested aliases.")
        sizes[key] = total
        return total

    size(root, 0)
