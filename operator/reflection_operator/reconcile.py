"""The operator's decisions as one pure function: what it sees of an ImportRun in, what to do out.

``decide`` reads the ImportRun (spec, status, the problems found with it), its Jobs and Pods and the
importer's summary, and returns a ``Plan``: the status to write, Jobs to create or delete, Events to post,
and when to look again. It calls no API, so every rule here is unit-tested without a cluster; the kopf
handlers only gather what it needs and carry the plan out.

The run's bookkeeping lives in ``status.run`` (see ``status.RunRecord``). Every decision can be taken
twice without harm: Job names are deterministic, so a repeated create meets AlreadyExists.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from importer.contract import ExitCode, ShardSummary

from .jobs import JobRequest, Owner, run_id_for
from .observed import FAILED, SUCCEEDED, JobInfo, PodInfo, parse_time
from .progress import total
from .quantity import QuantityError, format_memory, parse_quantity_bytes, scale_memory
from .schedule import Tick, evaluate
from .settings import Settings
from .spec import ImportRunSpec, Problem, parse_spec
from .status import (
    PHASE_FAILED,
    PHASE_PENDING,
    PHASE_RUNNING,
    PHASE_SUCCEEDED,
    PHASE_SUSPENDED,
    PHASE_WAITING,
    RUN_ACTIVE,
    RUN_BACKING_OFF,
    RUN_FAILED,
    RUN_STARTING,
    RUN_SUCCEEDED,
    RunRecord,
    condition,
    format_time,
    set_condition,
)

#: After a Job fails, how long to wait for its Pod's final status before deciding without it.
POD_STATUS_GRACE = timedelta(seconds=15)
#: How soon to look again while waiting for something that has no watch event of its own.
SHORT_WAIT = 1.0
MAX_BACKOFF_SECONDS = 600
#: Characters of the Pod's termination message (its last log lines) kept in lastFailure.message.
MESSAGE_TAIL = 1200

READY, RUNNING_CONDITION, MEMORY_RAISED = "Ready", "Running", "MemoryRaised"

#: A Job without a Pod this long is looked into: the controller reads its FailedCreate Events.
POD_CHECK_AFTER = timedelta(seconds=5)
#: A Job without a Pod and without a FailedCreate Event this long is reported all the same.
POD_DEADLINE = timedelta(seconds=60)
#: A Job whose Pod was refused is made anew after this long. The Job controller retries by itself, but backs
#: off to six minutes between tries; a new Job is tried at once, so a fix (the ServiceAccount made, the quota
#: raised) takes effect within this time.
REMAKE_REFUSED_AFTER = timedelta(seconds=20)
#: Why a container may wait that does not pass without the user's help.
STUCK_WAITING = (
    "CreateContainerConfigError",
    "CreateContainerError",
    "ErrImagePull",
    "ImagePullBackOff",
    "Unschedulable",
)
#: Ready=False reasons of a run whose Pods cannot be made or started (the spec itself is fine).
BLOCKED_REASONS = (
    "MissingServiceAccount",
    "QuotaExceeded",
    "PodSecurityRefused",
    "FailedCreate",
    "PodNotCreated",
    "MissingSecret",
    "ContainerConfigError",
    "ImagePullFailed",
    "Unschedulable",
)


@dataclass(frozen=True)
class Observed:
    now: datetime
    owner: Owner
    generation: int
    created: datetime
    raw_spec: Mapping[str, Any]
    spec: ImportRunSpec | None
    #: Everything wrong with the spec, its claims and its namespace; no new run starts while there are any.
    problems: list[Problem]
    status: Mapping[str, Any]
    jobs: list[JobInfo]
    pods: list[PodInfo]
    summary: Mapping[int, ShardSummary]
    settings: Settings
    #: The latest FailedCreate Event message of each Job of ``jobs_to_look_into`` (read by the controller).
    pod_refusals: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Blocker:
    """Why the run's Pods cannot be made or started, and what to do about it."""

    reason: str
    message: str


@dataclass(frozen=True)
class EventNote:
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass(frozen=True)
class JobToCreate:
    request: JobRequest
    spec: ImportRunSpec
    raw_spec: dict[str, Any]


