"""The one problem record every source is normalised into, and the raw rows sources read."""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from typing import Any, Literal, NamedTuple

Split = Literal["train", "eval"]
Operation = Literal["seed", "harder", "similar"]

class SourceError(ValueError):
    """A source that cannot be loaded at all: unreadable file, unknown column, missing split."""


class RawRow(NamedTuple):
    """What a loader yields: one upstream row, or the reason it could not be read."""

    row: int
    question: Any = None
    answer: Any = None
    meta: dict | None = None
    split: str | None = None  # per-row split (gsm_symbolic); None = cfg.split
    error: str | None = None  # set when the row itself is unreadable (invalid JSON, ...)


_WS = re.compile(r"\s+")


def normalize_question(text: str) -> str:
    """Whitespace-collapsed, stripped text: what the id and exact-duplicate checks see."""
    return _WS.sub(" ", text).strip()


def problem_id(question: str, answer: str) -> str:
    """Stable id from content: the same question and answer get the same id in every run."""
    payload = f"{normalize_question(question)}\x1f{answer.strip()}".encode()
    return hashlib.sha256(payload).hexdigest()[:16]


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: str
    source: str
    split: Split = "train"
    parent_id: str | None = None
    operation: Operation = "seed"
    round_introduced: int = 0
    meta: str | None = None  # JSON text: upstream id, template id, ...

    @classmethod
    def make(cls, question: str, answer: str, source: str, **kw) -> Problem:
        question, answer = question.strip(), answer.strip()
        return cls(id=problem_id(question, answer), question=question, answer=answer, source=source, **kw)

    def to_row(self) -> dict:
        """The storage row (storage/ calls the id column problem_id)."""
        row = asdict(self)
        row["problem_id"] = row.pop("id")
        return row
