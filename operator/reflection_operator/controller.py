"""Following one ImportRun: gather what ``reconcile.decide`` needs, carry out its plan, wait for news.

One loop per ImportRun (a kopf daemon) runs ``follow``; watch events of the ImportRun's Jobs, Pods and state
ConfigMap wake it through ``Context.wake``, and it sleeps until the next scheduled time otherwise. One loop
per object means its decisions never race each other.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from importer.contract import ShardSummary

from .jobs import (
    POD_SECURITY_ENFORCE_LABEL,
    RESTRICTED_VOLUME_TYPES,
    Owner,
    build_job,
    state_configmap,
    volumes_refused_under,
)
from .kube import (
    NAMESPACES_PATH,
    Kube,
    KubeError,
    claim_path,
    configmaps_path,
    events_path,
    importrun_status_path,
    jobs_path,
)
from .metrics import Metrics
from .observed import JobInfo, PodInfo, parse_time
from .progress import total
from .reconcile import EventNote, Observed, Plan, decide, jobs_to_look_into
from .settings import Settings
from .spec import ImportRunSpec, Problem, parse_spec
from .status import RunRecord

#: After a wake-up, wait this long for the rest of a burst of events (Job, Pod and summary change together).
COALESCE_SECONDS = 0.2
#: While a claim is missing or the namespace's Pod Security level refuses the Pod, look again this often
#: (neither change sends the operator an event).
DEPENDENCY_RECHECK_SECONDS = 10.0
DEPENDENCY_REASONS = ("MissingVolumeClaim", "PodSecurityLevel")
MAX_ERROR_BACKOFF = 60.0

Key = tuple[str, str]
Logger = logging.Logger | logging.LoggerAdapter[Any]
#: Posts a Kubernetes Event about the ImportRun (kopf.event in the operator).
EventPoster = Callable[[EventNote], None]


class JobRejected(Exception):
    """The API server refused a Job built from the spec: a problem with the spec, not a reason to retry."""


@dataclass
class Context:
    """What every ImportRun's loop shares: settings, the API client, metrics, the wake-up registry."""

    settings: Settings
    kube: Kube
    metrics: Metrics
    wakers: dict[Key, asyncio.Event] = field(default_factory=dict)

    def wake(self, namespace: str, name: str) -> None:
        waker = self.wakers.get((namespace, name))
        if waker is not None:
            waker.set()


@dataclass
class Views:
    """Live views (kopf indexes) of Jobs, Pods and state summaries, keyed by (namespace, ImportRun)."""

    jobs: Mapping[Key, Iterable[JobInfo]]
    pods: Mapping[Key, Iterable[PodInfo]]
    summaries: Mapping[Key, Iterable[dict[int, ShardSummary]]]

    def of(self, key: Key) -> tuple[list[JobInfo], list[PodInfo], dict[int, ShardSummary]]:
        summaries = list(self.summaries.get(key, []))
        return list(self.jobs.get(key, [])), list(self.pods.get(key, [])), (summaries[0] if summaries else {})


