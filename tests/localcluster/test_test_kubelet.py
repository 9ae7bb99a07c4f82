"""The test kubelet against the real control plane: Jobs, environment, mounts, OOM, RBAC, deletion."""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path
from typing import Any, cast

import psutil
import pytest
from kubernetes import client, utils
from kubernetes.client.exceptions import ApiException

from localcluster.cluster import LocalCluster
from tests.polling import wait_for

pytestmark = pytest.mark.cluster


def create(api: client.ApiClient, namespace: str, *objects: dict[str, Any]) -> None:
    for obj in objects:
        utils.create_from_dict(api, obj, namespace=namespace)


def as_json(response: Any) -> dict[str, Any]:
    """An object as the API server sends it (plain JSON): read with ``_preload_content=False``."""
    return dict(json.loads(response.data))


def read_pod(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any] | None:
    """The Pod, or None once it is gone."""
    try:
        return as_json(client.CoreV1Api(api).read_namespaced_pod(name, namespace, _preload_content=False))
    except ApiException as error:
        if error.status == 404:
            return None
        raise


def finished_pod(api: client.ApiClient, namespace: str, name: str, timeout: float = 60) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        pod = read_pod(api, namespace, name)
        return pod if pod and pod["status"].get("phase") in ("Succeeded", "Failed") else None

    return wait_for(f"pod {name} to finish", probe, timeout)


def terminated(pod: dict[str, Any]) -> dict[str, Any]:
    return dict(pod["status"]["containerStatuses"][0]["state"]["terminated"])


def python_pod(name: str, script: str, **spec: Any) -> dict[str, Any]:
    container = {
        "name": "main",
        "image": "ignored-by-the-test-kubelet",
        "command": ["python", "-u", "-c", textwrap.dedent(script)],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    container.update(spec.pop("container", {}))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "containers": [container], **spec},
    }


def test_job_runs_to_completion_with_env_and_mounts(
    kube_cluster: LocalCluster, kube_api: client.ApiClient, namespace: str, tmp_path: Path
) -> None:
    host = tmp_path / "host"
    host.mkdir()
    script = """
        import json, os, sys
        names = ["TOKEN", "MODE", "POD_NAME", "POD_NAMESPACE", "MEMORY_MI", "OUT", "KUBERNETES_SERVICE_HOST"]
        report = {name: os.environ.get(name) for name in names}
        report["cwd"] = os.getcwd()
        report["argv"] = sys.argv[1:]
        with open(os.environ["OUT"], "w") as out:
            json.dump(report, out)
        with open(sys.argv[1], "w") as marker:
            marker.write("written through the hostPath mount")
    """
    pod_spec = python_pod("unused", script)["spec"]
    pod_spec["containers"][0].update(
        {
            "args": ["/host/marker.txt"],
            "workingDir": "/out",
            "resources": {"limits": {"memory": "256Mi"}},
            "volumeMounts": [{"name": "out", "mountPath": "/out"}, {"name": "host", "mountPath": "/host"}],
            "env": [
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {
                    "name": "MEMORY_MI",
                    "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}},
                },
                {"name": "OUT", "value": "/out/report.json"},
            ],
        }
    )
    pod_spec["volumes"] = [
        {"name": "out", "persistentVolumeClaim": {"claimName": "results"}},
        {"name": "host", "hostPath": {"path": str(host)}},
    ]
    create(
        kube_api,
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "creds"},
            "stringData": {"token": "s3cr3t"},
        },
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"}, "data": {"mode": "fast"}},
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "results"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        },
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "report"},
            "spec": {"backoffLimit": 0, "template": {"spec": pod_spec}},
        },
    )

    batch = client.BatchV1Api(kube_api)

    def job_complete() -> bool:
        job = as_json(batch.read_namespaced_job_status("report", namespace, _preload_content=False))
        conditions = job["status"].get("conditions") or []
        return any(c["type"] == "Complete" and c["status"] == "True" for c in conditions)

    wait_for("the Job to complete", job_complete, timeout=60)
    core = client.CoreV1Api(kube_api)
    pods = as_json(core.list_namespaced_pod(namespace, label_selector="job-name=report", _preload_content=False))
    assert len(pods["items"]) == 1
    pod_name = pods["items"][0]["metadata"]["name"]
    pod = finished_pod(kube_api, namespace, pod_name)
    assert pod["status"]["phase"] == "Succeeded"
    assert terminated(pod)["reason"] == "Completed"
    assert terminated(pod)["exitCode"] == 0

    out_dir = kube_cluster.pvc_dir(namespace, "results")
    report = json.loads((out_dir / "report.json").read_text())
    assert report == {
        "TOKEN": "s3cr3t",
        "MODE": "fast",
        "POD_NAME": pod_name,
        "POD_NAMESPACE": namespace,
        "MEMORY_MI": "256",
        "OUT": f"{out_dir}/report.json",
        "KUBERNETES_SERVICE_HOST": None,
        "cwd": str(out_dir),
        "argv": [f"{host}/marker.txt"],
    }
    assert (host / "marker.txt").read_text() == "written through the hostPath mount"


