"""The kopf handlers: settings at startup, indexes of Jobs/Pods/state, one daemon per ImportRun.

- Jobs, Pods and the first state ConfigMap carrying the ``reflection.dev/importrun`` label are indexed by
  (namespace, ImportRun); the watches ask the API server for that label only, so unrelated objects are
  never streamed. Every change also wakes the owning ImportRun's loop (from the index functions, which
  kopf calls for every change before anything else).
- Each ImportRun has a daemon running ``controller.follow``: created, resumed after a restart, stopped on
  deletion (kopf's finalizer makes sure of that; the garbage collector then removes Jobs and state, which
  the ImportRun owns).
- A spec change wakes the loop at once (``on.update``); a deletion drops the ImportRun's metrics.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from importer.contract import LABEL_IMPORTRUN, LABEL_STATE_BUCKET, ShardSummary

from . import GROUP, PLURAL, VERSION
from .controller import Context, EventNote, Follower, Views, follow
from .kube import Kube
from .metrics import shared as shared_metrics
from .observed import JobInfo, PodInfo, importrun_of, job_info, pod_info, state_summary
from .settings import Settings

IMPORTRUNS = (GROUP, VERSION, PLURAL)
OWNED: Mapping[str, Any] = {LABEL_IMPORTRUN: kopf.PRESENT}
SUMMARY_BUCKET: Mapping[str, Any] = {LABEL_IMPORTRUN: kopf.PRESENT, LABEL_STATE_BUCKET: "0"}
Logger = logging.Logger | logging.LoggerAdapter[Any]
Key = tuple[str, str]


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: Any, logger: Logger, **_: Any) -> None:
    own = Settings.from_env()
    # kopf keeps its bookkeeping in annotations under our prefix, never in the status (the schema prunes it).
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # Our Events are posted explicitly; kopf's own log lines should not become Events too.
    settings.posting.level = logging.WARNING
    # Server-side filtering: only the objects the operator made (or the importer's state) are streamed.
    settings.watching.label_selectors["batch", "v1", "jobs"] = LABEL_IMPORTRUN
    settings.watching.label_selectors["v1", "pods"] = LABEL_IMPORTRUN
    settings.watching.label_selectors["v1", "configmaps"] = f"{LABEL_IMPORTRUN},{LABEL_STATE_BUCKET}=0"
    memo.ctx = Context(settings=own, kube=await Kube.connect(), metrics=shared_metrics())
    logger.info("reflection-operator configured: importer image %s", own.importer_image)


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a Pod its ServiceAccount; elsewhere the kubeconfig that KUBECONFIG names at the time of the call."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.cleanup()
async def close(memo: Any, **_: Any) -> None:
    ctx: Context | None = getattr(memo, "ctx", None)
    if ctx is not None:
        await ctx.kube.close()


@kopf.on.probe(id="importruns")
def followed(memo: Any, **_: Any) -> int:
    ctx: Context | None = getattr(memo, "ctx", None)
    return len(ctx.wakers) if ctx is not None else 0


# -- indexes ------------------------------------------------------------------------------------------


# Each index function also wakes the owning ImportRun's loop: the change it indexes is news to it.
# (Deletions are not indexed by a call; the loops that wait for one look again every second meanwhile.)


def _wake(memo: Any, key: Key) -> None:
    ctx: Context | None = getattr(memo, "ctx", None)
    if ctx is not None:
        ctx.wake(*key)


@kopf.index("batch", "v1", "jobs", labels=OWNED)
def importrun_jobs(namespace: str | None, body: kopf.Body, memo: Any, **_: Any) -> dict[Key, JobInfo]:
    key = (namespace or "", importrun_of(body))
    _wake(memo, key)
    return {key: job_info(body)}


@kopf.index("v1", "pods", labels=OWNED)
def importrun_pods(namespace: str | None, body: kopf.Body, memo: Any, **_: Any) -> dict[Key, PodInfo]:
    key = (namespace or "", importrun_of(body))
    _wake(memo, key)
    return {key: pod_info(body)}


@kopf.index("v1", "configmaps", labels=SUMMARY_BUCKET)
def importrun_summaries(
    namespace: str | None, body: kopf.Body, memo: Any, **_: Any
) -> dict[Key, dict[int, ShardSummary]]:
    key = (namespace or "", importrun_of(body))
    _wake(memo, key)
    return {key: state_summary(body)}


# -- ImportRuns ---------------------------------------------------------------------------------------


@kopf.daemon(*IMPORTRUNS, cancellation_timeout=5.0)
async def importrun_loop(
    body: kopf.Body,
    namespace: str | None,
    name: str,
    memo: Any,
    stopped: kopf.DaemonStopped,
    logger: Logger,
    **kwargs: Any,
) -> None:
    ctx: Context = memo.ctx
    key = (namespace or "", name)
    # kopf passes each index as a keyword argument named after its function.
    views = Views(jobs=kwargs["importrun_jobs"], pods=kwargs["importrun_pods"], summaries=kwargs["importrun_summaries"])

    def post(note: EventNote) -> None:
        kopf.event(body, type=note.type, reason=note.reason, message=note.message[:1024])

    follower = Follower(ctx, body, views, post)
    # A fresh waker even if a deleted namesake's loop is still ending: that one must not take our wake-ups.
    waker = ctx.wakers[key] = asyncio.Event()
    relay = asyncio.create_task(_wake_when_stopped(stopped, waker))
    try:
        await follow(follower, waker, lambda: bool(stopped), logger)
    finally:
        relay.cancel()
        if ctx.wakers.get(key) is waker:
            del ctx.wakers[key]


async def _wake_when_stopped(stopped: kopf.DaemonStopped, waker: asyncio.Event) -> None:
    """A deleted ImportRun or a stopping operator ends the loop at once, not at its next wake-up."""
    await stopped.wait()
    waker.set()


@kopf.on.update(*IMPORTRUNS, field="spec")
def spec_changed(namespace: str | None, name: str, memo: Any, **_: Any) -> None:
    memo.ctx.wake(namespace or "", name)


@kopf.on.delete(*IMPORTRUNS, optional=True)
def forget(namespace: str | None, name: str, memo: Any, **_: Any) -> None:
    memo.ctx.metrics.forget(namespace or "", name)
