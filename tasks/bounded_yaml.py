"""Read a YAML file with bounds: size, aliases, nesting, duplicate keys. Every error names the file.

A run config is small (the shipped ones are under 5 KB), but it is read before anything else and
may come from anywhere (a scheduled deployment's parameter, a file a colleague sent). Plain
`yaml.safe_load` accepts:

- an alias bomb ("billion laughs"): nine anchors of nine aliases each expand to 9^9 nodes; the
  composed document is tiny, but constructing it (and later hashing or serialising a section such
  as `teacher.vllm_engine_args`) takes gigabytes and minutes;
- a 50 MB file, parsed in full before validation refuses it;
- duplicate keys, silently keeping the last one (`rounds: 3` ... `rounds: 30`);
- bytes that are not UTF-8, with an error that names no file.

`load_yaml_file` refuses each of these in well under a second, naming the file (and the key and
line of a duplicate). The expansion is measured on the composed node graph, where an alias is a
second reference to the same node, so the check costs one pass over the distinct nodes.

>>> import tempfile, os
>>> with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
...     _ = f.write("a: &x [1, 2]\\nb: *x\\n")
>>> load_yaml_file(f.name)
{'a': [1, 2], 'b': [1, 2]}
>>> os.unlink(f.name)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

# A run config is a few KB; a 1 MB one is a mistake (or an attack), refused before parsing.
MAX_YAML_BYTES = 1_000_000
# Nodes after expanding aliases. The shipped configs have a few hundred.
MAX_YAML_NODES = 100_000
# Aliases in one document: configs use a handful (shared model sections).
MAX_YAML_ALIASES = 1_000

_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlFileError(ValueError):
    """A YAML file that cannot be read within the bounds; the message names the file."""


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts aliases while composing and refuses duplicate mapping keys."""

    def __init__(self, stream: str, origin: str) -> None:
        super().__init__(stream)
        self.origin = origin
        self.aliases = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_YAML_ALIASES:
                mark = self.peek_event().start_mark
                raise YamlFileError(
                    f"config {self.origin}: more than {MAX_YAML_ALIASES} YAML aliases (line {mark.line + 1}); "
                    "refusing a possible alias bomb"
                )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG or not isinstance(key_node, ScalarNode):
                continue  # "<<: *base" merges may override; complex keys are rare and left alone
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise YamlFileError(
                    f"config {self.origin}: duplicate key {key!r} at line {line} "
                    f"(first at line {seen[key]}); a YAML mapping keeps only one of them"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root: Node, origin: str) -> int:
    """Nodes in the document once every alias is expanded (memoised per node, so linear in the
    distinct nodes); a node that contains itself is refused."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    # Iterative post-order: a deeply nested document must not hit Python's recursion limit here.
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in sizes and not children_done:
            continue
        if isinstance(node, SequenceNode):
            children = node.value
        elif isinstance(node, MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        if not children_done:
            if key in on_path:
                raise YamlFileError(f"config {origin}: a YAML alias refers to a node that contains it")
            on_path.add(key)
            stack.append((node, True))
            for child in children:
                if id(child) in on_path:
                    raise YamlFileError(f"config {origin}: a YAML alias refers to a node that contains it")
                if id(child) not in sizes:
                    stack.append((child, False))
            continue
        on_path.discard(key)
        total = 1
        for child in children:
            total += sizes[id(child)]
            if total > MAX_YAML_NODES:
                line = node.start_mark.line + 1
                raise YamlFileError(
                    f"config {origin}: more than {MAX_YAML_NODES} values once YAML aliases are expanded "
                    f"(from line {line}); refusing a possible alias bomb"
                )
        sizes[key] = total
    return sizes[id(root)]


def load_yaml_file(path: str | Path, *, max_bytes: int = MAX_YAML_BYTES) -> Any:
    """The data of a one-document YAML file, or YamlFileError naming the file and the reason."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)  # never more than the cap, whatever the file's size
    except OSError as err:
        raise YamlFileError(f"cannot read config {path}: {err.strerror or err}") from None
    if len(raw) > max_bytes:
        raise YamlFileError(f"config {path} is larger than {max_bytes:,} bytes; a run config is a few KB")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise YamlFileError(
            f"config {path} is not UTF-8 text: {err.reason} at byte {err.start} (line {line})"
        ) from None
    loader = _BoundedLoader(text, str(path))
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, str(path))
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise YamlFileError(f"config {path} is not valid YAML: {err}") from None
    except RecursionError:
        raise YamlFileError(f"config {path} is nested too deeply") from None
    finally:
        loader.dispose()
