"""The line-aware YAML layer under the topology validator.

``yaml.safe_load`` throws away line numbers and silently keeps the last of two
duplicate keys, so a typo'd second ``b:`` pod would replace the first without a
word. We compose the node tree instead and turn it into a small tree of
:class:`Map` / :class:`Seq` / :class:`Scalar` that remembers where every key
and value came from, interpolating string values on the way so that the
validator only sees final values.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pods.interpolation import InterpolationError, interpolate

# PyYAML is imported where a document is read: the supervisor unpickles Problems from this module and reads
# no YAML.
if TYPE_CHECKING:
    import yaml
    from yaml.constructor import SafeConstructor

_TAG = "tag:yaml.org,2002:"
_MERGE = _TAG + "merge"
# Scalars we turn into Python values; anything else (a timestamp, a binary
# blob) is kept as its source text, which is what a user writing
# ``VERSION: 2024-01-01`` in an env block means anyway.
_TYPED = {_TAG + t for t in ("null", "bool", "int", "float")}
_AS_TEXT = {_TAG + t for t in ("timestamp", "binary")}


@functools.cache
def _constructor() -> SafeConstructor:
    from yaml.constructor import SafeConstructor

    return SafeConstructor()


@dataclass(frozen=True)
class Problem:
    """One finding, printed as ``FILE:LINE: message`` so editors can jump to it."""

    path: str
    line: int
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        prefix = "warning: " if self.severity == "warning" else ""
        return f"{where}: {prefix}{self.message}"


class Report:
    """Collects every problem of one file, so the user fixes them in one round."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.problems: list[Problem] = []

    def error(self, line: int, message: str) -> None:
        self.problems.append(Problem(self.path, line, message))

    def warning(self, line: int, message: str) -> None:
        self.problems.append(Problem(self.path, line, message, "warning"))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def sorted(self) -> list[Problem]:
        return sorted(self.problems, key=lambda p: p.line)


@dataclass
class Scalar:
    value: Any
    line: int
    #: Set when interpolation failed and an error was already reported, so
    #: that validators do not pile a second, confusing error on the same value.
    broken: bool = False


@dataclass
class Seq:
    items: list[Node]
    line: int


@dataclass
class Entry:
    key: str
    key_line: int
    value: Node


@dataclass
class Map:
    entries: dict[str, Entry]
    line: int
    #: (key, line, first line) of repeated keys; the first occurrence is kept.
    #: The validator reports them, because only it knows whether the key is a
    #: pod ("duplicate pod 'b'") or a plain key.
    duplicates: list[tuple[str, int, int]] = field(default_factory=list)

    def get(self, key: str) -> Node | None:
        entry = self.entries.get(key)
        return entry.value if entry else None


Node = Scalar | Seq | Map


def compose(text: str, report: Report) -> yaml.Node | None:
    """Parse ``text`` into a YAML node tree; a syntax error is reported, not raised.

    libyaml composes it when PyYAML has it (50 pods: 2 ms instead of 27): the same tags, values, line marks and
    scalar styles (plain ones made None, as PyYAML's own parser leaves them); a document it refuses goes to
    PyYAML's parser, whose message is the one reported."""
    import yaml

    fast = getattr(yaml, "CSafeLoader", None)
    if fast is not None:
        try:
            root = yaml.compose(text, Loader=fast)
        except yaml.YAMLError:
            pass
        else:
            _plain_style_none(root)
            return root
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        report.error(line, f"YAML syntax error: {exc.problem or exc.context}")
    except yaml.YAMLError as exc:  # ReaderError: a byte YAML does not allow
        report.error(1, f"YAML syntax error: {exc}")
    return None


def _plain_style_none(root: yaml.Node | None) -> None:
    for node in scalar_nodes(root):
        if node.style == "":
            node.style = None


def scalar_nodes(root: yaml.Node | None) -> Iterator[yaml.ScalarNode]:
    """Every scalar of a composed document, once each (an alias shares its anchor's node)."""
    import yaml

    seen: set[int] = set()
    stack = [root] if root is not None else []
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            yield node
        elif isinstance(node, yaml.SequenceNode):
            stack += node.value
        elif isinstance(node, yaml.MappingNode):
            stack += [n for pair in node.value for n in pair]


def build(
    root: yaml.Node,
    report: Report,
    environ: Mapping[str, str],
    skip_top_level: Callable[[str], bool] = lambda key: False,
) -> Node:
    """Turn a composed node into a located tree, interpolating string scalars.

    Top-level keys for which ``skip_top_level`` is true are dropped unread:
    compose-style ``x-`` extension fields hold anchors for the rest of the
    file, and an interpolation error in an unused template should not fail it.
    """
    return _Builder(report, environ).build(root, skip_top_level)


