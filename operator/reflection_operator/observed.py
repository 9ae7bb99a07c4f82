"""Small read-only views of the Jobs, Pods and state summaries the operator watches.

kopf keeps these in in-memory indexes (one watch per kind, filtered by the importrun label on the server),
so a reconcile reads them without asking the API server. Only what decisions need is kept.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from importer.contract import (
    LABEL_ATTEMPT,
    LABEL_IMPORTRUN,
    LABEL_RUN_ID,
    LABEL_SHARD,
    SUMMARY_KEY,
    ShardSummary,
    shard_of_summary_key,
)

from . import ANNOTATION_MEMORY, ANNOTATION_SHARD_COUNT
from .jobs import ANNOTATION_SPEC, CONTAINER_NAME

ACTIVE, SUCCEEDED, FAILED = "active", "succeeded", "failed"


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


@dataclass(frozen=True)
class JobInfo:
    name: str
    uid: str
    run_id: str
    attempt: int
    shard: int
    shard_count: int
    memory: str
    owner_uid: str
    state: str
    #: The Job controller's reason and message when it failed the Job.
    failure: str
    start_time: datetime | None
    completion_time: datetime | None
    #: The ImportRun's spec when the run started (JSON), for the run's retries.
    spec_snapshot: str
    deleting: bool
    created: datetime | None = None

    @property
    def finished(self) -> bool:
        return self.state != ACTIVE


def job_info(body: Mapping[str, Any]) -> JobInfo:
    meta, status = body.get("metadata", {}), body.get("status") or {}
    labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    state, failure, finished_at = ACTIVE, "", None
    if "Complete" in conditions:
        state, finished_at = (
            SUCCEEDED,
            status.get("completionTime") or conditions["Complete"].get("lastTransitionTime"),
        )
    elif "Failed" in conditions:
        failed = conditions["Failed"]
        state, finished_at = FAILED, failed.get("lastTransitionTime")
        failure = ": ".join(part for part in (failed.get("reason"), failed.get("message")) if part)
    owners = [ref.get("uid", "") for ref in meta.get("ownerReferences") or [] if ref.get("controller")]
    return JobInfo(
        name=meta.get("name", ""),
        uid=meta.get("uid", ""),
        run_id=labels.get(LABEL_RUN_ID, ""),
        attempt=_int(labels.get(LABEL_ATTEMPT), 1),
        shard=_int(labels.get(LABEL_SHARD)),
        shard_count=_int(annotations.get(ANNOTATION_SHARD_COUNT), 1),
        memory=annotations.get(ANNOTATION_MEMORY, ""),
        owner_uid=owners[0] if owners else "",
        state=state,
        failure=failure,
        start_time=parse_time(status.get("startTime")),
        completion_time=parse_time(finished_at),
        spec_snapshot=annotations.get(ANNOTATION_SPEC, ""),
        deleting=bool(meta.get("deletionTimestamp")),
        created=parse_time(meta.get("creationTimestamp")),
    )


@dataclass(frozen=True)
class Termination:
    exit_code: int
    reason: str
    message: str


@dataclass(frozen=True)
class PodInfo:
    name: str
    job_name: str
    run_id: str
    attempt: int
    shard: int
    phase: str
    #: The importer's container has started (is running or has ended).
    started: bool
    terminated: Termination | None
    created: datetime | None
    #: Why the importer's container has not started yet (reason, message): e.g. CreateContainerConfigError,
    #: or Unschedulable (the scheduler's reason) while the Pod has no node.
    waiting: tuple[str, str] | None = None

    @property
    def alive(self) -> bool:
        """Still running or about to: its process may still write state."""
        return self.phase in ("Pending", "Running", "Unknown", "")


def pod_info(body: Mapping[str, Any]) -> PodInfo:
    meta, status = body.get("metadata", {}), body.get("status") or {}
    labels = meta.get("labels") or {}
    statuses = [s for s in status.get("containerStatuses") or [] if s.get("name") == CONTAINER_NAME]
    state = statuses[0].get("state", {}) if statuses else {}
    terminated = state.get("terminated")
    return PodInfo(
        name=meta.get("name", ""),
        job_name=labels.get("job-name", ""),
        run_id=labels.get(LABEL_RUN_ID, ""),
        attempt=_int(labels.get(LABEL_ATTEMPT), 1),
        shard=_int(labels.get(LABEL_SHARD)),
        phase=status.get("phase", ""),
        started="running" in state or terminated is not None,
        terminated=Termination(
            exit_code=_int(terminated.get("exitCode")),
            reason=terminated.get("reason", ""),
            message=terminated.get("message", ""),
        )
        if terminated
        else None,
        created=parse_time(meta.get("creationTimestamp")),
        waiting=_waiting(state.get("waiting")) or _unschedulable(status),
    )


def _waiting(waiting: Mapping[str, Any] | None) -> tuple[str, str] | None:
    if not waiting:
        return None
    return str(waiting.get("reason", "")), str(waiting.get("message", ""))


def _unschedulable(status: Mapping[str, Any]) -> tuple[str, str] | None:
    """The scheduler's reason when it found no node for the Pod (then no container has a state yet)."""
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("reason"):
            return str(cond["reason"]), str(cond.get("message", ""))
    return None


def state_summary(body: Mapping[str, Any]) -> dict[int, ShardSummary]:
    """The per-shard summaries the importer keeps in ``data.summary`` of the first state ConfigMap.
    An entry that does not fit the contract is left out (a person may have edited it)."""
    raw = (body.get("data") or {}).get(SUMMARY_KEY) or "{}"
    try:
        parsed = json.loads(raw)
    except ValueError:
        return {}
    shards: dict[int, ShardSummary] = {}
    if not isinstance(parsed, dict):
        return shards
    for key, entry in parsed.items():
        index = shard_of_summary_key(str(key))
        if index is None:
            continue
        try:
            shards[index] = ShardSummary.model_validate(entry)
        except ValidationError:
            continue
    return shards


def importrun_of(body: Mapping[str, Any]) -> str:
    return str((body.get("metadata", {}).get("labels") or {}).get(LABEL_IMPORTRUN, ""))
