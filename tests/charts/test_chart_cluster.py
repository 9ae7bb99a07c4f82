"""The chart and the manifests on the local cluster: the operator and the importer Jobs it makes run in their
containers on the real node, from the images built from the Dockerfile; the test reaches the operator's
endpoints at its Pod's address (the node's bridge is on this machine)."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from importer.model import prepare_model
from tests.polling import wait_for

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "reflection-operator"
EXAMPLES = REPO / "examples"
RELEASE = "ro"
OPERATOR_PODS = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=operator"
#: The chart's and the manifests' default ports (values.yaml: livenessPort, metrics.port).
LIVENESS_PORT, METRICS_PORT = 8080, 9090
#: The images' user: it writes the embedded store.
IMAGE_USER = 65532
#: What a fresh namespace holds before anyone installs anything (and what the namespace controller owns).
BUILT_IN = {("ServiceAccount", "default"), ("ConfigMap", "kube-root-ca.crt")}


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except OSError as error:
        return 0, str(error)


def operator_pods(kube_cluster: Any, kubectl_json: Any, namespace: str, selector: str = OPERATOR_PODS) -> list[Any]:
    return list(kubectl_json(kube_cluster, "-n", namespace, "get", "pods", "-l", selector)["items"])


def running_pod(kube_cluster: Any, kubectl_json: Any, namespace: str, selector: str = OPERATOR_PODS) -> Any:
    """The one operator Pod, once it is the only one and its container runs (else None)."""
    pods = operator_pods(kube_cluster, kubectl_json, namespace, selector)
    if len(pods) != 1 or pods[0]["metadata"].get("deletionTimestamp"):
        return None
    statuses = pods[0].get("status", {}).get("containerStatuses") or [{}]
    return pods[0] if "running" in statuses[0].get("state", {}) else None


def importrun_phase_in_table(kube_cluster: Any, namespace: str, name: str) -> str | None:
    """The PHASE column of `kubectl get importruns`, as a person reads it."""
    table = kube_cluster.kubectl_run("-n", namespace, "get", "importruns").stdout.splitlines()
    header = table[0].split() if table else []
    for row in table[1:]:
        cells = row.split()
        if cells and cells[0] == name:
            return cells[header.index("PHASE")]
    return None


def example(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d]


def leftovers(kube_cluster: Any, kubectl_json: Any, namespace: str) -> list[tuple[str, str]]:
    """Every object in the namespace, of every listable namespaced kind, but Events and the built-in ones."""
    kinds = kube_cluster.kubectl_run("api-resources", "--verbs=list", "--namespaced", "-o", "name", check=True)
    names = [k for k in kinds.stdout.split() if not k.startswith("events")]
    items = kubectl_json(kube_cluster, "-n", namespace, "get", ",".join(names))["items"]
    found = [(i["kind"], i["metadata"]["name"]) for i in items]
    return [
        (kind, name)
        for kind, name in found
        if (kind, name) not in BUILT_IN and not (kind == "Secret" and name.startswith("default-token-"))
    ]


def test_helm_install_runs_an_importrun_then_upgrade_rolls_and_uninstall_cleans_up(
    kube_cluster, cluster_helm, kubectl_json, namespace, importrun_crd, logs_tree, pod_readable_dir
):
    install = cluster_helm.run(
        "install", RELEASE, str(CHART), "--namespace", namespace, "--wait", "--timeout", "300s",
        "--set", "scope=namespace",
    )  # fmt: skip
    assert f"kubectl -n {namespace} get importruns -w" in install.stdout  # NOTES.txt: what to do next
    first = wait_for("the operator Pod to run", lambda: running_pod(kube_cluster, kubectl_json, namespace), 120)
    assert first["spec"]["containers"][0]["command"] == ["python", "-m", "reflection_operator"]
    address = first["status"]["podIP"]
    wait_for("the liveness endpoint", lambda: http_get(f"http://{address}:{LIVENESS_PORT}/healthz")[0] == 200, 60)
    code, body = http_get(f"http://{address}:{METRICS_PORT}/metrics")
    assert code == 200 and "reflection_runs_started_total" in body

    # The one-off example, on a hostPath with the generated tree and into an embedded Qdrant; the rest as it is.
    (importrun,) = example("importrun-once.yaml")
    original = copy.deepcopy(importrun["spec"])
    importrun["spec"]["source"]["volume"] = {"hostPath": {"path": str(logs_tree)}}
    store = pod_readable_dir("chart-qdrant")
    os.chown(store, IMAGE_USER, IMAGE_USER)
    importrun["spec"]["qdrant"] = {"path": "store", "volume": {"hostPath": {"path": str(store), "type": "Directory"}}}
    assert original["source"]["subPath"] == importrun["spec"]["source"]["subPath"] == "projects"
    kube_cluster.kubectl_run("-n", namespace, "apply", "-f", "-", input=yaml.safe_dump(importrun), check=True)
    name = importrun["metadata"]["name"]
    phase = wait_for(
        "kubectl get importruns to show Succeeded",
        lambda: (p := importrun_phase_in_table(kube_cluster, namespace, name)) in ("Succeeded", "Failed") and p,
        240,
    )
    status = kubectl_json(kube_cluster, "-n", namespace, "get", "importrun", name)["status"]
    assert phase == "Succeeded", status
    manifest = json.loads((logs_tree / "projects" / "MANIFEST.json").read_text())
    assert status["filesDone"] == status["filesTotal"] == manifest["files"] and status["chunks"] > 0, status
    # What it imported answers a search, as the README shows it.
    env = {**os.environ, "IMPORTER_MODEL_DIR": str(prepare_model())}
    search = subprocess.run(
        [sys.executable, "-m", "importer", "search", "--qdrant-path", str(store / "store"), "--limit", "2", "--json",
         "stream"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert search.returncode == 0, search.stdout + search.stderr
    hits = [json.loads(line) for line in search.stdout.splitlines()]
    assert 1 <= len(hits) <= 2 and all(hit["session_file"].endswith(".jsonl") for hit in hits), hits

    # A changed value rolls the operator: the old Pod goes (Recreate), a new one runs with the new setting.
    cluster_helm.run(
        "upgrade", RELEASE, str(CHART), "--namespace", namespace, "--reuse-values",
        "--set", "resyncSeconds=120", "--wait", "--timeout", "120s",
    )  # fmt: skip

    def rolled() -> Any:
        pod = running_pod(kube_cluster, kubectl_json, namespace)
        return pod if pod and pod["metadata"]["uid"] != first["metadata"]["uid"] else None

    second = wait_for("a new operator Pod", rolled, 120)
    env_of = {e["name"]: e.get("value") for e in second["spec"]["containers"][0]["env"]}
    assert env_of["REFLECTION_RESYNC_SECONDS"] == "120"
    address = second["status"]["podIP"]
    wait_for("the new operator to answer", lambda: http_get(f"http://{address}:{LIVENESS_PORT}/healthz")[0] == 200, 60)
    # The new operator is the one that lets the ImportRun go (it removes kopf's finalizer).
    deleted = kube_cluster.kubectl_run("-n", namespace, "delete", "importrun", name, "--timeout=90s")
    assert deleted.returncode == 0, deleted.stderr

    cluster_helm.run("uninstall", RELEASE, "--namespace", namespace, "--wait", "--timeout", "120s")
    wait_for("the namespace to be empty", lambda: not leftovers(kube_cluster, kubectl_json, namespace), 120)
    discovery = f"{namespace}-{RELEASE}-reflection-operator-discovery"
    for kind in ("clusterrole", "clusterrolebinding"):
        gone = kube_cluster.kubectl_run("get", kind, discovery)
        assert gone.returncode != 0 and "NotFound" in gone.stderr
    # Helm never deletes the CRDs it installed from crds/ (that would delete every ImportRun in the cluster).
    assert kube_cluster.kubectl_run("get", "crd", "importruns.reflection.dev").returncode == 0


@pytest.mark.parametrize("scope", ["cluster", "namespace"])
def test_helm_template_is_accepted_by_the_apiserver(kube_cluster, cluster_helm, namespace, importrun_crd, scope):
    """Everything the chart can render but the ServiceMonitor (no Prometheus Operator CRDs here)."""
    rendered = cluster_helm.run(
        "template", "dry", str(CHART), "--namespace", namespace, "--set", f"scope={scope}",
        "--set", "qdrant.enabled=true", "--set", "examples.enabled=true",
    ).stdout  # fmt: skip
    result = kube_cluster.kubectl_run("apply", "--dry-run=server", "-f", "-", input=rendered)
    assert result.returncode == 0, result.stderr
    accepted = [line for line in result.stdout.splitlines() if line.endswith("(server dry run)")]
    assert len(accepted) == len([d for d in yaml.safe_load_all(rendered) if d])
    assert any(line.startswith("statefulset.apps/dry-reflection-operator-qdrant") for line in accepted)
    assert any(line.startswith("importrun.reflection.dev/claude-logs") for line in accepted)


def is_subset(small: Any, big: Any) -> bool:
    if isinstance(small, dict):
        return isinstance(big, dict) and all(k in big and is_subset(v, big[k]) for k, v in small.items())
    if isinstance(small, list):
        return isinstance(big, list) and len(small) == len(big) and all(map(is_subset, small, big))
    return bool(small == big)


@pytest.mark.parametrize(
    "name",
    ["importrun-once.yaml", "importrun-scheduled.yaml", "importrun-voyage.yaml", "logs-pvc.yaml", "logs-copy-pod.yaml"],
)
def test_examples_are_accepted_without_losing_a_field(kube_cluster, namespace, importrun_crd, name):
    """The apiserver takes each example as it is; for ImportRuns no field is pruned as unknown to the CRD."""
    result = kube_cluster.kubectl_run(
        "-n", namespace, "apply", "--dry-run=server", "-f", str(EXAMPLES / name), "-o", "json"
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    returned = answer["items"] if answer["kind"] == "List" else [answer]
    for sent, got in zip(example(name), returned, strict=True):
        assert got["kind"] == sent["kind"]
        if sent["kind"] == "ImportRun":
            assert is_subset(sent["spec"], got["spec"]), (sent["spec"], got["spec"])


def test_kubectl_apply_of_the_manifests_installs_a_running_operator(kube_cluster, kubectl_json, importrun_crd):
    manifests = REPO / "manifests"
    applied = kube_cluster.kubectl_run("apply", "-f", str(manifests))
    try:
        assert applied.returncode == 0, applied.stderr
        for expected in (
            "namespace/reflection-system",
            "customresourcedefinition.apiextensions.k8s.io/importruns.reflection.dev",
            "clusterrole.rbac.authorization.k8s.io/reflection-operator",
            "serviceaccount/reflection-importer",
            "deployment.apps/reflection-operator",
            "service/reflection-operator-metrics",
        ):
            assert expected in applied.stdout, applied.stdout
        selector = "app.kubernetes.io/instance=reflection-operator,app.kubernetes.io/component=operator"
        pod = wait_for(
            "the operator Pod to run",
            lambda: running_pod(kube_cluster, kubectl_json, "reflection-system", selector),
            120,
        )
        assert pod["spec"]["serviceAccountName"] == "reflection-operator"
        assert re.fullmatch(r"reflection-operator:\S+", pod["spec"]["containers"][0]["image"])  # the image built here
        # It watches every namespace (scope cluster) and answers on the liveness port of the manifests.
        healthz = f"http://{pod['status']['podIP']}:{LIVENESS_PORT}/healthz"
        wait_for("the liveness endpoint", lambda: http_get(healthz)[0] == 200, 60)
        assert "importruns" in json.loads(http_get(healthz)[1])  # kopf's probe answer
        assert (
            running_pod(kube_cluster, kubectl_json, "reflection-system", selector)["status"]["containerStatuses"][0][
                "restartCount"
            ]
            == 0
        )
    finally:
        # Everything but the CRD: other tests' ImportRuns live by it. The cluster-wide operator must be gone
        # before anything else runs.
        kube_cluster.kubectl_run("delete", "-f", str(manifests / "02-operator.yaml"), "--wait=true", "--timeout=90s")
        kube_cluster.kubectl_run("-n", "reflection-system", "wait", "--for=delete", "pod", "--all", "--timeout=90s")
        kube_cluster.kubectl_run("delete", "-f", str(manifests / "00-namespace.yaml"), "--wait=false")