def test_failures_are_reported_with_exit_code_reason_and_log_tail(kube_api: client.ApiClient, namespace: str) -> None:
    hungry = """
        import time
        hoard = []
        while True:
            hoard.append(bytearray(16 * 1024 * 1024))
            print("holding", len(hoard) * 16, "MiB")
            time.sleep(0.02)
    """
    failing = """
        import sys
        print("reading the source tree")
        sys.exit("fatal: source tree not found")
    """
    create(
        kube_api,
        namespace,
        python_pod("hungry", hungry, container={"resources": {"limits": {"memory": "128Mi"}}}),
        python_pod("failing", failing),
    )

    oom = finished_pod(kube_api, namespace, "hungry")
    assert oom["status"]["phase"] == "Failed"
    assert terminated(oom)["reason"] == "OOMKilled"
    assert terminated(oom)["exitCode"] == 137
    assert "holding" in terminated(oom)["message"]

    error = finished_pod(kube_api, namespace, "failing")
    assert error["status"]["phase"] == "Failed"
    assert terminated(error)["reason"] == "Error"
    assert terminated(error)["exitCode"] == 1
    assert terminated(error)["message"].splitlines() == [
        "reading the source tree",
        "fatal: source tree not found",
    ]


def test_service_account_kubeconfig_is_subject_to_rbac(kube_api: client.ApiClient, namespace: str) -> None:
    lister = f"""
        import sys
        from kubernetes import client, config
        from kubernetes.client.exceptions import ApiException
        config.load_kube_config()
        try:
            client.CoreV1Api().list_namespaced_config_map("{namespace}")
        except ApiException as error:
            sys.exit(f"status {{error.status}}")
        print("listed")
    """
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "lister"}}
    create(kube_api, namespace, account)
    # v1.20 admits a Pod only once the token controller has given its ServiceAccount a token Secret.
    core = client.CoreV1Api(kube_api)
    wait_for("the account's token", lambda: core.read_namespaced_service_account("lister", namespace).secrets)
    create(kube_api, namespace, python_pod("without-role", lister, serviceAccountName="lister"))
    refused = finished_pod(kube_api, namespace, "without-role")
    assert refused["status"]["phase"] == "Failed"
    assert "status 403" in terminated(refused)["message"]

    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "read-configmaps"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "lister-reads-configmaps"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "read-configmaps"},
        "subjects": [{"kind": "ServiceAccount", "name": "lister", "namespace": namespace}],
    }
    create(kube_api, namespace, role, binding, python_pod("with-role", lister, serviceAccountName="lister"))
    allowed = finished_pod(kube_api, namespace, "with-role")
    assert allowed["status"]["phase"] == "Succeeded", terminated(allowed)


def _running_pid(kube_api: client.ApiClient, namespace: str, name: str, pid_file: Path) -> psutil.Process:
    def probe() -> bool:
        pod = read_pod(kube_api, namespace, name)
        phase = (pod or {}).get("status", {}).get("phase")
        assert phase not in ("Succeeded", "Failed"), f"pod {name} ended early: {pod and pod['status']}"
        return phase == "Running" and pid_file.exists()

    wait_for(f"pod {name} to run", probe)
    return psutil.Process(int(pid_file.read_text()))