@dataclass
class Plan:
    status: dict[str, Any]
    create: list[JobToCreate] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    #: Empty the importer's summary before the first Jobs of a run (its numbers are the last run's).
    reset_summary: bool = False
    events: list[EventNote] = field(default_factory=list)
    #: Metrics to count: started, succeeded, failed, oom_retries, error_retries, skipped, missed.
    counters: list[str] = field(default_factory=list)
    requeue_after: float | None = None
    #: The plan would start Jobs: the caller checks claims and the namespace first (and decides again if
    #: either is a problem).
    starts_jobs: bool = False

    def event(self, type_: str, reason: str, message: str) -> None:
        self.events.append(EventNote(type_, reason, message))

    def wake_within(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)


@dataclass(frozen=True)
class Failure:
    shard: int
    kind: str  # "oom" (killed at its limit), "budget" (exit 86: over its own budget) or "error"
    reason: str
    message: str


def decide(obs: Observed) -> Plan:
    plan = Plan(status=json.loads(json.dumps(dict(obs.status))))  # a deep copy we may change freely
    status = plan.status
    status.pop("kopf", None)
    status.setdefault("conditions", [])
    jobs = [j for j in obs.jobs if j.owner_uid == obs.owner.uid]
    run = RunRecord.from_status(status.get("run"))
    blockers = _blockers(obs, jobs, run)
    _ready_condition(obs, plan, blockers)

    run = _adopt_orphans(obs, jobs, run, plan)
    if run is not None and run.in_progress:
        _advance(obs, jobs, run, plan)
        _remake_refused_jobs(obs, jobs, run, plan)
        _look_again_for_pods(obs, jobs, plan)
    tick = _schedule_tick(obs)
    run = _maybe_start(obs, jobs, run, tick, plan)
    if run is not None and run.state == RUN_STARTING:
        _start_attempt(obs, jobs, run, plan)
    _clean_history(obs, jobs, run, plan)
    _fill_status(obs, jobs, run, tick, plan)
    return plan


# -- spec problems ------------------------------------------------------------------------------------


def _ready_condition(obs: Observed, plan: Plan, blockers: list[Blocker]) -> None:
    conditions = plan.status["conditions"]
    was_ready = (condition(conditions, READY) or {}).get("status")
    if obs.problems:
        message = "; ".join(str(p) for p in obs.problems)
        changed = set_condition(conditions, READY, False, obs.problems[0].reason, message, obs.now, obs.generation)
        if changed:
            plan.event("Warning", obs.problems[0].reason, message)
    elif blockers:
        message = "; ".join(dict.fromkeys(b.message for b in blockers))  # shards refused alike: said once
        reason = blockers[0].reason
        if set_condition(conditions, READY, False, reason, message, obs.now, obs.generation):
            plan.event("Warning", reason, message)
            plan.status["lastFailure"] = {"reason": reason, "message": message, "time": format_time(obs.now)}
    else:
        was_blocked = (condition(conditions, READY) or {}).get("reason") in BLOCKED_REASONS
        set_condition(conditions, READY, True, "SpecValid", "the spec is valid", obs.now, obs.generation)
        if was_ready == "False" and was_blocked:
            plan.event("Normal", "PodsCreated", "the importer's Pods are created and start: the cause is gone")
        elif was_ready == "False":
            plan.event("Normal", "SpecValid", "the spec is valid again")


# -- Pods that cannot be made or started ----------------------------------------------------------------


def jobs_to_look_into(obs: Observed) -> list[JobInfo]:
    """Running Jobs of this ImportRun that have had no Pod for a while: the controller reads their
    FailedCreate Events (into ``Observed.pod_refusals``) before deciding."""
    with_pods = {p.job_name for p in obs.pods}
    return [
        job
        for job in obs.jobs
        if job.owner_uid == obs.owner.uid
        and not job.finished
        and not job.deleting
        and job.name not in with_pods
        and obs.now - (job.created or obs.now) >= POD_CHECK_AFTER
    ]