class Follower:
    """The state of one ImportRun's loop between reconciliations."""

    def __init__(self, ctx: Context, body: Mapping[str, Any], views: Views, post: EventPoster) -> None:
        self.ctx = ctx
        self.body = body  # kopf's live view: always the latest ImportRun seen
        self.views = views
        self.post = post
        meta = body["metadata"]
        self.owner = Owner(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])
        # The status this loop wrote last: the only writer of the status, it need not wait for the echo.
        self.status: dict[str, Any] = dict(body.get("status") or {})
        # The API server refused a Job built from this generation of the spec (e.g. a volume source
        # the schema lets through): reported as a spec problem until the spec changes.
        self.rejection: tuple[int, Problem] | None = None

    async def reconcile(self, logger: Logger) -> float | None:
        """One look at the ImportRun; returns seconds until it wants to look again (None: only on news)."""
        observed = self.observe(datetime.now(UTC))
        overdue = jobs_to_look_into(observed)
        if overdue:
            observed = replace(observed, pod_refusals=await pod_refusals(self.ctx.kube, self.owner.namespace, overdue))
        plan = decide(observed)
        if observed.spec is not None and not observed.problems and self.dependencies_due(plan):
            missing = await find_missing(self.ctx.kube, self.owner.namespace, observed.spec)
            if missing:
                plan = decide(replace(observed, problems=missing))
                plan.wake_within(DEPENDENCY_RECHECK_SECONDS)
        try:
            await self.carry_out(plan, observed, logger)
        except JobRejected as rejected:
            logger.warning("%s", rejected)
            return 0.0  # decide again at once, with the rejection as a spec problem
        return plan.requeue_after

    def observe(self, now: datetime) -> Observed:
        meta = self.body["metadata"]
        raw_spec = dict(self.body.get("spec") or {})
        spec, problems = parse_spec(raw_spec, self.ctx.settings)
        problems = name_problems(self.owner.name) + problems
        generation = int(meta.get("generation") or 0)
        if self.rejection is not None:
            if self.rejection[0] == generation:
                problems.append(self.rejection[1])
            else:
                self.rejection = None  # the spec changed: try again
        jobs, pods, summary = self.views.of((self.owner.namespace, self.owner.name))
        return Observed(
            now=now,
            owner=self.owner,
            generation=generation,
            created=parse_time(meta.get("creationTimestamp")) or now,
            raw_spec=raw_spec,
            spec=spec,
            problems=problems,
            status=self.status,
            jobs=jobs,
            pods=pods,
            summary=summary,
            settings=self.ctx.settings,
        )

    def dependencies_due(self, plan: Plan) -> bool:
        """Claims and the namespace are read before Jobs are made, and again while they were a problem."""
        conditions: list[dict[str, Any]] = self.status.get("conditions") or []
        ready = next((c for c in conditions if c.get("type") == "Ready"), {})
        return plan.starts_jobs or ready.get("reason") in DEPENDENCY_REASONS

    async def carry_out(self, plan: Plan, observed: Observed, logger: Logger) -> None:
        kube, namespace = self.ctx.kube, self.owner.namespace
        if plan.reset_summary:
            await reset_state_summary(kube, self.owner)
        for item in plan.create:
            manifest = build_job(item.spec, item.raw_spec, item.request, self.ctx.settings)
            try:
                await kube.create(jobs_path(namespace), manifest)
                logger.info("created Job %s", item.request.name)
            except KubeError as error:
                if error.status in (400, 422):
                    message = f"the API server refused the Job: {error.message}"
                    self.rejection = (observed.generation, Problem("spec", "JobRejected", message))
                    raise JobRejected(message) from error
                if not error.already_exists:
                    raise
                logger.info("Job %s exists already: adopting it", item.request.name)
        # The status goes before deletions: a run whose outcome is not recorded keeps its Jobs.
        if stored_form(plan.status) != stored_form(self.status):
            patch = {"status": merge_patch_form(plan.status)}
            patched = await kube.merge_patch(importrun_status_path(namespace, self.owner.name), patch)
            self.status = dict(patched.get("status") or {})
        for name in plan.delete:
            if await kube.delete(jobs_path(namespace, name)):
                logger.info("deleted Job %s", name)
        for note in plan.events:
            self.post(note)
        for counter in plan.counters:
            self.ctx.metrics.count(counter, namespace)
        run = RunRecord.from_status(self.status.get("run"))
        if run is not None:
            self.ctx.metrics.record_progress(namespace, self.owner.name, total(observed.summary, run.shards))


def merge_patch_form(value: Any, in_list: bool = False) -> Any:
    """``value`` as a merge patch: empty strings become null (delete the field), or vanish inside lists.

    Empty strings are never sent: the v1.20 API server of the test cluster turns them into null and then
    refuses them as "must be of type string"; an absent field means the same to every reader.
    """
    if isinstance(value, dict):
        patch: dict[str, Any] = {}
        for key, item in value.items():
            if item == "" or item is None:
                if not in_list:
                    patch[key] = None
                continue
            patch[key] = merge_patch_form(item, in_list)
        return patch
    if isinstance(value, list):
        return [merge_patch_form(item, True) for item in value if item != ""]
    return value


def stored_form(value: Any) -> Any:
    """``value`` as the API server stores it after ``merge_patch_form``: without nulls and empty strings."""
    if isinstance(value, dict):
        return {k: stored_form(v) for k, v in value.items() if v is not None and v != ""}
    if isinstance(value, list):
        return [stored_form(item) for item in value if item != ""]
    return value


