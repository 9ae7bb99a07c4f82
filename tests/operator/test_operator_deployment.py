"""The operator as it is deployed: under its own RBAC only, and through `python -m reflection_operator`."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.polling import wait_for

RBAC = Path(__file__).resolve().parents[2] / "operator" / "rbac.yaml"


@pytest.fixture
def operator_kubeconfig(k8s, kube_cluster, tmp_path: Path) -> Iterator[Path]:
    """A kubeconfig for a ServiceAccount with the operator's roles: the main one bound in the test namespace
    (as for a namespace-scoped install), the discovery one cluster-wide."""
    roles = [d for d in yaml.safe_load_all(RBAC.read_text()) if d["kind"] == "ClusterRole"]
    kube_cluster.kubectl_run("apply", "-f", "-", input=yaml.safe_dump_all(roles), check=True)
    discovery = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": f"discovery-{k8s.namespace}"},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": "reflection-operator-discovery",
        },
        "subjects": [{"kind": "ServiceAccount", "name": "reflection-operator", "namespace": k8s.namespace}],
    }
    kube_cluster.kubectl_run("apply", "-f", "-", input=yaml.safe_dump(discovery), check=True)
    k8s.apply(
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "reflection-operator"}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "reflection-operator"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "reflection-operator"},
            "subjects": [{"kind": "ServiceAccount", "name": "reflection-operator", "namespace": k8s.namespace}],
        },
    )
    account = wait_for(
        "the ServiceAccount's token", lambda: (k8s.get("sa", "reflection-operator") or {}).get("secrets")
    )
    secret = k8s.get("secret", account[0]["name"])
    config = yaml.safe_load(kube_cluster.kubeconfig.read_text())
    config["users"][0]["user"] = {"token": base64.b64decode(secret["data"]["token"]).decode()}
    path = tmp_path / "operator.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    yield path
    kube_cluster.kubectl_run("delete", "clusterrolebinding", f"discovery-{k8s.namespace}")


def test_the_operator_works_with_only_the_permissions_of_its_role(
    k8s, run_operator, operator_env, kube_cluster, small_corpus, operator_kubeconfig, monkeypatch
):
    """A Job is made and watched with its Pod, the state ConfigMap is made, the status and Events are written,
    the finalizer is removed on deletion: all under operator/rbac.yaml, which grants no access to Secrets."""
    source, _ = small_corpus
    kubeconfig = operator_kubeconfig

    def as_operator(*args: str) -> subprocess.CompletedProcess[str]:
        return kube_cluster.kubectl_run("--kubeconfig", str(kubeconfig), "-n", k8s.namespace, *args)

    k8s.run("create", "secret", "generic", "qdrant", "--from-literal=api-key=s3cret")
    for denied in (as_operator("get", "deployments"), as_operator("get", "secret", "qdrant")):
        assert denied.returncode != 0 and "forbidden" in denied.stderr.lower()
    # What explains a run that cannot start: its Jobs' Events, the namespace's Pod Security label.
    namespace_by_name = ("get", "namespaces", f"--field-selector=metadata.name={k8s.namespace}")
    for allowed in (as_operator("get", "events"), as_operator(*namespace_by_name)):
        assert allowed.returncode == 0, allowed.stderr
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    body = {
        "apiVersion": "reflection.dev/v1alpha1",
        "kind": "ImportRun",
        "metadata": {"name": "limited"},
        "spec": {
            "source": {"volume": {"hostPath": {"path": str(source)}}},
            "qdrant": {"url": "http://127.0.0.1:9", "apiKeySecretRef": {"name": "qdrant", "key": "api-key"}},
            "resources": {"memory": "1Gi"},
            "failureRetry": {"maxRetries": 0},
            "failedRunsHistoryLimit": 0,
        },
    }
    k8s.apply(body)
    with run_operator(k8s.namespace) as runner:
        status = k8s.wait_phase("limited", "Failed", timeout=240)
        # failedRunsHistoryLimit 0: the failed run's Job is deleted once its outcome is recorded.
        wait_for("the failed Job to be deleted", lambda: k8s.jobs("limited") == [], timeout=60)
        k8s.run("delete", "importrun", "limited", "--wait=true", "--timeout=60s")
    assert status["lastFailure"]["reason"] == "Error"
    assert {"RunStarted", "RunFailed"} <= set(k8s.event_reasons("limited"))
    assert "403" not in runner.output and "Forbidden" not in runner.output, runner.output[-3000:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read().decode()


def test_python_dash_m_runs_the_operator_with_liveness_metrics_and_json_logs(
    k8s, operator_env, small_corpus, embedded_importrun
):
    source, _ = small_corpus
    liveness, metrics = free_port(), free_port()
    env = {
        **os.environ,
        **operator_env,
        "REFLECTION_NAMESPACES": k8s.namespace,
        "REFLECTION_LIVENESS_PORT": str(liveness),
        "REFLECTION_METRICS_PORT": str(metrics),
        "REFLECTION_LOG_FORMAT": "json",
    }
    k8s.apply(embedded_importrun("entry", source, suspend=True))
    process = subprocess.Popen(
        [sys.executable, "-m", "reflection_operator"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        wait_for("the ImportRun to be suspended", lambda: k8s.status("entry").get("phase") == "Suspended", 60)
        code, _ = http_get(f"http://127.0.0.1:{liveness}/healthz")
        assert code == 200
        code, text = http_get(f"http://127.0.0.1:{metrics}/metrics")
        assert code == 200 and "reflection_runs_started_total" in text and "reflection_reconcile_errors_total" in text
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=60)
        k8s.run("delete", "importrun", "entry", "--wait=false")
    lines = [line for line in output.decode().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert records and len(records) >= len(lines) - 2, lines[:20]  # structured logs
    assert process.returncode == 0, lines[-20:]
    assert any("configured" in r.get("message", "") for r in records)


def test_importer_rbac_command_prints_what_the_importer_needs():
    result = subprocess.run(
        [sys.executable, "-m", "reflection_operator", "importer-rbac", "-n", "team"],
        capture_output=True,
        text=True,
        check=True,
    )
    kinds = [d["kind"] for d in yaml.safe_load_all(result.stdout)]
    assert kinds == ["ServiceAccount", "Role", "RoleBinding"]
    role = list(yaml.safe_load_all(result.stdout))[1]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create", "update"]}]
