"""The importer's per-shard summaries, added up into the numbers `kubectl get importruns` shows."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .observed import ShardSummary


@dataclass(frozen=True)
class Progress:
    files_total: int = 0
    files_done: int = 0
    files_failed: int = 0
    chunks: int = 0

    @property
    def text(self) -> str:
        return f"{self.files_done}/{self.files_total}"

    def percent(self, finished: bool = False) -> int:
        if self.files_total == 0:
            return 100 if finished else 0
        # Floor, so that 100 appears only when every file is done.
        return min(100, self.files_done * 100 // self.files_total)

    def status_fields(self, finished: bool = False) -> dict[str, Any]:
        return {
            "progress": self.text,
            "filesTotal": self.files_total,
            "filesDone": self.files_done,
            "filesFailed": self.files_failed,
            "chunks": self.chunks,
            "percent": self.percent(finished),
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
    )