def _blockers(obs: Observed, jobs: list[JobInfo], run: RunRecord | None) -> list[Blocker]:
    """What keeps the current attempt's Pods from being made or from starting; empty when nothing does."""
    if run is None or not run.in_progress:
        return []
    found: list[Blocker] = []
    current = [j for j in jobs if j.run_id == run.id and j.attempt == run.attempt and not j.finished]
    for job in current:
        pods = [p for p in obs.pods if p.job_name == job.name]
        for pod in pods:
            if pod.waiting is not None and pod.waiting[0] in STUCK_WAITING:
                found.append(_waiting_blocker(obs, *pod.waiting))
        if pods or job.deleting:
            continue
        refusal = obs.pod_refusals.get(job.name)
        if refusal:
            found.append(_refusal_blocker(obs, refusal))
        elif obs.now - (job.created or obs.now) >= POD_DEADLINE:
            found.append(
                Blocker(
                    "PodNotCreated",
                    f"Job {job.name} has had no Pod for {int(POD_DEADLINE.total_seconds())}s and no FailedCreate "
                    "Event says why: is the Job controller (kube-controller-manager) running?",
                )
            )
    return found or _still_blocked(obs, run)


def _still_blocked(obs: Observed, run: RunRecord) -> list[Blocker]:
    """A refused Job is made anew (``_remake_refused_jobs``): until its Pod appears, the reason stands."""
    ready = condition(list(obs.status.get("conditions") or []), READY) or {}
    if ready.get("status") != "False" or ready.get("reason") not in BLOCKED_REASONS:
        return []
    if any(p.run_id == run.id and p.attempt == run.attempt for p in obs.pods):
        return []
    return [Blocker(str(ready["reason"]), str(ready.get("message", "")))]


def _refusal_blocker(obs: Observed, refusal: str) -> Blocker:
    """A FailedCreate Event's message (``Error creating: pods "x" is forbidden: ...``) as a cause and a fix."""
    cause = refusal.split(" is forbidden: ", 1)[-1]
    namespace = obs.owner.namespace
    if "service account" in cause or "serviceaccount" in cause:
        account = obs.settings.importer_service_account
        flag = "" if account == Settings().importer_service_account else f" --service-account {account}"
        return Blocker(
            "MissingServiceAccount",
            f"the importer's Pod cannot be created: {cause}. Create its ServiceAccount and Role with "
            f"`python -m reflection_operator importer-rbac -n {namespace}{flag} | kubectl apply -f -` "
            "(or list the namespace in the chart's importer.namespaces)",
        )
    if "quota" in cause:
        return Blocker(
            "QuotaExceeded",
            f"the importer's Pod cannot be created: {cause}. Raise the ResourceQuota of namespace {namespace} "
            "or lower spec.resources (memory, cpu) or spec.parallelism",
        )
    if "PodSecurity" in cause:
        return Blocker(
            "PodSecurityRefused",
            f"the importer's Pod cannot be created: {cause}. The namespace's pod-security.kubernetes.io/enforce "
            "level refuses it: use a volume type that level allows for spec.source.volume and spec.qdrant.volume "
            "(README: Volumes and Pod Security)",
        )
    return Blocker("FailedCreate", f"the importer's Pod cannot be created: {cause}")


def _waiting_blocker(obs: Observed, reason: str, message: str) -> Blocker:
    """A Pod that cannot start: no node fits it, a Secret (or key) the spec names is missing, or the image."""
    if reason == "Unschedulable":
        return Blocker(
            "Unschedulable",
            f"no node can take the importer's Pod: {message}. Lower spec.resources (memory is requested in full) "
            "or add capacity",
        )
    if reason in ("ErrImagePull", "ImagePullBackOff"):
        return Blocker("ImagePullFailed", f"the importer's image cannot be pulled ({reason}): {message}")
    for field_name, ref in obs.spec.secret_refs() if obs.spec is not None else []:
        if _names(message, ref.name):
            return Blocker(
                "MissingSecret",
                f"{field_name}: the importer cannot start: {message}. Create the Secret {ref.name!r} with the key "
                f"{ref.key!r} in namespace {obs.owner.namespace}",
            )
    return Blocker("ContainerConfigError", f"the importer cannot start ({reason}): {message}")


def _names(message: str, name: str) -> bool:
    """``message`` mentions the object ``name`` (alone, quoted or as namespace/name), not a longer name."""
    return re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])", message) is not None


