"""The chart as rendered by the real helm: lint, schema, security defaults, RBAC, optional parts (no cluster)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from reflection_operator.rbac import IMPORTER_CONFIGMAP_VERBS
from reflection_operator.settings import Settings

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "reflection-operator"
OPERATOR_RBAC = REPO / "operator" / "rbac.yaml"
ALL_ON = ("qdrant.enabled=true", "examples.enabled=true", "metrics.serviceMonitor.enabled=true")


@pytest.mark.parametrize(
    "values",
    [(), ALL_ON, ("scope=namespace", *ALL_ON), ("importer.namespaces={team-a,team-b}", "rbac.discovery=false")],
    ids=["defaults", "all-on", "namespaced-all-on", "more-namespaces"],
)
def test_helm_lint_strict_passes(helm, values):
    sets = [arg for value in values for arg in ("--set", value)]
    result = helm.run("lint", "--strict", str(CHART), *sets, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("replicaCoutn=2", "Additional property replicaCoutn is not allowed"),
        ("image.pullpolicy=Always", "Additional property pullpolicy is not allowed"),
        ("qdrant.enable=true", "Additional property enable is not allowed"),
        ("metrics.port=nine", "Invalid type. Expected: integer"),
        ("scope=everywhere", "scope must be one of the following"),
        ("logFormat=xml", "logFormat must be one of the following"),
        ("importer.defaultMemory=lots", "importer.defaultMemory: Does not match pattern"),
        ("examples.qdrantUrl=qdrant:6333", "examples.qdrantUrl: Does not match pattern"),
    ],
)
def test_schema_rejects_typos_and_wrong_types(helm, value, message):
    result = helm.run("template", "ro", str(CHART), "--set", value, check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_every_value_is_commented():
    """Each key of values.yaml has a comment right above it (the children of resources are documented whole)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    uncommented = []
    parents: list[tuple[int, str]] = []
    for number, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z][\w.-]*):", line)
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2)
        parents = [(i, k) for i, k in parents if i < indent]
        path = ".".join([k for _, k in parents] + [key])
        parents.append((indent, key))
        free_form = any(k in ("resources", "podSecurityContext", "securityContext") for _, k in parents[:-1])
        if not free_form and not lines[number - 1].lstrip().startswith("#"):
            uncommented.append(path)
    assert uncommented == []


