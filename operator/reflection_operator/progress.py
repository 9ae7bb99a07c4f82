"""The importer's per-shard summaries, added up into the numbers `kubectl get importruns` shows."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import reduce
from operator import add
from typing import Any

from importer.contract import RunNumbers, ShardSummary


@dataclass(frozen=True)
class Progress:
    """One run's numbers (``run``: what the run's importers did) beside the totals over the source's files
    (every run so far)."""

    files_total: int = 0
    files_done: int = 0
    files_failed: int = 0
    chunks: int = 0
    run: RunNumbers = field(default_factory=RunNumbers)

    @property
    def text(self) -> str:
        """This run's files handled (read, unchanged or failed) out of the files it found."""
        return f"{self.run.files_processed}/{self.files_total}"

    def percent(self, finished: bool = False) -> int:
        if self.files_total == 0:
            return 100 if finished else 0
        # Floor, so that 100 appears only when every file is handled.
        return min(100, self.run.files_processed * 100 // self.files_total)

    def describe_run(self) -> str:
        """This run's numbers in one sentence, for Events."""
        skipped = ", ".join(f"{reason} {count}" for reason, count in self.run.skipped.items()) or "none"
        return (
            f"{self.run.files_read} files read, {self.run.files_unchanged} unchanged, "
            f"{self.run.files_failed} failed, {self.run.messages} messages, {self.run.chunks} chunks written, "
            f"skipped lines: {skipped}, {self.run.seconds:.0f}s importing"
        )

    def status_fields(self, finished: bool = False) -> dict[str, Any]:
        return {
            "progress": self.text,
            "percent": self.percent(finished),
            "runNumbers": {
                "filesRead": self.run.files_read,
                "filesUnchanged": self.run.files_unchanged,
                "filesFailed": self.run.files_failed,
                "messages": self.run.messages,
                "chunks": self.run.chunks,
                # A list, not a map: a merge patch replaces a list whole but would keep a map's old reasons.
                "skippedLines": [{"reason": reason, "lines": lines} for reason, lines in self.run.skipped.items()],
                "seconds": round(self.run.seconds, 1),
            },
            # Over every file of the source and every run so far.
            "filesTotal": self.files_total,
            "filesDone": self.files_done,
            "filesFailed": self.files_failed,
            "chunks": self.chunks,
        }


def total(summary: Mapping[int, ShardSummary], shard_count: int) -> Progress:
    """Sums the shards of the current run; entries of shards beyond its shard count (left over from a run
    with more parallelism) are ignored."""
    shards = [entry for index, entry in summary.items() if index < shard_count]
    return Progress(
        files_total=sum(s.files_total for s in shards),
        files_done=sum(s.files_done for s in shards),
        files_failed=sum(s.files_failed for s in shards),
        chunks=sum(s.chunks for s in shards),
        run=reduce(add, (s.run for s in shards), RunNumbers()),
    )
