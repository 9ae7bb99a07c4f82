"""Shared test configuration: the local control plane's fixtures (kube_cluster, kube_api, namespace) and the
ImportRun CRD on it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ["localcluster.pytest_plugin"]

CRD_PATH = (
    Path(__file__).resolve().parents[1] / "charts" / "reflection-operator" / "crds" / "importruns.reflection.dev.yaml"
)


@pytest.fixture(scope="session")
def importrun_crd(kube_cluster: Any) -> Path:
    """The ImportRun CRD, applied from the chart (its single source) once per session, and established."""
    kube_cluster.kubectl_run("apply", "-f", str(CRD_PATH), check=True)
    kube_cluster.kubectl_run(
        "wait", "--for=condition=established", "--timeout=60s", "crd/importruns.reflection.dev", check=True
    )
    return CRD_PATH
