"""Both Pods meet the "restricted" Pod Security Standard, field by field.

Kubernetes 1.20 has no PodSecurity admission, so this reads the Pod templates themselves: the operator's from
the chart as rendered, the importer's from the Job the operator builds. The checks follow the standard's table
(https://kubernetes.io/docs/concepts/security/pod-security-standards/), baseline and restricted rows.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from localcluster.cluster import helm_binary
from tests.charts.operator_jobs import operator_job

CHART = Path(__file__).resolve().parents[2] / "charts" / "reflection-operator"
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}  # fmt: skip
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range",
}  # fmt: skip


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """Every way ``pod`` (a PodSpec) breaks the restricted standard; empty when it meets it."""
    found = []
    pod_sc = pod.get("securityContext") or {}
    containers = [*pod.get("initContainers", []), *pod["containers"], *pod.get("ephemeralContainers", [])]
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            found.append(f"{field} is set")
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']} is {kinds}")
    for sysctl in pod_sc.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            found.append(f"sysctl {sysctl['name']}")
    if (pod_sc.get("seLinuxOptions") or {}).get("type") not in (None, "", "container_t", "container_init_t"):
        found.append("pod seLinuxOptions.type")
    if pod_sc.get("runAsUser") == 0:
        found.append("pod runAsUser 0")
    for container in containers:
        name, sc = container["name"], container.get("securityContext") or {}
        if sc.get("privileged"):
            found.append(f"{name}: privileged")
        capabilities = sc.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            found.append(f"{name}: capabilities do not drop ALL")
        if set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: adds capabilities {capabilities['add']}")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            found.append(f"{name}: hostPort")
        if sc.get("procMount") not in (None, "Default"):
            found.append(f"{name}: procMount")
        if (sc.get("seLinuxOptions") or {}).get("type") not in (None, "", "container_t", "container_init_t"):
            found.append(f"{name}: seLinuxOptions.type")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation is not false")
        if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            found.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser") == 0:
            found.append(f"{name}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile {seccomp}")
    return found


def operator_pod() -> dict[str, Any]:
    rendered = subprocess.run(
        [str(helm_binary()), "template", "ro", str(CHART), "--namespace", "demo"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    (deployment,) = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Deployment"]
    return dict(deployment["spec"]["template"]["spec"])


def importer_pod() -> dict[str, Any]:
    raw = {
        "source": {"volume": {"persistentVolumeClaim": {"claimName": "claude-logs"}}, "subPath": "projects"},
        "qdrant": {"url": "http://qdrant:6333"},
        "resources": {"memory": "512Mi", "cpu": "1"},
    }
    return dict(operator_job(raw)["spec"]["template"]["spec"])


@pytest.mark.parametrize("pod", [operator_pod, importer_pod], ids=["operator", "importer"])
def test_the_pod_meets_the_restricted_standard(pod: Any) -> None:
    assert restricted_violations(pod()) == []


def test_the_check_notices_each_kind_of_violation() -> None:
    pod = importer_pod()
    container = pod["containers"][0]
    pod["hostNetwork"] = True
    pod["volumes"] = [*pod.get("volumes", []), {"name": "host", "hostPath": {"path": "/"}}]
    container["securityContext"] = {**container["securityContext"], "allowPrivilegeEscalation": True}
    container["securityContext"]["capabilities"] = {"drop": ["ALL"], "add": ["SYS_ADMIN"]}
    pod["securityContext"] = {**pod.get("securityContext", {}), "runAsNonRoot": False}
    container["securityContext"].pop("runAsNonRoot", None)
    found = restricted_violations(pod)
    assert "hostNetwork is set" in found
    assert any(v.startswith("volume host") for v in found)
    assert "importer: allowPrivilegeEscalation is not false" in found
    assert "importer: adds capabilities ['SYS_ADMIN']" in found
    assert "importer: runAsNonRoot is not true" in found