def _look_again_for_pods(obs: Observed, jobs: list[JobInfo], plan: Plan) -> None:
    """A Job's Pod that is refused sends the operator no watch event: look again while a Job has none."""
    with_pods = {p.job_name for p in obs.pods}
    for job in jobs:
        if job.finished or job.deleting or job.name in with_pods or job.name in obs.pod_refusals:
            continue
        age = obs.now - (job.created or obs.now)
        due = POD_CHECK_AFTER if age < POD_CHECK_AFTER else min(age + POD_CHECK_AFTER, POD_DEADLINE)
        if due > age:
            plan.wake_within((due - age).total_seconds())


def _remake_refused_jobs(obs: Observed, jobs: list[JobInfo], run: RunRecord, plan: Plan) -> None:
    """Deletes the current attempt's Jobs whose Pod was refused a while ago; ``_advance`` makes them anew."""
    for job in jobs:
        if job.run_id != run.id or job.attempt != run.attempt or job.finished or job.deleting:
            continue
        if job.name not in obs.pod_refusals or job.name in plan.delete:
            continue
        age = obs.now - (job.created or obs.now)
        if age >= REMAKE_REFUSED_AFTER:
            plan.delete.append(job.name)
            plan.wake_within(SHORT_WAIT)  # make it again once it is gone
        else:
            plan.wake_within((REMAKE_REFUSED_AFTER - age).total_seconds())


# -- following a run ----------------------------------------------------------------------------------


def _adopt_orphans(obs: Observed, jobs: list[JobInfo], run: RunRecord | None, plan: Plan) -> RunRecord | None:
    """Jobs of a run the status does not know (the operator stopped between making them and writing the
    status): take them over instead of starting anything new."""
    if run is not None and run.in_progress:
        return run
    known = int(run.id) if run is not None else -1
    orphans = [j for j in jobs if not j.finished and not j.deleting and j.run_id.isdigit() and int(j.run_id) > known]
    if not orphans:
        return run
    run_id = max((j.run_id for j in orphans), key=int)
    of_run = [j for j in jobs if j.run_id == run_id]
    attempt = max(j.attempt for j in of_run)
    memory = next((j.memory for j in of_run if j.attempt == attempt and j.memory), "")
    scheduled = datetime.fromtimestamp(int(run_id), UTC)
    adopted = RunRecord(
        id=run_id,
        scheduled_time=scheduled,
        shards=max(j.shard_count for j in of_run),
        attempt=attempt,
        memory=memory,
        state=RUN_ACTIVE,
        succeeded_shards=sorted({j.shard for j in of_run if j.state == SUCCEEDED}),
        tried_memory=[memory] if memory else [],
        start_time=min((j.start_time for j in of_run if j.start_time), default=obs.now),
    )
    _mark_handled(plan.status, scheduled, started=True)
    plan.event(
        "Normal",
        "RunAdopted",
        f"following the existing Jobs of the run scheduled at {format_time(scheduled)}",
    )
    return adopted


def _advance(obs: Observed, jobs: list[JobInfo], run: RunRecord, plan: Plan) -> None:
    if run.state == RUN_BACKING_OFF:
        if run.retry_at is not None and obs.now < run.retry_at:
            plan.wake_within((run.retry_at - obs.now).total_seconds())
            return
        run.attempt += 1
        run.retry_at = None
        run.state = RUN_STARTING
        return
    if run.state != RUN_ACTIVE:
        return
    current = {j.shard: j for j in jobs if j.run_id == run.id and j.attempt == run.attempt and not j.deleting}
    pending = run.pending_shards()
    missing = [s for s in pending if s not in current]
    if missing:
        # Just made and not yet seen, or deleted by someone: (re)create; AlreadyExists is harmless.
        _create_jobs(obs, jobs, run, missing, plan)
        return
    if any(not current[s].finished for s in pending):
        return
    run.succeeded_shards = sorted(set(run.succeeded_shards) | {s for s in pending if current[s].state == SUCCEEDED})
    failed_jobs = [current[s] for s in pending if current[s].state == FAILED]
    if not failed_jobs:
        _succeed(obs, run, plan)
        return
    failures = [_failure_of(obs, job) for job in failed_jobs]
    if any(f is None for f in failures):
        plan.wake_within(SHORT_WAIT)  # the Pod's last status is still on its way
        return
    known = [f for f in failures if f is not None]
    memory_failures = [f for f in known if f.kind in ("oom", "budget")]
    if memory_failures:
        _retry_with_more_memory(obs, jobs, run, memory_failures, plan)
    else:
        _retry_after_error(obs, jobs, run, known, plan)


