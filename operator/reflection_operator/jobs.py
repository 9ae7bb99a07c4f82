"""The importer Job and the state ConfigMap as pure functions of the spec and the run: no API calls here.

A Job's name is a function of the ImportRun, the run's scheduled time, the attempt and the shard, so a
restarted operator that decides the same thing again gets AlreadyExists and adopts the Job it made before.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from importer.contract import (
    LABEL_ATTEMPT,
    LABEL_IMPORTRUN,
    LABEL_MANAGED_BY,
    LABEL_RUN_ID,
    LABEL_SHARD,
    LABEL_STATE_BUCKET,
    MANAGED_BY,
    ImporterEnv,
)

from . import ANNOTATION_MEMORY, ANNOTATION_SCHEDULED_TIME, ANNOTATION_SHARD_COUNT, API_VERSION, KIND
from .quantity import format_memory
from .settings import Settings
from .spec import ImportRunSpec, SecretKeyRef

#: Where the importer sees its volumes. The source is mounted read-only.
SOURCE_MOUNT = "/data/source"
QDRANT_MOUNT = "/data/qdrant"
#: The only writable place on the read-only root filesystem: HOME, caches, temporary files.
SCRATCH_MOUNT = "/tmp"
CONTAINER_NAME = "importer"
#: The run's spec, as it was when the run started: retries of the run use it, not later edits.
ANNOTATION_SPEC = "reflection.dev/spec"
#: Seconds the importer has between SIGTERM and SIGKILL when its Pod is deleted (Replace, a deleted
#: ImportRun, a drained node). Kubernetes' default, set deliberately: the importer stops reading, finishes the
#: batch in flight and saves its state within it (its longest step, one embedding batch, takes a few seconds);
#: whatever it could not save is read again by the next run, never lost.
TERMINATION_GRACE_SECONDS = 30
#: Longest Job name: the Job controller copies it into the Pods' job-name label (63 characters at most).
MAX_JOB_NAME = 63


@dataclass(frozen=True)
class Owner:
    """The ImportRun that owns what the operator creates."""

    name: str
    namespace: str
    uid: str

    def reference(self, block_owner_deletion: bool = True) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": block_owner_deletion,
        }


@dataclass(frozen=True)
class JobRequest:
    """One Job to exist: a shard of an attempt of a run."""

    owner: Owner
    #: The run's scheduled time as seconds since the epoch (a string: it is a label value).
    run_id: str
    scheduled_time: datetime
    attempt: int
    shard: int
    shard_count: int
    #: The memory limit in bytes for this attempt.
    memory: int

    @property
    def name(self) -> str:
        return job_name(self.owner.name, self.run_id, self.attempt, self.shard)


def run_id_for(moment: datetime) -> str:
    return str(int(moment.timestamp()))


def state_configmap_base(importrun: str) -> str:
    return f"{importrun}-state"


def job_name(importrun: str, run_id: str, attempt: int, shard: int) -> str:
    suffix = f"-{run_id}-{attempt}-{shard}"
    prefix = re.sub(r"[^a-z0-9-]", "-", importrun.lower())
    room = MAX_JOB_NAME - len(suffix)
    if len(prefix) > room:
        # Keep the names of long ImportRuns apart with a hash of the full name.
        digest = hashlib.sha256(importrun.encode()).hexdigest()[:6]
        prefix = prefix[: room - len(digest) - 1].rstrip("-") + "-" + digest
    return prefix + suffix


def common_labels(importrun: str) -> dict[str, str]:
    return {
        LABEL_MANAGED_BY: MANAGED_BY,
        "app.kubernetes.io/name": "reflection-importer",
        LABEL_IMPORTRUN: importrun,
    }


def build_job(spec: ImportRunSpec, raw_spec: dict[str, Any], request: JobRequest, settings: Settings) -> dict[str, Any]:
    """The Job for one shard of one attempt. ``raw_spec`` is recorded on the Job for the run's retries."""
    labels = {
        **common_labels(request.owner.name),
        LABEL_RUN_ID: request.run_id,
        LABEL_ATTEMPT: str(request.attempt),
        LABEL_SHARD: str(request.shard),
    }
    annotations = {
        ANNOTATION_MEMORY: format_memory(request.memory),
        ANNOTATION_SHARD_COUNT: str(request.shard_count),
        ANNOTATION_SCHEDULED_TIME: request.scheduled_time.isoformat().replace("+00:00", "Z"),
        ANNOTATION_SPEC: json.dumps(raw_spec, sort_keys=True, separators=(",", ":")),
    }
    job_spec: dict[str, Any] = {
        # The operator decides about retries (with more memory after an OOM kill): one Pod per Job.
        "backoffLimit": 0,
        "completions": 1,
        "parallelism": 1,
        "template": {
            "metadata": {"labels": labels},
            "spec": _pod_spec(spec, request, settings),
        },
    }
    if settings.job_ttl_seconds:
        job_spec["ttlSecondsAfterFinished"] = settings.job_ttl_seconds
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": request.name,
            "namespace": request.owner.namespace,
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [request.owner.reference()],
        },
        "spec": job_spec,
    }


