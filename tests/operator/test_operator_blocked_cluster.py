"""Runs whose Pods cannot be made, against the local control plane (real kube-apiserver admission, real Job
controller): the ImportRun says why and how to fix it, and goes on by itself once the cause is gone."""

from __future__ import annotations

from reflection_operator.rbac import importer_rbac

from tests.polling import wait_for


def ready_condition(k8s, name: str) -> dict:
    conditions = k8s.status(name).get("conditions") or []
    return next((c for c in conditions if c["type"] == "Ready"), {})


def blocked_by(k8s, name: str, reason: str) -> dict | None:
    ready = ready_condition(k8s, name)
    return ready if ready.get("status") == "False" and ready.get("reason") == reason else None


def pods_of(k8s, name: str) -> list:
    return list(k8s.get("pods", selector=f"reflection.dev/importrun={name}"))


def recovered(k8s, name: str) -> bool:
    return ready_condition(k8s, name).get("status") == "True" and bool(pods_of(k8s, name))


def test_a_missing_importer_service_account_is_reported_and_the_run_recovers(
    k8s, run_operator, small_corpus, embedded_importrun, claim
):
    source, _ = small_corpus
    k8s.run("delete", "serviceaccount", "reflection-importer")
    k8s.apply(claim("qdrant-nosa"), embedded_importrun("nosa", source))
    with run_operator(k8s.namespace):
        ready = wait_for("MissingServiceAccount", lambda: blocked_by(k8s, "nosa", "MissingServiceAccount"), timeout=90)
        assert f"importer-rbac -n {k8s.namespace}" in ready["message"]
        status = k8s.status("nosa")
        assert status["phase"] == "Pending"
        assert status["lastFailure"]["reason"] == "MissingServiceAccount"
        assert "MissingServiceAccount" in k8s.event_reasons("nosa")
        assert pods_of(k8s, "nosa") == []

        k8s.apply(*importer_rbac(k8s.namespace))  # the fix the message names
        wait_for("a Pod and Ready=True", lambda: recovered(k8s, "nosa"), timeout=120)
        assert "PodsCreated" in k8s.event_reasons("nosa")
        assert k8s.status("nosa")["attempt"] == 1  # a refused Pod costs no attempt


def test_a_resource_quota_that_refuses_the_pod_is_reported_and_the_run_recovers(
    k8s, run_operator, small_corpus, embedded_importrun, claim
):
    source, _ = small_corpus
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "small"},
        "spec": {"hard": {"limits.memory": "256Mi"}},
    }
    k8s.apply(quota)
    k8s.apply(claim("qdrant-quota"), embedded_importrun("quota", source))  # asks for 1Gi
    with run_operator(k8s.namespace):
        ready = wait_for("QuotaExceeded", lambda: blocked_by(k8s, "quota", "QuotaExceeded"), timeout=90)
        assert "small" in ready["message"] and "spec.resources" in ready["message"]
        assert pods_of(k8s, "quota") == []
        k8s.run("delete", "resourcequota", "small")
        wait_for("a Pod and Ready=True", lambda: recovered(k8s, "quota"), timeout=120)


def test_a_namespace_pod_security_level_that_refuses_the_volume_blocks_the_run_until_relabelled(
    k8s, run_operator, small_corpus, embedded_importrun, claim
):
    """The 1.20 test cluster has no PodSecurity admission: what is tested is the operator reading the label."""
    source, _ = small_corpus
    label = "pod-security.kubernetes.io/enforce"
    k8s.run("label", "namespace", k8s.namespace, f"{label}=baseline")
    k8s.apply(claim("qdrant-pss"), embedded_importrun("pss", source))  # source is a hostPath
    with run_operator(k8s.namespace):
        ready = wait_for("PodSecurityLevel", lambda: blocked_by(k8s, "pss", "PodSecurityLevel"), timeout=90)
        assert ready["message"].startswith("spec.source.volume:") and "hostPath" in ready["message"]
        assert "PodSecurityLevel" in k8s.event_reasons("pss")
        assert k8s.jobs("pss") == []
        k8s.run("label", "namespace", k8s.namespace, f"{label}-")
        wait_for("a Job and Ready=True", lambda: ready_condition(k8s, "pss").get("status") == "True", timeout=90)
        wait_for("a Job", lambda: k8s.jobs("pss"), timeout=60)


def test_kubectl_shows_the_next_run_as_a_time(k8s, run_operator, small_corpus, embedded_importrun):
    """kubectl 1.20 prints a future time in a date column as <invalid>: NEXT RUN is a string column."""
    source, _ = small_corpus
    k8s.apply(embedded_importrun("yearly", source, schedule="0 3 1 1 *"))
    with run_operator(k8s.namespace):
        status = k8s.wait_phase("yearly", "Waiting", timeout=60)
        table = k8s.run("get", "ir", "yearly").stdout.splitlines()
    assert "<invalid>" not in table[1]
    header = table[0]
    start = header.index("NEXT RUN")
    assert table[1][start:].split()[0] == status["nextScheduleTime"]
    assert status["nextScheduleTime"].endswith("-01-01T03:00:00Z")