def _failure_of(obs: Observed, job: JobInfo) -> Failure | None:
    """What ended a failed Job, from its Pod; None while the Pod's final status may still arrive."""
    pods = [p for p in obs.pods if p.job_name == job.name and p.terminated is not None]
    if not pods:
        finished = job.completion_time or obs.now
        if obs.now - finished < POD_STATUS_GRACE:
            return None
        return Failure(job.shard, "error", "JobFailed", job.failure or "the Job failed and its Pod is gone")
    pod = max(pods, key=lambda p: p.created or datetime.min.replace(tzinfo=UTC))
    ended = pod.terminated
    assert ended is not None
    if ended.reason == "OOMKilled":
        return Failure(job.shard, "oom", "OOMKilled", f"shard {job.shard} was OOM-killed at its {job.memory} limit")
    if ended.exit_code == ExitCode.MEMORY_BUDGET:
        return Failure(
            job.shard,
            "budget",
            "MemoryBudgetExceeded",
            f"shard {job.shard} stopped over its memory budget at its {job.memory} limit",
        )
    tail = ended.message.strip()[-MESSAGE_TAIL:]
    detail = f": {tail}" if tail else ""
    return Failure(
        job.shard,
        "error",
        ended.reason or "Error",
        f"shard {job.shard} exited with {ended.exit_code}{detail}",
    )


def _run_spec(obs: Observed, jobs: list[JobInfo], run: RunRecord) -> tuple[ImportRunSpec | None, dict[str, Any]]:
    """The spec the run started with (recorded on its Jobs), so that edits wait for the next run."""
    for job in sorted(jobs, key=lambda j: -j.attempt):
        if job.run_id == run.id and job.spec_snapshot:
            try:
                raw = json.loads(job.spec_snapshot)
            except ValueError:
                continue
            spec, problems = parse_spec(raw, obs.settings)
            if spec is not None and not problems:
                return spec, raw
    return obs.spec, dict(obs.raw_spec)


def _retry_with_more_memory(
    obs: Observed, jobs: list[JobInfo], run: RunRecord, failures: list[Failure], plan: Plan
) -> None:
    spec, _ = _run_spec(obs, jobs, run)
    first = failures[0]
    try:
        current = parse_quantity_bytes(run.memory)
    except QuantityError:
        current = spec.resources.memory if spec else 0
    if spec is None:
        _fail(obs, run, first.reason, f"{first.message}; no valid spec to retry with", plan)
        return
    policy = spec.memory_retry
    tried = ", ".join(run.tried_memory or [run.memory])
    if run.attempt >= policy.max_attempts:
        _fail(
            obs,
            run,
            first.reason,
            f"{first.message}; gave up after {run.attempt} attempt(s) with limits {tried} "
            f"(spec.memoryRetry.maxAttempts={policy.max_attempts})",
            plan,
        )
        return
    raised = scale_memory(current, policy.factor, policy.max_memory)
    if raised <= current:
        _fail(
            obs,
            run,
            first.reason,
            f"{first.message}; limits tried: {tried}; cannot go above "
            f"spec.memoryRetry.maxMemory={format_memory(policy.max_memory)}",
            plan,
        )
        return
    run.attempt += 1
    run.memory = format_memory(raised)
    run.tried_memory = [*(run.tried_memory or []), run.memory]
    run.state = RUN_STARTING
    message = f"{first.message}; attempt {run.attempt} of {policy.max_attempts} resumes with {run.memory}"
    plan.status["lastFailure"] = {"reason": first.reason, "message": message, "time": format_time(obs.now)}
    set_condition(plan.status["conditions"], MEMORY_RAISED, True, first.reason, message, obs.now, obs.generation)
    plan.event("Warning", first.reason, message)
    plan.counters.append("oom_retries")