@pytest.mark.parametrize("obeys_sigterm", [True, False], ids=["obeys-sigterm", "ignores-sigterm"])
def test_deleting_a_running_pod_stops_its_process(
    kube_api: client.ApiClient, namespace: str, tmp_path: Path, obeys_sigterm: bool
) -> None:
    script = f"""
        import os, signal, sys, time
        def on_sigterm(*_):
            if {obeys_sigterm}:
                open("/work/got-sigterm", "w").close()
                sys.exit(0)
        signal.signal(signal.SIGTERM, on_sigterm)
        with open("/work/pid.tmp", "w") as out:
            out.write(str(os.getpid()))
        os.rename("/work/pid.tmp", "/work/pid")
        while True:
            time.sleep(0.05)
    """
    pod = python_pod(
        "sleeper",
        script,
        # Obeying, the Pod must go as soon as its process exits: far sooner than a grace period of 60 s, however
        # loaded the machine. Ignoring it, the process is killed when 2 s of grace have run out.
        terminationGracePeriodSeconds=60 if obeys_sigterm else 2,
        volumes=[{"name": "work", "hostPath": {"path": str(tmp_path)}}],
        container={"volumeMounts": [{"name": "work", "mountPath": "/work"}]},
    )
    create(kube_api, namespace, pod)
    process = _running_pid(kube_api, namespace, "sleeper", tmp_path / "pid")
    assert process.is_running()

    started = time.monotonic()
    client.CoreV1Api(kube_api).delete_namespaced_pod("sleeper", namespace)
    wait_for("the pod to be gone", lambda: read_pod(kube_api, namespace, "sleeper") is None, timeout=120)
    elapsed = time.monotonic() - started
    assert not process.is_running()
    assert (tmp_path / "got-sigterm").exists() == obeys_sigterm
    if obeys_sigterm:
        assert elapsed < 60, "the kubelet waited out the grace period although the process had exited"
    else:  # killed only once the grace period ran out
        assert elapsed >= 2


def test_restart_policy_always_restarts_with_backoff(kube_api: client.ApiClient, namespace: str) -> None:
    pod = python_pod("crasher", "import sys; sys.exit(3)", restartPolicy="Always")
    create(kube_api, namespace, pod)

    def restarted_twice() -> dict[str, Any] | None:
        current = read_pod(kube_api, namespace, "crasher")
        statuses = (current or {}).get("status", {}).get("containerStatuses") or []
        return current if statuses and statuses[0]["restartCount"] >= 2 else None

    current = wait_for("two restarts", restarted_twice, timeout=20)
    status = current["status"]["containerStatuses"][0]
    assert current["status"]["phase"] == "Running"
    assert status["lastState"]["terminated"]["exitCode"] == 3


def test_init_containers_run_first_and_share_volumes(kube_api: client.ApiClient, namespace: str) -> None:
    pod = python_pod(
        "with-init",
        "print(open('/shared/greeting').read())",
        volumes=[{"name": "shared", "emptyDir": {}}],
        container={"volumeMounts": [{"name": "shared", "mountPath": "/shared"}]},
        initContainers=[
            {
                "name": "prepare",
                "image": "ignored",
                "command": ["sh", "-c", "echo hello from init > /shared/greeting"],
                "volumeMounts": [{"name": "shared", "mountPath": "/shared"}],
            }
        ],
    )
    create(kube_api, namespace, pod)
    done = finished_pod(kube_api, namespace, "with-init")
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert done["status"]["initContainerStatuses"][0]["state"]["terminated"]["reason"] == "Completed"


def test_pods_sharing_an_embedded_qdrant_folder_run_one_at_a_time(
    kube_api: client.ApiClient, namespace: str, tmp_path: Path
) -> None:
    script = """
        import json, os, sys, time
        start = time.time()
        time.sleep(1.0)
        with open(f"/q/{os.environ['HOSTNAME']}.json", "w") as out:
            json.dump([start, time.time()], out)
    """
    for name in ("first", "second"):
        pod = python_pod(
            name,
            script,
            volumes=[{"name": "q", "hostPath": {"path": str(tmp_path)}}],
            container={
                "volumeMounts": [{"name": "q", "mountPath": "/q"}],
                "env": [{"name": "IMPORTER_QDRANT_PATH", "value": "/q/store"}],
            },
        )
        create(kube_api, namespace, pod)
    for name in ("first", "second"):
        assert finished_pod(kube_api, namespace, name)["status"]["phase"] == "Succeeded"
    spans = sorted(json.loads((tmp_path / f"{name}.json").read_text()) for name in ("first", "second"))
    assert spans[0][1] <= spans[1][0], f"runs overlapped: {spans}"


def test_finished_jobs_are_deleted_after_their_ttl(kube_api: client.ApiClient, namespace: str) -> None:
    """The TTLAfterFinished gate is on: the field is kept and the controller-manager deletes the Job."""
    batch = client.BatchV1Api(kube_api)
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "short-lived"},
        "spec": {
            "ttlSecondsAfterFinished": 1,
            "backoffLimit": 0,
            "template": {
                "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "x", "command": ["true"]}]}
            },
        },
    }
    created = batch.create_namespaced_job(namespace, cast(Any, job))  # the client takes plain dicts too
    assert created.spec is not None and created.spec.ttl_seconds_after_finished == 1

    def gone() -> bool | None:
        try:
            batch.read_namespaced_job("short-lived", namespace)
        except ApiException as error:
            return True if error.status == 404 else None
        return None

    wait_for("the finished Job to be deleted", gone, timeout=60)