def name_problems(name: str) -> list[Problem]:
    if len(name) > 63:
        message = f"{len(name)} characters; at most 63 fit the labels that tie Jobs and state to it"
        return [Problem("metadata.name", "InvalidName", message)]
    return []


async def find_missing(kube: Kube, namespace: str, spec: ImportRunSpec) -> list[Problem]:
    """Claims the spec names that do not exist, and volumes the namespace's Pod Security level refuses.

    Secrets are not looked at: that would need the right to read their values. A missing Secret or key
    shows as the Pod's CreateContainerConfigError instead, which ``reconcile`` reports."""
    problems = []
    for field_name, claim in spec.claim_refs():
        if await kube.get(claim_path(namespace, claim)) is None:
            message = f"PersistentVolumeClaim {claim!r} does not exist"
            problems.append(Problem(field_name, "MissingVolumeClaim", message))
    return problems + pod_security_problems(namespace, await enforced_level(kube, namespace), spec)


async def enforced_level(kube: Kube, namespace: str) -> str:
    """The namespace's enforced Pod Security level; "" when none is set or the Namespace cannot be read
    (a namespace-scoped install without the discovery role)."""
    try:
        found = await kube.list(NAMESPACES_PATH, f"metadata.name={namespace}")
    except KubeError as error:
        if error.status in (401, 403):
            return ""
        raise
    labels = (found[0].get("metadata", {}).get("labels") or {}) if found else {}
    return str(labels.get(POD_SECURITY_ENFORCE_LABEL, ""))


def pod_security_problems(namespace: str, level: str, spec: ImportRunSpec) -> list[Problem]:
    problems = []
    allowed = {"baseline": "any type but hostPath", "restricted": ", ".join(RESTRICTED_VOLUME_TYPES)}
    for field_name, kind in volumes_refused_under(level, spec):
        message = (
            f"namespace {namespace} enforces the Pod Security level {level!r} (label {POD_SECURITY_ENFORCE_LABEL}), "
            f"which refuses {kind} volumes: the Pod would not be created. Under {level!r} use {allowed[level]} "
            "(e.g. persistentVolumeClaim), or relabel the namespace"
        )
        problems.append(Problem(field_name, "PodSecurityLevel", message))
    return problems


async def pod_refusals(kube: Kube, namespace: str, jobs: Iterable[JobInfo]) -> dict[str, str]:
    """The latest FailedCreate Event message of each Job (the Job controller's word on a refused Pod)."""
    refusals = {}
    for job in jobs:
        selector = f"involvedObject.uid={job.uid},reason=FailedCreate"
        events = await kube.list(events_path(namespace), selector)
        if events:
            latest = max(events, key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))
            refusals[job.name] = str(latest.get("message", ""))
    return refusals


async def reset_state_summary(kube: Kube, owner: Owner) -> None:
    """Makes the first state ConfigMap (owned by the ImportRun), or empties the summary the last run left."""
    manifest = state_configmap(owner)
    try:
        await kube.create(configmaps_path(owner.namespace), manifest)
    except KubeError as error:
        if not error.already_exists:
            raise
        name = manifest["metadata"]["name"]
        await kube.merge_patch(configmaps_path(owner.namespace, name), {"data": {"summary": "{}"}})


async def follow(follower: Follower, waker: asyncio.Event, stopped: Callable[[], bool], logger: Logger) -> None:
    """Reconciles until stopped: on news (a wake-up), at the time the plan asked for, or at the resync."""
    failures = 0
    resync = follower.ctx.settings.resync_seconds
    while not stopped():
        try:
            delay = await follower.reconcile(logger)
            failures = 0
        except Exception as error:  # the loop must outlive API hiccups; the next pass retries
            failures += 1
            follower.ctx.metrics.reconcile_errors.labels(follower.owner.namespace).inc()
            delay = min(MAX_ERROR_BACKOFF, 2.0**failures)
            logger.warning("reconcile failed (%s); retrying in %.0fs", error, delay, exc_info=True)
        await sleep_until_woken(waker, resync if delay is None else min(delay, resync))


async def sleep_until_woken(waker: asyncio.Event, seconds: float) -> None:
    try:
        # Never a zero timeout: a plan asking for "now" again and again must not spin the loop.
        await asyncio.wait_for(waker.wait(), timeout=max(0.05, seconds))
    except TimeoutError:
        return
    await asyncio.sleep(COALESCE_SECONDS)
    waker.clear()
