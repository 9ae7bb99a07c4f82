"""Fixtures for the operator's unit tests: a small simulated world of Jobs and Pods around one ImportRun.

(pytest runs with --import-mode=importlib, so helpers reach the tests as fixtures, not imports.)"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from reflection_operator.jobs import JobRequest, Owner, build_job
from reflection_operator.observed import JobInfo, PodInfo, ShardSummary, job_info, pod_info
from reflection_operator.reconcile import Observed, Plan, decide
from reflection_operator.settings import Settings
from reflection_operator.spec import parse_spec

T0 = datetime(2026, 1, 5, 10, 0, 0, tzinfo=UTC)
OWNER = Owner(name="nightly", namespace="team", uid="uid-1")


def base_spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "source": {"volume": {"persistentVolumeClaim": {"claimName": "claude-logs"}}, "subPath": "projects"},
        "qdrant": {"url": "http://qdrant:6333"},
        "resources": {"memory": "512Mi", "cpu": "1"},
    }
    spec.update(overrides)
    return spec


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


class World:
    """What the operator would see of one ImportRun: its spec and status, Jobs, Pods, summary, the time."""

    T0 = T0
    #: A run-once ImportRun's run id: its creation time (30 s before T0).
    RUN0 = str(int((T0 - timedelta(seconds=30)).timestamp()))
    base_spec = staticmethod(base_spec)
    iso = staticmethod(iso)

    def __init__(self, spec: dict[str, Any] | None = None) -> None:
        self.settings = Settings()
        self.raw_spec = spec if spec is not None else base_spec()
        self.status: dict[str, Any] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.pods: dict[str, dict[str, Any]] = {}
        self.summary: dict[int, ShardSummary] = {}
        self.now = T0
        self.created = T0 - timedelta(seconds=30)
        self.generation = 1
        self.extra_problems: list[Any] = []

    def observe(self) -> Observed:
        spec, problems = parse_spec(self.raw_spec, self.settings)
        return Observed(
            now=self.now,
            owner=OWNER,
            generation=self.generation,
            created=self.created,
            raw_spec=self.raw_spec,
            spec=spec,
            problems=problems + self.extra_problems,
            status=self.status,
            jobs=[job_info(b) for b in self.jobs.values()],
            pods=[pod_info(b) for b in self.pods.values()],
            summary=self.summary,
            settings=self.settings,
        )

    def step(self, apply: bool = True) -> Plan:
        """Decide, and (like the controller) carry the plan out: Jobs appear, deleted Jobs vanish."""
        plan = decide(self.observe())
        if apply:
            for item in plan.create:
                body = build_job(item.spec, item.raw_spec, item.request, self.settings)
                body["metadata"]["uid"] = f"uid-{item.request.name}"
                body["metadata"]["creationTimestamp"] = iso(self.now)
                self.jobs.setdefault(item.request.name, body)
            for name in plan.delete:
                self.jobs.pop(name, None)
                for pod in [p for p, b in self.pods.items() if b["metadata"]["labels"]["job-name"] == name]:
                    del self.pods[pod]
            self.status = plan.status
        return plan

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    # -- what the Job controller and the kubelet would do ---------------------------------------------

    def start_pod(self, job: str) -> str:
        body = self.jobs[job]
        labels = {**body["spec"]["template"]["metadata"]["labels"], "job-name": job}
        name = f"{job}-pod"
        self.pods[name] = {
            "metadata": {"name": name, "labels": labels, "creationTimestamp": iso(self.now)},
            "status": {"phase": "Running", "containerStatuses": [{"name": "importer", "state": {"running": {}}}]},
        }
        body["status"] = {"startTime": iso(self.now), "active": 1}
        return name

    def end_pod(self, job: str, exit_code: int, reason: str = "", message: str = "", pod_status: bool = True) -> None:
        name = f"{job}-pod"
        if name not in self.pods:
            self.start_pod(job)
        if pod_status:
            terminated = {"exitCode": exit_code, "reason": reason or ("Completed" if exit_code == 0 else "Error")}
            if message:
                terminated["message"] = message
            self.pods[name]["status"] = {
                "phase": "Succeeded" if exit_code == 0 else "Failed",
                "containerStatuses": [{"name": "importer", "state": {"terminated": terminated}}],
            }
        kind = "Complete" if exit_code == 0 else "Failed"
        condition = {"type": kind, "status": "True", "lastTransitionTime": iso(self.now)}
        if kind == "Failed":
            condition.update(reason="BackoffLimitExceeded", message="Job has reached the specified backoff limit")
        self.jobs[job]["status"] = {"conditions": [condition], "completionTime": iso(self.now)}

    def job_infos(self) -> list[JobInfo]:
        return [job_info(b) for b in self.jobs.values()]

    def pod_infos(self) -> list[PodInfo]:
        return [pod_info(b) for b in self.pods.values()]


def request_for(attempt: int = 1, shard: int = 0, memory: int = 512 << 20, shards: int = 1) -> JobRequest:
    return JobRequest(
        owner=OWNER,
        run_id=str(int(T0.timestamp())),
        scheduled_time=T0,
        attempt=attempt,
        shard=shard,
        shard_count=shards,
        memory=memory,
    )


@pytest.fixture
def make_world() -> type[World]:
    return World


@pytest.fixture(name="request_for")
def request_for_fixture() -> Any:
    return request_for
