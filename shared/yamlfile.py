"""YAML files read for configuration (playbooks, content), with every problem located.

One document per file is parsed into plain data *and* its node tree, so a problem found later
(by pydantic, or by a cross-check) can be reported at its ``file:line: field: reason``.
Pure: parsing text is the only thing done here (the caller reads the file).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError

FieldPath = tuple[str | int, ...]


def format_path(path: FieldPath, empty: str = "<file>") -> str:
    """``("steps", 2, "offset")`` → ``"steps[2].offset"``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or empty


@dataclass(frozen=True, slots=True)
class Located:
    """One problem at a place in a file: ``file:line: field: reason``."""

    path: FieldPath
    reason: str
    file: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = ""
        if self.file is not None:
            where = f"{self.file}:{self.line}: " if self.line is not None else f"{self.file}: "
        return f"{where}{format_path(self.path)}: {self.reason}"


class YamlFileError(Exception):
    """Problems found in one or more files; the message lists each on a line."""

    def __init__(self, problems: Sequence[Located], what: str = "file") -> None:
        self.problems: tuple[Located, ...] = tuple(problems)
        count = len(self.problems)
        heading = f"invalid {what}" if count == 1 else f"{count} {what} problems"
        super().__init__(heading + ":\n" + "\n".join(f"  {p}" for p in self.problems))


def parse(text: str, source: str) -> tuple[Any, yaml.Node]:
    """The one document of ``text`` as data, with its node tree (for :func:`line_of`).

    Raises:
        YamlFileError: not valid YAML, empty, or a key given twice in one mapping.
    """
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.YAMLError as exc:
            raise YamlFileError([yaml_problem(exc, source)]) from None
        if node is None:
            raise YamlFileError([Located((), "the file is empty", source, 1)])
        duplicates = duplicate_keys(node, ())
        if duplicates:
            raise YamlFileError(
                [Located(p, "duplicate key", source, line) for p, line in duplicates]
            )
        try:
            data = loader.construct_document(node)
        except yaml.YAMLError as exc:
            raise YamlFileError([yaml_problem(exc, source)]) from None
    finally:
        loader.dispose()
    return data, node


def yaml_problem(exc: yaml.YAMLError, source: str) -> Located:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        reason = "; ".join(part for part in (exc.context, exc.problem) if part)
        line = mark.line + 1 if mark is not None else None
    else:
        reason, line = str(exc), None
    return Located((), f"not valid YAML: {reason}", source, line)


def pydantic_reason(error: Any) -> str:
    """A pydantic error's message in the words used for files."""
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return "unknown field"
    if error["type"] == "missing":
        return "required field is missing"
    return message


def validation_problems(
    exc: ValidationError, node: yaml.Node, source: str, prefix: FieldPath = ()
) -> list[Located]:
    """Each error of ``exc`` at its line; a container error that only echoes the errors of
    its items is left out."""
    errors = exc.errors()
    locs = [(*prefix, *e["loc"]) for e in errors]
    kept = [
        (loc, e)
        for loc, e in zip(locs, errors, strict=True)
        if not any(len(other) > len(loc) and other[: len(loc)] == loc for other in locs)
    ]
    return [Located(loc, pydantic_reason(e), source, line_of(node, loc)) for loc, e in kept]


def duplicate_keys(node: yaml.Node, path: FieldPath) -> list[tuple[FieldPath, int]]:
    found: list[tuple[FieldPath, int]] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[object] = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in seen and key != "<<":
                found.append(((*path, str(key)), key_node.start_mark.line + 1))
            seen.add(key)
            found.extend(duplicate_keys(value_node, (*path, str(key))))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            found.extend(duplicate_keys(item, (*path, index)))
    return found


def line_of(node: yaml.Node, path: Sequence[str | int]) -> int:
    """The 1-based line of the node at ``path``, or of its deepest existing ancestor."""
    current = node
    for depth, part in enumerate(path):
        child: yaml.Node | None = None
        if isinstance(current, yaml.MappingNode):
            for key_node, value_node in current.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.value == str(part):
                    child = key_node if depth == len(path) - 1 else value_node
                    break
        elif (
            isinstance(current, yaml.SequenceNode)
            and isinstance(part, int)
            and 0 <= part < len(current.value)
        ):
            child = current.value[part]
        if child is None:
            break
        current = child
    line: int = current.start_mark.line + 1
    return line
