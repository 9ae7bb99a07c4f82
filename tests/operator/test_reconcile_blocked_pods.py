"""Runs whose Pods cannot be made or started (reconcile.decide in the simulated world): the cause and its
fix are reported on the ImportRun, and the run goes on by itself once the cause is gone."""

from __future__ import annotations

import pytest
from reflection_operator.controller import pod_security_problems
from reflection_operator.jobs import volumes_refused_under
from reflection_operator.reconcile import POD_DEADLINE, REMAKE_REFUSED_AFTER, jobs_to_look_into
from reflection_operator.settings import Settings
from reflection_operator.spec import parse_spec

NO_ACCOUNT = (
    'Error creating: pods "nightly-1767604800-1-0-" is forbidden: error looking up service account '
    'team/reflection-importer: serviceaccount "reflection-importer" not found'
)
OVER_QUOTA = (
    'Error creating: pods "nightly-1767604800-1-0-x2k" is forbidden: exceeded quota: small, requested: '
    "limits.memory=512Mi, used: limits.memory=0, limited: limits.memory=256Mi"
)
# The message format of the PodSecurity admission plugin (Kubernetes 1.23+), which the 1.20 test cluster lacks.
POD_SECURITY = (
    'Error creating: pods "nightly-1767604800-1-0-abc" is forbidden: violates PodSecurity "baseline:latest": '
    'hostPath volumes (volume "source")'
)


def ready(world) -> dict:
    return next(c for c in world.status["conditions"] if c["type"] == "Ready")


def reasons(plan) -> list[str]:
    return [e.reason for e in plan.events]


def started_job(make_world):
    world = make_world()
    plan = world.step()
    (job,) = [c.request.name for c in plan.create]
    return world, job


@pytest.mark.parametrize(
    ("refusal", "reason", "fix"),
    [
        (NO_ACCOUNT, "MissingServiceAccount", "python -m reflection_operator importer-rbac -n team"),
        (OVER_QUOTA, "QuotaExceeded", "ResourceQuota"),
        (POD_SECURITY, "PodSecurityRefused", "pod-security.kubernetes.io/enforce"),
        ('Error creating: pods "x" is forbidden: something else', "FailedCreate", "something else"),
    ],
)
def test_a_refused_pod_is_reported_with_its_cause_and_fix(make_world, refusal, reason, fix):
    world, job = started_job(make_world)
    assert ready(world)["status"] == "True"
    world.advance(6)
    assert [j.name for j in jobs_to_look_into(world.observe())] == [job]
    world.pod_refusals = {job: refusal}
    plan = world.step()
    assert ready(world)["status"] == "False" and ready(world)["reason"] == reason
    assert fix in ready(world)["message"]
    assert world.status["lastFailure"]["reason"] == reason and fix in world.status["lastFailure"]["message"]
    assert reasons(plan) == [reason]
    assert world.status["phase"] == "Pending"
    assert not plan.delete  # not yet: the Job controller may still succeed by itself
    assert not world.step().events  # said once


def test_a_refused_job_is_made_anew_and_the_run_goes_on_once_the_cause_is_gone(make_world):
    world, job = started_job(make_world)
    world.advance(6)
    world.pod_refusals = {job: NO_ACCOUNT}
    first = world.step()
    assert 0 < (first.requeue_after or 0) <= REMAKE_REFUSED_AFTER.total_seconds()
    world.advance(REMAKE_REFUSED_AFTER.total_seconds())
    plan = world.step()
    assert plan.delete == [job] and job not in world.jobs
    world.pod_refusals = {}
    plan = world.step()
    assert [c.request.name for c in plan.create] == [job]  # the same run, attempt and shard
    # The new Job has no Pod yet: the reason stands, unchanged and without a new Event.
    assert ready(world)["reason"] == "MissingServiceAccount" and not plan.events
    assert world.status["attempt"] == 1

    world.advance(2)
    world.start_pod(job)
    plan = world.step()
    assert ready(world)["status"] == "True"
    assert reasons(plan) == ["PodsCreated"]
    assert world.status["phase"] == "Running"