def _pod_spec(spec: ImportRunSpec, request: JobRequest, settings: Settings) -> dict[str, Any]:
    uid = settings.run_as_user
    return {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "serviceAccountName": settings.importer_service_account,
        # The importer keeps its state in ConfigMaps through the API: it needs its token.
        "automountServiceAccountToken": True,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": uid,
            "runAsGroup": uid,
            "fsGroup": uid,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(spec, request, settings)],
        "volumes": _volumes(spec),
    }


def _container(spec: ImportRunSpec, request: JobRequest, settings: Settings) -> dict[str, Any]:
    memory = format_memory(request.memory)
    resources = spec.resources
    mounts: list[dict[str, Any]] = [
        {"name": "source", "mountPath": SOURCE_MOUNT, "readOnly": True},
        {"name": "scratch", "mountPath": SCRATCH_MOUNT},
    ]
    if spec.qdrant.path is not None:
        mounts.append({"name": "qdrant", "mountPath": QDRANT_MOUNT})
    return {
        "name": CONTAINER_NAME,
        "image": spec.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": list(settings.importer_command),
        "env": _environment(spec, request, settings),
        "resources": {
            "limits": {"memory": memory, "cpu": resources.cpu},
            # Memory requested as much as allowed: the scheduler must not overcommit what we will use.
            "requests": {"memory": memory, "cpu": resources.cpu_request or resources.cpu},
        },
        "volumeMounts": mounts,
        # On failure the Pod's last log lines become its termination message: lastFailure shows them.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }


def _environment(spec: ImportRunSpec, request: JobRequest, settings: Settings) -> list[dict[str, Any]]:
    source = SOURCE_MOUNT + (f"/{spec.source.sub_path}" if spec.source.sub_path else "")
    env: list[dict[str, Any]] = [
        _value(ImporterEnv.SOURCE, source),
        _value(ImporterEnv.PROVIDER, spec.embedding.provider),
        _value(ImporterEnv.STATE_CONFIGMAP, state_configmap_base(request.owner.name)),
        {"name": str(ImporterEnv.NAMESPACE), "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        _value(ImporterEnv.RUN_NAME, request.owner.name),
        # The same on every attempt of the run: the importer counts what earlier attempts did as this run's.
        _value(ImporterEnv.RUN_ID, request.run_id),
        _value(ImporterEnv.SHARD_INDEX, str(request.shard)),
        _value(ImporterEnv.SHARD_COUNT, str(request.shard_count)),
        {
            "name": str(ImporterEnv.MEMORY_LIMIT),
            "valueFrom": {"resourceFieldRef": {"containerName": CONTAINER_NAME, "resource": "limits.memory"}},
        },
        _value(ImporterEnv.MEMORY_FRACTION, str(spec.tuning.operational_memory_fraction)),
        _value(ImporterEnv.BATCH_SIZE, str(spec.tuning.batch_size)),
        _value(ImporterEnv.WORKERS, str(spec.tuning.thread_pool_workers)),
        _value(ImporterEnv.CHUNK_MESSAGES, str(spec.tuning.chunk_messages)),
        # Fewer glibc arenas: many threads otherwise each grow their own and RSS balloons.
        _value("MALLOC_ARENA_MAX", "2"),
        # The root filesystem is read-only: everything that writes goes to the scratch emptyDir.
        _value("HOME", SCRATCH_MOUNT),
        _value("XDG_CACHE_HOME", f"{SCRATCH_MOUNT}/.cache"),
        _value("PYTHONUNBUFFERED", "1"),
    ]
    if spec.qdrant.url is not None:
        env.append(_value(ImporterEnv.QDRANT_URL, spec.qdrant.url))
    else:
        path = QDRANT_MOUNT + (f"/{spec.qdrant.path}" if spec.qdrant.path else "")
        env.append(_value(ImporterEnv.QDRANT_PATH, path))
    if spec.qdrant.api_key:
        env.append(_secret(ImporterEnv.QDRANT_API_KEY, spec.qdrant.api_key))
    if spec.embedding.model:
        env.append(_value(ImporterEnv.MODEL, spec.embedding.model))
    if spec.embedding.api_key:
        env.append(_secret(ImporterEnv.VOYAGE_API_KEY, spec.embedding.api_key))
    if spec.embedding.base_url:
        env.append(_value(ImporterEnv.VOYAGE_BASE_URL, spec.embedding.base_url))
    if settings.importer_model_dir:
        env.append(_value(ImporterEnv.MODEL_DIR, settings.importer_model_dir))
    if spec.tuning.settle_seconds is not None:
        env.append(_value(ImporterEnv.SETTLE_SECONDS, str(spec.tuning.settle_seconds)))
    if spec.tuning.checkpoint_seconds is not None:
        env.append(_value(ImporterEnv.CHECKPOINT_SECONDS, str(spec.tuning.checkpoint_seconds)))
    return env


def _value(name: str, value: str) -> dict[str, Any]:
    return {"name": str(name), "value": value}


def _secret(name: str, ref: SecretKeyRef) -> dict[str, Any]:
    # Secrets reach the importer only as references: their values never pass through the operator.
    return {"name": str(name), "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def _volumes(spec: ImportRunSpec) -> list[dict[str, Any]]:
    volumes = [
        {"name": "source", **_read_only(spec.source.volume)},
        {"name": "scratch", "emptyDir": {}},
    ]
    if spec.qdrant.path is not None and spec.qdrant.volume is not None:
        volumes.append({"name": "qdrant", **spec.qdrant.volume})
    return volumes


#: Volume sources with a readOnly flag of their own (the mount's readOnly covers the others).
_READ_ONLY_FLAGGED = ("persistentVolumeClaim", "nfs", "csi", "iscsi", "rbd", "cephfs", "azureFile")


def _read_only(volume: dict[str, Any]) -> dict[str, Any]:
    """The source volume, read-only at the volume too where its type allows it."""
    (kind, source), *_ = volume.items()
    if kind in _READ_ONLY_FLAGGED and isinstance(source, dict):
        source = {**source, "readOnly": True}
    return {kind: source}


#: The namespace label whose Pod Security level the API server enforces on Pods (Kubernetes 1.23 and later).
POD_SECURITY_ENFORCE_LABEL = "pod-security.kubernetes.io/enforce"
#: The volume types the "restricted" Pod Security Standard allows; "baseline" refuses hostPath only, and
#: "privileged" refuses nothing (https://kubernetes.io/docs/concepts/security/pod-security-standards/).
RESTRICTED_VOLUME_TYPES = (
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
)


def volumes_refused_under(level: str, spec: ImportRunSpec) -> list[tuple[str, str]]:
    """(field, volume type) of each volume of the spec that the Pod Security ``level`` refuses.

    Only the volumes come from the user: the rest of the Pod (non-root, no privilege escalation, all
    capabilities dropped, RuntimeDefault seccomp, an emptyDir scratch) passes "restricted" as it is."""
    refused = []
    for field_name, volume in (("spec.source.volume", spec.source.volume), ("spec.qdrant.volume", spec.qdrant.volume)):
        kind = next(iter(volume or {}), None)
        if kind is None:
            continue
        if (level == "baseline" and kind == "hostPath") or (
            level == "restricted" and kind not in RESTRICTED_VOLUME_TYPES
        ):
            refused.append((field_name, kind))
    return refused


def state_configmap(owner: Owner) -> dict[str, Any]:
    """The first state bucket, made by the operator so that it (and every bucket the importer adds, which
    copies its ownerReferences) goes away with the ImportRun."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": f"{state_configmap_base(owner.name)}-0",
            "namespace": owner.namespace,
            "labels": {
                LABEL_MANAGED_BY: MANAGED_BY,
                LABEL_IMPORTRUN: owner.name,
                LABEL_STATE_BUCKET: "0",
            },
            # Not blocking: the importer copies these references onto the buckets it adds, and setting
            # blockOwnerDeletion would need a permission on ImportRuns that its ServiceAccount lacks.
            "ownerReferences": [owner.reference(block_owner_deletion=False)],
        },
        "data": {"summary": "{}"},
    }