def _retry_after_error(obs: Observed, jobs: list[JobInfo], run: RunRecord, failures: list[Failure], plan: Plan) -> None:
    spec, _ = _run_spec(obs, jobs, run)
    first = failures[0]
    retries = spec.failure_retry.max_retries if spec else 0
    if run.error_retries >= retries:
        suffix = f" (gave up after {run.error_retries} retries: spec.failureRetry.maxRetries={retries})"
        _fail(obs, run, first.reason, first.message + suffix, plan)
        return
    backoff = spec.failure_retry.backoff_seconds if spec else 0
    delay = min(MAX_BACKOFF_SECONDS, backoff * (2**run.error_retries))
    run.error_retries += 1
    run.state = RUN_BACKING_OFF
    run.retry_at = obs.now + timedelta(seconds=delay)
    message = f"{first.message} (retry {run.error_retries} of {retries} in {delay}s)"
    plan.status["lastFailure"] = {"reason": first.reason, "message": message, "time": format_time(obs.now)}
    plan.event("Warning", "RetryingAfterError", message)
    plan.counters.append("error_retries")
    plan.wake_within(delay)


def _succeed(obs: Observed, run: RunRecord, plan: Plan) -> None:
    run.state = RUN_SUCCEEDED
    run.completion_time = obs.now
    plan.status["lastSuccessfulTime"] = format_time(obs.now)
    progress = total(obs.summary, run.shards)
    took = int((obs.now - (run.start_time or obs.now)).total_seconds())
    plan.event(
        "Normal",
        "RunSucceeded",
        f"this run: {progress.describe_run()}; {took}s and {run.attempt} attempt(s) in all; "
        f"totals: {progress.files_done} of {progress.files_total} files imported, {progress.chunks} chunks",
    )
    plan.counters.append("succeeded")


def _fail(obs: Observed, run: RunRecord, reason: str, message: str, plan: Plan) -> None:
    run.state = RUN_FAILED
    run.completion_time = obs.now
    plan.status["lastFailure"] = {"reason": reason, "message": message, "time": format_time(obs.now)}
    plan.event("Warning", "RunFailed", f"{message}; this run: {total(obs.summary, run.shards).describe_run()}")
    plan.counters.append("failed")


# -- starting runs ------------------------------------------------------------------------------------


def _schedule_tick(obs: Observed) -> Tick | None:
    spec = obs.spec
    if spec is None or spec.schedule is None:
        return None
    last = _handled(obs.status) or obs.created
    return evaluate(spec.schedule, last, obs.now, spec.starting_deadline_seconds)


def _handled(status: Mapping[str, Any]) -> datetime | None:
    return parse_time(status.get("lastHandledScheduleTime"))


def _mark_handled(status: dict[str, Any], moment: datetime, *, started: bool) -> None:
    previous = _handled(status)
    if previous is None or moment > previous:
        status["lastHandledScheduleTime"] = format_time(moment)
    if started:
        status["lastScheduleTime"] = format_time(moment)


def _maybe_start(
    obs: Observed, jobs: list[JobInfo], run: RunRecord | None, tick: Tick | None, plan: Plan
) -> RunRecord | None:
    spec = obs.spec
    if spec is None or obs.problems or spec.suspend:
        return run
    if spec.schedule is None:
        if run is None and not plan.status.get("lastScheduleTime"):
            return _new_run(obs, spec, obs.created, plan)
        return run
    if tick is None or tick.due is None:
        return run
    due = tick.due
    if tick.missed:
        plan.event(
            "Warning",
            "MissedRuns",
            f"{tick.missed} scheduled run(s) before {format_time(due)} were missed "
            "(the operator was down or the ImportRun suspended)",
        )
        plan.counters.append("missed")
    if tick.too_late:
        late = int((obs.now - due).total_seconds())
        plan.event(
            "Warning",
            "MissedSchedule",
            f"the run scheduled at {format_time(due)} is {late}s late, past "
            f"spec.startingDeadlineSeconds={spec.starting_deadline_seconds}: skipped",
        )
        plan.counters.append("missed")
        _mark_handled(plan.status, due, started=False)
        return run
    if run is not None and run.in_progress:
        if spec.concurrency_policy == "Forbid":
            plan.event(
                "Normal",
                "RunSkipped",
                f"the run scheduled at {format_time(due)} was skipped: the run scheduled at "
                f"{format_time(run.scheduled_time)} is still in progress (concurrencyPolicy: Forbid)",
            )
            plan.counters.append("skipped")
            _mark_handled(plan.status, due, started=False)
            return run
        _replace(jobs, run, due, plan)
    return _new_run(obs, spec, due, plan)


