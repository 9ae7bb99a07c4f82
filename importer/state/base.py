"""The importer's memory between runs: what it knows of each file, behind one interface."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

from importer.contract import ShardSummary

#: Status of an entry migrated from the older importer's state file (points written by that importer);
#: the reader decides per file whether to adopt it or import the file afresh.
LEGACY = "legacy"


@dataclass
class FileState:
    """What the importer has consumed of one JSONL file (keyed by its path relative to the source root)."""

    size: int = 0
    mtime: float = 0.0
    #: sha256 (hex, first 16 chars) of the file's first bytes: a changed head means the file was rewritten.
    head_hash: str = ""
    #: How many bytes ``head_hash`` covers (the file may have been shorter than the usual head).
    head_size: int = 0
    #: Byte offset just past the last complete record consumed.
    consumed: int = 0
    #: Byte offset where the next run resumes reading: the start of the still-short tail chunk
    #: (re-read and re-emitted, complete, with the same index), or ``consumed`` when there is none.
    offset: int = 0
    #: Index of the chunk that starts at ``offset``.
    next_chunk: int = 0
    #: Project the file's points went to (fixed at first import so a resumed run uses the same collection).
    project: str = ""
    #: Text messages consumed (up to ``consumed``) and points written, over all runs.
    messages: int = 0
    chunks: int = 0
    #: Per-reason counts of skipped lines (bad_json, non_utf8, too_long, bad_shape, ...).
    skipped: dict[str, int] = field(default_factory=dict)
    #: "done", "partial" (an incomplete last line waits for the writer) or "failed".
    status: str = "done"
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FileState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class StateStore(Protocol):
    """Where per-file state lives: a JSON file on a laptop, ConfigMaps in a Job."""

    def load(self) -> dict[str, FileState]:
        """Everything saved so far, keyed by the file's path relative to the source root."""
        ...

    def save(self, files: dict[str, FileState], summary: ShardSummary) -> None:
        """Persist ``files`` (changed entries merged into what is stored) and ``summary``.

        Raises on failure after its own retries; the caller must treat nothing as saved then.
        """
        ...