def test_a_job_without_a_pod_or_a_reason_is_reported_after_the_deadline(make_world):
    world, job = started_job(make_world)
    world.advance(POD_DEADLINE.total_seconds() - 1)
    world.step()
    assert ready(world)["status"] == "True"
    world.advance(1)
    plan = world.step()
    assert ready(world)["reason"] == "PodNotCreated" and job in ready(world)["message"]
    assert reasons(plan) == ["PodNotCreated"]


def test_a_missing_secret_shows_through_the_pods_status_naming_the_field(make_world):
    world = make_world(
        make_world.base_spec(qdrant={"url": "http://q:6333", "apiKeySecretRef": {"name": "qdrant", "key": "api-key"}})
    )
    (job,) = [c.request.name for c in world.step().create]
    pod = world.start_pod(job)
    world.pods[pod]["status"] = {
        "phase": "Pending",
        "containerStatuses": [
            {
                "name": "importer",
                "state": {"waiting": {"reason": "CreateContainerConfigError", "message": 'secret "qdrant" not found'}},
            }
        ],
    }
    plan = world.step()
    assert ready(world)["reason"] == "MissingSecret"
    assert ready(world)["message"].startswith("spec.qdrant.apiKeySecretRef:")
    assert "'api-key'" in ready(world)["message"] and reasons(plan) == ["MissingSecret"]
    assert not plan.delete  # the kubelet retries by itself

    world.start_pod(job)  # the Secret was made: the container starts
    plan = world.step()
    assert ready(world)["status"] == "True" and reasons(plan) == ["PodsCreated"]


def test_another_secret_with_a_longer_name_is_not_taken_for_ours(make_world):
    world = make_world(
        make_world.base_spec(qdrant={"url": "http://q:6333", "apiKeySecretRef": {"name": "qdrant", "key": "k"}})
    )
    (job,) = [c.request.name for c in world.step().create]
    pod = world.start_pod(job)
    waiting = {"reason": "CreateContainerConfigError", "message": 'secret "qdrant-old" not found'}
    world.pods[pod]["status"] = {"containerStatuses": [{"name": "importer", "state": {"waiting": waiting}}]}
    world.step()
    assert ready(world)["reason"] == "ContainerConfigError"


VOLUMES = {
    "hostPath": {"hostPath": {"path": "/logs"}},
    "nfs": {"nfs": {"server": "nas", "path": "/logs"}},
    "persistentVolumeClaim": {"persistentVolumeClaim": {"claimName": "logs"}},
    "csi": {"csi": {"driver": "x"}},
}


@pytest.mark.parametrize(
    ("level", "kind", "refused"),
    [
        ("", "hostPath", False),
        ("privileged", "hostPath", False),
        ("baseline", "hostPath", True),
        ("baseline", "nfs", False),
        ("restricted", "nfs", True),
        ("restricted", "hostPath", True),
        ("restricted", "persistentVolumeClaim", False),
        ("restricted", "csi", False),
    ],
)
def test_volumes_each_pod_security_level_refuses(make_world, level, kind, refused):
    raw = make_world.base_spec(source={"volume": VOLUMES[kind]})
    spec, problems = parse_spec(raw, Settings())
    assert spec is not None and not problems
    assert volumes_refused_under(level, spec) == ([("spec.source.volume", kind)] if refused else [])
    found = pod_security_problems("team", level, spec)
    assert [(p.field, p.reason) for p in found] == ([("spec.source.volume", "PodSecurityLevel")] if refused else [])
    if refused:
        assert f"refuses {kind} volumes" in found[0].message and level in found[0].message


def test_a_pod_no_node_can_take_is_reported_until_it_is_scheduled(make_world):
    world, job = started_job(make_world)
    pod = world.start_pod(job)
    message = "0/1 nodes are available: 1 Insufficient memory."
    world.pods[pod]["status"] = {
        "phase": "Pending",
        "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}],
    }
    plan = world.step()
    assert ready(world)["reason"] == "Unschedulable" and message in ready(world)["message"]
    assert "spec.resources" in ready(world)["message"] and reasons(plan) == ["Unschedulable"]
    world.start_pod(job)
    world.step()
    assert ready(world)["status"] == "True"