def _replace(jobs: list[JobInfo], run: RunRecord, due: datetime, plan: Plan) -> None:
    doomed = sorted({j.name for j in jobs if j.run_id == run.id and not j.deleting})
    plan.delete.extend(doomed)
    plan.event(
        "Normal",
        "RunReplaced",
        f"the run scheduled at {format_time(run.scheduled_time)} is replaced by the run scheduled at "
        f"{format_time(due)} (concurrencyPolicy: Replace); it resumes from the saved state",
    )


def _new_run(obs: Observed, spec: ImportRunSpec, scheduled: datetime, plan: Plan) -> RunRecord:
    memory = format_memory(spec.resources.memory)
    _mark_handled(plan.status, scheduled, started=True)
    set_condition(plan.status["conditions"], MEMORY_RAISED, False, "WithinLimit", "", obs.now, obs.generation)
    return RunRecord(
        id=run_id_for(scheduled),
        scheduled_time=scheduled,
        shards=spec.parallelism,
        attempt=1,
        memory=memory,
        state=RUN_STARTING,
        tried_memory=[memory],
        start_time=obs.now,
    )


def _start_attempt(obs: Observed, jobs: list[JobInfo], run: RunRecord, plan: Plan) -> None:
    """Make the attempt's Jobs, once no Pod of another run or attempt can still write the state."""
    blockers = [p for p in obs.pods if p.alive and (p.run_id != run.id or p.attempt != run.attempt)]
    lingering = [j for j in jobs if j.run_id != run.id and not j.finished and not j.deleting]
    if blockers or lingering:
        plan.wake_within(SHORT_WAIT)
        return
    made = _create_jobs(obs, jobs, run, run.pending_shards(), plan)
    if not made:
        return  # a problem with the spec, its claims or namespace: the run stays Starting until it is fixed
    run.state = RUN_ACTIVE
    if run.attempt == 1:
        plan.reset_summary = True
        plan.counters.append("started")
        plan.event(
            "Normal",
            "RunStarted",
            f"run scheduled at {format_time(run.scheduled_time)} started: {made} Job(s) with {run.memory} each",
        )
    else:
        plan.event("Normal", "AttemptStarted", f"attempt {run.attempt} started with {run.memory}")


def _create_jobs(obs: Observed, jobs: list[JobInfo], run: RunRecord, shards: list[int], plan: Plan) -> int:
    """Adds the Jobs of ``shards`` to the plan; returns how many (none while there are problems)."""
    spec, raw = _run_spec(obs, jobs, run) if run.attempt > 1 else (obs.spec, dict(obs.raw_spec))
    if spec is None or obs.problems:
        return 0
    try:
        memory = parse_quantity_bytes(run.memory)
    except QuantityError:
        memory = spec.resources.memory
    plan.starts_jobs = True
    for shard in shards:
        request = JobRequest(
            owner=obs.owner,
            run_id=run.id,
            scheduled_time=run.scheduled_time,
            attempt=run.attempt,
            shard=shard,
            shard_count=run.shards,
            memory=memory,
        )
        plan.create.append(JobToCreate(request, spec.model_copy(update={"parallelism": run.shards}), raw))
    return len(shards)


# -- tidying up ---------------------------------------------------------------------------------------


def _clean_history(obs: Observed, jobs: list[JobInfo], run: RunRecord | None, plan: Plan) -> None:
    """Keep the Jobs of the last N successful and M failed finished runs; delete older ones."""
    spec = obs.spec
    if spec is None:
        return
    by_run: dict[str, list[JobInfo]] = {}
    for job in jobs:
        if not job.deleting and job.name not in plan.delete:
            by_run.setdefault(job.run_id, []).append(job)
    succeeded: list[str] = []
    failed: list[str] = []
    for run_id, of_run in by_run.items():
        if run is not None and run_id == run.id:
            if run.in_progress:
                continue
            (succeeded if run.state == RUN_SUCCEEDED else failed).append(run_id)
        elif all(j.finished for j in of_run):
            shards = max(j.shard_count for j in of_run)
            done = {j.shard for j in of_run if j.state == SUCCEEDED}
            (succeeded if len(done) >= shards else failed).append(run_id)
    for kept, limit in (
        (succeeded, spec.successful_runs_history_limit),
        (failed, spec.failed_runs_history_limit),
    ):
        for run_id in sorted(kept, key=lambda r: int(r) if r.isdigit() else 0, reverse=True)[limit:]:
            plan.delete.extend(sorted(j.name for j in by_run[run_id]))


