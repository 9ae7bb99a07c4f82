"""The ImportRun's status: the run record the operator keeps there, conditions, timestamps."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .observed import parse_time

# Phases (status.phase). "Waiting" stands for "waiting for the next run" of a scheduled ImportRun.
PHASE_PENDING = "Pending"
PHASE_RUNNING = "Running"
PHASE_SUCCEEDED = "Succeeded"
PHASE_FAILED = "Failed"
PHASE_SUSPENDED = "Suspended"
PHASE_WAITING = "Waiting"

# States of a run (status.run.state).
RUN_STARTING = "Starting"  # decided; its Jobs are about to be made (or wait for an earlier run's Pods to end)
RUN_ACTIVE = "Active"  # its Jobs exist and run
RUN_BACKING_OFF = "BackingOff"  # an attempt failed; the next one starts at retryAt
RUN_SUCCEEDED = "Succeeded"
RUN_FAILED = "Failed"
RUN_STATES_IN_PROGRESS = (RUN_STARTING, RUN_ACTIVE, RUN_BACKING_OFF)


def format_time(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass
class RunRecord:
    """One run (a scheduled time, or the single run of an unscheduled ImportRun) and its attempts."""

    id: str
    scheduled_time: datetime
    shards: int
    attempt: int
    memory: str
    state: str
    succeeded_shards: list[int] = field(default_factory=list)
    error_retries: int = 0
    retry_at: datetime | None = None
    tried_memory: list[str] = field(default_factory=list)
    start_time: datetime | None = None
    completion_time: datetime | None = None

    @property
    def in_progress(self) -> bool:
        return self.state in RUN_STATES_IN_PROGRESS

    def pending_shards(self) -> list[int]:
        return [s for s in range(self.shards) if s not in self.succeeded_shards]

    def to_status(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "scheduledTime": format_time(self.scheduled_time),
            "shards": self.shards,
            "attempt": self.attempt,
            "memory": self.memory,
            "state": self.state,
            "succeededShards": sorted(self.succeeded_shards),
            "errorRetries": self.error_retries,
            "retryAt": format_time(self.retry_at),
            "triedMemory": list(self.tried_memory),
            "startTime": format_time(self.start_time),
            "completionTime": format_time(self.completion_time),
        }

    @classmethod
    def from_status(cls, raw: Mapping[str, Any] | None) -> RunRecord | None:
        if not raw or not raw.get("id"):
            return None
        scheduled = parse_time(raw.get("scheduledTime")) or datetime.fromtimestamp(int(raw["id"]), UTC)
        return cls(
            id=str(raw["id"]),
            scheduled_time=scheduled,
            shards=int(raw.get("shards") or 1),
            attempt=int(raw.get("attempt") or 1),
            memory=str(raw.get("memory") or ""),
            state=str(raw.get("state") or RUN_ACTIVE),
            succeeded_shards=[int(s) for s in raw.get("succeededShards") or []],
            error_retries=int(raw.get("errorRetries") or 0),
            retry_at=parse_time(raw.get("retryAt")),
            tried_memory=[str(m) for m in raw.get("triedMemory") or []],
            start_time=parse_time(raw.get("startTime")),
            completion_time=parse_time(raw.get("completionTime")),
        )


def set_condition(
    conditions: list[dict[str, Any]],
    kind: str,
    status: bool,
    reason: str,
    message: str,
    now: datetime,
    generation: int,
) -> bool:
    """Sets one condition in place; lastTransitionTime moves only when the status flips.
    Returns True when status, reason or message changed."""
    value = "True" if status else "False"
    for condition in conditions:
        if condition.get("type") == kind:
            changed = (condition.get("status"), condition.get("reason"), condition.get("message")) != (
                value,
                reason,
                message,
            )
            if condition.get("status") != value:
                condition["lastTransitionTime"] = format_time(now)
            condition.update(status=value, reason=reason, message=message, observedGeneration=generation)
            return changed
    conditions.append(
        {
            "type": kind,
            "status": value,
            "reason": reason,
            "message": message,
            "lastTransitionTime": format_time(now),
            "observedGeneration": generation,
        }
    )
    return True


def condition(conditions: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    return next((c for c in conditions if c.get("type") == kind), None)
