"""The importer's memory between runs: what it knows of each file, behind one interface."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

from pydantic import ValidationError

from importer.contract import ShardSummary

log = logging.getLogger(__name__)

#: Status of an entry migrated from the older importer's state file (points written by that importer);
#: the reader decides per file whether to adopt it or import the file afresh.
LEGACY = "legacy"
#: Status of a pruned file's entry (its file is gone and its points deleted): the same as no entry.
#: A store that can delete entries drops it; one that only merges keeps it as a tombstone.
DELETED = "deleted"
STATUSES = frozenset({"done", "partial", "failed", LEGACY, DELETED})


class BadEntry(ValueError):
    """A saved entry that cannot be understood: it is dropped (its file imported again), never trusted."""


@dataclass
class FileState:
    """What the importer has consumed of one JSONL file (keyed by its path relative to the source root)."""

    size: int = 0
    mtime: float = 0.0
    #: sha256 (hex, first 16 chars) of the file's first bytes: a changed head means the file was rewritten.
    head_hash: str = ""
    #: How many bytes ``head_hash`` covers (the file may have been shorter than the usual head).
    head_size: int = 0
    #: sha256 (hex, first 16 chars) of the bytes before ``consumed``: a change anywhere in what was
    #: consumed means the file was rewritten. Empty in entries saved before it existed.
    prefix_hash: str = ""
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
    #: The run that last read this file ("" outside the operator, and in entries saved before runs had ids),
    #: and what that run did to it over its attempts: a retry of the same run finds the file unchanged but
    #: counts it as its own work, not as unchanged (``importer.contract.RunNumbers``).
    run_id: str = ""
    run_messages: int = 0
    run_chunks: int = 0
    run_skipped: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> FileState:
        """The entry as saved; unknown keys are ignored, a missing one takes its default.

        Raises :class:`BadEntry` for anything of the wrong type or out of range.
        """
        if not isinstance(data, dict):
            raise BadEntry(f"entry is a {type(data).__name__}, not an object")
        defaults = cls()
        values = {
            f.name: _checked(f.name, data[f.name], getattr(defaults, f.name)) for f in fields(cls) if f.name in data
        }
        if values.get("status", defaults.status) not in STATUSES:
            raise BadEntry(f"unknown status {values['status']!r}")
        return cls(**values)


def _checked(name: str, value: Any, default: Any) -> Any:
    """``value`` if it has the type of the field's default (an int for a float) and a sane range."""
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not type(default):
        raise BadEntry(f"{name}: {value!r} is not a {type(default).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise BadEntry(f"{name}: {value!r} is not a finite number")
    if isinstance(value, int) and value < 0:
        raise BadEntry(f"{name}: {value!r} is negative")
    if isinstance(value, dict) and not all(isinstance(k, str) and type(v) is int and v >= 0 for k, v in value.items()):
        raise BadEntry(f"{name}: {value!r} is not a count per reason")
    return value


def read_summary(raw: Any) -> ShardSummary | None:
    """A saved summary, or None when there is none or it cannot be understood (it only carries numbers on)."""
    if raw is None:
        return None
    try:
        return ShardSummary.model_validate(raw)
    except ValidationError as error:
        log.warning("saved summary ignored", extra={"error": str(error)})
        return None


def read_entries(raw: Mapping[str, Any]) -> dict[str, FileState]:
    """Saved entries by path; one that cannot be understood is dropped with a warning (its file is then
    imported again), never trusted. Both state backends read through here."""
    entries: dict[str, FileState] = {}
    for key, value in raw.items():
        try:
            entries[key] = FileState.from_json(value)
        except BadEntry as error:
            log.warning("state entry dropped: its file is imported again", extra={"source": key, "error": str(error)})
    return entries


class StateStore(Protocol):
    """Where per-file state lives: a JSON file on a laptop, ConfigMaps in a Job."""

    def load(self) -> dict[str, FileState]:
        """Everything saved so far, keyed by the file's path relative to the source root."""
        ...

    def saved_summary(self) -> ShardSummary | None:
        """This shard's summary as the last ``load`` found it; None when there was none (or an unreadable one)."""
        ...

    def save(self, files: dict[str, FileState], summary: ShardSummary) -> None:
        """Persist ``files`` (changed entries merged into what is stored) and ``summary``.

        Raises on failure after its own retries; the caller must treat nothing as saved then.
        """
        ...