def line_of(node: yaml.Node) -> int:
    return node.start_mark.line + 1


class _Builder:
    def __init__(self, report: Report, environ: Mapping[str, str]) -> None:
        self.report = report
        self.environ = environ
        self.warned: set[str] = set()
        # Aliases point at the same node; converting each node once keeps a
        # "billion laughs" document cheap and reports its problems once.
        self.done: dict[int, Node] = {}
        self.active: set[int] = set()

    def build(self, node: yaml.Node, skip_top_level: Callable[[str], bool]) -> Node:
        import yaml

        if isinstance(node, yaml.MappingNode):
            return self._map(node, skip_top_level)
        return self.node(node)

    def node(self, node: yaml.Node) -> Node:
        import yaml

        key = id(node)
        if key in self.done:
            return self.done[key]
        if key in self.active:
            self.report.error(line_of(node), "recursive YAML alias")
            return Scalar(None, line_of(node), broken=True)
        self.active.add(key)
        try:
            if isinstance(node, yaml.MappingNode):
                out: Node = self._map(node, lambda key: False)
            elif isinstance(node, yaml.SequenceNode):
                out = Seq([self.node(item) for item in node.value], line_of(node))
            else:
                out = self._scalar(node)
        finally:
            self.active.discard(key)
        self.done[key] = out
        return out

    def _map(self, node: yaml.MappingNode, skip: Callable[[str], bool]) -> Map:
        import yaml

        result = Map({}, line_of(node))
        merged: dict[str, Entry] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                self._merge(value_node, merged)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.report.error(line_of(key_node), "mapping keys must be plain scalars")
                continue
            key = key_node.value
            first = result.entries.get(key)
            if first is not None:
                result.duplicates.append((key, line_of(key_node), first.key_line))
                continue
            if skip(key):
                continue
            result.entries[key] = Entry(key, line_of(key_node), self.node(value_node))
        for key, entry in merged.items():
            result.entries.setdefault(key, entry)
        return result

    def _merge(self, value_node: yaml.Node, into: dict[str, Entry]) -> None:
        """YAML ``<<: *anchor`` merge keys: explicit keys win, earlier merges win over later ones."""
        import yaml

        sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
        for source in sources:
            built = self.node(source)
            if not isinstance(built, Map):
                self.report.error(line_of(source), "'<<' merge needs a mapping or a list of mappings")
                continue
            for key, entry in built.entries.items():
                into.setdefault(key, entry)

    def _scalar(self, node: yaml.ScalarNode) -> Scalar:
        line = line_of(node)
        if node.tag == _TAG + "str":
            return self._interpolated(node.value, line)
        if node.tag in _TYPED:
            constructor = _constructor()
            return Scalar(constructor.yaml_constructors[node.tag](constructor, node), line)
        if node.tag in _AS_TEXT:
            return Scalar(node.value, line)
        self.report.error(line, f"unsupported YAML tag {node.tag!r}")
        return Scalar(node.value, line, broken=True)

    def _interpolated(self, text: str, line: int) -> Scalar:
        def unset(name: str) -> None:
            if name not in self.warned:
                self.warned.add(name)
                self.report.warning(line, f"variable {name} is not set; substituting an empty string")

        try:
            return Scalar(interpolate(text, self.environ, unset), line)
        except InterpolationError as exc:
            self.report.error(line, str(exc))
            return Scalar(text, line, broken=True)


def to_python(node: Node) -> Any:
    """Plain Python data for parts of the file another layer validates (sidecar, prometheus)."""
    if isinstance(node, Map):
        return {key: to_python(entry.value) for key, entry in node.entries.items()}
    if isinstance(node, Seq):
        return [to_python(item) for item in node.items]
    return node.value


def describe(node: Node) -> str:
    """How a value reads in an error message: ``string 'two'``, ``a mapping``..."""
    if isinstance(node, Map):
        return "a mapping"
    if isinstance(node, Seq):
        return "a list"
    value = node.value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"number {value}"
    return f"string {value!r}"


def report_duplicates(node: Node, report: Report, where: str) -> None:
    """Report repeated keys anywhere below ``node``, for subtrees validated elsewhere."""
    if isinstance(node, Map):
        for key, line, first in node.duplicates:
            report.error(line, f"duplicate key {key!r} in {where} (first defined at line {first})")
        for key, entry in node.entries.items():
            report_duplicates(entry.value, report, f"{where}.{key}")
    elif isinstance(node, Seq):
        for index, item in enumerate(node.items):
            report_duplicates(item, report, f"{where}[{index}]")
