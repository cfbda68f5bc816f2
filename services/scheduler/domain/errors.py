"""The one error the playbook code raises, with every problem it found."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

FieldPath = tuple[str | int, ...]


def format_path(path: FieldPath) -> str:
    """``("steps", 2, "offset")`` → ``"steps[2].offset"``; the empty path is ``"<playbook>"``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "<playbook>"


@dataclass(frozen=True, slots=True)
class PlaybookProblem:
    """One thing wrong with a playbook: where (file, 1-based line, field path) and why.

    ``file`` and ``line`` are ``None`` for a playbook built in code rather than loaded.
    """

    path: FieldPath
    reason: str
    file: str | None = None
    line: int | None = None

    @property
    def field(self) -> str:
        """The field path as text, e.g. ``steps[2].offset``."""
        return format_path(self.path)

    def __str__(self) -> str:
        where = ""
        if self.file is not None:
            where = f"{self.file}:{self.line}: " if self.line is not None else f"{self.file}: "
        return f"{where}{self.field}: {self.reason}"


class PlaybookError(Exception):
    """A playbook is invalid. The message lists every problem as ``file:line: field: reason``."""

    def __init__(self, problems: Sequence[PlaybookProblem]) -> None:
        self.problems: tuple[PlaybookProblem, ...] = tuple(problems)
        count = len(self.problems)
        heading = "invalid playbook" if count == 1 else f"{count} playbook problems"
        super().__init__(heading + ":\n" + "\n".join(f"  {p}" for p in self.problems))
