"""A Job exactly as the operator builds it, for the tests that check Jobs against standards and schemas."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from reflection_operator.jobs import JobRequest, Owner, build_job
from reflection_operator.settings import Settings
from reflection_operator.spec import parse_spec


def operator_job(raw: dict[str, Any]) -> dict[str, Any]:
    """The Job the operator builds for the first shard of a run of an ImportRun with spec ``raw``."""
    settings = Settings()
    spec, problems = parse_spec(raw, settings)
    assert spec is not None and not problems, problems
    when = datetime(2026, 1, 5, tzinfo=UTC)
    request = JobRequest(
        owner=Owner(name="nightly", namespace="team", uid="uid-1"),
        run_id=str(int(when.timestamp())),
        scheduled_time=when,
        attempt=1,
        shard=0,
        shard_count=spec.parallelism,
        memory=512 << 20,
    )
    return build_job(spec, raw, request, settings)
