"""The importer Job as a pure function of the spec and the run."""

from __future__ import annotations

import json

from reflection_operator.jobs import build_job, job_name, state_configmap
from reflection_operator.observed import job_info
from reflection_operator.settings import Settings
from reflection_operator.spec import parse_spec

SETTINGS = Settings(importer_model_dir="/models/minilm")


def make(make_world, request_for, **overrides):
    raw = make_world.base_spec(**overrides)
    spec, problems = parse_spec(raw, SETTINGS)
    assert not problems and spec is not None
    return build_job(spec, raw, request_for(), SETTINGS)


def env_of(job) -> dict:
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_job_runs_once_owned_by_the_importrun_with_limits_and_labels(make_world, request_for):
    job = make(make_world, request_for)
    meta, spec = job["metadata"], job["spec"]
    assert meta["name"] == job_name("nightly", request_for().run_id, 1, 0)
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "reflection.dev/v1alpha1",
            "kind": "ImportRun",
            "name": "nightly",
            "uid": "uid-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert spec["backoffLimit"] == 0 and spec["ttlSecondsAfterFinished"] == SETTINGS.job_ttl_seconds
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == "reflection-importer"
    container = pod["containers"][0]
    assert container["command"] == ["python", "-m", "importer", "run"]
    assert container["resources"] == {
        "limits": {"memory": "512Mi", "cpu": "1"},
        "requests": {"memory": "512Mi", "cpu": "1"},
    }
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    labels = spec["template"]["metadata"]["labels"]
    assert labels["reflection.dev/importrun"] == "nightly" and labels["reflection.dev/attempt"] == "1"
    assert meta["annotations"]["reflection.dev/memory"] == "512Mi"


def test_job_is_locked_down(make_world, request_for):
    pod = make(make_world, request_for)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = pod["containers"][0]["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["source"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["source"]["persistentVolumeClaim"] == {"claimName": "claude-logs", "readOnly": True}
    assert volumes["scratch"] == {"name": "scratch", "emptyDir": {}}
    env = env_of(make(make_world, request_for))
    assert env["HOME"] == "/tmp" and mounts["scratch"]["mountPath"] == "/tmp"


def test_environment_follows_the_importers_contract(make_world, request_for):
    env = env_of(make(make_world, request_for, tuning={"batchSize": 8, "threadPoolWorkers": 1}))
    assert env["IMPORTER_SOURCE"] == "/data/source/projects"
    assert env["IMPORTER_QDRANT_URL"] == "http://qdrant:6333"
    assert env["IMPORTER_STATE_CONFIGMAP"] == "nightly-state"
    assert env["IMPORTER_RUN_NAME"] == "nightly"
    assert env["IMPORTER_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["IMPORTER_MEMORY_LIMIT"] == {
        "resourceFieldRef": {"containerName": "importer", "resource": "limits.memory"}
    }
    assert (env["IMPORTER_SHARD_INDEX"], env["IMPORTER_SHARD_COUNT"]) == ("0", "1")
    assert (env["IMPORTER_BATCH_SIZE"], env["IMPORTER_WORKERS"], env["IMPORTER_CHUNK_MESSAGES"]) == ("8", "1", "5")
    assert env["IMPORTER_MEMORY_FRACTION"] == "0.8" and env["MALLOC_ARENA_MAX"] == "2"
    assert env["IMPORTER_MODEL_DIR"] == "/models/minilm"
    assert "IMPORTER_QDRANT_PATH" not in env and "VOYAGE_API_KEY" not in env


def test_every_attempt_of_a_run_gets_the_runs_id(make_world, request_for):
    """The importer counts what an earlier attempt of the same run saved as this run's work."""
    raw = make_world.base_spec()
    spec, _ = parse_spec(raw, SETTINGS)
    assert spec is not None
    first, retry = (build_job(spec, raw, request_for(attempt=n), SETTINGS) for n in (1, 2))
    assert env_of(first)["IMPORTER_RUN_ID"] == env_of(retry)["IMPORTER_RUN_ID"]
    assert env_of(retry)["IMPORTER_RUN_ID"] == retry["metadata"]["labels"]["reflection.dev/run-id"]
    assert first["metadata"]["name"] != retry["metadata"]["name"]


def test_secrets_are_references_and_an_embedded_store_gets_its_volume(make_world, request_for):
    job = make(
        make_world,
        request_for,
        qdrant={"path": "store", "volume": {"persistentVolumeClaim": {"claimName": "qdrant-data"}}},
        embedding={"provider": "voyage", "apiKeySecretRef": {"name": "voyage", "key": "api-key"}},
        resources={"memory": "256Mi", "cpu": "500m", "cpuRequest": "100m"},
    )
    env = env_of(job)
    assert env["VOYAGE_API_KEY"] == {"secretKeyRef": {"name": "voyage", "key": "api-key"}}
    assert env["IMPORTER_QDRANT_PATH"] == "/data/qdrant/store" and env["IMPORTER_PROVIDER"] == "voyage"
    pod = job["spec"]["template"]["spec"]
    assert {"name": "qdrant", "persistentVolumeClaim": {"claimName": "qdrant-data"}} in pod["volumes"]
    assert pod["containers"][0]["resources"]["requests"]["cpu"] == "100m"


def test_job_names_are_deterministic_and_fit_a_label():
    assert job_name("nightly", "1767607200", 2, 3) == "nightly-1767607200-2-3"
    long_a, long_b = "a" * 80, "a" * 79 + "b"
    assert len(job_name(long_a, "1767607200", 20, 63)) <= 63
    assert job_name(long_a, "1767607200", 1, 0) != job_name(long_b, "1767607200", 1, 0)
    assert job_name("team.logs", "1", 1, 0) == "team-logs-1-1-0"


def test_the_job_records_the_runs_spec_and_reads_back(make_world, request_for):
    raw = make_world.base_spec(parallelism=2)
    spec, _ = parse_spec(raw, SETTINGS)
    assert spec is not None
    body = build_job(spec, raw, request_for(attempt=2, shard=1, memory=768 << 20, shards=2), SETTINGS)
    body["metadata"]["uid"] = "job-uid"
    info = job_info(body)
    assert (info.attempt, info.shard, info.shard_count, info.memory) == (2, 1, 2, "768Mi")
    assert info.owner_uid == "uid-1" and info.state == "active"
    assert json.loads(info.spec_snapshot) == raw


def test_state_configmap_is_owned_but_does_not_block_deletion(request_for):
    configmap = state_configmap(request_for().owner)
    assert configmap["metadata"]["name"] == "nightly-state-0"
    assert configmap["metadata"]["labels"]["reflection.dev/state-bucket"] == "0"
    assert configmap["metadata"]["ownerReferences"][0]["blockOwnerDeletion"] is False
    assert configmap["data"] == {"summary": "{}"}


def test_the_pod_gets_its_grace_period_on_purpose(make_world, request_for):
    """Set explicitly (not left to the cluster's default): the importer saves its state within it on SIGTERM."""
    from reflection_operator.jobs import TERMINATION_GRACE_SECONDS

    pod = make(make_world, request_for)["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == TERMINATION_GRACE_SECONDS == 30
