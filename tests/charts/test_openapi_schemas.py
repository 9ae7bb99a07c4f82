"""Every object the chart renders and every Job the operator builds, against Kubernetes' OpenAPI schemas.

kubernetes-validate 1.37 carries the schemas of 1.25 to 1.37; 1.20 (the oldest version we support) is only in
its older releases, so its 1.23.4 source release is fetched once (pip, into the cache) and run beside the new
one in a subprocess. Custom resources (ImportRun) have no schema there; the API server checks those
(tests/charts/test_chart_cluster.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

from localcluster.cluster import helm_binary
from tests.charts.operator_jobs import operator_job

CHART = Path(__file__).resolve().parents[2] / "charts" / "reflection-operator"
OLD_RELEASE = "1.23.4"
#: Value sets that switch on every optional part of the chart.
VALUE_SETS = {
    "defaults": [],
    "namespace-scope": ["scope=namespace"],
    "everything": ["qdrant.enabled=true", "metrics.serviceMonitor.enabled=true", "examples.enabled=true"],
}


def rendered(values: list[str]) -> list[dict[str, Any]]:
    sets = [arg for value in values for arg in ("--set", value)]
    result = subprocess.run(
        [str(helm_binary()), "template", "ro", str(CHART), "--namespace", "demo", "--include-crds", *sets],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def operator_jobs() -> list[dict[str, Any]]:
    """Jobs of the operator for a plain spec and for one that uses every optional field it turns into the Job."""
    specs = [
        {
            "source": {"volume": {"persistentVolumeClaim": {"claimName": "logs"}}, "subPath": "projects"},
            "qdrant": {"url": "http://qdrant:6333"},
            "resources": {"memory": "512Mi", "cpu": "1"},
        },
        {
            "source": {"volume": {"hostPath": {"path": "/srv/logs"}}},
            "qdrant": {"path": "store", "volume": {"persistentVolumeClaim": {"claimName": "qdrant"}}},
            "resources": {"memory": "1Gi", "cpu": "2"},
            "parallelism": 2,
            "tuning": {"checkpointSeconds": 0.5, "settleSeconds": 1},
        },
    ]
    return [operator_job(raw) for raw in specs]


def all_objects() -> list[tuple[str, dict[str, Any]]]:
    objects = [
        (f"{name}:{obj['kind']}/{obj['metadata']['name']}", obj)
        for name, values in VALUE_SETS.items()
        for obj in rendered(values)
    ]
    objects += [(f"job:{job['metadata']['name']}", job) for job in operator_jobs()]
    # Custom resources: the Prometheus Operator's ServiceMonitor, our ImportRun (CRDs themselves are checked).
    custom = ("monitoring.coreos.com/", "reflection.dev/")
    return [(label, o) for label, o in objects if not o["apiVersion"].startswith(custom)]


@pytest.mark.parametrize("version", all_versions())
def test_every_object_matches_the_schemas_of(version: str) -> None:
    for label, obj in all_objects():
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            raise AssertionError(f"{label} against {version}: {error.message} at {list(error.path)}") from error


@pytest.fixture(scope="session")
def old_validator() -> Path:
    """kubernetes-validate 1.23.4's package folder (schemas 1.10-1.23), fetched from PyPI once into the cache."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "reflection-operator"
    folder = base / f"kubernetes-validate-{OLD_RELEASE}"
    if not (folder / "kubernetes_validate" / "__init__.py").exists():
        download = folder.parent / f"{folder.name}.download"
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
             f"kubernetes-validate=={OLD_RELEASE}", "-d", str(download)],
            check=True, capture_output=True,
        )  # fmt: skip
        (sdist,) = download.glob("*.tar.gz")
        with tarfile.open(sdist) as archive:
            archive.extractall(download, filter="data")
        package = next(download.rglob("kubernetes_validate/__init__.py")).parent
        folder.mkdir(parents=True, exist_ok=True)
        package.rename(folder / "kubernetes_validate")
        shutil.rmtree(download)
    return folder


def test_every_object_matches_the_schemas_of_1_20(old_validator: Path, tmp_path: Path) -> None:
    files = []
    for index, (label, obj) in enumerate(all_objects()):
        path = tmp_path / f"{index:03d}-{label.replace('/', '_').replace(':', '_')}.yaml"
        path.write_text(yaml.safe_dump(obj))
        files.append(str(path))
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--kubernetes-version", "1.20.0", "--strict", *files],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(old_validator)}, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("INFO") == len(files), result.stdout  # each file reported as validated


def test_the_check_notices_a_field_the_schema_lacks() -> None:
    job = operator_jobs()[0]
    job["spec"]["template"]["spec"]["containers"][0]["memoryLimit"] = "1Gi"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, "1.37.0", strict=True)