# -- the status ---------------------------------------------------------------------------------------


def _fill_status(obs: Observed, jobs: list[JobInfo], run: RunRecord | None, tick: Tick | None, plan: Plan) -> None:
    status = plan.status
    spec = obs.spec
    status["observedGeneration"] = obs.generation
    if run is not None:
        status["run"] = run.to_status()
        status["attempt"] = run.attempt
        status["memory"] = run.memory
        status["startTime"] = format_time(run.start_time)
        status["completionTime"] = None if run.in_progress else format_time(run.completion_time)
        finished = run.state == RUN_SUCCEEDED
        status.update(total(obs.summary, run.shards).status_fields(finished))
    else:
        status.setdefault("progress", "0/0")
        if spec is not None:
            status["memory"] = format_memory(spec.resources.memory)
    status["active"] = [
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": j.name,
            "namespace": obs.owner.namespace,
            "uid": j.uid,
        }
        for j in sorted(jobs, key=lambda j: j.name)
        if not j.finished and j.name not in plan.delete
    ] + [
        {"apiVersion": "batch/v1", "kind": "Job", "name": c.request.name, "namespace": obs.owner.namespace}
        for c in plan.create
        if c.request.name not in {j.name for j in jobs}
    ]
    suspended = bool(spec and spec.suspend)
    next_time = tick.next_time if tick is not None and not suspended and not obs.problems else None
    status["nextScheduleTime"] = format_time(next_time)
    if next_time is not None:
        plan.wake_within((next_time - obs.now).total_seconds())
    status["phase"] = _phase(obs, run, suspended)
    _running_condition(obs, run, plan)


def _phase(obs: Observed, run: RunRecord | None, suspended: bool) -> str:
    scheduled = obs.spec is not None and obs.spec.schedule is not None
    if run is not None and run.in_progress:
        if run.state == RUN_ACTIVE and any(
            p.started for p in obs.pods if p.run_id == run.id and p.attempt == run.attempt
        ):
            return PHASE_RUNNING
        return PHASE_RUNNING if run.state == RUN_BACKING_OFF else PHASE_PENDING
    if suspended:
        return PHASE_SUSPENDED
    if run is None:
        return PHASE_WAITING if scheduled and not obs.problems else PHASE_PENDING
    if run.state == RUN_SUCCEEDED:
        return PHASE_WAITING if scheduled else PHASE_SUCCEEDED
    return PHASE_FAILED


def _running_condition(obs: Observed, run: RunRecord | None, plan: Plan) -> None:
    conditions = plan.status["conditions"]
    if run is None:
        set_condition(conditions, RUNNING_CONDITION, False, "NotStarted", "no run yet", obs.now, obs.generation)
    elif run.state == RUN_BACKING_OFF:
        message = f"attempt {run.attempt + 1} starts at {format_time(run.retry_at)}"
        set_condition(conditions, RUNNING_CONDITION, True, "BackingOff", message, obs.now, obs.generation)
    elif run.in_progress:
        message = f"attempt {run.attempt} with {run.memory}"
        reason = "RunStarted" if run.attempt == 1 else "Retrying"
        set_condition(conditions, RUNNING_CONDITION, True, reason, message, obs.now, obs.generation)
    elif run.state == RUN_SUCCEEDED:
        set_condition(conditions, RUNNING_CONDITION, False, "RunSucceeded", "", obs.now, obs.generation)
    else:
        message = (plan.status.get("lastFailure") or {}).get("message", "")
        set_condition(conditions, RUNNING_CONDITION, False, "RunFailed", message, obs.now, obs.generation)