def test_schema_and_values_agree():
    """Every value in values.yaml is declared by the schema (so the defaults pass their own schema's checks)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(node: Any, spec: dict[str, Any], path: str) -> list[str]:
        missing = []
        if isinstance(node, dict) and "properties" in spec:
            for key, child in node.items():
                if key not in spec["properties"]:
                    missing.append(f"{path}{key}")
                else:
                    missing += walk(child, spec["properties"][key], f"{path}{key}.")
        return missing

    assert walk(values, schema, "") == []
    assert set(schema["properties"]) - {"global"} == set(values)


def test_operator_deployment_defaults(helm, find):
    objects = helm.template()
    deployment = find(objects, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    # The test kubelet runs exactly this command; so does the operator image's CMD.
    assert container["command"] == ["python", "-m", "reflection_operator"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])
    env = {e["name"]: e.get("value") for e in container["env"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert ports == {"healthz": int(env["REFLECTION_LIVENESS_PORT"]), "metrics": int(env["REFLECTION_METRICS_PORT"])}
    assert env["REFLECTION_NAMESPACES"] == ""  # scope cluster: every namespace
    assert env["REFLECTION_IMPORTER_IMAGE"] == "reflection-importer:0.1.0"
    assert env["REFLECTION_IMPORTER_SERVICE_ACCOUNT"] == "reflection-importer"
    assert pod["serviceAccountName"] == find(objects, "ServiceAccount", "ro-reflection-operator")["metadata"]["name"]
    service = find(objects, "Service", "ro-reflection-operator-metrics")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert service["spec"]["selector"] == spec["selector"]["matchLabels"]
    for item in objects:
        labels = item["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "ro"
        assert labels["app.kubernetes.io/name"] == "reflection-operator"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"


def test_chart_defaults_are_the_operators_defaults(helm, find):
    """With default values the operator runs exactly as with no settings at all (so the two cannot drift)."""
    (container,) = find(helm.template(), "Deployment")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if e["name"].startswith("REFLECTION_")}
    assert Settings.from_env(env) == Settings()


def test_the_deployment_environment_is_what_the_operator_reads(helm, find):
    """Values reach the operator as REFLECTION_* variables its Settings accept, with the values meant."""
    objects = helm.template(
        "scope=namespace",
        "importer.jobTTLSeconds=1000000",
        "importer.command={python,-m,importer,run,--no-progress}",
        "importer.modelDir=/models/minilm",
        "resyncSeconds=120",
        namespace="team",
    )
    (container,) = find(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    settings = Settings.from_env(env)
    assert settings.namespaces == ("team",)
    assert settings.job_ttl_seconds == 1_000_000  # not "1e+06"
    assert settings.importer_command == ("python", "-m", "importer", "run", "--no-progress")
    assert settings.importer_model_dir == "/models/minilm"
    assert settings.resync_seconds == 120
    assert settings.importer_service_account == "reflection-importer"


def rules_of(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    matches = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(matches) == 1, [o["metadata"]["name"] for o in objects if o["kind"] == kind]
    return list(matches[0]["rules"])


def test_rbac_is_the_operators_own_in_either_scope(helm, find):
    documents = yaml.safe_load_all(OPERATOR_RBAC.read_text())
    reference = {d["metadata"]["name"]: d["rules"] for d in documents if d["kind"] == "ClusterRole"}
    cluster = helm.template()
    assert rules_of(cluster, "ClusterRole", "ro-reflection-operator") == reference["reflection-operator"]
    assert (
        rules_of(cluster, "ClusterRole", "ro-reflection-operator-discovery")
        == reference["reflection-operator-discovery"]
    )
    assert not [o for o in cluster if o["kind"] == "Role" and o["metadata"]["name"] == "ro-reflection-operator"]
    binding = find(cluster, "ClusterRoleBinding", "ro-reflection-operator")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "ro-reflection-operator", "namespace": "demo"}]

    namespaced = helm.template("scope=namespace")
    assert rules_of(namespaced, "Role", "ro-reflection-operator") == reference["reflection-operator"]
    assert find(namespaced, "RoleBinding", "ro-reflection-operator")["roleRef"]["kind"] == "Role"
    # The only cluster-scoped objects of a namespaced release carry the namespace in their names.
    cluster_scoped = [o["metadata"]["name"] for o in namespaced if o["kind"].startswith("Cluster")]
    assert cluster_scoped == ["demo-ro-reflection-operator-discovery"] * 2
    without_discovery = helm.template("scope=namespace", "rbac.discovery=false")
    assert not [o for o in without_discovery if o["kind"].startswith("Cluster")]


def test_importer_account_reaches_only_configmaps_where_importruns_live(helm, find):
    objects = helm.template("importer.namespaces={team-a,demo}")
    roles = [o for o in objects if o["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["demo", "team-a"]
    for role in roles:
        assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"], "verbs": IMPORTER_CONFIGMAP_VERBS}]
    accounts = [o for o in objects if o["kind"] == "ServiceAccount" and o["metadata"]["name"] == "reflection-importer"]
    assert sorted(a["metadata"]["namespace"] for a in accounts) == ["demo", "team-a"]
    binding = find([o for o in objects if o["metadata"].get("namespace") == "team-a"], "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "reflection-importer", "namespace": "team-a"}]
    # In scope "namespace" the operator sees only its own namespace: more namespaces are refused, not ignored.
    result = helm.run(
        "template", "ro", str(CHART), "--set", "scope=namespace", "--set", "importer.namespaces={x}", check=False
    )
    assert result.returncode != 0 and "importer.namespaces is for scope" in result.stderr


def test_optional_parts_are_off_by_default(helm):
    kinds = sorted({o["kind"] for o in helm.template()})
    assert kinds == [
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
    ]


def test_bundled_qdrant_and_the_example_importrun_that_uses_it(helm, find):
    objects = helm.template(*ALL_ON)
    statefulset = find(objects, "StatefulSet", "ro-reflection-operator-qdrant")
    pod = statefulset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert re.fullmatch(r"qdrant/qdrant:v\d+\.\d+\.\d+", container["image"])  # pinned
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    service = find(objects, "Service", "ro-reflection-operator-qdrant")
    assert sorted(p["port"] for p in service["spec"]["ports"]) == [6333, 6334]
    importrun = find(objects, "ImportRun", "claude-logs")
    assert importrun["spec"]["qdrant"] == {"url": "http://ro-reflection-operator-qdrant.demo.svc:6333"}
    assert find(objects, "PersistentVolumeClaim", "claude-logs")
    monitor = find(objects, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    # The example needs a Qdrant: the bundled one or a URL.
    result = helm.run("template", "ro", str(CHART), "--set", "examples.enabled=true", check=False)
    assert result.returncode != 0 and "examples.enabled needs examples.qdrantUrl" in result.stderr
    elsewhere = helm.template(
        "examples.enabled=true", "examples.qdrantUrl=http://qdrant.db:6333", "examples.schedule=@hourly"
    )
    assert find(elsewhere, "ImportRun")["spec"]["qdrant"]["url"] == "http://qdrant.db:6333"
    assert find(elsewhere, "ImportRun")["spec"]["schedule"] == "@hourly"


def test_chart_version_matches_the_project(helm):
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    pyproject = (REPO / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M)
    assert version is not None and chart["appVersion"] == version.group(1)
    assert chart["kubeVersion"] == ">=1.20.0-0"
